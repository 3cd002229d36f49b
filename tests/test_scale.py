"""Large-scale paths on CPU: teacher.py at the cifar10 / imagenet64 presets on fake data in the
real formats, bench/kernel.py's dry run, and the Triton kernel (interpreted) against torch."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common as C
import teacher
from test_data import write_cifar10, write_imagenet64_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keep_two_samples(monkeypatch):
    """teacher.py ends with 64 DDIM samples: minutes of CPU for the cifar10 network, hours for the
    imagenet64 one. Keep the first 2 of them (same noise, sampler and network)."""
    real_sample, real_guided = C.ddim_sample, C.guided
    monkeypatch.setattr(C, "ddim_sample", lambda denoise, x, ts, *a, **k: real_sample(denoise, x[:2], ts, *a, **k))
    monkeypatch.setattr(C, "guided", lambda net, y=None, w=0.0, null_class=None: real_guided(
        net, None if y is None else y[:2], w, null_class))


@pytest.mark.slow
def test_teacher_cifar10_preset(tmp_path, monkeypatch):
    """Two iterations of the cifar10 preset (the ~35M U-Net, reduced batch) on CIFAR pickles."""
    write_cifar10(tmp_path / "data", n_per_batch=2)
    keep_two_samples(monkeypatch)
    out = tmp_path / "out"
    teacher.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                  "--iters", "2", "--batch-size", "2", "--sample-steps", "2", "--device", "cpu",
                  "--log-every", "1"])
    ck = C.load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] == 2 and ck["model_config"] == C.build_unet("cifar10").config
    assert ck["config"]["lr"] == teacher.PRESETS["cifar10"]["lr"] and ck["config"]["batch_size"] == 2
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] == r["loss"] for r in logs)
    # the optimiser moved the weights (the output conv starts at zero in every U-Net)
    assert ck["model"]["out.2.weight"].abs().sum() > 0
    assert (out / "samples.png").stat().st_size > 0
    shutil.rmtree(out)  # pytest keeps the last runs' tmp dirs: don't leave checkpoints behind


@pytest.mark.slow
def test_teacher_imagenet64_preset(tmp_path, monkeypatch):
    """Two iterations of the imagenet64 preset (the class-conditional ADM-width U-Net) at batch 2
    on npz batches."""
    write_imagenet64_npz(tmp_path / "data", sizes=(2, 2))
    keep_two_samples(monkeypatch)
    out = tmp_path / "out"
    teacher.main(["--dataset", "imagenet64", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                  "--iters", "2", "--batch-size", "2", "--sample-steps", "2", "--device", "cpu",
                  "--log-every", "1"])
    ck = C.load_checkpoint(str(out / "ckpt.pt"))
    cfg = C.build_unet("imagenet64").config
    assert ck["step"] == 2 and ck["model_config"] == cfg and cfg["num_classes"] == 1000
    assert ck["config"]["cond"] and ck["config"]["lr"] == teacher.PRESETS["imagenet64"]["lr"]
    assert sum(v.numel() for v in ck["model"].values()) > 200e6  # the preset network, not a toy
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] == r["loss"] for r in logs)
    assert (out / "samples.png").stat().st_size > 0
    del ck
    shutil.rmtree(out)  # a 4.5 GB checkpoint (weights, EMA, Adam): don't leave it in /tmp


def test_bench_kernel_dry(tmp_path):
    """The benchmark end to end on CPU: eager torch, and the Triton column through the interpreter."""
    out = tmp_path / "kernel.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "bench/kernel.py", "--dry", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| shape | elements | dtype | bound | noise |")
    rows = json.load(open(out))["rows"]
    assert len(lines) == 2 + len(rows) == 2 + 2 * 2 * 2 * 2  # sizes x dtypes x bounds x noise
    assert {(r["dtype"], r["bound"], r["noise"]) for r in rows} == {
        (d, b, z) for d in ("float32", "bfloat16") for b in ("none", "reflect") for z in (False, True)}
    for row in rows:
        assert row["ok"] and set(row["us"]) == {"eager", "triton", "rows"} and min(row["us"].values()) > 0
        assert row["bytes"] == row["numel"] * (4 if row["dtype"] == "float32" else 2) * (4 + row["noise"])


def test_bench_kernel_bad_flags():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernel", os.path.join(ROOT, "bench", "kernel.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for flags, msg in ((["--dtypes", "float8"], "--dtypes"), (["--sizes", "128x3xA"], "--sizes"),
                       (["--bounds", "wrap"], "--bounds")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(flags)


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
KERNEL_CHECK = r"""
import json, torch, common as C
assert C.triton is not None
torch.manual_seed(0)
res = []
shapes = [(1, 1, 3, 5), (3, 3, 17, 23), (5, 2, 7, 11), (8, 3, 9, 9)]  # odd sizes, rows split blocks
for shape in shapes:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bound in C.BOUNDS:
            for noisy in (False, True):
                for per_sample in (True, False):
                    B = shape[0]
                    x = (3 * torch.randn(shape)).to(dtype)  # |x0| well past 1: reflect folds often
                    v = (3 * torch.randn(shape)).to(dtype)
                    z = torch.randn(shape).to(dtype) if noisy else None
                    t = torch.rand(B) * 0.9 + 0.05 if per_sample else torch.tensor(0.6)
                    a_t, s_t = C.alpha_sigma(t)
                    a_s, s_s = C.alpha_sigma(t - 0.04)
                    if not per_sample:
                        a_t, s_t, a_s, s_s = (float(c) for c in (a_t, s_t, a_s, s_s))
                    ref = C.reflected_step_torch(x, v, a_t, s_t, a_s, s_s, noise=z, bound=bound)
                    for block in (64, 1024):
                        out = C.reflected_step_triton(x, v, a_t, s_t, a_s, s_s, noise=z, bound=bound, block=block)
                        res.append(dict(case=f"{shape} {dtype} {bound} noise={noisy} per_sample={per_sample} block={block}",
                            bound=bound, dtype=str(dtype), dtypes=[str(o.dtype) for o in out], shapes=[list(o.shape) for o in out],
                            err=max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref)),
                            scale=max(r.float().abs().max().item() for r in ref),
                            x0_max=ref[1].float().abs().max().item()))
# a non-contiguous input (a transposed view) and the public entry point
x, v = torch.randn(2, 3, 5, 7).transpose(2, 3), torch.randn(2, 3, 5, 7).transpose(2, 3)
c = C.alpha_sigma(torch.tensor([0.3, 0.7]))
out = C.reflected_step(x, v, *c, *c, bound="reflect", backend="triton")
ref = C.reflected_step_torch(x, v, *c, *c, bound="reflect")
res.append(dict(case="transposed view", bound="reflect", dtype="torch.float32", dtypes=[str(o.dtype) for o in out],
    shapes=[list(o.shape) for o in out], err=max((o - r).abs().max().item() for o, r in zip(out, ref)),
    scale=1.0, x0_max=1.0))
print(json.dumps(res))
"""


def test_triton_kernel_matches_torch():
    """The Triton kernel, run by the interpreter on CPU, equals reflected_step_torch: odd sizes,
    several batch sizes, per-sample and scalar coefficients, every bound, with and without noise,
    fp32 / bf16 / fp16 inputs, tails that do not fill a block."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == 4 * 3 * 3 * 2 * 2 * 2 + 1
    for c in res:
        dtype = getattr(torch, c["dtype"].split(".")[1])
        assert c["dtypes"] == [c["dtype"]] * 2 and c["shapes"][0] == c["shapes"][1], c["case"]
        # Both compute in fp32. The interpreter rounds fp32 -> bf16 toward zero where torch (and
        # Triton on a GPU) round to nearest even, so bf16 outputs may differ by one ulp here.
        tol = (1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps) * max(1.0, c["scale"])
        assert c["err"] <= tol, c
        if c["bound"] != "none":
            assert c["x0_max"] <= 1.0, c  # clip / reflect keep x0_hat in [-1, 1]
    assert max(c["x0_max"] for c in res if c["bound"] == "none") > 3  # so the bounds had work to do
