"""A rerun into an --out that holds a checkpoint continues it only as the same run: a flag that
changes training (priors, bounds, rollouts, guidance, schedule, batch, lr, seed, teacher, ...)
differing from the checkpoint's config stops with one line before anything is written, and
config.json and the checkpoint stay as they were. Flags that may change (harness.
MAY_CHANGE_ON_RESUME: counts, device, --iters) resume."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import dmd2_ddil
import harness as H
import lcm_ddil
import pd_ddil
import teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    pd_ddil: ["--teacher-steps", "4", "--steps", "2", "--iters-per-stage", "1",
              "--stage-eval-samples", "4"],
    lcm_ddil: ["--iters", "1", "--steps", "2", "--grid", "4"],
    dmd2_ddil: ["--iters", "1", "--steps", "2", "--teacher-substeps", "1"],
}
EVAL = ["--batch-size", "4", "--buffer-size", "8", "--refresh", "1", "--eval-samples", "4",
        "--shift-samples", "4", "--ref-samples", "0", "--reference-steps", "2"]


def files(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in ("config.json", "ckpt.pt")}


@pytest.mark.parametrize("mod", list(TINY), ids=lambda m: m.__name__)
@pytest.mark.parametrize("changed", [["--lr", "1e-3"], ["--beta-student", "0.1"],
                                     ["--bound", "clip"], ["--seed", "1"]],
                         ids=lambda c: c[0])
def test_a_rerun_with_another_training_flag_is_refused(tmp_path, tiny_teacher, mod, changed):
    out = str(tmp_path / "run")
    argv = [*TINY[mod], *EVAL, "--teacher", tiny_teacher, "--out", out]
    mod.main(argv)
    before = files(out)
    with pytest.raises(SystemExit) as e:
        mod.main(argv + changed)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and changed[0] in msg and "fresh --out" in msg
    assert files(out) == before  # config.json not overwritten, checkpoint untouched


def test_flags_that_may_change_resume(tmp_path, tiny_teacher):
    out = str(tmp_path / "run")
    argv = [*TINY[lcm_ddil], *EVAL, "--teacher", tiny_teacher, "--out", out]
    lcm_ddil.main(argv)
    lcm_ddil.main(argv + ["--iters", "2", "--log-every", "1", "--eval-samples", "5"])  # grows
    assert H.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2


def test_the_teacher_refuses_another_run_too(tmp_path):
    out = str(tmp_path / "t")
    argv = ["--iters", "2", "--batch-size", "4", "--sample-steps", "2", "--sample-count", "2",
            "--out", out]
    teacher.main(argv)
    before = files(out)
    with pytest.raises(SystemExit, match="--ema"):
        teacher.main(argv + ["--ema", "0.9"])
    assert files(out) == before


def holder(out):
    """A live process holding out's claim (as a run training there does), until its stdin closes."""
    code = f"import harness as H; H.claim_out_dir({str(out)!r}); print('held', flush=True); input()"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_into_a_live_runs_out_stops_and_writes_nothing(tmp_path):
    """Two runs training into one --out would overwrite each other's checkpoints: the second
    stops with one line before writing anything; once the first ends, the claim is free."""
    out = tmp_path / "t"
    out.mkdir()
    argv = ["--iters", "2", "--batch-size", "4", "--sample-steps", "2", "--sample-count", "2",
            "--out", str(out)]
    p = holder(out)
    try:
        with pytest.raises(SystemExit, match=r"^error: --out .* is in use by another run"):
            teacher.main(argv)
        assert sorted(os.listdir(out)) == [H.OUT_LOCK] and H.out_in_use(str(out))
    finally:
        p.communicate("")
    assert not H.out_in_use(str(out))  # the kernel released it with the process
    teacher.main(argv)
    assert os.path.isfile(out / "ckpt.pt")


def test_the_benchmark_skips_a_run_another_process_is_training(tmp_path):
    """bench/results.py's execute leaves a run another benchmark is training alone (its stdout.log
    untouched: reopening it would truncate the live run's log) and reports it as left to that
    process, not as failed: the closing line says to rerun when it ends, not to read its log."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import results as R
    cfg = R.H.parse_config(R.Config, ["--budget", "smoke", "--runs-dir", str(tmp_path)])
    name = "uncond-lcm-K2-b1_0_0-none-s0"
    (tmp_path / name).mkdir()
    (tmp_path / name / "stdout.log").write_text("live\n")
    p = holder(tmp_path / name)
    try:
        failed, busy = R.execute(cfg, {name: ("uncond", "lcm", 2, (1, 0, 0), "none", 0.0, 0)})
    finally:
        p.communicate("")
    assert failed == [] and busy == [name] and (tmp_path / name / "stdout.log").read_text() == "live\n"
    with pytest.raises(SystemExit, match=r"^error: 1 runs were left to another process training them "
                                         rf"\({name}\): rerun when it ends"):
        R.stop_if_unfinished(failed, busy)
    with pytest.raises(SystemExit, match=r"^error: 1 runs failed \(x\): see their stdout.log; rerun to "
                                         r"retry them; 1 runs were left"):
        R.stop_if_unfinished(["x"], busy)
    R.stop_if_unfinished([], [])  # a complete grid ends quietly


def test_a_flag_newer_than_the_checkpoint_resumes_only_at_its_default(tmp_path):
    """A checkpoint written before a flag existed was trained as the flag's default: resuming it
    at that default continues; at another value stops (it would continue another run)."""
    cfg = H.parse_config(lcm_ddil.Config, [])
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "student_states"}
    path = str(tmp_path / "ckpt.pt")
    torch.save({"config": old}, path)
    H.check_same_run(cfg, path)
    with pytest.raises(SystemExit, match="--student-states taus, not grid"):
        H.check_same_run(H.parse_config(lcm_ddil.Config, ["--student-states", "grid"]), path)


def test_a_run_from_before_the_noise_grid_flag_resumes_only_on_the_karras_grid(tmp_path):
    """DMD2 runs made before --noise-grid drew from the Karras grid, which auto is not under
    guidance: such a checkpoint continues only with --noise-grid karras (Config.BEFORE_FLAG)."""
    argv = ["--cond", "--guidance", "2"]
    cfg = H.parse_config(dmd2_ddil.Config, argv)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "noise_grid"}}, path)
    with pytest.raises(SystemExit, match="--noise-grid karras, not auto"):
        H.check_same_run(cfg, path)
    H.check_same_run(H.parse_config(dmd2_ddil.Config, argv + ["--noise-grid", "karras"]), path)
