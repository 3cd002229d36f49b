"""lcm_ddil.py: boundary condition, target network, teacher solver, sampling grid, end to end, resume."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import common as C
import harness as H
from teacher import load_net
import lcm_ddil as L
from conftest import cfg_v, ddim_step, random_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_boundary_condition_f_tends_to_x():
    net = random_unet()
    big_v = lambda x, t, y=None, w=None: torch.full_like(x, 100.0)  # x0_hat far from x near t = 0
    x = 2 * torch.randn(6, 1, 8, 8)
    c_skip, c_out = L.scalings(torch.tensor([0.0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    with torch.no_grad():
        t0 = torch.zeros(6)
        a0, s0 = C.alpha_sigma(0.0)
        assert (C.x0_from_v(x, big_v(x, t0), a0, s0) - x).abs().min() > 1e-3  # x0_hat(x, 0) != x
        assert torch.equal(L.consistency_fn(big_v, x, t0, bound="none"), x)  # ... but f(x, 0) = x exactly
        assert torch.equal(L.consistency_fn(net, x, t0, bound="none"), x)
        errs = [(L.consistency_fn(big_v, x, torch.full((6,), t), bound="none") - x).abs().max().item()
                for t in (1e-2, 1e-6, 1e-7, 1e-8, 1e-9)]
        assert errs[0] > 0.5 and all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-3
        # at the sampling times of K <= 4, f is x0_hat to float precision (the docstring's claim)
        t = torch.full((6,), 0.25)
        alpha, sigma = C.alpha_sigma(t[0])
        x0 = C.x0_from_v(x, net(x, t), alpha, sigma)
        assert L.scalings(0.25)[0].item() < 1e-7
        assert torch.allclose(L.consistency_fn(net, x, t, bound="none"), x0, atol=1e-6)


def test_target_ema0_is_student_and_gets_no_gradient():
    student, teacher = random_unet(1), random_unet(2).requires_grad_(False)
    x, n = torch.randn(8, 1, 8, 8), torch.tensor([1, 2, 3, 10, 20, 30, 47, 48])

    target = L.make_target(student, 0.0)
    assert target is student
    L.consistency_loss(student, target, teacher, x, n, 48, bound="reflect").mean().backward()
    g_cd = [p.grad.clone() for p in student.parameters()]
    # the same loss with the label computed beforehand as a constant: identical gradients, so
    # nothing flowed through the target branch
    student.zero_grad()
    t, s = n / 48, (n - 1) / 48
    with torch.no_grad():
        label = L.consistency_fn(student, L.teacher_step(teacher, x, t, s, bound="reflect"), s, bound="reflect")
    L.distance(L.consistency_fn(student, x, t, bound="none"), label).mean().backward()
    for a, p in zip(g_cd, student.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-8)
    assert any(a.abs().sum() > 0 for a in g_cd)

    # EMA target: a separate frozen copy that never gets a gradient, updated by lerp
    target = L.make_target(student, 0.95)
    assert target is not student and not any(p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    student.zero_grad()
    L.consistency_loss(student, target, teacher, x, n, 48, bound="reflect").mean().backward()
    assert all(p.grad is None for p in target.parameters())
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    L.update_target(target, student, 0.95)
    for b, pt, ps in zip(before, target.parameters(), student.parameters()):
        assert torch.allclose(pt, 0.95 * b + 0.05 * ps, atol=1e-6)
    L.update_target(student, student, 0.95)  # decay 0 / same net: a no-op


@pytest.mark.parametrize("bound", C.BOUNDS)
def test_teacher_step_is_commons_ddim_step(tiny_teacher, bound):
    teacher, _, _ = load_net(tiny_teacher)
    torch.nn.init.normal_(teacher.out[-1].weight, std=0.3)  # 20 iterations leave v ~ 0
    grid = 48
    n = torch.tensor([1, 1, 2, 12, 24, 36, 47, 48])
    x = 1.5 * torch.randn(len(n), 1, 8, 8)
    got = L.teacher_step(teacher, x, n / grid, (n - 1) / grid, bound=bound)
    for i, k in enumerate(n.tolist()):
        ts = torch.tensor([k / grid, (k - 1) / grid])
        want = C.ddim_sample(lambda z, t: teacher(z, t), x[i:i + 1], ts, bound=bound)
        assert torch.allclose(got[i:i + 1], want, atol=1e-5), (bound, k)


# ---- one training iteration, piece by piece, against independent computations -----------------

def cd_label(target, teacher, x, t, s, y, w, bound):
    """The CD label written out: one guided teacher DDIM step t -> s with x0 bounded, then the
    target's consistency function f = c_skip x + c_out x0_hat at s (w as the target's input)."""
    a_t, s_t = (C.bcast(c, x) for c in C.alpha_sigma(t))
    x0 = C.bound_x0(a_t * x - s_t * cfg_v(teacher, x, t, y, w), bound)
    x_s = ddim_step(x, x0, t, s)
    x_s = torch.where(C.bcast(s, x) == 0, x0, x_s)
    a_s, s_s = (C.bcast(c, x) for c in C.alpha_sigma(s))
    x0_target = C.bound_x0(a_s * x_s - s_s * target(x_s, s, y, w), bound)
    st = L.S_T * s.double()
    c_skip = (L.SD ** 2 / (st ** 2 + L.SD ** 2)).float().view(-1, 1, 1, 1)
    c_out = (st / (st ** 2 + L.SD ** 2).sqrt()).float().view(-1, 1, 1, 1)
    return c_skip * x_s + c_out * x0_target


def student_f(student, x, t, y, w):
    a, s = (C.bcast(c, x) for c in C.alpha_sigma(t))
    st = L.S_T * t.double()
    c_skip = (L.SD ** 2 / (st ** 2 + L.SD ** 2)).float().view(-1, 1, 1, 1)
    c_out = (st / (st ** 2 + L.SD ** 2).sqrt()).float().view(-1, 1, 1, 1)
    return c_skip * x + c_out * (a * x - s * student(x, t, y, w))


@pytest.mark.parametrize("bound", ["none", "reflect"])
def test_guided_loss_and_update_match_the_written_out_cd_step(bound):
    teacher = random_unet(3, num_classes=3).requires_grad_(False)
    student = random_unet(4, num_classes=3, w_embed=True)
    target = L.make_target(student, 0.9)
    with torch.no_grad():
        for p in target.parameters():  # a target that differs from the student
            p.add_(0.05 * torch.randn_like(p))
    grid = 12
    n = torch.tensor([1, 3, 6, 12, 12, 2])
    x, y, w = 1.5 * torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0, 2]), torch.tensor([0.0, 1.0, 2.5, 4.0, 1.5, 3.0])
    t, s = n / grid, (n - 1) / grid
    label = cd_label(target, teacher, x, t, s, y, w, bound)
    want = (student_f(student, x, t, y, w) - label).square().flatten(1).mean(1)
    got = L.consistency_loss(student, target, teacher, x, n, grid, y, w, bound=bound)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    # the update: SGD on the mean loss moves the student by -lr * grad; the target follows by EMA
    cfg = types.SimpleNamespace(grid=grid, grad_accum=1, bf16=False, bound=bound, loss="l2",
                                huber_c=1e-3, grad_clip=1e9, target_ema=0.9)
    want.mean().backward()
    grads = [p.grad.clone() for p in student.parameters()]
    before = [p.detach().clone() for p in student.parameters()]
    target_before = [p.detach().clone() for p in target.parameters()]
    student.zero_grad()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    losses = L.train_step(student, student, target, teacher, opt, x, t, y, w, cfg)
    torch.testing.assert_close(losses, want.detach(), atol=1e-5, rtol=1e-4)
    for p, b, g in zip(student.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)
    for pt, tb, ps in zip(target.parameters(), target_before, student.parameters()):
        torch.testing.assert_close(pt, 0.9 * tb + 0.1 * ps.detach(), atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())


def test_state_sources_keep_their_conditioning_and_come_from_the_right_network():
    teacher = random_unet(3, num_classes=3).requires_grad_(False)
    student = random_unet(4, num_classes=3, w_embed=True)
    K, grid, m = 2, 8, 3
    x1, y, w = torch.randn(m, 1, 8, 8), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    # teacher: its own guided DDIM on the training grid (8 steps), kept at tau = 1 and 1/2
    x, t, yy, ww = L.teacher_rollout(teacher, x1, y, w, steps=K, grid=grid, bound="reflect")
    z = x1
    with torch.no_grad():
        for i in range(grid // K):  # 4 fine steps from t = 1 to t = 1/2
            tt, ss = torch.full((m,), 1 - i / grid), torch.full((m,), 1 - (i + 1) / grid)
            a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
            z = ddim_step(z, C.reflect(a * z - sg * cfg_v(teacher, z, tt, y, w)), tt, ss)
    torch.testing.assert_close(x[:m], x1)
    torch.testing.assert_close(x[m:], z, atol=1e-5, rtol=1e-4)
    assert t.tolist() == [1.0] * m + [0.5] * m and yy.tolist() == y.tolist() * 2 and ww.tolist() == w.tolist() * 2
    # student: its own re-noising sampler, at its w input; the state at 1/2 is its x0 re-noised
    torch.manual_seed(5)
    x, t, yy, ww = L.student_rollout(student, x1, y, w, steps=K, bound="none")
    torch.manual_seed(5)
    noise = torch.randn_like(x1)
    with torch.no_grad():
        a, sg = C.alpha_sigma(1.0)
        x0 = a * x1 - sg * student(x1, torch.ones(m), y, w)
        a2, s2 = C.alpha_sigma(0.5)
        torch.testing.assert_close(x[m:], a2 * x0 + s2 * noise, atol=1e-5, rtol=1e-4)
    assert ww.tolist() == w.tolist() * 2 and not x.requires_grad
    # data: forward diffusion at grid times, labels and weights as given
    torch.manual_seed(7)
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    xd, td, yd, wd = L.data_states(x0, torch.arange(5), torch.full((5,), 2.0), grid)
    torch.manual_seed(7)
    torch.rand(5, 1, 8, 8)
    t_want = torch.randint(1, grid + 1, (5,)) / grid
    eps = torch.randn_like(x0)
    a, sg = (C.bcast(c, x0) for c in C.alpha_sigma(t_want))
    torch.testing.assert_close(td, t_want)
    torch.testing.assert_close(xd, a * x0 + sg * eps)
    assert yd.tolist() == list(range(5)) and wd.tolist() == [2.0] * 5


def test_student_and_target_have_no_dropout():
    teacher = random_unet(3, num_classes=3, dropout=0.5)
    with torch.no_grad():  # (zero-initialised layers would hide dropout)
        for p in teacher.parameters():
            p.normal_(0, 0.2)
    student = C.student_of(teacher, w_embed=True)
    target = L.make_target(student, 0.95)
    x, t, y, w = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4) % 3, torch.ones(4)
    assert student.training and student.config["dropout"] == 0.0
    assert torch.equal(student(x, t, y, w), student(x, t, y, w))  # deterministic in train mode
    assert torch.equal(student(x, t, y, w), target(x, t, y, w))  # same randomness: none
    teacher.train()
    assert not torch.equal(teacher(x, t, y), teacher(x, t, y))  # (the teacher's dropout is real)


def test_sampling_times_on_grid_and_off_grid_error():
    for K, grid in [(1, 48), (2, 48), (4, 48), (8, 48), (3, 48), (4, 20)]:
        taus = L.sampling_times(K, grid)
        assert taus[0] == 1 and taus[-1] == 0 and len(taus) == K + 1
        assert torch.allclose(taus * grid, (taus * grid).round(), atol=1e-4)
    with pytest.raises(SystemExit, match="not on the --grid 50"):
        L.sampling_times(4, 50)
    r = subprocess.run([sys.executable, "lcm_ddil.py", "--steps", "5", "--grid", "48",
                        "--out", "/nonexistent/never-written"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--grid" in lines[0], r.stderr


def run(tmp_path, teacher, out, iters, **extra):
    args = {"teacher": teacher, "out": str(tmp_path / out), "iters": iters, "batch-size": 8,
            "ckpt-every": 2, "log-every": 1, "eval-samples": 16, "reference-steps": 8,
            "beta-data": 0.5, "beta-teacher": 0.25, "beta-student": 0.25,
            "buffer-size": 32, "refresh": 2, "refresh-every": 2, "seed": 3, "ref-samples": 16,
            "shift-samples": 16, **extra}
    argv = [s for k, v in args.items() for s in (f"--{k}", str(v))]
    return L.main(argv)


def test_end_to_end_writes_outputs_and_resume_is_exact(tmp_path, tiny_teacher):
    run(tmp_path, tiny_teacher, "full", 4)
    out = tmp_path / "full"
    for f in ("ckpt.pt", "log.jsonl", "samples.png", "metrics.json", "config.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["student"]) == {"1", "2", "4"} and set(m["teacher"]) == {"1", "2", "4", "8"}
    for row in list(m["student"].values()) + list(m["teacher"].values()):
        assert {"fd", "kid", "precision", "recall", "entropy"} <= set(row)
    cs = m["covariate_shift"]
    assert cs["t"] == [1.0, 0.75, 0.5, 0.25] and len(cs["ratio"]) == 4
    assert m["it_per_s"] > 0 and m["config"]["steps"] == 4
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert {"loss_data", "loss_teacher", "loss_student"} <= set(logs[0])
    net, sampler, ck = load_net(str(out / "ckpt.pt"))  # evaluate.py's entry point
    assert sampler == "renoise" and ck["steps"] == 4 and ck["step"] == 4

    # interrupted after step 2 (a checkpoint), then resumed: bit-identical to the full run, though
    # this one also samples an FD curve during training (--eval-every), which must not perturb it
    curve = {"eval-every": 1, "eval-every-samples": 8}
    run(tmp_path, tiny_teacher, "resumed", 2, **curve)
    run(tmp_path, tiny_teacher, "resumed", 4, **curve)
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    fd_recs = [r for r in logs if "fd" in r]
    assert [r["step"] for r in fd_recs] == [1, 2, 3, 4] and all(r["fd"] > 0 for r in fd_recs)
    train_s = [r["train_s"] for r in fd_recs]
    assert train_s == sorted(train_s) and train_s[0] > 0  # training time carries over the resume
    a = torch.load(out / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    for key in ("net", "target"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for name in ("teacher", "student"):
        assert torch.equal(a["buffers"][name]["x"], b["buffers"][name]["x"]), name
    first = {k: v for k, v in H.load_checkpoint(str(out / "ckpt.pt"))["net"].items()}
    teacher_sd = load_net(tiny_teacher)[0].state_dict()
    assert any(not torch.equal(first[k], teacher_sd[k]) for k in teacher_sd)  # it trained


def test_rollout_teacher_p_one_is_the_teachers_own_trajectory():
    """--rollout-teacher-p 1: every step of the student's rollout is the teacher's action, so the
    states are the teacher's own trajectory on the training grid; p = 0 is the student's."""
    teacher = random_unet(3, num_classes=3).requires_grad_(False)
    student = random_unet(4, num_classes=3, w_embed=True)
    x1, y, w = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    x_t = L.teacher_rollout(teacher, x1, y, w, steps=4, grid=8, bound="reflect")[0]
    x_p1 = L.student_rollout(student, x1, y, w, steps=4, bound="reflect", expert=teacher,
                              grid=8, p=1.0)[0]
    torch.testing.assert_close(x_p1, x_t, atol=1e-5, rtol=1e-4)
    torch.manual_seed(1)
    x_p0 = L.student_rollout(student, x1, y, w, steps=4, bound="reflect", expert=teacher,
                              grid=8, p=0.0)[0]
    torch.manual_seed(1)
    x_own = L.student_rollout(student, x1, y, w, steps=4, bound="reflect")[0]
    assert torch.equal(x_p0, x_own) and not torch.allclose(x_p0[3:], x_t[3:], atol=1e-3)


def test_grid_fill_carries_each_own_state_on_with_the_teacher_to_every_grid_time():
    """--student-states grid: the own states at tau_i stay, and between them the teacher's DDIM
    from each fills the grid times above tau_i+1; with p = 1 the whole is the teacher's own
    trajectory on the grid."""
    teacher = random_unet(3, num_classes=3).requires_grad_(False)
    student = random_unet(4, num_classes=3, w_embed=True)
    m, x1, y, w = 3, torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    kw = dict(steps=2, bound="reflect", expert=teacher, grid=8)
    torch.manual_seed(1)
    x, t, yy, ww = L.student_rollout(student, x1, y, w, fill=True, **kw)
    torch.manual_seed(1)
    own = L.student_rollout(student, x1, y, w, **kw)[0]
    assert t.tolist() == [1 - n / 8 for n in range(8) for _ in range(m)]
    assert yy.tolist() == y.tolist() * 8 and ww.tolist() == w.tolist() * 8
    assert torch.equal(x[:m], x1) and torch.equal(x[4 * m:5 * m], own[m:])  # the own states
    z = own[m:]  # from the own state at 1/2, the teacher's guided DDIM down to 1/8
    with torch.no_grad():
        for n in range(4, 7):
            tt, ss = torch.full((m,), 1 - n / 8), torch.full((m,), 1 - (n + 1) / 8)
            a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
            z = ddim_step(z, C.reflect(a * z - sg * cfg_v(teacher, z, tt, y, w)), tt, ss)
            torch.testing.assert_close(x[(n + 1) * m:(n + 2) * m], z, atol=1e-5, rtol=1e-4)
    x_t = L.teacher_rollout(teacher, x1, y, w, steps=8, grid=8, bound="reflect")[0]
    x_p1 = L.student_rollout(student, x1, y, w, fill=True, p=1.0, **kw)[0]
    torch.testing.assert_close(x_p1, x_t, atol=1e-5, rtol=1e-4)


def test_w_max_zero_alone_is_the_unguided_setting():
    """--w-max 0 is CD's unguided setting whatever --w-min (default 1); a real range must be
    ordered."""
    L.check(H.parse_config(L.Config, ["--w-max", "0"]))
    with pytest.raises(SystemExit, match="--w-min <= --w-max"):
        L.check(H.parse_config(L.Config, ["--w-min", "2", "--w-max", "1"]))
