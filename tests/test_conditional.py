"""The guided, class-conditional path end to end: each method distils a conditional teacher with
guidance, and its metrics.json rows are exactly what `python evaluate.py CKPT` prints for the same
checkpoint, seed, K and sample count (balanced labels; the teacher rows at the student's w)."""
import json

import pytest

import dmd2_ddil as D
import evaluate as E
import lcm_ddil as L
import pd_ddil as P

SMALL = ["--batch-size", "8", "--eval-samples", "30", "--shift-samples", "8", "--log-every", "1",
         "--buffer-size", "32", "--refresh", "2", "--seed", "1", "--ref-samples", "16",
         "--beta-data", "0.5", "--beta-teacher", "0.25", "--beta-student", "0.25"]
METHODS = {
    "pd": (P.main, ["--teacher-steps", "4", "--steps", "2", "--iters-per-stage", "2",
                    "--stage-eval-samples", "10", "--guidance", "2"], "2"),
    "lcm": (L.main, ["--iters", "2", "--steps", "2", "--grid", "4", "--reference-steps", "4",
                     "--refresh-every", "1"], "2"),
    "dmd2": (D.main, ["--iters", "2", "--steps", "2", "--teacher-substeps", "2", "--guidance", "2",
                      "--fake-updates", "1"], "2"),
}


@pytest.mark.parametrize("method", METHODS)
def test_guided_run_metrics_equal_the_evaluate_cli(method, tiny_cond_teacher, tmp_path):
    main, args, K = METHODS[method]
    out = tmp_path / method
    main(["--teacher", tiny_cond_teacher, "--out", str(out), *SMALL, *args])
    m = json.loads((out / "metrics.json").read_text())
    assert m["w"] == 2.0 and m["sample_bound"] == "clip"
    for row in m["student"].values():
        assert 0 <= row["cond_acc"] <= 1
    cli = E.main([str(out / "ckpt.pt"), "--steps", K, "--num-samples", "30", "--seed", "1",
                  "--out", str(tmp_path / "eval")])
    assert cli["w"] == 2.0 and cli["bound"] == "clip"
    shared = set(cli["rows"][K])  # the script adds the teacher-reference and paired columns
    assert shared <= set(m["student"][K]) and {"fd", "kid", "cond_acc"} <= shared
    assert {k: m["student"][K][k] for k in shared} == cli["rows"][K]  # the same numbers, not close ones
    teacher = E.main([tiny_cond_teacher, "--steps", K, "--num-samples", "30", "--seed", "1",
                      "--w", "2", "--out", str(tmp_path / "eval-teacher")])
    assert teacher["rows"][K] == {k: m["teacher"][K][k] for k in shared}
    # the distillation gap: FD against the teacher's own samples, and the paired error where the
    # sampler is a deterministic function of its noise (PD: DDIM; LCM / DMD2: one step only)
    assert m["teacher_ref"]["n"] == 16 and m["teacher_ref"]["floor_fd"] > 0
    assert m["student"][K]["fd_teacher"] >= 0
    assert (m["student"][K]["paired_px"] is None) == (method != "pd")
    assert m["teacher"][max(m["teacher"], key=int)]["paired_px"] == 0.0  # the reference row itself


def test_same_seed_same_guided_lcm_run(tiny_cond_teacher, tmp_path):
    """The w-conditioned student's new layers are initialised from the seed: two runs with the
    same flags end with the same weights (and a different seed does not)."""
    import torch
    args = ["--teacher", tiny_cond_teacher, *SMALL, "--iters", "2", "--steps", "2", "--grid", "4",
            "--reference-steps", "4", "--refresh-every", "1", "--ref-samples", "0"]
    nets = [L.main([*args, "--out", str(tmp_path / d), *extra]).state_dict()
            for d, extra in (("a", []), ("b", []), ("c", ["--seed", "7"]))]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    assert not all(torch.equal(nets[0][k], nets[2][k]) for k in nets[0])
