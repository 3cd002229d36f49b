"""Shared fixtures. Every test runs on CPU; the repository root is importable."""
import os
import sys

import pytest

# Tests use small tensors, and some start two torchrun ranks on a 2-core machine: one intra-op
# thread per process avoids oversubscription (set before torch is imported, inherited by children).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def all_cores():
    """Every core for one in-process test of a large network (the presets' U-Nets): nothing else
    runs beside it, and torch's intra-op threads nearly halve its time on 2 cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A digits teacher trained for a few iterations: a real checkpoint, in seconds."""
    import teacher
    out = tmp_path_factory.mktemp("teacher")
    teacher.main(["--iters", "20", "--out", str(out), "--log-every", "10", "--sample-steps", "4",
                  "--seed", "0"])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="session")
def tiny_cond_teacher(tmp_path_factory):
    """A class-conditional digits teacher (null label for guidance), a few iterations."""
    import teacher
    out = tmp_path_factory.mktemp("teacher_cond")
    teacher.main(["--iters", "20", "--cond", "--out", str(out), "--log-every", "10",
                  "--sample-steps", "4", "--seed", "0"])
    return str(out / "ckpt.pt")


def random_unet(seed=0, **kw):
    """A small U-Net with every weight random (the zero-initialised layers too), so v depends on
    x, t, the label and the w input."""
    import torch
    import common as C
    torch.manual_seed(seed)
    net = C.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res=1, resolution=8, **kw)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.abs().sum() == 0 and "norm" not in name and not name.startswith(("n1", "n2")):
                p.normal_(0, 0.1)
        net.out[-1].weight.normal_(0, 0.3)
    return net


def cfg_v(net, x, t, y, w):
    """Classifier-free guidance written out independently of common.guided."""
    import torch
    v_c = net(x, t, y)
    v_u = net(x, t, torch.full_like(y, net.num_classes))
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1, 1, 1) if torch.is_tensor(w) else w
    return v_u + (1 + w) * (v_c - v_u)


def ddim_step(x, x0, t, s):
    """x_s = alpha_s x0 + sigma_s (x - alpha_t x0) / sigma_t, per-sample t and s (x0 at s = 0)."""
    import common as C
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    a_t, s_t, a_s, s_s = (C.bcast(c, x) for c in (a_t, s_t, a_s, s_s))
    return a_s * x0 + s_s * (x - a_t * x0) / s_t
