"""bench/results.py: the paired statistics on a constructed case, the plan (the grid and each
run's flags), the aggregation on fabricated metrics.json files (pairing by seed, a missing seed
dropped on both sides), and a two-run smoke end to end."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import results as R  # noqa: E402
import lcm_ddil  # noqa: E402  (after results: it puts the root on sys.path)

TS = [1.0, 0.75, 0.5, 0.25]


def test_paired_ci_known_interval(monkeypatch):
    # differences [1, 2, 3, 4, 5]: mean 3, sd 1.5811, t_{0.975,4} = 2.7764, half-width 1.963;
    # MDD (2.7764 + 0.9410) 1.5811 / sqrt(5) = 2.629
    b = [10.0, 20.0, 30.0, 40.0, 50.0]
    a = [x + d for x, d in zip(b, [1, 2, 3, 4, 5])]
    c = R.paired_ci(a, b)
    assert c["n"] == 5 and c["mean"] == pytest.approx(3.0) and c["sd"] == pytest.approx(1.5811, abs=1e-4)
    assert c["half_width"] == pytest.approx(1.963, abs=1e-3)
    assert (c["lo"], c["hi"]) == pytest.approx((3 - 1.963, 3 + 1.963), abs=1e-3)
    assert c["mdd"] == pytest.approx(2.629, abs=1e-3)
    assert c["a"] == [11.0, 55.0] and c["b"] == [10.0, 50.0]
    # the order is the pairing: the same values paired otherwise give another interval
    assert R.paired_ci(a, b[::-1])["sd"] != pytest.approx(c["sd"])
    # the hard-coded t table (no scipy) gives the same interval
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert R.t_quantiles(4) == (2.7764, 0.941)
    assert R.paired_ci(a, b)["half_width"] == pytest.approx(1.963, abs=1e-3)
    assert R.t_quantiles(40) == (1.96, 0.8416)
    monkeypatch.undo()
    pytest.importorskip("scipy")
    assert all(R.t_quantiles(df) == pytest.approx((R.T975[df - 1], R.T80[df - 1]), abs=1e-4)
               for df in range(1, 31))
    # one pair: a difference, no interval; none: None; unequal arms: an error
    one = R.paired_ci([2.0], [1.5])
    assert one["mean"] == 0.5 and one["lo"] is None and one["mdd"] is None
    assert R.paired_ci([], []) is None
    with pytest.raises(ValueError):
        R.paired_ci([1.0, 2.0], [1.0])
    # verdicts: only an interval that excludes 0 decides
    assert R.verdict(c) == "worse" and R.verdict(R.paired_ci(b, a)) == "better"
    assert R.verdict(R.paired_ci(b, a), None) == "lower" and R.verdict(c, None) == "higher"
    assert R.verdict(R.paired_ci([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])) == "no difference"
    assert R.verdict(one) == "n < 2"


def test_plan_grid_and_flags():
    cells, runs = R.plan(R.H.parse_config(R.Config, []))
    # per lab: 3 methods x 4 variants x K in {2, 4} + DMD2's +reflect at K = 2, 4 + DMD2 K = 1
    # (baseline, +reflect); 2 labs, 5 seeds
    assert len(cells) == 2 * (3 * 4 * 2 + 2 + 2) == 56 and len(runs) == 56 * 5 == 280
    assert all(sorted(c["runs"]) == [0, 1, 2, 3, 4] for c in cells.values())
    assert {c["variant"] for c in cells.values() if c["steps"] == 1} == {"baseline", "+reflect"}
    assert {c["method"] for c in cells.values() if c["steps"] == 1} == {"dmd2"}
    order = [spec[-1] for spec in runs.values()]
    assert order == sorted(order)  # seed by seed: a benchmark stopped part-way has whole seeds
    cfg = R.H.parse_config(R.Config, ["--runs-dir", "x"])

    def flags(label, seed=0):
        name = cells[label]["runs"][seed]
        argv = R.argv_of(cfg, name, runs[name])
        assert argv[-1] == os.path.join("x", name)
        f = {a: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
             for i, a in enumerate(argv) if a.startswith("--")}
        # the stale-run check reads the whole config the command would write, flags by key
        config = R.config_of(argv)[0]
        for a, v in f.items():
            have = config[a[2:].replace("-", "_")]
            assert have is True if v is True else R.same_value(have, type(have)(v))
        return f
    f = flags("uncond dmd2 K=4 baseline")
    assert (f["--beta-data"], f["--beta-teacher"], f["--beta-student"], f["--bound"]) == ("0", "0", "1", "none")
    assert (f["--sample-bound"], f["--ref-samples"], f["--rollout-teacher-p"]) == ("clip", "5000", "0")
    assert "--eval-every" in f and "--cond" not in f and "--guidance" not in f
    f = flags("uncond pd K=2 baseline", 3)
    assert (f["--beta-data"], f["--beta-student"], f["--steps"], f["--seed"]) == ("1", "0", "2", "3")
    f = flags("cond lcm K=4 +DDIL mixed", 2)
    assert f["--cond"] is True and (f["--w-min"], f["--w-max"]) == ("1", "3") and "--guidance" not in f
    assert (f["--beta-data"], f["--beta-student"], f["--bound"], f["--rollout-teacher-p"]) == ("0.5", "0.5", "none", "0.5")
    assert cells["cond lcm K=4 +DDIL mixed"]["runs"][2] == "cond-lcm-K4-b0.5_0_0.5-none-mix0.5-s2"
    for method in ("pd", "dmd2"):
        f = flags(f"cond {method} K=2 +DDIL+reflect")
        assert f["--cond"] is True and f["--guidance"] == "2" and f["--bound"] == "reflect"
    for steps in (1, 2, 4):  # DMD2's default, (0, 0, 1) + reflect, at every K
        f = flags(f"cond dmd2 K={steps} +reflect")
        assert (f["--steps"], f["--beta-data"], f["--beta-student"], f["--bound"]) == (str(steps), "0", "1", "reflect")
    assert not any(c["variant"] == "+reflect" and c["method"] != "dmd2" for c in cells.values())
    assert all(flags(label)["--sample-bound"] == "clip" and "--eval-every" in flags(label) for label in cells)
    # every run has its own folder
    assert len(set(runs)) == len(runs)
    # the filters, and the teachers per lab
    cells, runs = R.plan(R.H.parse_config(R.Config, ["--lab", "cond", "--only", "dmd2,lcm", "--seeds", "7"]))
    assert len(cells) == 2 * 4 * 2 + 2 + 2 and {c["lab"] for c in cells.values()} == {"cond"}
    assert {c["method"] for c in cells.values()} == {"lcm", "dmd2"} and all(n.endswith("-s7") for n in runs)
    cfg = R.H.parse_config(R.Config, ["--teacher", "u.pt", "--teacher-cond", "c.pt", "--budget", "smoke"])
    name = next(iter(runs))
    argv = R.argv_of(cfg, name, runs[name])
    assert argv[argv.index("--teacher") + 1] == "c.pt" and "5000" not in argv
    with pytest.raises(SystemExit, match="--only"):
        R.plan(R.H.parse_config(R.Config, ["--only", "lcm,gan"]))
    with pytest.raises(SystemExit, match="--lab"):
        R.plan(R.H.parse_config(R.Config, ["--lab", "imagenet"]))


def test_cost_budget_trains_as_the_full_one():
    # --budget cost times iterations: every training flag of the full budget (batch size, teacher
    # sub-steps, ...) is the same; only the iteration count and the evaluation are cut
    def opts(flags):
        return dict(zip(flags[::2], flags[1::2]))
    cut = ("--iters", "--iters-per-stage", "--eval-every", "--eval-every-samples")
    for method in R.SCRIPTS:
        full, cost = opts(R.BUDGETS["full"][method]), opts(R.BUDGETS["cost"][method])
        train = {k: v for k, v in full.items() if k not in cut and "samples" not in k}
        assert {k: cost.get(k) for k in train} == train, method
        n = "--iters-per-stage" if method == "pd" else "--iters"
        assert int(full[n]) / 10 <= int(cost[n]) < int(full[n])
    assert R.H.parse_config(R.Config, ["--budget", "cost"]).budget == "cost"


def fake_metrics(path, fd, seed, *, fd_teacher=None, paired_px=None, ratio_last=1.0, it_per_s=10.0,
                 floor=0.01):
    """A metrics.json as the scripts write it at K = 4 (and K = 1), with a log.jsonl FD curve."""
    def row(f, ft, px):
        return {"fd": f, "kid": f / 10, "precision": 0.8, "recall": 0.9, "entropy": 2.3,
                "fd_teacher": ft, "kid_teacher": None if ft is None else ft / 10,
                "paired_px": px, "paired_feat": None if px is None else 2 * px}
    os.makedirs(path)
    m = {"student": {"1": row(fd + 1, None, 0.5), "4": row(fd, fd_teacher, paired_px)},
         "teacher": {"4": row(10 + seed, 9 + seed, 0.1), "64": row(1 + seed, 0.5, 0.0)},
         "w": None, "sample_bound": "clip",
         "teacher_ref": {"n": 16, "steps": 64, "floor_fd": floor, "floor_kid": floor / 10},
         "covariate_shift": {"t": TS, "err_data": [1.0] * 4, "err_own": [2.0, 1.5, 1.2, ratio_last],
                             "ratio": [2.0, 1.5, 1.2, ratio_last], "state_fd": [0.0] * 4},
         "it_per_s": it_per_s, "train_time_s": 100 / it_per_s, "config": {"seed": seed}}
    with open(os.path.join(path, "metrics.json"), "w") as fh:
        json.dump(m, fh)
    with open(os.path.join(path, "log.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")  # not a curve record
        for t, f in ((10, fd + 2), (20, fd)):
            fh.write(json.dumps({"step": t, "train_s": 3 * t, "fd": f, "kid": 0.0}) + "\n")
        fh.write(json.dumps({"step": 10, "train_s": 30, "fd": fd + 2, "kid": 0.0}) + "\n")  # resumed: again


def test_aggregation_pairs_by_seed(tmp_path, monkeypatch, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "res"
    argv = ["--budget", "smoke", "--seeds", "0", "1", "2", "3", "--only", "lcm", "--lab", "uncond",
            "--runs-dir", str(runs_dir), "--out", str(out), "--no-run"]
    cells, _ = R.plan(R.H.parse_config(R.Config, argv))
    base, ddil, mixed = (cells[f"uncond lcm K=4 {v}"]["runs"] for v in ("baseline", "+DDIL", "+DDIL mixed"))
    # baseline seeds 0..3; +DDIL lacks seed 2, so its pairs are seeds 0, 1, 3: differences
    # -2, -3, -4 in FD (the baseline's seed 2, 100, would move any unpaired mean), fd_teacher
    # 0.1, -0.1, 0 (no difference), paired_px null for a re-noising sampler
    fd_b = {0: 5.0, 1: 6.0, 2: 100.0, 3: 7.0}
    for s, fd in fd_b.items():
        fake_metrics(str(runs_dir / base[s]), fd, s, fd_teacher=1.0, ratio_last=2.0 + s / 10, it_per_s=10.0)
    for s, (d, dt) in {0: (-2, 0.1), 1: (-3, -0.1), 3: (-4, 0.0)}.items():
        fake_metrics(str(runs_dir / ddil[s]), fd_b[s] + d, s, fd_teacher=1.0 + dt, ratio_last=1.0, it_per_s=5.0,
                     floor=0.03)
    fake_metrics(str(runs_dir / mixed[0]), 4.0, 0, fd_teacher=1.0, it_per_s=4.0)  # one seed: no interval
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the results must not need matplotlib
    res = R.main(argv)
    assert "pip install matplotlib" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["results.json", "table.md"]

    rows = {(r["cell"], r["K"]): r for r in res["rows"]}
    b_row, d_row = rows[("uncond lcm K=4 baseline", 4)], rows[("uncond lcm K=4 +DDIL", 4)]
    assert (b_row["fd"]["n"], b_row["fd"]["max"], d_row["seeds"]) == (4, 100.0, [0, 1, 3])
    fd = d_row["vs_baseline"]["fd"]
    assert fd["seeds"] == [0, 1, 3] and fd["n"] == 3 and fd["mean"] == pytest.approx(-3.0)
    assert fd["sd"] == pytest.approx(1.0) and fd["half_width"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-3)
    assert fd["verdict"] == "better" and fd["b"] == [5.0, 7.0] and fd["a"] == [3.0, 3.0]
    ft = d_row["vs_baseline"]["fd_teacher"]
    assert ft["mean"] == pytest.approx(0.0) and ft["verdict"] == "no difference"
    assert d_row["vs_baseline"]["paired_px"] is None  # null on both sides: nothing to compare
    sr = d_row["vs_baseline"]["shift_ratio"]  # the last grid time: baseline 2, 2.1, 2.3 on seeds 0, 1, 3
    assert sr["mean"] == pytest.approx(1.0 - 6.4 / 3) and sr["verdict"] == "lower"
    assert d_row["cost_ratio"] == pytest.approx(2.0) and d_row["shift_ratio"]["mean"] == pytest.approx(1.0)
    m_row = rows[("uncond lcm K=4 +DDIL mixed", 4)]
    assert m_row["vs_baseline"]["fd"]["n"] == 1 and m_row["vs_baseline"]["fd"]["verdict"] == "n < 2"
    assert m_row["cost_ratio"] == pytest.approx(2.5)
    assert m_row["vs_ddil"]["fd"]["mean"] == pytest.approx(1.0)  # against +DDIL's seed 0 (3), not the baseline's
    assert "vs_ddil" not in d_row
    # K = 1 rows (evaluated, not trained): spreads, no comparison; paired_px there
    assert rows[("uncond lcm K=4 +DDIL", 1)]["paired_px"]["mean"] == 0.5
    assert "vs_baseline" not in rows[("uncond lcm K=4 +DDIL", 1)]
    assert "shift_ratio" not in rows[("uncond lcm K=4 +DDIL", 1)]  # the shift and cost: the trained K
    assert "vs_baseline" not in b_row
    # teacher rows once per (lab, K, seed); the reference floor per lab
    teacher = {(r["lab"], r["K"]): r for r in res["teacher"]}
    assert teacher[("uncond", 64)]["fd"]["n"] == 4 and teacher[("uncond", 64)]["fd"]["mean"] == pytest.approx(2.5)
    ref = res["teacher_ref"]["uncond"]
    assert (ref["n"], ref["steps"], ref["floor_fd"]["n"]) == (16, 64, 4)  # seeds 0..3, first run each
    assert ref["floor_fd"]["mean"] == pytest.approx(0.01)
    assert res["fd_curves"]["uncond lcm K=4 +DDIL"][3] == [[10, 5.0], [20, 3.0]] or \
        res["fd_curves"]["uncond lcm K=4 +DDIL"][3] == [(10, 5.0), (20, 3.0)]
    assert res["covariate_shift"]["uncond lcm K=4 baseline"]["ratio"][3]["mean"] == pytest.approx(2.15)
    assert len(res["missing"]) == 4 * 8 - 4 - 3 - 1 and ddil[2] in res["missing"]

    table = (out / "table.md").read_text()
    assert table.splitlines()[2].startswith("Command: `python bench/results.py --budget smoke")
    assert "### uncond lcm, K = 4" in table
    assert "| baseline | 4 | 29.5 ± 47 [5, 100] |" in table
    assert "| +DDIL | 3 | 3 ± 0 [3, 3] | 1 ± 0.1 [0.9, 1.1] | – | 1 ± 0 [1, 1] | 2.00 |" in table
    assert "| +DDIL | -3 [-5.48, -0.516] (n = 3, MDD 3.1) **better** |" in table
    assert "**no difference** | – | -1.13 [-1.51, -0.754] (n = 3, MDD 0.47) **lower** |" in table
    assert "| +DDIL mixed | -1 (n = 1) |" in table
    assert "| variant - +DDIL |" in table and "| +DDIL mixed | +1 (n = 1) |" in table
    assert "| uncond | 16 | 64 | 0.01" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1, 2, 3] and saved["wall_s"] >= 0 and "runs_wall_s" in saved

    # --check: the same runs agree with themselves; a shifted committed row does not
    committed = tmp_path / "committed.json"
    committed.write_text((out / "results.json").read_text())
    res = R.main(argv + ["--check", str(committed)])
    assert res["check"]["agree"] == res["check"]["compared"] > 0 and not res["check"]["outside"]
    old = json.loads(committed.read_text())
    for r in old["rows"]:
        if (r["cell"], r["K"]) == ("uncond lcm K=4 +DDIL", 4):
            r["fd"].update(min=4.5, max=4.6)  # the rerun's mean 3 is now outside
    committed.write_text(json.dumps(old))
    res = R.main(argv + ["--check", str(committed)])
    assert res["check"]["outside"] == ["uncond lcm K=4 +DDIL K=4 fd: 3 outside [4.5, 4.6]"]
    assert res["check"]["agree"] == res["check"]["compared"] - 1


@pytest.mark.slow
def test_smoke_two_runs_end_to_end(tiny_teacher, tmp_path, monkeypatch, capsys):
    # the grid cut to two cells (baseline and DAgger's mixture at K = 2, LCM, uncond), one seed
    monkeypatch.setattr(R, "STEPS", (2,))
    monkeypatch.setattr(R, "VARIANTS", {v: R.VARIANTS[v] for v in ("baseline", "+DDIL mixed")})
    argv = ["--budget", "smoke", "--seeds", "0", "--only", "lcm", "--lab", "uncond", "--teacher", tiny_teacher,
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "res")]
    res = R.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("command: python bench/results.py --budget smoke") and "[2/2]" in printed
    assert not res["failed"] and not res["missing"]
    rows = {(r["variant"], r["K"]): r for r in res["rows"]}
    assert set(rows) == {(v, k) for v in ("baseline", "+DDIL mixed") for k in (1, 2)}
    r = rows[("+DDIL mixed", 2)]
    assert math.isfinite(r["fd"]["mean"]) and math.isfinite(r["fd_teacher"]["mean"])
    assert r["paired_px"] is None and rows[("+DDIL mixed", 1)]["paired_px"]["n"] == 1  # re-noising at K > 1
    assert r["vs_baseline"]["fd"]["n"] == 1 and r["wall_s"]["n"] == 1 and r["cost_ratio"] > 0
    assert res["teacher_ref"]["uncond"]["n"] == 16 and res["runs_wall_s"] > 0
    cfg = json.loads((tmp_path / "runs" / "uncond-lcm-K2-b0.5_0_0.5-none-mix0.5-s0" / "config.json").read_text())
    assert (cfg["rollout_teacher_p"], cfg["bound"], cfg["sample_bound"], cfg["teacher"]) == \
        (0.5, "none", "clip", tiny_teacher)
    assert len(res["fd_curves"]["uncond lcm K=2 baseline"][0]) > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for name in ("covariate_shift.png", "fd_curves.png"):
            assert 0 < os.path.getsize(tmp_path / "res" / name) < 100_000
    R.main(argv)  # a rerun resumes: nothing left to train (the runs' config.json match their flags)
    assert "2 runs, 2 already done, 0 to run" in capsys.readouterr().out
    # a run made before a flag existed: taken as the flag's value then (harness.before_flags),
    # which is the default unless the script's Config says otherwise
    configs = {run / "config.json": (run / "config.json").read_text() for run in (tmp_path / "runs").iterdir()}
    for path, text in configs.items():
        path.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "target_ema"}))
    R.main(argv)
    assert "2 runs, 2 already done, 0 to run" in capsys.readouterr().out
    monkeypatch.setattr(lcm_ddil.Config, "BEFORE_FLAG", {"target_ema": 0.9}, raising=False)
    with pytest.raises(SystemExit, match=r"were made with other flags \(uncond-lcm-K2-b1_0_0-none-s0: "
                                         r"target_ema 0.9, now 0.95"):
        R.main(argv)
    monkeypatch.delattr(lcm_ddil.Config, "BEFORE_FLAG")
    for path, text in configs.items():
        path.write_text(text)
    # a default changed since the runs were made, in a flag their command does not pass: stale too
    field = lcm_ddil.Config.__dataclass_fields__["target_ema"]
    monkeypatch.setattr(field, "default", 0.9)
    with pytest.raises(SystemExit, match=r"2 runs in .* were made with other flags \(uncond-lcm-K2-b1_0_0-none-s0: "
                                         r"target_ema 0.95, now 0.9, \.\.\.\): move them away"):
        R.main(argv)
    monkeypatch.setattr(field, "default", 0.95)
    # another budget for the same names: the finished runs are stale, not "already done"
    lcm = list(R.BUDGETS["smoke"]["lcm"])
    lcm[lcm.index("--iters") + 1] = "4"
    monkeypatch.setitem(R.BUDGETS["smoke"], "lcm", lcm)
    with pytest.raises(SystemExit, match=r"2 runs in .* were made with other flags \(uncond-lcm-K2-b1_0_0-none-s0: "
                                         r"iters 3, now 4, \.\.\.\): move them away"):
        R.main(argv)


def test_plots_have_a_row_per_lab_and_k(tmp_path, monkeypatch):
    """Every trained K gets its own row of panels (DMD2 alone at K = 1), labs first, larger K first."""
    plt = pytest.importorskip("matplotlib.pyplot")
    cells = {f"{lab} {m} K={k} baseline": {"lab": lab, "method": m, "steps": k, "variant": "baseline"}
             for lab, m, k in (("uncond", "lcm", 4), ("uncond", "lcm", 2), ("uncond", "dmd2", 1),
                               ("cond", "pd", 4))}
    shift = {"t": [1.0, 0.5], "ratio": [{"mean": 1.0, "std": 0.1}, {"mean": 1.2, "std": 0.1}]}
    res = {"cells": cells, "fd_curves": {label: {0: [(10, 1.0), (20, 0.5)]} for label in cells},
           "covariate_shift": {label: shift for label in cells}}
    # a variant with no finished run yet: in the grid's cells, no curve, no legend entry
    cells["uncond lcm K=4 +DDIL"] = {"lab": "uncond", "method": "lcm", "steps": 4, "variant": "+DDIL"}
    res["fd_curves"]["uncond lcm K=4 +DDIL"] = {0: []}
    figures = []
    subplots = plt.subplots

    def spy(*args, **kwargs):
        figures.append(subplots(*args, **kwargs))
        return figures[-1]
    monkeypatch.setattr(plt, "subplots", spy)
    assert len(R.plots(res, str(tmp_path))) == 2
    for fig, axes in figures:
        assert axes.shape == (4, 3)  # rows: uncond K = 4, 2, 1; cond K = 4; columns: pd, lcm, dmd2
        titles = [[ax.get_title() if ax.axison else "" for ax in row] for row in axes]
        assert titles == [["", "uncond lcm, K = 4", ""], ["", "uncond lcm, K = 2", ""],
                          ["", "", "uncond dmd2, K = 1"], ["cond pd, K = 4", "", ""]]
        assert [[ax.axison for ax in row] for row in axes] == [[t != "" for t in row] for row in titles]
    legend = [t.get_text() for t in figures[0][1][0][1].get_legend().get_texts()]
    assert legend == ["baseline (n = 1)"]


def test_x0_range_reads_the_denoisers_clean_image():
    # a denoiser whose x0_hat is known: v = (alpha x - x0) / sigma gives back x0 at every step.
    # Half the pixels at 1.5, half at 0: share outside 0.5, mean excess 0.25, max 1.5, per step.
    import torch
    import x0_range as X
    import common as C
    x0 = torch.zeros(4, 1, 8, 8)
    x0[..., :4] = 1.5

    def denoise(x, t):
        alpha, sigma = C.alpha_sigma(t[0])
        return (alpha * x - x0) / sigma
    rows = X.x0_range(denoise, torch.randn(4, 1, 8, 8), C.time_grid(4))
    assert [r[0] for r in rows] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    for _, share, excess, top in rows:
        assert (share, excess, top) == pytest.approx((0.5, 0.25, 1.5), abs=1e-4)
