"""Rollouts stand for policies, so they run exactly as those policies are evaluated: the
student's own rollouts (and the teacher's) use the sampling bound that final_evaluation samples
with, whatever --bound (which acts on the targets); the student's guidance input is the one it is
evaluated at (PD, DMD2: plain, w = 0; LCM: its w input, at each trajectory's drawn w)."""
import pytest

import dmd2_ddil
import evaluate as E
import lcm_ddil
import pd_ddil

COMMON = ["--beta-data", "1", "--beta-teacher", "1", "--beta-student", "1", "--batch-size", "6",
          "--buffer-size", "8", "--refresh", "1", "--eval-samples", "4", "--shift-samples", "4",
          "--ref-samples", "0", "--reference-steps", "2", "--bound", "reflect",
          "--sample-bound", "clip"]
RUNS = {
    pd_ddil: (["--teacher-steps", "4", "--steps", "2", "--iters-per-stage", "2", "--guidance", "2",
               "--stage-eval-samples", "4"], ("rollout_states",)),
    lcm_ddil: (["--iters", "2", "--steps", "2", "--grid", "4"], ("teacher_rollout", "student_rollout")),
    dmd2_ddil: (["--iters", "2", "--steps", "2", "--teacher-substeps", "1", "--fake-updates", "1",
                 "--guidance", "2"], ("teacher_rollout", "backward_simulation")),
}


@pytest.mark.parametrize("mod", list(RUNS), ids=lambda m: m.__name__)
def test_rollouts_run_the_evaluated_sampler(tmp_path, tiny_cond_teacher, mod, monkeypatch):
    flags, names = RUNS[mod]
    calls, evaluation = [], {}
    for name in names:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (
            calls.append((_name, a, k)), _real(*a, **k))[1])
    final = E.final_evaluation
    monkeypatch.setattr(E, "final_evaluation", lambda *a, **k: (
        evaluation.update(k), final(*a, **k))[1])
    mod.main([*flags, *COMMON, "--cond", "--teacher", tiny_cond_teacher,
              "--out", str(tmp_path / "run")])
    assert calls and evaluation["bound"] == "clip"
    for name, args, kw in calls:
        assert kw["bound"] == evaluation["bound"], (name, kw["bound"])  # not --bound reflect
        is_student = name in ("student_rollout", "backward_simulation") or (
            name == "rollout_states" and kw["sub"] == 1)
        if is_student and mod is pd_ddil:  # evaluated plainly: it has learnt the guided steps
            assert kw["w"] == evaluation["w_student"] == 0.0
        if is_student and mod is lcm_ddil:  # its w input, each trajectory at its own w
            w = args[3]
            assert w.shape == (len(args[1]),) and ((1.0 <= w) & (w <= 3.0)).all()
        if is_student and mod is dmd2_ddil:  # G has no guidance input: sampled plainly as in
            assert evaluation["w_student"] == 0.0  # evaluation (backward_simulation: guided(G, y))
