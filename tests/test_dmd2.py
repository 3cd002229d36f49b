"""dmd2_ddil.py: the DM gradient on analytic Gaussian scores, the GAN losses, rollouts without
grad, the two time-scale rule, the outputs of a tiny run, and exact resume."""
import json
import os

import pytest
import torch

import common as C
import dmd2_ddil as D


def gaussian_denoiser(mean, std):
    """The exact v-denoiser of x0 ~ N(mean, std^2) per pixel:
    E[x0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean)."""
    def denoise(x, t):
        a, s = (C.bcast(c, x) for c in C.alpha_sigma(t))
        x0 = mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)
        return (a * x - x0) / s  # the v that gives this x0: x0 = alpha x - sigma v
    return denoise


def gaussian_kl(x, mean, std):
    """KL(N(m, s^2) || N(mean, std^2)) per pixel, with m, s fitted to x, averaged over pixels."""
    m, s = x.mean(0), x.std(0)
    return (torch.log(std / s) + (s**2 + (m - mean) ** 2) / (2 * std**2) - 0.5).mean()


def test_dm_gradient_is_zero_when_fake_equals_real():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 4, requires_grad=True)
    score = gaussian_denoiser(0.3, 0.5)
    loss, grad = D.dm_loss(x, score, score, 0.02, 0.98)
    loss.backward()
    assert grad.abs().max().item() == 0.0 and loss.item() == 0.0
    assert x.grad.abs().max().item() == 0.0
    # and a different fake score does give a gradient
    _, grad = D.dm_loss(x, score, gaussian_denoiser(-0.3, 0.5), 0.02, 0.98)
    assert grad.abs().mean().item() > 0.1


def test_dm_step_moves_samples_towards_the_real_distribution():
    torch.manual_seed(0)
    real_mean, real_std, fake_mean, fake_std = 0.5, 0.3, -0.3, 0.6
    real, fake = gaussian_denoiser(real_mean, real_std), gaussian_denoiser(fake_mean, fake_std)
    x = (fake_mean + fake_std * torch.randn(4096, 1, 2, 2)).requires_grad_(True)
    loss, grad = D.dm_loss(x, real, fake, 0.02, 0.98)
    loss.backward()
    # the loss's gradient is the DM gradient (the mean over elements scales it by 1 / numel)
    torch.testing.assert_close(x.grad * x.numel(), grad)
    kl_before = gaussian_kl(x.detach(), real_mean, real_std)
    x_new = x.detach() - 0.05 * grad
    kl_after = gaussian_kl(x_new, real_mean, real_std)
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)
    # the mean moves up (towards 0.5): the sign is right, not just the size
    assert x_new.mean() > x.detach().mean() + 0.01


def test_gan_head_shapes_and_loss_signs():
    torch.manual_seed(0)
    net = C.build_unet("digits")
    head = D.gan_head(net.mid_ch)
    v, feats = net(torch.randn(5, 1, 8, 8), torch.rand(5), return_features=True)
    assert v.shape == (5, 1, 8, 8) and feats.shape[:2] == (5, net.mid_ch)
    logits = head(feats)
    assert logits.shape == (5, 1)
    real = torch.zeros(8, requires_grad=True)
    fake = torch.zeros(8, requires_grad=True)
    D.gan_d_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # D: real logits up, fake logits down
    fake_g = torch.zeros(8, requires_grad=True)
    D.gan_g_loss(fake_g).backward()
    assert (fake_g.grad < 0).all()  # G: fake logits up
    # a discriminator that is right has a lower loss than one that is wrong
    assert D.gan_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) < D.gan_d_loss(
        torch.full((4,), -3.0), torch.full((4,), 3.0))
    # the joint fake-score / D loss reaches the head's parameters
    x, r = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    loss_v, loss_d = D.fake_score_loss(net, head, x, r, None, None, True, 0.02, 0.98)
    (loss_v + loss_d).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_rollouts_carry_no_graph_and_land_on_the_grid():
    torch.manual_seed(0)
    G = C.build_unet("digits")
    for p in G.parameters():  # a non-trivial generator, with grad on
        p.data.add_(0.02 * torch.randn_like(p))
    assert all(p.requires_grad for p in G.parameters())
    K, n = 4, 3
    taus = C.time_grid(K)[:-1]
    x1 = torch.randn(n, 1, 8, 8)
    x, t = D.backward_simulation(G, x1, taus, "reflect")
    assert not x.requires_grad and x.grad_fn is None
    assert x.shape == (K * n, 1, 8, 8) and torch.equal(t, taus.repeat_interleave(n))
    torch.testing.assert_close(x[:n], x1)  # tau_1 = 1: the noise itself
    # the state at tau_2 is G's bounded sample at tau_1, re-noised to tau_2
    x0 = C.bound_x0(D.x0_of(lambda x, s: G(x, s), x1, torch.ones(n)), "reflect")
    a, s = C.alpha_sigma(taus[1])
    resid = (x[n:2 * n] - a * x0) / s  # must be the fresh noise, independent of x0: ~N(0, 1)
    assert abs(resid.std().item() - 1.0) < 0.3 and x0.abs().max() <= 1.0
    # the teacher rollout stops on the student grid: its last states equal a DDIM run to tau_K
    xt, _ = D.teacher_rollout(G, x1, taus, 2, "reflect")
    assert not xt.requires_grad
    ref = C.ddim_sample(C.guided(G), x1, C.time_grid(2 * K)[:2 * (K - 1) + 1], "reflect")
    torch.testing.assert_close(xt[-n:], ref)


def run(teacher, out, *extra):
    args = ["--teacher", teacher, "--out", str(out), "--steps", "2", "--batch-size", "8",
            "--buffer-size", "16", "--refresh", "2", "--teacher-substeps", "2", "--eval-samples", "32",
            "--shift-samples", "8", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]
    return D.main(args)


def test_tiny_run_writes_every_output_and_follows_two_time_scales(tiny_teacher, tmp_path):
    run(tiny_teacher, tmp_path, "--iters", "7", "--fake-updates", "3")
    for f in ("ckpt.pt", "log.jsonl", "samples.png", "metrics.json", "config.json"):
        assert os.path.isfile(tmp_path / f), f
    m = json.load(open(tmp_path / "metrics.json"))
    assert set(m["student"]) == {"1", "2"} and set(m["teacher"]) == {"1", "2", "64"}
    assert m["student"]["2"]["fd"] >= 0 and m["config"]["steps"] == 2 and m["it_per_s"] > 0
    assert len(m["covariate_shift"]["t"]) == 2
    ck = C.load_checkpoint(str(tmp_path / "ckpt.pt"))
    # two time scales: G stepped at steps 0, 3, 6; F and the GAN head at every one of 7 steps
    assert ck["opt_g"]["state"][0]["step"].item() == 3
    assert ck["opt_f"]["state"][0]["step"].item() == 7
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in logged if "loss_dm" in r] == [1, 4, 7]
    net, kind, _ = C.load_net(str(tmp_path / "ckpt.pt"))  # the checkpoint contract
    assert kind == "renoise"
    assert C.generate(net, 4, 2, kind).abs().max() <= 1.0


def test_resume_matches_an_uninterrupted_run(tiny_teacher, tmp_path):
    common = ["--fake-updates", "2", "--beta-data", "0.25", "--beta-teacher", "0.25",
              "--beta-student", "0.5", "--eval-samples", "16"]
    run(tiny_teacher, tmp_path / "a", "--iters", "5", *common)
    run(tiny_teacher, tmp_path / "b", "--iters", "3", *common)  # "interrupted" after step 3
    run(tiny_teacher, tmp_path / "b", "--iters", "5", *common)  # resumes from its ckpt.pt
    a, b = (C.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    assert a["step"] == b["step"] == 5
    for key in ("net", "fake", "head"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for key in ("opt_g", "opt_f"):
        for i, s in a[key]["state"].items():
            assert torch.equal(s["exp_avg"], b[key]["state"][i]["exp_avg"]), (key, i)
    assert torch.equal(a["buffers"]["student"]["x"], b["buffers"]["student"]["x"])
