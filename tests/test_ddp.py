"""torchrun with 2 CPU ranks (gloo): the ranks hold identical weights after training, and a run
killed after a checkpoint and resumed equals the uninterrupted one, every rank's own replay
buffers included (each rank resumes its own, not rank 0's)."""
import os
import subprocess
import sys

import pytest
import torch

import harness as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--batch-size", "8", "--buffer-size", "32", "--refresh", "2", "--refresh-every", "1",
        "--eval-samples", "16", "--shift-samples", "8", "--ref-samples", "0", "--reference-steps", "4", "--log-every", "1",
        "--ckpt-every", "2", "--beta-data", "0.5", "--beta-teacher", "0.25", "--beta-student", "0.25",
        "--seed", "2"]


def torchrun(tmp_path, teacher, out, iters, port):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import lcm_ddil\n"
        "net = lcm_ddil.main(sys.argv[1:])\n"
        "torch.save(net.state_dict(), sys.argv[sys.argv.index('--out') + 1] + f'/rank{dist.get_rank()}.pt')\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(driver), "--teacher", teacher, "--out", str(out),
                        "--iters", str(iters), *ARGS], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_ranks_agree_and_a_resumed_run_equals_the_uninterrupted_one(tiny_teacher, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(tmp_path, tiny_teacher, full, 4, 29531)
    torchrun(tmp_path, tiny_teacher, resumed, 2, 29532)  # "killed" after its step-2 checkpoint
    assert os.path.isfile(f"{resumed}/ckpt.pt.rank1.step2")
    r = torchrun(tmp_path, tiny_teacher, resumed, 4, 29533)
    assert "resuming from" in r.stdout
    for out in (full, resumed):  # DDP: both ranks end with the same weights
        w0, w1 = (torch.load(f"{out}/rank{i}.pt", weights_only=True) for i in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
    a, b = (torch.load(f"{d}/ckpt.pt", weights_only=True) for d in (full, resumed))
    for key in ("net", "target"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # every rank's own buffers: rank 1's differ from rank 0's, and survive the resume exactly
    a1, b1 = (torch.load(f"{d}/ckpt.pt.rank1.step4", weights_only=True) for d in (full, resumed))
    assert not os.path.exists(f"{resumed}/ckpt.pt.rank1.step2")  # the old sidecar is gone
    for name in ("teacher", "student"):
        assert torch.equal(a["buffers"][name]["x"], b["buffers"][name]["x"]), name
        assert torch.equal(a1["buffers"][name]["x"], b1["buffers"][name]["x"]), name
        assert not torch.equal(a["buffers"][name]["x"], a1["buffers"][name]["x"]), name


def test_per_rank_keys_stay_in_the_checkpoint_on_one_process(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    H.save_checkpoint(path, {"step": 3, "net": {"w": torch.ones(2)}, "buffers": {"x": torch.zeros(1)}},
                      per_rank=("buffers",))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no sidecar for rank 0
    ck = H.load_checkpoint(path, per_rank=("buffers",))
    assert ck["step"] == 3 and torch.equal(ck["buffers"]["x"], torch.zeros(1))
