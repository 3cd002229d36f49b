"""common.py: schedule, reflection, the reference step, DDIM on a known Gaussian, U-Net, buffer,
checkpoints. (The Triton kernel against this reference is in test_scale.py.)"""
import math

import types

import pytest
import torch

import common as C
import harness as H
from teacher import load_net


# ---- schedule -------------------------------------------------------------------------------

def test_schedule_endpoints_and_variance_preserving():
    t = torch.linspace(0, 1, 101)
    lam = C.logsnr(t)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-4) and lam[-1].item() == pytest.approx(-20.0, abs=1e-4)
    assert (lam[1:] < lam[:-1]).all()  # strictly decreasing
    a, s = C.alpha_sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
    torch.testing.assert_close(torch.log(a**2 / s**2), lam, atol=1e-3, rtol=1e-4)
    assert C.alpha_sigma(0.5)[0].item() == pytest.approx(math.sqrt(0.5), abs=1e-5)  # logsnr(0.5) = 0


def test_v_parameterisation_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    a, s = C.alpha_sigma(torch.tensor(0.3))
    x = a * x0 + s * eps
    v = C.v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(C.x0_from_v(x, v, a, s), x0)
    torch.testing.assert_close(s * x + a * v, eps)  # eps_hat = sigma x_t + alpha v


# ---- reflection and the reference step --------------------------------------------------------

def test_reflect_identity_inside_and_mirror_outside():
    inside = torch.linspace(-1, 1, 201)
    torch.testing.assert_close(C.reflect(inside), inside)
    x = torch.linspace(-1, 1, 51)[1:-1]
    for k in range(-5, 6):  # several periods out, both directions
        torch.testing.assert_close(C.reflect(x + 4 * k), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(C.reflect(2 - x + 4 * k), x, atol=1e-5, rtol=0)  # mirror at +1
    assert C.reflect(torch.tensor(1.5)).item() == pytest.approx(0.5)
    assert C.reflect(torch.tensor(-1.25)).item() == pytest.approx(-0.75)
    assert C.reflect(torch.tensor(-9.5)).item() == pytest.approx(-0.5)  # -9.5 + 8 = -1.5 -> -0.5


@pytest.mark.parametrize("bound", C.BOUNDS)
@pytest.mark.parametrize("with_noise", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_reflected_step_matches_formulas(bound, with_noise, per_sample):
    g = torch.Generator().manual_seed(1)
    B = 5
    x, v, z = (3 * torch.randn(B, 2, 3, 3, generator=g) for _ in range(3))
    if per_sample:
        t, s = torch.rand(B, generator=g) * 0.8 + 0.2, torch.rand(B, generator=g) * 0.2
    else:
        t, s = torch.tensor(0.7), torch.tensor(0.4)
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    xs, x0 = C.reflected_step(x, v, a_t, s_t, a_s, s_s, noise=z if with_noise else None, bound=bound)
    for i in range(B):  # per-sample, per-formula, in float64
        at, st = float(a_t[i] if per_sample else a_t), float(s_t[i] if per_sample else s_t)
        as_, ss = float(a_s[i] if per_sample else a_s), float(s_s[i] if per_sample else s_s)
        xi, vi = x[i].double(), v[i].double()
        x0_ref = at * xi - st * vi
        if bound == "clip":
            x0_ref = x0_ref.clamp(-1, 1)
        elif bound == "reflect":
            u = x0_ref + 1
            x0_ref = 1 - ((u % 4) - 2).abs()  # torch's % is floor mod
        eps_ref = z[i].double() if with_noise else (xi - at * x0_ref) / st
        torch.testing.assert_close(x0[i].double(), x0_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xs[i].double(), as_ * x0_ref + ss * eps_ref, atol=1e-4, rtol=1e-4)
    if bound != "none":
        assert x0.abs().max() <= 1.0


def test_reflected_step_keeps_dtype_and_rejects_bad_bound():
    x = torch.randn(2, 1, 4, 4, dtype=torch.bfloat16)
    xs, x0 = C.reflected_step(x, x, 0.6, 0.8, 0.8, 0.6, bound="reflect")
    assert xs.dtype == x0.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        C.reflected_step(x, x, 0.6, 0.8, 0.8, 0.6, bound="tanh")


# ---- DDIM on a known Gaussian ---------------------------------------------------------------

MU = torch.linspace(-0.5, 0.5, 16).reshape(1, 1, 4, 4)
STD = torch.linspace(0.1, 0.6, 16).reshape(1, 1, 4, 4)


def gaussian_denoiser(x, t):
    """The exact v for data x0 ~ N(MU, STD^2): E[x0 | x_t] = MU + alpha STD^2 / (alpha^2 STD^2 + sigma^2) (x_t - alpha MU)."""
    a, s = (C.bcast(c, x) for c in C.alpha_sigma(t))
    x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MU)
    return (a * x - x0) / s


def ddim_gaussian_gain(steps):
    """DDIM with the exact denoiser is linear: x_out - MU = gain * (x_1 - alpha_1 MU). Float64."""
    ts = C.time_grid(steps).double()
    gain = torch.ones_like(STD, dtype=torch.float64)
    std = STD.double()
    for t, s in zip(ts[:-1], ts[1:]):
        lt, ls = C.logsnr(t).double(), C.logsnr(s).double()
        at, st, as_, ss = (torch.sigmoid(v).sqrt() for v in (lt, -lt, ls, -ls))
        vt = at**2 * std**2 + st**2
        gain = gain * (at * std**2 / vt if s == 0 else (as_ * at * std**2 + ss * st) / vt)
    return gain


@pytest.mark.parametrize("steps", [1, 4, 32])
def test_ddim_exact_gaussian_map(steps):
    x1 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = C.ddim_sample(gaussian_denoiser, x1, C.time_grid(steps), bound="none")
    a1 = C.alpha_sigma(1.0)[0]
    expect = MU.double() + ddim_gaussian_gain(steps) * (x1.double() - a1 * MU.double())
    torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=1e-4)


def test_ddim_many_steps_recovers_the_gaussian():
    """With many steps DDIM solves the probability-flow ODE: samples ~ N(MU, STD^2).
    DDIM is first order: the gain's error shrinks ~linearly in the step count (2.4% at 256 steps
    for STD = 0.1, under 1% at 1024). Sampling error of 4k draws: std of std ~1.1%."""
    err = [(ddim_gaussian_gain(k).float() / STD - 1).abs().max().item() for k in (256, 1024)]
    assert err[1] < 0.01 and err[1] < err[0] / 3
    x1 = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = C.ddim_sample(gaussian_denoiser, x1, C.time_grid(1024), bound="none")
    torch.testing.assert_close(out.mean(0, keepdim=True), MU, atol=0.035, rtol=0)  # 4 std errors
    torch.testing.assert_close(out.std(0, keepdim=True), STD, atol=0, rtol=0.05)  # 4.5 std errors


def test_ddim_states_and_renoise_sampler():
    x1 = torch.randn(8, 1, 4, 4)
    out, states = C.ddim_sample(gaussian_denoiser, x1, C.time_grid(4), bound="reflect", return_states=True)
    assert len(states) == 4 and states[0] is x1 and out.abs().max() <= 1
    # re-noising: x_{tau_2} = alpha x0_hat(x_1) + sigma z exactly
    z = [torch.randn_like(x1) for _ in range(4)]
    _, st = C.ddim_sample(gaussian_denoiser, x1, C.time_grid(4), bound="none", noises=z, return_states=True)
    a, s = C.alpha_sigma(1.0)
    x0 = C.x0_from_v(x1, gaussian_denoiser(x1, torch.ones(8)), a, s)
    a2, s2 = C.alpha_sigma(0.75)
    torch.testing.assert_close(st[1], a2 * x0 + s2 * z[0], atol=1e-5, rtol=1e-5)


# ---- U-Net --------------------------------------------------------------------------------

def test_unet_digits_shapes_conditioning_and_features():
    torch.manual_seed(0)
    net = C.build_unet("digits", num_classes=10, w_embed=True)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    torch.testing.assert_close(net(x, t, None, w=torch.full((3,), 3.0)), net(x, t, None))  # w zero-init
    for p in net.parameters():  # zero-initialised output layers would hide the conditioning
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    v, feats = net(x, t, torch.tensor([0, 1, 10]), return_features=True)
    assert v.shape == x.shape and feats.shape[:2] == (3, net.mid_ch)
    assert not torch.allclose(net(x, t, torch.tensor([0, 0, 0])), net(x, t, torch.tensor([5, 5, 5])))
    torch.testing.assert_close(net(x, t, None), net(x, t, torch.full((3,), 10)))  # None = null class
    assert not torch.allclose(net(x, t, None, w=torch.full((3,), 3.0)), net(x, t, None))


@pytest.mark.parametrize("preset,classes", [("cifar10", 0), ("imagenet64", 1000)])
def test_unet_large_presets_on_meta(preset, classes):
    with torch.device("meta"):
        net = C.build_unet(preset)
        res, ch = C.MODEL_PRESETS[preset]["resolution"], C.MODEL_PRESETS[preset]["in_ch"]
        x = torch.empty(2, ch, res, res)
        y = torch.zeros(2, dtype=torch.long) if classes else None
        v = net(x, torch.empty(2), y)
    assert v.shape == x.shape and net.num_classes == classes
    assert 20e6 < C.num_params(net) < 400e6


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w0 = a.weight.detach().clone()
    C.ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * w0 + 0.1 * b.weight)


def test_guided_is_classifier_free_guidance_or_a_w_input():
    torch.manual_seed(0)
    teacher = C.build_unet("digits", ch=8, num_classes=3)
    student = C.build_unet("digits", ch=8, num_classes=3, w_embed=True)
    for p in [*teacher.parameters(), *student.parameters()]:
        p.data.normal_(0, 0.1)
    x, t, y, w = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 1]), torch.tensor([0.0, 1.0, 2.5, 4.0])
    v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full((4,), 3))  # 3 = the null label
    want = v_u + (1 + w.view(-1, 1, 1, 1)) * (v_c - v_u)
    torch.testing.assert_close(C.guided(teacher, y, w)(x, t), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(C.guided(teacher, y, 2.5)(x, t), v_u + 3.5 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert torch.equal(C.guided(teacher, y, 0.0)(x, t), v_c)  # w = 0: the conditional model
    assert torch.equal(C.guided(teacher, y, torch.zeros(4))(x, t), v_c)
    assert torch.equal(C.guided(student, y, w)(x, t), student(x, t, y, w))  # w is an input


# ---- the DDIL mixing buffer ------------------------------------------------------------------

def test_source_counts():
    assert C.source_counts(128, (1, 0, 0)) == [128, 0, 0]
    assert C.source_counts(128, (0.5, 0, 0.5)) == [64, 0, 64]
    assert C.source_counts(10, (1 / 3, 1 / 3, 1 / 3)) == [4, 3, 3]
    for B in (1, 7, 64, 100):
        for betas in [(0.25, 0.25, 0.5), (0.1, 0.2, 0.7), (0.34, 0.33, 0.33)]:
            c = C.source_counts(B, betas)
            assert sum(c) == B and all(abs(n - B * b) <= 1 for n, b in zip(c, betas))
    assert H.check_betas(2, 0, 2) == (0.5, 0, 0.5)
    for bad in [(-1, 1, 0), (0, 0, 0)]:
        with pytest.raises(SystemExit, match="error"):
            H.check_betas(*bad)


def test_ramped_betas_and_shared_ddil_flags():
    betas = (0.5, 0.0, 0.5)
    assert C.ramped_betas(betas, 0.3, 0.0) == betas  # no ramp: the fixed priors
    assert C.ramped_betas(betas, 0.0, 0.5) == (1.0, 0.0, 0.0)  # starts as pure data
    assert C.ramped_betas(betas, 0.25, 0.5) == pytest.approx((0.75, 0.0, 0.25))  # linear
    assert C.ramped_betas(betas, 0.5, 0.5) == betas and C.ramped_betas(betas, 0.9, 0.5) == betas
    for frac in (0.0, 0.1, 0.2, 0.4):  # sums to 1 throughout; the teacher's share never moves
        b = C.ramped_betas((0.25, 0.25, 0.5), frac, 0.4)
        assert sum(b) == pytest.approx(1.0) and b[1] == 0.25
    cfg = types.SimpleNamespace(beta_data=1.0, beta_teacher=0.0, beta_student=1.0, beta_ramp=0.5,
                                eval_every=0, eval_every_samples=250, student_head="copy", head_warmup=200,
                                teacher="")
    assert H.check_ddil(cfg) == (0.5, 0.0, 0.5)
    assert H.check_ddil(types.SimpleNamespace(**{**vars(cfg), "student_head": "v", "teacher": "diffusers:x"}))
    for field, bad, msg in (("beta_ramp", 1.5, "--beta-ramp"), ("eval_every", -1, "--eval-every"),
                            ("eval_every_samples", 0, "--eval-every-samples"), ("head_warmup", -1, "--head-warmup"),
                            ("student_head", "v", "--student-head v re-reads a published eps")):
        with pytest.raises(SystemExit, match=msg):
            H.check_ddil(types.SimpleNamespace(**{**vars(cfg), field: bad}))


def test_buffer_stores_detached_and_keeps_dtype_and_conditioning():
    buf = C.MixingBuffer(capacity=16)
    g = torch.ones(1, requires_grad=True)
    x = (torch.randn(6, 1, 2, 2) * g).to(torch.float64)
    buf.push(x, torch.linspace(0, 1, 6), torch.arange(6), torch.arange(6) * 0.5)
    torch.manual_seed(0)
    xs, ts, ys, ws = buf.sample(32)
    assert not xs.requires_grad and xs.grad_fn is None and xs.dtype == torch.float64
    assert ts.dtype == torch.float32 and set(ys.tolist()) <= set(range(6))
    # every sampled state is one that was pushed, with its own time, label and guidance weight
    for xi, ti, yi, wi in zip(xs, ts, ys, ws):
        assert torch.equal(xi, x[yi].detach()) and ti.item() == pytest.approx(yi.item() / 5)
        assert wi.item() == yi.item() * 0.5
    buf.push(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2))  # no labels / weights: -1, 0
    assert buf.y[6:8].tolist() == [-1, -1] and buf.w[6:8].tolist() == [0.0, 0.0]


def test_buffer_push_beyond_capacity_keeps_states_from_every_time_and_the_ring_order():
    """A refresh larger than the ring (time-major: every trajectory at tau_1, then tau_2, ...)
    keeps a uniform subset of its states, never one end of the time axis."""
    buf = C.MixingBuffer(4)
    buf.push(torch.arange(3.0)[:, None], torch.zeros(3))            # 0 1 2 _
    buf.push(torch.arange(10.0, 16.0)[:, None], torch.zeros(6))     # more than capacity
    kept = buf.x[:, 0].tolist()
    assert len(buf) == 4 and len(set(kept)) == 4 and set(kept) <= set(range(10, 16))
    buf.push(torch.tensor([[99.0]]), torch.zeros(1))                # replaces the oldest slot
    assert 99.0 in buf.x[:, 0].tolist() and len(set(buf.x[:, 0].tolist()) & set(kept)) == 3

    torch.manual_seed(0)
    K, n = 4, 256  # one refresh of 256 trajectories x 4 times into a ring of 256
    times = torch.tensor([1.0, 0.75, 0.5, 0.25]).repeat_interleave(n)
    buf = C.MixingBuffer(n)
    buf.push(torch.randn(K * n, 1), times)
    counts = [(buf.t == t).sum().item() for t in (1.0, 0.75, 0.5, 0.25)]
    assert all(30 < c < 100 for c in counts), counts  # about n / K each; the old code kept 0.25 only


def test_buffer_staleness_bound():
    """capacity states, refresh trajectories of T states per iteration: no state older than
    ceil(capacity / (refresh * T)) iterations is ever sampled."""
    capacity, refresh, T = 40, 2, 4
    bound = math.ceil(capacity / (refresh * T))
    buf = C.MixingBuffer(capacity)
    for it in range(30):
        buf.push(torch.full((refresh * T, 1), float(it)), torch.zeros(refresh * T))
        x = buf.sample(200)[0]
        assert (it - x.min().item()) < bound
        assert len(buf) == min(capacity, (it + 1) * refresh * T)


def test_replay_fills_then_refreshes_and_cat_states_keeps_sources():
    buf, calls = C.MixingBuffer(64), []

    def rollout(n):  # n trajectories of T = 4 states, labelled by call
        calls.append(n)
        return torch.full((n * 4, 1, 2, 2), float(len(calls))), torch.rand(n * 4), None, torch.full((n * 4,), 2.0)
    assert C.replay(buf, rollout, 0, 3, 4) is None and calls == []  # source off: no rollout
    x, t, y, w = C.replay(buf, rollout, 10, 1, 4)
    assert calls == [3] and len(buf) == 12  # first fill: ceil(10 / 4) trajectories serve 10 states
    assert (y == -1).all() and (w == 2.0).all() and x.shape == (10, 1, 2, 2)
    C.replay(buf, rollout, 10, 1, 4)
    assert calls == [3, 1] and len(buf) == 16  # then `trajectories` per call
    C.replay(buf, rollout, 10, 0, 4)
    assert calls == [3, 1]  # no refresh this iteration
    data = (torch.zeros(5, 1, 2, 2), torch.rand(5), torch.arange(5), None)
    x, t, y, w, src = C.cat_states(data, None, C.replay(buf, rollout, 3, 0, 4))
    assert src.tolist() == [0] * 5 + [2] * 3 and (x[:5] == 0).all() and (x[5:] > 0).all()
    assert y.tolist() == [0, 1, 2, 3, 4, -1, -1, -1] and w.tolist() == [0.0] * 5 + [2.0] * 3


def test_buffer_state_dict_round_trip():
    buf = C.MixingBuffer(8)
    buf.push(torch.randn(5, 3), torch.rand(5), torch.arange(5), torch.rand(5))
    other = C.MixingBuffer(8)
    other.load_state_dict(buf.state_dict())
    torch.manual_seed(3)
    a = buf.sample(6)
    torch.manual_seed(3)
    assert all(torch.equal(u, v) for u, v in zip(a, other.sample(6)))
    buf.push(torch.randn(1, 3), torch.rand(1)), other.push(torch.randn(1, 3), torch.rand(1))
    assert buf.ptr == other.ptr == 6


# ---- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    net = C.build_unet("digits")
    path = str(tmp_path / "ckpt.pt")
    H.save_checkpoint(path, {"net": net.state_dict(), "model_config": net.config, "step": 7,
                             "sampler": "ddim", "config": {"dataset": "digits"}})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    loaded, kind, ck = load_net(path)
    assert kind == "ddim" and ck["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_wrong_shape_checkpoint_is_one_line_error(tmp_path):
    small, big = C.build_unet("digits"), C.build_unet("digits", ch=32)
    with pytest.raises(SystemExit) as e:
        H.load_weights(big, small.state_dict())
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and "(96, 24)" in msg and "(128, 32)" in msg
    with pytest.raises(SystemExit, match="not found"):
        H.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="could not load"):
        H.load_checkpoint(str(tmp_path / "junk.pt"))


def test_dagger_rollout_mixes_own_and_expert_steps_per_trajectory():
    own = lambda x, i, idx: x + 1.0  # noqa: E731
    expert = lambda x, i, idx: x + 100.0 + 0 * idx.view(-1, 1).float()  # noqa: E731
    x1 = torch.zeros(4000, 1)
    torch.manual_seed(0)
    states = C.dagger_rollout(x1, 3, own, expert, p=0.0)
    assert [s.max().item() for s in states] == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(C.dagger_rollout(x1, 3, own, expert, p=1.0)[-1], torch.full((4000, 1), 300.0))
    steps = C.dagger_rollout(x1, 3, own, expert, p=0.25)
    took_expert = torch.stack([(b - a) > 50 for a, b in zip(steps, steps[1:])])  # [3, n, 1]
    assert abs(took_expert.float().mean().item() - 0.25) < 0.02  # per step and trajectory
    assert took_expert.any(0).float().mean() > took_expert[0].float().mean()  # not one coin per rollout
