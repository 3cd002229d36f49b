"""bench/rehearsal.py, the CPU rehearsal of docs/reproduce.md's torchrun commands: every
documented command parses with its script's flags and finds its teacher (fast, --dry); a
corrupted flag in a copy of the page fails it, before torchrun (fast) and inside it (slow); and
(slow, about 70 s) the CIFAR-10 commands at 2 gloo ranks through a SIGKILL and a resume, ranks
agreeing, one method equal to an uninterrupted run bit for bit. The 8-rank rehearsal itself
(python bench/rehearsal.py) is not part of the suite: its wall time is in docs/reproduce.md."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
LCM_BASELINE = "--beta-data 1 --beta-student 0 --seed 0 --out runs/cifar10-lcm-baseline-s0"


def rehearsal():
    spec = importlib.util.spec_from_file_location("bench_rehearsal",
                                                  os.path.join(ROOT, "bench", "rehearsal.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corrupted(tmp_path, old, new):
    """A copy of reproduce.md with `old` replaced by `new` exactly once."""
    text = open(DOC).read()
    assert text.count(old) == 1, old
    path = tmp_path / "reproduce.md"
    path.write_text(text.replace(old, new))
    return str(path)


def rows(stdout):
    return [ln for ln in stdout.splitlines() if ln.startswith("| `")]


def test_the_documented_commands_parse_and_find_their_teachers(capsys):
    rh = rehearsal()
    lines = rh.documented_commands(DOC)
    scripts = {ln.split()[2] for ln in lines}
    assert scripts == set(rh.SHRINK), scripts  # every script documented, each with a SHRINK entry
    assert rh.main(["--dry"]) == 0, capsys.readouterr().out
    assert len(rows(capsys.readouterr().out)) == len(lines)


def test_only_paths_change_and_shrink_is_appended(tmp_path):
    rh = rehearsal()
    scratch = str(tmp_path)
    for line in rh.documented_commands(DOC):
        script, doc_args, run_args, dataset = rh.plan(line, scratch)
        assert dataset in rh.DATASETS
        for a, b in zip(doc_args, run_args):  # the documented part: runs/ paths moved, no more
            assert b == (os.path.join(scratch, a) if a.startswith("runs/") else a)
        data = os.path.join(scratch, "data", dataset)
        assert run_args[len(doc_args):] == (rh.SHRINK[script]
                                            + rh.SHRINK_DATASET.get((script, dataset), [])
                                            + ["--data-dir", data])
    with pytest.raises(ValueError, match="--iters"):  # SHRINK never overrides a documented flag
        rh.plan("torchrun --nproc_per_node=8 lcm_ddil.py --dataset cifar10 --iters 9", scratch)


def test_a_corrupted_flag_fails_the_dry_rehearsal(tmp_path, capsys):
    rh = rehearsal()
    typo = LCM_BASELINE.replace("--beta-student", "--beta-studnet")
    bad = corrupted(tmp_path, LCM_BASELINE, typo)
    assert rh.main(["--dry", "--doc", bad]) == 1
    failed = [r for r in rows(capsys.readouterr().out) if "FAIL" in r]
    assert len(failed) == 1 and "lcm_ddil" in failed[0] and "--beta-studnet" in failed[0], failed
    bad = corrupted(tmp_path, "--out runs/teacher-imagenet64-cond", "--out runs/teacher-in64")
    assert rh.main(["--dry", "--doc", bad]) == 1  # the methods' --teacher is written by nothing
    failed = [r for r in rows(capsys.readouterr().out) if "FAIL" in r]
    assert len(failed) == 5 and all("no teacher command" in r for r in failed), failed


def run(*args, timeout=600):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "rehearsal.py"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_two_ranks_rehearse_the_cifar10_commands_through_a_kill(tmp_path):
    rc, out = run("--ranks", "2", "--datasets", "cifar10", "--workdir", str(tmp_path / "ok"))
    table = rows(out)
    assert rc == 0 and len(table) == 5, out[-4000:]
    assert all("| 2 |" in r and "ok: killed after step" in r and "2 ranks agree" in r
               for r in table), table
    assert sum("= uninterrupted run bit for bit" in r for r in table) == 1, table  # 2 ranks: exact
    assert os.path.isfile(tmp_path / "ok" / "runs" / "cifar10-lcm-ddil-s0" / "ckpt.pt.rank1.step4")

    # a flag value that parses but breaks the run (the teacher's config.json for its ckpt.pt):
    # torchrun fails, and so does the rehearsal (only that line, reusing the teacher above)
    line = "lcm_ddil.py --dataset cifar10 --teacher runs/teacher-cifar10/ckpt.pt --beta-data 1"
    bad = corrupted(tmp_path, line, line.replace("ckpt.pt", "config.json"))
    rc, out = run("--ranks", "2", "--datasets", "cifar10", "--doc", bad,
                  "--workdir", str(tmp_path / "ok"), "--only", "cifar10-lcm-baseline-s0")
    table = rows(out)
    assert rc == 1 and len(table) == 1, out[-4000:]
    assert "FAIL: rc 1: error: could not load checkpoint" in table[0], table[0]
