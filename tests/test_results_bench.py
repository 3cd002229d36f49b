"""bench/results.py: the plan, the aggregation over seeds on constructed metrics.json files, and one
smoke run end to end."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import results as R  # noqa: E402

TS = [1.0, 0.75, 0.5, 0.25]


def fake_metrics(path, fd, it_per_s, seed, bound, ratio):
    """A metrics.json as lcm_ddil.py writes it; FD at K = 4 is `fd`, K = 1 and 2 derived from it."""
    row = lambda f: {"fd": f, "kid": f / 10, "precision": 0.8, "recall": 0.9, "entropy": 2.3}  # noqa: E731
    os.makedirs(path)
    m = {"student": {"1": row(fd + 1), "2": row(fd + 0.5), "4": row(fd)},
         "teacher": {"4": row(10 + seed), "64": row(1 + seed)},
         "covariate_shift": {"t": TS, "err_data": [1.0] * 4, "err_own": ratio, "ratio": ratio,
                             "state_fd": [0.0] * 4},
         "it_per_s": it_per_s, "train_time_s": 100 / it_per_s, "config": {"seed": seed, "bound": bound}}
    with open(os.path.join(path, "metrics.json"), "w") as fh:
        json.dump(m, fh)


def test_plan_covers_the_grid_and_shares_ablation_runs():
    groups, runs = R.plan(R.H.parse_config(R.Config, []))
    main = [g for g in groups.values() if g["kind"] == "main"]
    abl = [g for g in groups.values() if g["kind"] == "ablation"]
    assert len(main) == 3 * 4 + 1 + len(R.EXTRA) and all(len(g["runs"]) == 3 for g in main)
    assert len(abl) == len(R.ABLATION) + len(R.SCHEDULES) and all(len(g["runs"]) == 2 for g in abl)
    # LCM (1,0,0) and (0.5,0,0.5) at bound none are the main grid's baseline and +DDIL runs
    assert groups["lcm ablation (1, 0, 0)"]["runs"] == groups["lcm baseline"]["runs"][:2]
    assert groups["lcm ablation (0.5, 0, 0.5)"]["runs"] == groups["lcm +DDIL"]["runs"][:2]
    assert len(runs) == 3 * 4 * 3 + 3 + 3 * len(R.EXTRA) + (len(R.ABLATION) - 2 + len(R.SCHEDULES)) * 2
    cfg = R.H.parse_config(R.Config, ["--runs-dir", "x"])

    def flags(label, seed=0):
        argv = R.argv_of(cfg, groups[label]["runs"][seed], runs[groups[label]["runs"][seed]])
        return {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--")}
    f = flags("dmd2 baseline")
    betas_bound = (f["--beta-data"], f["--beta-teacher"], f["--beta-student"], f["--bound"])
    assert betas_bound == ("0", "0", "1", "none")
    f = flags("dmd2 +DDIL (0.25, 0.25, 0.5)+reflect", 1)  # DMD2 with teacher rollouts
    assert (f["--beta-teacher"], f["--bound"], f["--seed"]) == ("0.25", "reflect", "1")
    f = flags("pd +DDIL+reflect", 2)
    assert (f["--beta-data"], f["--beta-student"], f["--bound"], f["--seed"]) == ("0.5", "0.5", "reflect", "2")
    assert flags("dmd2 baseline, 1-step G")["--steps"] == "1" and flags("lcm +reflect")["--steps"] == "4"
    assert flags("lcm +DDIL")["--beta-ramp"] == "0" and flags("lcm ablation (0.5, 0, 0.5) ramp 0.5")["--beta-ramp"] == "0.5"
    with pytest.raises(SystemExit, match="--only"):
        R.plan(R.H.parse_config(R.Config, ["--only", "lcm,gan"]))


def test_aggregation_over_seeds(tmp_path, monkeypatch, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "res"
    fds = {"baseline": [1.0, 2.0, 3.0], "+reflect": [2.5, 1.5, 2.0], "+DDIL": [0.1, 0.2, 0.3],
           "+DDIL+reflect": [0.4, 0.5, 0.6]}
    ips = {"baseline": 10.0, "+reflect": 8.0, "+DDIL": 5.0, "+DDIL+reflect": 4.0}
    for variant, (which, bound) in R.VARIANTS.items():
        betas = R.BASELINE["lcm"] if which == "baseline" else R.DDIL["lcm"]
        for seed, fd in enumerate(fds[variant]):
            ratio = [1.0, 2.0 + seed, 1.0, float("inf") if seed == 0 else 3.0]
            fake_metrics(str(runs_dir / R.run_name("lcm", 4, betas, bound, seed)), fd, ips[variant],
                         seed, bound, ratio)
    # --eval-every curves (train_s, fd) for seeds 0 and 1: the baseline ends at 2.0 (reached at 30 s);
    # DDIL seed 0 gets there at 24 s, seed 1 never
    curves = {("baseline", 0): [(10, 5.0), (20, 3.0), (30, 2.0)], ("baseline", 1): [(10, 4.0), (30, 2.0)],
              ("+DDIL", 0): [(12, 4.0), (24, 1.9), (36, 1.0)], ("+DDIL", 1): [(12, 4.0), (36, 2.5)]}
    for (variant, seed), curve in curves.items():
        betas = R.BASELINE["lcm"] if variant == "baseline" else R.DDIL["lcm"]
        with open(runs_dir / R.run_name("lcm", 4, betas, "none", seed) / "log.jsonl", "w") as fh:
            fh.write(json.dumps({"step": 1, "time": 0.5, "loss": 1.0}) + "\n")  # not a curve record
            for t, fd in curve:
                fh.write(json.dumps({"step": t, "time": t + 5, "train_s": t, "fd": fd}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the results must not need matplotlib
    res = R.main(["--budget", "smoke", "--seeds", "0", "1", "2", "--only", "lcm", "--runs-dir",
                  str(runs_dir), "--out", str(out), "--no-run"])
    assert "pip install matplotlib" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["results.json", "table.md"]

    rows = {(r["variant"], r["K"]): r for r in res["rows"]}
    assert len(rows) == 4 * 3  # K = 1, 2, 4 per variant
    s = rows[("baseline", 4)]["fd"]
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == pytest.approx((2.0, 1.0, 1.0, 3.0, 3))
    assert rows[("baseline", 1)]["fd"]["mean"] == pytest.approx(3.0)
    assert rows[("+DDIL", 4)]["kid"]["mean"] == pytest.approx(0.02)
    assert rows[("+DDIL", 4)]["fd"]["std"] == pytest.approx(0.1)
    d = rows[("+DDIL", 4)]["fd_vs_baseline"]
    assert d["delta"] == pytest.approx(-1.8) and d["beyond_spread"] is True
    assert rows[("+reflect", 4)]["fd_vs_baseline"]["beyond_spread"] is False
    # teacher rows: one per (bound, K) and seed, however many variants share that bound
    teacher = {(r["bound"], r["K"]): r for r in res["teacher"]}
    assert set(teacher) == {("none", 4), ("none", 64), ("reflect", 4), ("reflect", 64)}
    assert teacher[("none", 64)]["fd"]["n"] == 3 and teacher[("none", 64)]["fd"]["mean"] == pytest.approx(2.0)
    cost = res["cost"]["lcm"]
    assert cost["time_per_it_ratio"]["+DDIL / baseline"] == pytest.approx(2.0)
    assert cost["time_per_it_ratio"]["+DDIL+reflect / +reflect"] == pytest.approx(2.0)
    reach = cost["time_to_baseline_fd"]
    assert set(reach) == {"+DDIL / baseline"}  # the reflect pair has no curves
    assert reach["+DDIL / baseline"]["ddil_s"]["mean"] == 24 and reach["+DDIL / baseline"]["ddil_s"]["n"] == 1
    assert reach["+DDIL / baseline"]["baseline_s"]["mean"] == 30
    assert (reach["+DDIL / baseline"]["never_reached"], reach["+DDIL / baseline"]["runs"]) == (1, 2)
    assert "24 s against 30 ± 0 [30, 30] s (1 of 2 seeds never)" in (out / "table.md").read_text()
    cs = res["covariate_shift"]["lcm"]["baseline"]
    assert cs["t"] == TS and cs["ratio"][1]["mean"] == pytest.approx(3.0)
    assert cs["ratio"][3]["n"] == 2 and cs["ratio"][3]["mean"] == pytest.approx(3.0)  # inf dropped

    table = (out / "table.md").read_text()
    assert table.splitlines()[2].startswith("Command: `python bench/results.py --budget smoke")
    assert "| lcm | baseline | 4 | 3 | 2 ± 1 [1, 3] |" in table
    assert "| lcm | +DDIL | 4 | 3 | 0.2 ± 0.1 [0.1, 0.3] |" in table and "-1.8 (beyond spread)" in table
    assert "| none | 64 | 3 |" in table and "+DDIL / baseline = 2.00" in table
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1, 2]

    # --check: a rerun of the same runs agrees with itself; a shifted committed row does not
    committed = tmp_path / "committed.json"
    committed.write_text((out / "results.json").read_text())
    res = R.main(["--budget", "smoke", "--seeds", "0", "1", "2", "--only", "lcm", "--runs-dir",
                  str(runs_dir), "--out", str(out), "--no-run", "--check", str(committed)])
    assert res["check"]["agree"] == res["check"]["compared"] > 0 and not res["check"]["outside"]
    old = json.loads(committed.read_text())
    for r in old["rows"]:
        if (r["variant"], r["K"]) == ("+DDIL", 4):
            r["fd"].update(min=0.5, max=0.6)  # the rerun's mean 0.2 is now outside
    committed.write_text(json.dumps(old))
    res = R.main(["--budget", "smoke", "--seeds", "0", "1", "2", "--only", "lcm", "--runs-dir",
                  str(runs_dir), "--out", str(out), "--no-run", "--check", str(committed)])
    assert res["check"]["agree"] == res["check"]["compared"] - 1
    assert res["check"]["outside"] == ["lcm +DDIL K=4 fd: 0.2 outside [0.5, 0.6]"]
    assert "check against" in capsys.readouterr().out

    # a missing run is reported, and the rest still aggregated
    os.remove(runs_dir / R.run_name("lcm", 4, R.DDIL["lcm"], "none", 2) / "metrics.json")
    res = R.main(["--budget", "smoke", "--seeds", "0", "1", "2", "--only", "lcm", "--runs-dir",
                  str(runs_dir), "--out", str(out), "--no-run"])
    assert res["missing"] == [R.run_name("lcm", 4, R.DDIL["lcm"], "none", 2)]
    assert {(r["variant"], r["K"]): r for r in res["rows"]}[("+DDIL", 4)]["fd"]["n"] == 2


@pytest.mark.slow
def test_smoke_run_end_to_end(tiny_teacher, tmp_path, capsys):
    argv = ["--budget", "smoke", "--seeds", "0", "--only", "lcm", "--teacher", tiny_teacher,
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "res")]
    res = R.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("command: python bench/results.py --budget smoke") and "[4/4]" in printed
    assert not res["failed"] and not res["missing"]
    rows = {(r["variant"], r["K"]): r for r in res["rows"]}
    assert set(rows) == {(v, k) for v in R.VARIANTS for k in (1, 2, 4)}
    assert all(r["fd"]["n"] == 1 and math.isfinite(r["fd"]["mean"]) for r in rows.values())
    # each variant ran with its own flags
    for v, (which, bound) in R.VARIANTS.items():
        betas = R.BASELINE["lcm"] if which == "baseline" else R.DDIL["lcm"]
        cfg = json.loads((tmp_path / "runs" / R.run_name("lcm", 4, betas, bound, 0) / "config.json").read_text())
        assert cfg["bound"] == bound and cfg["teacher"] == tiny_teacher
        assert (cfg["beta_data"], cfg["beta_student"]) == ((1, 0) if which == "baseline" else (0.5, 0.5))
    assert res["cost"]["lcm"]["it_per_s"]["+DDIL"]["n"] == 1
    assert res["cost"]["lcm"]["time_to_baseline_fd"]["+DDIL / baseline"]["runs"] == 1  # the curves exist
    assert len(res["covariate_shift"]["lcm"]["+DDIL"]["t"]) == 4
    assert "| lcm | +DDIL+reflect | 4 | 1 |" in (tmp_path / "res" / "table.md").read_text()
    try:
        import matplotlib  # noqa: F401
        for name in ("fd.png", "covariate_shift.png", "fd_curves.png"):
            assert 0 < os.path.getsize(tmp_path / "res" / name) < 100_000
    except ImportError:
        pass
    # a rerun resumes: nothing left to train
    R.main(argv)
    assert "4 runs, 4 already done, 0 to run" in capsys.readouterr().out
