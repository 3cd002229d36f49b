"""pd_ddil.py: the PD target, the halving schedule, the DDIL batch, an end-to-end run, resume."""
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
import pd_ddil as P
from conftest import cfg_v, ddim_step, random_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def analytic_teacher(x, t, y=None):
    """A nonlinear v-denoiser whose x0_hat often leaves [-1, 1], so bounding matters."""
    return 2.0 * torch.tanh(3.0 * x) + C.bcast(t, x) * x


def one_ddim_step(x_t, x0, t, s):
    """x_s = alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t: the DDIM step with a given x0."""
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    return a_s * x0 + s_s * (x_t - a_t * x0) / s_t


@pytest.mark.parametrize("bound", ["none", "reflect"])
def test_target_lands_on_teacher_two_steps(bound):
    torch.manual_seed(0)
    N = 4
    i = torch.tensor([4, 3, 2, 1, 4, 3, 2, 1])
    t = i.float() / N
    x_t = 3.0 * torch.randn(len(i), 1, 8, 8)
    x_tilde = P.pd_target(analytic_teacher, x_t, t, N, bound)
    if bound == "reflect":  # a convex combination of two bounded x0_hats: inside the walls
        assert x_tilde.abs().max() <= 1.0 + 1e-5
    a, s = C.alpha_sigma(t[:1])
    assert (a * x_t[0] - s * analytic_teacher(x_t[:1], t[:1])).abs().max() > 1.5  # walls are hit
    for k in range(len(i)):
        ts = torch.tensor([i[k] / N, (i[k] - 0.5) / N, (i[k] - 1) / N])
        two_steps = C.ddim_sample(lambda x, tt: analytic_teacher(x, tt), x_t[k:k + 1], ts, bound=bound)
        if i[k] == 1:  # s = 0: the target is the teacher's last x0_hat, which is the sampler's output
            torch.testing.assert_close(x_tilde[k:k + 1], two_steps, rtol=0, atol=1e-6)
        else:
            landed = one_ddim_step(x_t[k], x_tilde[k], float(ts[0]), float(ts[2]))
            torch.testing.assert_close(landed, two_steps[0], rtol=1e-4, atol=1e-4)


def test_target_with_small_unet_and_loss_zero_at_teacher():
    """A random U-Net teacher; a student whose x0 equals x_tilde has zero loss, a copy does not."""
    torch.manual_seed(0)
    net = C.build_unet("digits", ch=8)
    for p in net.parameters():  # the zero-initialised output would make v = 0
        torch.nn.init.normal_(p, std=0.3)
    net.eval()
    N, x_t = 2, torch.randn(4, 1, 8, 8)
    t = torch.tensor([1.0, 0.5, 1.0, 0.5])
    with torch.no_grad():
        x_tilde = P.pd_target(net, x_t, t, N, "reflect")
        for k in range(4):
            ts = torch.tensor([float(t[k]), float(t[k]) - 0.25, float(t[k]) - 0.5])
            two = C.ddim_sample(lambda x, tt: net(x, tt), x_t[k:k + 1], ts, bound="reflect")
            ref = two if ts[2] == 0 else one_ddim_step(x_t[k:k + 1], x_tilde[k:k + 1], ts[0], ts[2])
            torch.testing.assert_close(ref, two, rtol=1e-4, atol=1e-4)
        a, s = (C.bcast(c, x_t) for c in C.alpha_sigma(t))
        exact = lambda x, tt, y=None: (a * x - x_tilde) / s  # v whose x0 is x_tilde
        assert P.pd_loss(exact, net, x_t, t, N, "reflect").abs().max() < 1e-6
        assert P.pd_loss(net, net, x_t, t, N, "reflect").min() > 1e-4


def test_halving_schedule():
    assert P.stage_steps(64, 4) == [32, 16, 8, 4]
    assert P.stage_steps(4, 1) == [2, 1]
    assert P.stage_steps(8, 4) == [4]
    for teacher_steps, steps in [(64, 3), (64, 64), (64, 128), (48, 4), (64, 0)]:
        with pytest.raises(SystemExit, match="not reachable by halving"):
            P.stage_steps(teacher_steps, steps)


def test_unreachable_steps_is_a_one_line_error(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "pd_ddil.py", "--steps", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--steps 3" in lines[0]
    assert not out.exists()  # stopped before any work


def written_out_target(teacher, x_t, t, N, bound, y, w):
    """PD's target from two guided teacher DDIM steps, written out: the x0 whose one DDIM step
    t -> s lands where the teacher's two steps t -> t - 1/2N -> s land (x0_hat at s = 0)."""
    z, x0 = x_t, None
    for tt, ss in ((t, t - 0.5 / N), (t - 0.5 / N, t - 1 / N)):
        a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
        x0 = C.bound_x0(a * z - sg * cfg_v(teacher, z, tt, y, w), bound)
        z = ddim_step(z, x0, tt, ss)
    s = t - 1 / N
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    x_tilde = (z - C.bcast(s_s / s_t, z) * x_t) / C.bcast(a_s - s_s / s_t * a_t, z)
    return torch.where(C.bcast(s == 0, z).bool(), x0, x_tilde)


@pytest.mark.parametrize("bound", ["none", "reflect"])
def test_guided_target_loss_and_update_match_the_written_out_pd_step(bound):
    teacher = random_unet(1, num_classes=3).requires_grad_(False)
    student = random_unet(2, num_classes=3)
    N, w = 4, 2.5
    t = torch.tensor([4, 3, 2, 1, 4, 1]) / N
    x_t, y = 1.5 * torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        want_target = written_out_target(teacher, x_t, t, N, bound, y, w)
    torch.testing.assert_close(P.pd_target(teacher, x_t, t, N, bound, y, w), want_target, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(P.pd_target(teacher, x_t, t, N, bound, y, 0.0), want_target, atol=1e-3)
    a, sg = (C.bcast(c, x_t) for c in C.alpha_sigma(t))
    snr_w = torch.exp(C.logsnr(t)).clamp(min=1.0)
    want = snr_w * ((a * x_t - sg * student(x_t, t, y)) - want_target).square().flatten(1).mean(1)
    torch.testing.assert_close(P.pd_loss(student, teacher, x_t, t, N, bound, y, w, False), want,
                               atol=1e-5, rtol=1e-4)
    # the update: SGD at the stage's learning rate on the mean loss
    want.mean().backward()
    grads = [p.grad.clone() for p in student.parameters()]
    before = [p.detach().clone() for p in student.parameters()]
    student.zero_grad()
    cfg = types.SimpleNamespace(grad_accum=2, bound=bound, bf16=False, grad_clip=1e9)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    loss = P.train_step(student, student, teacher, opt, x_t, t, y, w, N, 0.05, cfg)
    torch.testing.assert_close(loss, want.mean().detach(), atol=1e-5, rtol=1e-4)
    assert opt.param_groups[0]["lr"] == 0.05
    for p, b_, g in zip(student.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b_ - 0.05 * g, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads) and all(p.grad is None for p in teacher.parameters())


def test_rollouts_are_the_samplers_states_at_grid_times_with_their_labels():
    net = random_unet(1, num_classes=3).eval()
    x1, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    x, t, yy, w = P.rollout_states(net, x1, y, 1.5, 2, 2, bound="reflect")  # the 2N = 4-step teacher
    z, states = x1, [x1]
    with torch.no_grad():
        for i in range(4):
            tt, ss = torch.full((3,), 1 - i / 4), torch.full((3,), 1 - (i + 1) / 4)
            a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
            z = ddim_step(z, C.reflect(a * z - sg * cfg_v(net, z, tt, y, 1.5)), tt, ss)
            states.append(z)
    assert t.tolist() == [1.0] * 3 + [0.5] * 3 and yy.tolist() == [0, 2, 1] * 2 and w == 1.5
    torch.testing.assert_close(x, torch.cat([states[0], states[2]]), atol=1e-5, rtol=1e-4)
    assert not x.requires_grad
    torch.manual_seed(4)
    x0 = torch.rand(5, 1, 8, 8)
    xd, td, yd, _ = P.data_states(x0, torch.arange(5), 4)
    torch.manual_seed(4)
    torch.rand(5, 1, 8, 8)
    t_want = torch.randint(1, 5, (5,)).float() / 4
    a, sg = (C.bcast(c, x0) for c in C.alpha_sigma(t_want))
    torch.testing.assert_close(xd, a * x0 + sg * torch.randn_like(x0))
    assert torch.equal(td, t_want) and yd.tolist() == list(range(5))


# ----------------------------------------------------------------------------------------------
# end to end: tiny teacher, 4 -> 2 -> 1 steps, a few iterations per stage
# ----------------------------------------------------------------------------------------------

def tiny_args(teacher, out, *extra):
    return ["--teacher", teacher, "--teacher-steps", "4", "--steps", "1", "--iters-per-stage", "3",
            "--batch-size", "8", "--buffer-size", "64", "--refresh", "4", "--eval-samples", "40",
            "--stage-eval-samples", "20", "--shift-samples", "16", "--ref-samples", "16", "--log-every", "1",
            "--ckpt-every", "100", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def full_run(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("pd_full")
    P.main(tiny_args(tiny_teacher, out))
    return out


def test_end_to_end_writes_every_output(full_run):
    out = full_run
    for f in ("ckpt.pt", "log.jsonl", "samples.png", "metrics.json", "config.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["student"]) == {"1"} and set(m["teacher"]) == {"1", "64"}
    for row in [m["student"]["1"], m["teacher"]["1"], m["teacher"]["64"]]:
        assert {"fd", "kid", "precision", "recall", "entropy"} <= set(row) and row["fd"] >= 0
    shift = m["covariate_shift"]
    assert shift["t"] == [1.0] and len(shift["ratio"]) == 1 and shift["err_data"][0] > 0
    assert m["it_per_s"] > 0 and m["train_time_s"] > 0 and m["config"]["steps"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["N"] for r in log if "stage_fd" in r] == [2, 1]  # each stage's FD
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    net, sampler, ck = load_net(str(out / "ckpt.pt"))  # the contract evaluate.py reads
    assert sampler == "ddim" and ck["steps"] == 1 and ck["config"]["dataset"] == "digits"
    teacher, _, _ = load_net(ck["config"]["teacher"])
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     teacher.state_dict().values()))  # it trained


def test_interrupted_run_matches_uninterrupted(full_run, tiny_teacher, tmp_path):
    # stop mid-stage 0, then mid-stage 1 (crossing a stage boundary), then finish
    for iters in ("2", "4", "0"):
        P.main(tiny_args(tiny_teacher, tmp_path, "--iters", iters))
        if iters != "0":
            assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == int(iters)
            assert not (tmp_path / "metrics.json").exists()
    a = torch.load(full_run / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("net", "teacher"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    fa = json.loads((full_run / "metrics.json").read_text())["student"]["1"]["fd"]
    fb = json.loads((tmp_path / "metrics.json").read_text())["student"]["1"]["fd"]
    assert fa == fb


def test_rollout_teacher_p_one_is_the_stage_teachers_trajectory():
    teacher, student = random_unet(1, num_classes=3).eval(), random_unet(2, num_classes=3).eval()
    x1, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    want = P.rollout_states(teacher, x1, y, 1.5, 4, 2, bound="none")[0]
    got = P.rollout_states(student, x1, y, 0.0, 4, 1, bound="none", expert=teacher,
                             expert_w=1.5, p=1.0)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(P.rollout_states(student, x1, y, 0.0, 4, 1, bound="none")[0][3:], want[3:], atol=1e-3)
