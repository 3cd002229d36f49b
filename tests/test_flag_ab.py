"""bench/flag_ab.py: A is the benchmark's own run of the cell, B the same run with the flag; the
difference is paired by seed; a fresh checkout keeps the committed seeds; bad cells stop first."""
import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import flag_ab as A  # noqa: E402


def test_bad_cells_and_flags_stop_before_any_run(tmp_path):
    base = ["--runs-dir", str(tmp_path / "r"), "--out", str(tmp_path / "o")]
    for argv, msg in ((["--name", "x"], "give B's flags"),
                      (["--flags", "--fake-states own", "--name", "a b"], "letters"),
                      (["--flags", "--x 1", "--name", "x", "--k", "3"], "no benchmark cell"),
                      (["--flags", "--x 1", "--name", "x", "--variant", "+reflect",
                        "--method", "pd"], "no benchmark cell"),
                      (["--flags", "--x 1", "--name", "x", "--seeds", "0", "0"], "distinct")):
        with pytest.raises(SystemExit, match=msg):
            A.main(argv + base)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_smoke_pairs_b_against_the_benchmarks_own_run(tiny_teacher, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--budget", "smoke", "--lab", "uncond", "--method", "lcm", "--k", "2",
            "--variant", "+DDIL", "--flags", "--student-states grid", "--name", "grid",
            "--seeds", "0", "1", "--teacher", tiny_teacher, "--jobs", "2",
            "--runs-dir", str(runs), "--out", str(out)]
    res = A.main(argv)
    a0, b0 = "uncond-lcm-K2-b0.5_0_0.5-none-s0", "uncond-lcm-K2-b0.5_0_0.5-none-s0-grid"
    assert sorted(os.listdir(runs)) == sorted([a0, b0, a0[:-1] + "1", b0.replace("s0", "s1")])
    assert json.loads((runs / a0 / "config.json").read_text())["student_states"] == "taus"
    assert json.loads((runs / b0 / "config.json").read_text())["student_states"] == "grid"
    fd = res["rows"]["fd"]
    m = {n: json.loads((runs / n / "metrics.json").read_text())["student"]["2"]["fd"]
         for n in (a0, b0)}
    assert fd["seeds"] == [0, 1] and fd["a"][0] == m[a0] and fd["b"][0] == m[b0]
    assert fd["ci"]["mean"] == pytest.approx(sum(fd["b"]) / 2 - sum(fd["a"]) / 2)
    assert fd["ci"]["lo"] is not None and "| fd |" in (out / "ab-grid.md").read_text()
    shutil.rmtree(runs)  # a fresh checkout: the committed seeds stay
    again = A.main(argv + ["--no-run"])
    assert again["rows"] == res["rows"]
