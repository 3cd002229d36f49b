"""bench/shift_gap.py: the error is the distance to the teacher's 64-step sample from the same
state, the two state sets share their noise, the gap pairs the right arms on the right set, and
the whole thing runs end to end on smoke runs."""
import json
import os
import sys

import pytest
import torch

from conftest import random_unet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common as C  # noqa: E402
import shift_gap as S  # noqa: E402


def test_the_error_is_the_distance_to_the_teachers_sample_from_the_state():
    teacher = random_unet(1).eval()
    x = torch.randn(6, 1, 8, 8)
    i, K = 1, 2  # the state is at tau_1 = 0.5: the student's one remaining step, the teacher's 32
    label = S.sample_from(teacher, x, i * S.LABEL_STEPS // K, S.LABEL_STEPS, None, 0.0, "clip")
    with torch.no_grad():  # written out: the 64-step grid from t = 0.5 is 32 DDIM steps
        z, ts = x, torch.linspace(1, 0, 65)[32:]
        for t, s in zip(ts[:-1], ts[1:]):
            a, sg = C.alpha_sigma(t)
            a_s, s_s = C.alpha_sigma(s)
            x0 = (a * z - sg * teacher(z, torch.full((6,), float(t)))).clamp(-1, 1)
            z = x0 if s == 0 else a_s * x0 + s_s * (z - a * x0) / sg
    torch.testing.assert_close(label, z, atol=1e-5, rtol=1e-4)
    student = random_unet(2).eval()
    px, feat = S.errors(student, "ddim", K, i, x, None, 0.0, (label, label.flatten(1)), "clip",
                        None, lambda s: s.flatten(1))
    with torch.no_grad():  # the student's one step from t = 0.5 lands on its x0
        a, sg = C.alpha_sigma(torch.tensor(0.5))
        mine = (a * x - sg * student(x, torch.full((6,), 0.5))).clamp(-1, 1)
    want = (mine - label).square().flatten(1).mean(1).double()
    torch.testing.assert_close(px, want)
    torch.testing.assert_close(feat, want)  # the identity "features" here
    # the teacher as a 64-step "student" has no error; the same teacher at K = 2 has some
    px0, _ = S.errors(teacher, "ddim", 64, 32, x, None, 0.0, (label, label.flatten(1)), "clip",
                      None, lambda s: s.flatten(1))
    assert px0.max() < 1e-10 and px.mean() > 1e-4


def test_state_sets_share_their_noise():
    net = random_unet(3).eval()
    sets, noises = S.state_sets(net, "renoise", 4, 32, seed=0, w=0.0, bound="clip")
    eps = sets["own"][0][0]  # the own rollout starts at the noise the data states are diffused with
    x0s = []
    for i in range(1, 4):  # one set of images, diffused with that one eps to every time
        a, s = C.alpha_sigma(torch.tensor(1 - i / 4))
        x0s.append((sets["data"][i][0] - s * eps) / a)
        assert not torch.allclose(sets["floor"][i], sets["data"][i][0])  # the floor's own draw
    for x0 in x0s[1:]:
        torch.testing.assert_close(x0, x0s[0], atol=1e-4, rtol=1e-4)
    assert x0s[0].min() >= -1 - 1e-3 and x0s[0].max() <= 1 + 1e-3 and x0s[0].std() > 0.1
    # the own states are the network's re-noising sampler from eps with the shared noises
    with torch.no_grad():
        a, s = C.alpha_sigma(torch.tensor(1.0))
        x0 = (a * eps - s * net(eps, torch.ones(32))).clamp(-1, 1)
        a2, s2 = C.alpha_sigma(torch.tensor(0.75))
    torch.testing.assert_close(sets["own"][1][0], a2 * x0 + s2 * noises[0], atol=1e-5, rtol=1e-4)
    assert sets["own"][0][1] is None and sets["data"][0][1] is None


def fabricated(seed, base_own, gap, gain, excess):
    """One seed-cell's measurement with known differences at its one time t = 0.5."""
    err = {"data-only": {"own": [base_own], "data": [base_own - excess]},
           "own-only": {"own": [base_own - gap], "data": [1.0]},
           "+DDIL": {"own": [base_own - gain], "data": [1.0]}}
    return {"t": [0.5], "err": {arm: {s: {"px": v, "feat": [x * 2 for x in v]} for s, v in e.items()}
                                for arm, e in err.items()},
            "state_fd": [3.0 + seed], "state_fd_floor": [1.0], "old_ratio": [1.0, 1.5]}


def test_gap_pairs_data_only_against_own_only_on_own_states():
    cells = {("uncond", "pd", 2, s): {} for s in range(4)}
    # gap 0.1 + 0.01 s, gain 0.02, excess 0.3: seed 3 not measured, so dropped
    measured = {("uncond", "pd", 2, s): fabricated(s, 1.0 + s, 0.1 + 0.01 * s, 0.02, 0.3)
                for s in range(3)}
    (row,) = S.aggregate(cells, measured)
    assert row["seeds"] == 3 and row["t"] == 0.5
    assert row["px"]["gap"]["mean"] == pytest.approx(0.11) and row["px"]["gap"]["n"] == 3
    assert row["px"]["gap"]["lo"] > 0  # a gap resolved above zero
    assert row["px"]["ddil_gain"]["mean"] == pytest.approx(0.02)
    assert row["px"]["excess"]["mean"] == pytest.approx(0.3)
    assert row["feat"]["gap"]["mean"] == pytest.approx(0.22)
    assert row["px"]["err"]["data-only on own"]["mean"] == pytest.approx(2.0)
    assert row["state_fd"]["mean"] == pytest.approx(4.0) and row["old_ratio"]["mean"] == 1.5
    md = S.table_md({"regime": "base", "budget": "full", "command": "c", "date": "d",
                     "measured": 3, "cells": 4, "n": 8, "rows": [row]})
    assert "| uncond | pd | 2 | 0.50 | 3 |" in md and "**+110 [" in md
    # the plot's numbers: percent of data-only's own-state error (2.0)
    (t, mean, lo, hi), = S.percent_points([row])[("uncond", "pd", 2)]["gap"]
    assert t == 0.5 and mean == pytest.approx(5.5) and lo == pytest.approx(100 * row["px"]["gap"]["lo"] / 2)
    assert S.percent_points([row])[("uncond", "pd", 2)]["excess"][0][1] == pytest.approx(15.0)


def test_bad_flags_stop_before_any_run(tmp_path):
    for argv, msg in ((["--ks", "3"], "dividing 64"), (["--ks", "1"], "K >= 2"),
                      (["--seeds", "0", "0"], "distinct"), (["--only", "gan"], "--only"),
                      (["--n", "4"], "--n")):
        with pytest.raises(SystemExit, match=msg):
            S.main(argv + ["--runs-dir", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_smoke_end_to_end(tiny_teacher, tmp_path):
    argv = ["--budget", "smoke", "--seeds", "0", "1", "--only", "pd", "--lab", "uncond", "--ks", "2",
            "--n", "32", "--teacher", tiny_teacher, "--jobs", "2",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    res = S.main(argv)
    assert res["measured"] == res["cells"] == 2
    names = sorted(os.listdir(tmp_path / "runs"))
    assert "uncond-pd-K2-b0_0_1-none-s1" in names and "uncond-pd-K2-b1_0_0-none-s0" in names
    (row,) = res["rows"]
    assert row["px"]["gap"]["n"] == 2 and row["px"]["gap"]["lo"] is not None
    assert (tmp_path / "out" / "shift_gap.md").read_text().count("| uncond | pd | 2 | 0.50 | 2 |") == 2
    cached = json.loads((tmp_path / "runs" / "shift_gap" /
                         "uncond-pd-K2-b1_0_0-none-s0-n32.json").read_text())
    assert cached["t"] == [0.5] and set(cached["digests"]) == set(S.ARMS)
    # end to end: each arm's own final evaluation, data-only minus the arm, paired by seed
    fd = next(r for r in res["end_rows"] if r["key"] == "fd")
    runs = tmp_path / "runs"

    def fd_of(name):
        return json.loads((runs / name / "metrics.json").read_text())["student"]["2"]["fd"]
    want = [fd_of(f"uncond-pd-K2-b1_0_0-none-s{s}") - fd_of(f"uncond-pd-K2-b0_0_1-none-s{s}")
            for s in (0, 1)]
    assert fd["seeds"] == 2 and fd["own_gain"]["mean"] == pytest.approx(sum(want) / 2)
    assert "## End to end" in (tmp_path / "out" / "shift_gap.md").read_text()
    # a rerun measures nothing again and gives the same rows; so does a fresh checkout, which
    # has the committed results but not the runs
    again = S.main(argv + ["--no-run"])
    assert again["rows"] == res["rows"]
    import shutil
    shutil.rmtree(tmp_path / "runs")
    fresh = S.main(argv + ["--no-run"])
    assert fresh["rows"] == res["rows"] and fresh["measured"] == 2


def test_a_rollout_only_regime_shares_the_runs_it_cannot_change():
    """own-grid acts on LCM's own rollouts only: LCM's data-only arm, and every PD arm, are the
    base regime's runs (same names, no flags); LCM's arms with own states get the flags and
    their own names; a regime of every run (k8) renames every arm."""
    cfg = S.H.parse_config(S.Config, ["--regime", "own-grid", "--only", "pd,lcm", "--lab", "uncond",
                                      "--ks", "4", "--seeds", "0"])
    cells, runs = S.plan(cfg)
    lcm, pd = cells[("uncond", "lcm", 4, 0)], cells[("uncond", "pd", 4, 0)]
    assert lcm["data-only"] == "uncond-lcm-K4-b1_0_0-none-s0" and runs[lcm["data-only"]][1] == []
    for arm in ("+DDIL", "own-only"):
        assert lcm[arm].endswith("-s0-own-grid")
        assert runs[lcm[arm]][1] == ["--student-states", "grid"]
    assert all(not name.endswith("own-grid") and runs[name][1] == [] for name in pd.values())
    cfg.regime = "k8"
    assert all(name.endswith("-k8") for name in S.plan(cfg)[0][("uncond", "pd", 4, 0)].values())
    # a regime of one method's runs (karras: DMD2's noise grid) refuses the others
    cfg.regime = "karras"
    with pytest.raises(SystemExit, match="--regime karras changes only dmd2: give --only dmd2"):
        S.plan(cfg)
    cfg.only = "dmd2"
    arms = S.plan(cfg)[0][("uncond", "dmd2", 4, 0)]
    assert all(name.endswith("-karras") for name in arms.values())
