"""bench/dmd2_sweep.py's reading of a run (ratio to the teacher, the curve, settled within its
noise) and its table, on fabricated run folders; a fresh checkout keeps the committed rows."""
import json
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import dmd2_sweep as W  # noqa: E402


def fake_run(runs, name, fd, teacher, curve, noise, k=1):
    d = runs / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({
        "student": {str(k): {"fd": fd, "fd_teacher": 2 * fd, "precision": 0.8, "recall": 0.9}},
        "teacher": {"64": {"fd": teacher}}, "teacher_ref": {"floor_fd": 0.06},
        "train_time_s": 10.0}))
    (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "fd": v}) + "\n" for s, v in curve)
                                 + json.dumps({"step": 5, "loss_dm": 1.0}) + "\n")
    (d / "fd_noise.json").write_text(json.dumps({"fds": [], "sd": noise}))


def test_rows_ratio_settled_and_the_committed_rows_kept(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    fake_run(runs, "recipe-s0", 0.16, 0.04, [(500, 3.0), (1000, 0.12), (1500, 0.15), (2000, 0.16)], 0.025)
    fake_run(runs, "ema0.99-s0", 0.09, 0.045, [(500, 0.3), (1000, 0.2), (1500, 0.1)], 0.01)
    res = W.main(["--no-run", "--settings", "recipe,ema0.99", "--runs-dir", str(runs), "--out", str(out)])
    recipe, ema = res["rows"]  # in SETTINGS' order
    assert recipe["setting"] == "recipe" and recipe["ratio"] == pytest.approx(4.0)
    assert recipe["settled"]  # 0.12..0.16 within 2 x 0.025
    assert not ema["settled"] and ema["ratio"] == pytest.approx(2.0)  # 0.1..0.3 is not
    assert [tuple(p) for p in recipe["curve"]] == [(500, 3.0), (1000, 0.12), (1500, 0.15), (2000, 0.16)]
    md = (out / "dmd2_sweep.md").read_text()
    assert "| recipe | `(defaults)` | 0 | 0.1600 | 0.0400 | 4.00 |" in md
    assert "| ema0.99 | `--ema-decay 0.99` | 0 |" in md and "| no |" in md
    # a fresh checkout: the committed rows stay, a run made there is added beside them
    os.rename(runs, tmp_path / "gone")
    fake_run(runs, "gan1e-2-s0", 0.12, 0.04, [(500, 0.2), (1000, 0.12)], 0.02)
    again = W.main(["--no-run", "--runs-dir", str(runs), "--out", str(out)])
    assert [r["setting"] for r in again["rows"]] == ["recipe", "ema0.99", "gan1e-2"]
    assert again["rows"][0]["fd"] == 0.16 and again["rows"][2]["settled"] is False


def test_drift_reads_a_falling_curve_and_a_flat_one():
    """The last 5 points against the 5 before (Welch, 95%): a still-falling curve has its
    interval below 0, an oscillating flat one across 0; a curve under 2 x 5 points has none."""
    falling = [(500 * i, 1.0 - 0.05 * i + 0.01 * (-1) ** i) for i in range(1, 11)]
    d, half = W.drift(falling)
    assert d == pytest.approx(-0.25 + 0.004) and d + half < 0  # (the alternation: +0.004)
    flat = [(500 * i, 0.13 + 0.02 * (-1) ** i + 0.005 * (i % 3)) for i in range(1, 21)]
    d, half = W.drift(flat)
    assert abs(d) < half
    # by hand: windows (0.12, 0.145, 0.155, 0.11, 0.15) and (0.115, 0.16, 0.11, 0.145, 0.155)
    a, b = [fd for _, fd in flat[-10:-5]], [fd for _, fd in flat[-5:]]
    assert d == pytest.approx(sum(b) / 5 - sum(a) / 5)
    var = lambda x: sum((v - sum(x) / 5) ** 2 for v in x) / 4  # noqa: E731
    assert half == pytest.approx(2.306 * ((var(a) + var(b)) / 5) ** 0.5)
    assert W.drift(falling[:9]) is None and W.drift(falling[:6], n=3)[0] == pytest.approx(-0.15 + 0.02 / 3)


def test_sweeps_side_by_side_keep_each_others_rows(tmp_path, monkeypatch):
    """Two sweeps of other seeds run at once: the one that ends last keeps the other's row."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--settings", "recipe", "--runs-dir", str(runs), "--out", str(out)]

    def run(argv, **_):  # this sweep's run; meanwhile the sweep of seed 1 finishes and writes
        fake_run(runs, "recipe-s0", 0.16, 0.04, [(500, 0.2)], 0.02)
        fake_run(runs, "recipe-s1", 0.12, 0.04, [(500, 0.2)], 0.02)
        W.main(["--no-run", "--seeds", "1", *args])
        return types.SimpleNamespace(returncode=0)
    monkeypatch.setattr(W.subprocess, "run", run)
    res = W.main(["--seeds", "0", *args])
    assert [(r["setting"], r["seed"], r["fd"]) for r in res["rows"]] == [("recipe", 0, 0.16),
                                                                         ("recipe", 1, 0.12)]


def test_a_k_step_sweep_reads_its_own_runs_and_files(tmp_path):
    """--steps 4 reads the K = 4 runs (-K4 in their names) at K = 4, into its own json/md."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    fake_run(runs, "recipe-s0", 0.16, 0.04, [(500, 0.2)], 0.02)  # a one-step run beside it
    fake_run(runs, "recipe-K4-s0", 0.06, 0.04, [(500, 0.2), (1000, 0.07)], 0.02, k=4)
    res = W.main(["--no-run", "--steps", "4", "--settings", "recipe", "--runs-dir", str(runs),
                  "--out", str(out)])
    assert [(r["fd"], r["ratio"]) for r in res["rows"]] == [(0.06, pytest.approx(1.5))]
    assert W.argv_of(W.H.parse_config(W.Config, ["--steps", "4"]), "recipe", 0)[2:4] == ["--steps", "4"]
    assert "sweep on digits" in (out / "dmd2_sweep-K4.md").read_text()
    assert "K = 4" in (out / "dmd2_sweep-K4.md").read_text() and not (out / "dmd2_sweep.json").exists()


def test_a_run_made_with_other_flags_stops_the_sweep(tmp_path):
    """A run folder whose config.json is not what its setting's command writes now (an older
    recipe, a changed default, a run from before --noise-grid) is refused, not read as that setting."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--no-run", "--lab", "cond", "--settings", "recipe", "--runs-dir", str(runs), "--out", str(out)]
    cfg = W.H.parse_config(W.Config, args)
    cfg.runs_dir = str(runs)
    config = W.R.config_of(W.argv_of(cfg, "recipe", 0))[0]
    fake_run(runs, "cond-recipe-s0", 0.16, 0.04, [(500, 0.2)], 0.02)
    (runs / "cond-recipe-s0" / "config.json").write_text(json.dumps(config))
    assert W.main(args)["rows"][0]["fd"] == 0.16
    (runs / "cond-recipe-s0" / "config.json").write_text(json.dumps({**config, "lr": 3e-4}))
    with pytest.raises(SystemExit, match=r"made with other flags \(cond-recipe-s0: lr 0.0003, now"):
        W.main(args)
    del config["noise_grid"]  # made on the Karras grid, before the flag; auto is time when guided
    (runs / "cond-recipe-s0" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="noise_grid karras, now auto"):
        W.main(args)
