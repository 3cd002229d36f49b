"""teacher.py end to end: outputs, exact resume, DDP ranks agree, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--log-every", "5", "--sample-steps", "2", "--batch-size", "32"]


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def test_teacher_writes_outputs(tiny_teacher):
    out = os.path.dirname(tiny_teacher)
    for f in ("ckpt.pt", "samples.png", "log.jsonl", "config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    ck = torch.load(tiny_teacher, weights_only=True)
    assert ck["step"] == 20 and ck["config"]["dataset"] == "digits"
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in logs] == [10, 20] and all(r["loss"] > 0 for r in logs)
    net = teacher.load_teacher(tiny_teacher, "digits")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    teacher.main(["--iters", "12", "--ckpt-every", "6", "--out", a, *FAST])
    teacher.main(["--iters", "6", "--ckpt-every", "6", "--out", b, *FAST])  # "interrupted" at 6
    teacher.main(["--iters", "12", "--ckpt-every", "6", "--out", b, *FAST])  # resumes from 6
    for key in ("model", "ema"):
        wa, wb = weights(os.path.join(a, "ckpt.pt"), key), weights(os.path.join(b, "ckpt.pt"), key)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), key
    steps = [json.loads(line)["step"] for line in open(os.path.join(b, "log.jsonl"))]
    assert steps == sorted(set(steps))  # the resumed log has no duplicated records


@pytest.mark.slow
def test_torchrun_two_ranks_agree(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import teacher\n"
        "ema = teacher.main(sys.argv[1:])\n"
        "torch.save(ema.state_dict(), sys.argv[sys.argv.index('--out') + 1] + f'/rank{dist.get_rank()}.pt')\n")
    out = str(tmp_path / "ddp")
    r = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(driver),
             "--iters", "4", "--out", out, *FAST], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "global batch 64 (2 x 32)" in r.stdout
    w0, w1 = (torch.load(f"{out}/rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ck = torch.load(f"{out}/ckpt.pt", weights_only=True)
    assert all(torch.equal(ck["ema"][k], w0[k]) for k in w0)
    # the ranks saw different data: one process with the same seed ends elsewhere
    single = str(tmp_path / "single")
    teacher.main(["--iters", "4", "--out", single, *FAST])
    w = weights(os.path.join(single, "ckpt.pt"), "ema")
    assert not all(torch.equal(w[k], w0[k]) for k in w)


@pytest.mark.parametrize("args,msg", [
    (["--bogus", "1"], "unrecognized arguments"),
    (["--iters", "abc"], "invalid int value"),
    (["--iters", "0"], "--iters must be positive"),
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--dataset", "imagenet64", "--data-dir", "/nonexistent"], "not found under --data-dir"),
])
def test_bad_input_is_a_one_line_error(args, msg, tmp_path):
    r = run(["teacher.py", *args, "--out", str(tmp_path / "o")], timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_checkpoint_of_another_model_is_refused(tiny_teacher, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    ck = torch.load(tiny_teacher, weights_only=True)
    torch.save(ck, out / "ckpt.pt")
    r = run(["teacher.py", "--out", str(out), "--cond"], timeout=120)  # class-conditional != ckpt
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "--cond False, not True" in r.stderr
    with pytest.raises(SystemExit, match="trained on 'digits'"):
        teacher.load_teacher(tiny_teacher, "mnist")


def test_nan_loss_stops_in_one_line_and_writes_no_nan(tmp_path):
    """A diverging run (--lr 1e6) stops at the first logged NaN loss with one line that says
    how to rerun (a lower --lr is another run: a fresh --out), and writes no checkpoint."""
    out = str(tmp_path / "o")
    r = run(["teacher.py", "--iters", "30", "--ckpt-every", "100", "--lr", "1e6", "--warmup", "1",
             "--out", out, *FAST], timeout=300)
    msg = r.stderr.strip()
    assert r.returncode != 0 and msg.startswith("error: loss is") and "\n" not in msg
    assert "no checkpoint was written yet" in msg and "fresh --out" in msg
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))

def test_a_narrower_student_is_fitted_to_the_teachers_v():
    """--student-width 0.5: half the channels, random (seeded) weights, then published.
    warm_up_head regresses its v on the (shipped) teacher's over forward-diffused data."""
    import common as C
    import harness as H
    import published as P
    T = teacher.load_teacher(teacher.shipped_teacher_path("digits", False), "digits")
    S = teacher.make_student(T, width=0.5, seed=3)
    assert S.config["ch"] == T.config["ch"] // 2 == 12 and S.refit and S.training
    assert C.num_params(S) < C.num_params(T) / 3
    again = teacher.make_student(T, width=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(S.state_dict().values(), again.state_dict().values()))
    data = H.load_dataset("digits")
    x0 = H.to_float(data[0][:256])
    torch.manual_seed(0)
    t = torch.rand(256)
    z = C.diffuse(x0, t)

    def err():
        with torch.no_grad():
            return float((S(z, t) - T(z, t)).square().mean())
    before = err()
    P.warm_up_head(S, T, data, 60, 64, 1e-3, seed=0)
    assert err() < 0.5 * before
    assert torch.equal(teacher.make_student(T).inp.weight, T.inp.weight)  # width 1: the copy


@pytest.mark.parametrize("argv, msg", [(["--student-width", "0"], "--student-width"),
                                       (["--student-width", "0.5", "--head-warmup", "0"], "--head-warmup > 0")])
def test_bad_student_width_is_refused(argv, msg, tmp_path):
    import lcm_ddil
    with pytest.raises(SystemExit, match=msg):
        lcm_ddil.main(argv + ["--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
