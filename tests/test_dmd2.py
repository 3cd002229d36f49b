"""dmd2_ddil.py: the DM gradient on analytic Gaussian scores, the GAN losses, rollouts without
grad, the two time-scale rule, the outputs of a tiny run, and exact resume."""
import json
import os
import types

import pytest
import torch

import common as C
import harness as H
from teacher import load_net
import dmd2_ddil as D
from conftest import cfg_v, ddim_step, random_unet


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
    loss, grad = D.dm_loss(x, score, score, "karras", 20, 980)
    loss.backward()
    assert grad.abs().max().item() == 0.0 and loss.item() == 0.0
    assert x.grad.abs().max().item() == 0.0
    # and a different fake score does give a gradient
    _, grad = D.dm_loss(x, score, gaussian_denoiser(-0.3, 0.5), "karras", 20, 980)
    assert grad.abs().mean().item() > 0.1


def test_dm_step_moves_samples_towards_the_real_distribution():
    torch.manual_seed(0)
    real_mean, real_std, fake_mean, fake_std = 0.5, 0.3, -0.3, 0.6
    real, fake = gaussian_denoiser(real_mean, real_std), gaussian_denoiser(fake_mean, fake_std)
    x = (fake_mean + fake_std * torch.randn(4096, 1, 2, 2)).requires_grad_(True)
    loss, grad = D.dm_loss(x, real, fake, "time", 20, 980)
    loss.backward()
    # the loss's gradient is the DM gradient (the mean over elements scales it by 1 / numel)
    torch.testing.assert_close(x.grad * x.numel(), grad)
    kl_before = gaussian_kl(x.detach(), real_mean, real_std)
    x_new = x.detach() - 0.05 * grad
    kl_after = gaussian_kl(x_new, real_mean, real_std)
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)
    # the mean moves up (towards 0.5): the sign is right, not just the size
    assert x_new.mean() > x.detach().mean() + 0.01


def test_noise_levels_are_dmd2s_karras_grid():
    """EDM's sigma is our sigma / alpha: the grid's ends are sigma 0.002 and 80, its 2% and 98%
    indices DMD2's DM range, and uniform in the index puts the median at sigma ~2.5."""
    def edm_sigma(t):
        a, s = C.alpha_sigma(t)
        return (s / a).double()
    torch.manual_seed(0)
    ends = torch.cat([D.grid_t(4000, "karras", 0, 0), D.grid_t(4000, "karras", 999, 999)])
    torch.testing.assert_close(edm_sigma(ends[:4000]), torch.full((4000,), 0.002, dtype=torch.float64),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(edm_sigma(ends[4000:]), torch.full((4000,), 80.0, dtype=torch.float64),
                               rtol=1e-3, atol=0)
    t = D.grid_t(200_000, "karras", 20, 980)
    s = edm_sigma(t)
    assert s.min() == pytest.approx(0.003232, rel=1e-2) and s.max() == pytest.approx(72.05, rel=1e-2)
    assert s.median() == pytest.approx(2.53, rel=0.03) and t.median() == pytest.approx(0.76, abs=0.01)
    # uniform in the index: k = 500 (sigma_k of the formula) is the median
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    assert s.median() == pytest.approx((lo + 500 / 999 * (hi - lo)) ** 7, rel=0.03)


def test_time_grid_is_the_teachers_training_times_and_auto_picks_it_under_guidance():
    torch.testing.assert_close(D.grid_times("time"), torch.arange(1000) / 999)
    torch.manual_seed(0)
    t = D.grid_t(200_000, "time", 20, 980)
    assert t.min() == pytest.approx(20 / 999) and t.max() == pytest.approx(980 / 999)
    assert t.median() == pytest.approx(0.5, abs=0.01)
    # the Karras grid is far heavier at high noise: 37% of its DM levels below logsnr -4, 7% here
    assert (C.logsnr(t) < -4).float().mean() == pytest.approx(0.070, abs=0.005)
    assert (C.logsnr(D.grid_t(200_000, "karras", 20, 980)) < -4).float().mean() == pytest.approx(0.366, abs=0.01)
    cfg = lambda grid, w: types.SimpleNamespace(noise_grid=grid, guidance=w)  # noqa: E731
    assert D.noise_grid(cfg("auto", 2.0)) == "time" and D.noise_grid(cfg("auto", 0.0)) == "karras"
    assert D.noise_grid(cfg("karras", 2.0)) == "karras" and D.noise_grid(cfg("time", 0.0)) == "time"


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
    loss_v, loss_d = D.fake_score_loss(net, head, x, r, None, None, True, "karras")
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
    x, t, _, _ = D.backward_simulation(G, x1, None, taus, bound="reflect")
    assert not x.requires_grad and x.grad_fn is None
    assert x.shape == (K * n, 1, 8, 8) and torch.equal(t, taus.repeat_interleave(n))
    torch.testing.assert_close(x[:n], x1)  # tau_1 = 1: the noise itself
    # the state at tau_2 is G's bounded sample at tau_1, re-noised to tau_2 with fresh noise
    torch.manual_seed(7)
    x = D.backward_simulation(G, x1, None, taus, bound="reflect")[0]
    torch.manual_seed(7)
    z = torch.randn_like(x1)  # the first re-noising draw
    x0 = C.bound_x0(D.x0_of(lambda x, s: G(x, s), x1, torch.ones(n)), "reflect")
    a, s = C.alpha_sigma(taus[1])
    torch.testing.assert_close(x[n:2 * n], a * x0 + s * z, atol=1e-5, rtol=1e-4)
    assert x0.abs().max() <= 1.0


def test_teacher_rollout_follows_the_guided_teacher_and_keeps_labels():
    T = random_unet(1, num_classes=3).requires_grad_(False)
    K, n, w = 2, 3, 2.0
    taus = C.time_grid(K)[:-1]
    x1, y = torch.randn(n, 1, 8, 8), torch.tensor([2, 0, 1])
    x, t, yy, ww = D.teacher_rollout(T, x1, y, w, taus, substeps=2, bound="reflect")
    z = x1
    with torch.no_grad():
        for i in range(2):  # 2 substeps from t = 1 to tau_2 = 1/2
            tt, ss = torch.full((n,), 1 - i / 4), torch.full((n,), 1 - (i + 1) / 4)
            a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
            z = ddim_step(z, C.reflect(a * z - sg * cfg_v(T, z, tt, y, w)), tt, ss)
    torch.testing.assert_close(x[n:], z, atol=1e-5, rtol=1e-4)
    assert not x.requires_grad and yy.tolist() == [2, 0, 1] * 2 and ww == w and t.tolist() == [1.0] * 3 + [0.5] * 3
    # the diagnostic's label: the guided teacher's DDIM sample from the state, at its label
    label = D.teacher_sample_from(T, x[n:], 0.5, K, 2, y, w, bound="reflect")
    z = x[n:]
    with torch.no_grad():
        for i in range(2, 4):
            tt, ss = torch.full((n,), 1 - i / 4), torch.full((n,), 1 - (i + 1) / 4)
            a, sg = (C.bcast(c, z) for c in C.alpha_sigma(tt))
            x0 = C.reflect(a * z - sg * cfg_v(T, z, tt, y, w))
            z = ddim_step(z, x0, tt, ss) if i < 3 else x0
    torch.testing.assert_close(label, z, atol=2e-4, rtol=1e-3)  # (batched vs separate CFG passes)


def dmd2_cfg(**kw):
    return types.SimpleNamespace(bf16=False, guidance=2.0, noise_grid="auto", dm_min_step=20, dm_max_step=980,
                                 gan_weight=0.0,
                                 disc_weight=1e-2, grad_clip=1e9, **kw)


def test_generator_update_is_the_dm_gradient_against_the_guided_real_score():
    T = random_unet(1, num_classes=3).requires_grad_(False)
    G, fake = random_unet(2, num_classes=3), random_unet(3, num_classes=3)
    head = D.gan_head(fake.mid_ch)
    cfg = dmd2_cfg()
    x_in, t_in, y = torch.randn(6, 1, 8, 8), torch.tensor([1.0, 0.5] * 3), torch.tensor([0, 1, 2, 0, 1, 2])
    # written out: G's sample, then the DM gradient with T guided at w and F at the label
    x = D.generator_sample(G, x_in, t_in, y, bound="reflect")
    a, sg = (C.bcast(c, x) for c in C.alpha_sigma(t_in))
    torch.testing.assert_close(x, C.reflect(a * x_in - sg * G(x_in, t_in, y)))
    torch.manual_seed(9)
    t = torch.randint(cfg.dm_min_step, cfg.dm_max_step + 1, (6,)) / 999  # guided: auto is the time grid
    a, sg = (C.bcast(c, x) for c in C.alpha_sigma(t))
    x_t = a * x.detach() + sg * torch.randn_like(x)
    with torch.no_grad():
        p_real = x - (a * x_t - sg * cfg_v(T, x_t, t, y, cfg.guidance))
        p_fake = x - (a * x_t - sg * fake(x_t, t, y))
        grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    (0.5 * (x - (x - grad).detach()).square().mean()).backward()  # d/dx = grad / numel
    grads = [p.grad.clone() for p in G.parameters()]
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("G", G), ("F", fake), ("D", head), ("T", T))}
    G.zero_grad()
    opt = torch.optim.SGD(G.parameters(), lr=10.0)
    x = D.generator_sample(G, x_in, t_in, y, bound="reflect")
    torch.manual_seed(9)
    rec = D.generator_update(G, fake, head, T, opt, x, y, cfg)
    assert set(rec) == {"loss_dm"}
    for p, b, g in zip(G.parameters(), before["G"], grads):
        torch.testing.assert_close(p.detach(), b - 10.0 * g, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads)
    for name, m in (("F", fake), ("D", head), ("T", T)):  # only G moves
        assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before[name])), name
    assert all(p.requires_grad for p in fake.parameters())  # and F trains again afterwards


def test_fake_score_update_denoises_gs_samples_and_leaves_g_alone():
    G, fake = random_unet(2, num_classes=3), random_unet(3, num_classes=3)
    head = D.gan_head(fake.mid_ch)
    cfg = dmd2_cfg()
    x = D.generator_sample(G, torch.randn(4, 1, 8, 8), torch.ones(4), torch.arange(4) % 3, bound="reflect")
    real, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(2)
    t = torch.rand(4)
    eps = torch.randn_like(x)
    a, sg = (C.bcast(c, x) for c in C.alpha_sigma(t))
    v = a * eps - sg * x.detach()
    (fake(a * x.detach() + sg * eps, t, y) - v).square().mean().backward()
    grads = [p.grad.clone() for p in fake.parameters()]
    before = [p.detach().clone() for p in fake.parameters()]
    g_before = [p.detach().clone() for p in G.parameters()]
    fake.zero_grad()
    opt = torch.optim.SGD(list(fake.parameters()) + list(head.parameters()), lr=0.1)
    torch.manual_seed(2)
    rec = D.fake_score_update(fake, head, fake, head, opt, x, real, y, None, cfg)
    assert set(rec) == {"loss_fake"}
    for p, b, g in zip(fake.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, atol=1e-6, rtol=1e-4)
    assert all(torch.equal(p, b) for p, b in zip(G.parameters(), g_before)) and G.out[-1].weight.grad is None


def run(teacher, out, *extra):
    args = ["--teacher", teacher, "--out", str(out), "--steps", "2", "--batch-size", "8",
            "--buffer-size", "16", "--refresh", "2", "--teacher-substeps", "2", "--eval-samples", "32",
            "--shift-samples", "8", "--ref-samples", "16", "--log-every", "1", "--device", "cpu", "--seed", "3", *extra]
    return D.main(args)


def test_tiny_run_writes_every_output_and_follows_two_time_scales(tiny_teacher, tmp_path):
    run(tiny_teacher, tmp_path, "--iters", "7", "--fake-updates", "3")
    for f in ("ckpt.pt", "log.jsonl", "samples.png", "metrics.json", "config.json"):
        assert os.path.isfile(tmp_path / f), f
    m = json.load(open(tmp_path / "metrics.json"))
    assert set(m["student"]) == {"1", "2"} and set(m["teacher"]) == {"1", "2", "64"}
    assert m["student"]["2"]["fd"] >= 0 and m["config"]["steps"] == 2 and m["it_per_s"] > 0
    assert len(m["covariate_shift"]["t"]) == 2
    ck = H.load_checkpoint(str(tmp_path / "ckpt.pt"))
    # two time scales: G stepped at steps 0, 3, 6; F and the GAN head at every one of 7 steps
    assert ck["opt_g"]["state"][0]["step"].item() == 3
    assert ck["opt_f"]["state"][0]["step"].item() == 7
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in logged if "loss_dm" in r] == [1, 4, 7]
    net, kind, _ = load_net(str(tmp_path / "ckpt.pt"))  # the checkpoint contract
    assert kind == "renoise"
    assert C.generate(net, 4, 2, kind, bound="clip").abs().max() <= 1.0


@pytest.mark.parametrize("ema", [[], ["--ema-decay", "0.5"]], ids=["G", "EMA"])
def test_resume_matches_an_uninterrupted_run(tiny_teacher, tmp_path, ema):
    common = ["--fake-updates", "2", "--beta-data", "0.25", "--beta-teacher", "0.25",
              "--beta-student", "0.5", "--eval-samples", "16", *ema]
    run(tiny_teacher, tmp_path / "a", "--iters", "5", *common)
    run(tiny_teacher, tmp_path / "b", "--iters", "3", *common)  # "interrupted" after step 3
    run(tiny_teacher, tmp_path / "b", "--iters", "5", *common)  # resumes from its ckpt.pt
    a, b = (H.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in "ab")
    assert a["step"] == b["step"] == 5
    assert (a["g"] is None) == (not ema)
    for key in ("net", "fake", "head") + (("g",) if ema else ()):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for key in ("opt_g", "opt_f"):
        for i, s in a[key]["state"].items():
            assert torch.equal(s["exp_avg"], b[key]["state"][i]["exp_avg"]), (key, i)
    assert torch.equal(a["buffers"]["student"]["x"], b["buffers"]["student"]["x"])


def test_rollout_teacher_p_one_is_the_teachers_trajectory():
    T, G = random_unet(1, num_classes=3).requires_grad_(False), random_unet(2, num_classes=3)
    taus = C.time_grid(3)[:-1]
    x1, y = torch.randn(3, 1, 8, 8), torch.tensor([2, 0, 1])
    want = D.teacher_rollout(T, x1, y, 2.0, taus, substeps=2, bound="reflect")[0]
    got = D.backward_simulation(G, x1, y, taus, bound="reflect", expert=T,
                                 expert_w=2.0, substeps=2, p=1.0)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_data_states_come_from_images_other_than_the_gans_real_batch(tmp_path, tiny_teacher,
                                                                    monkeypatch):
    """DDIL's data source diffuses its own batch, not the GAN's real images (G's outputs from
    those would be near-copies of the real images D sees beside them)."""
    seen = {"data": [], "real": []}
    data_states, fake_update = D.data_states, D.fake_score_update
    monkeypatch.setattr(D, "data_states", lambda x0, y, taus: (
        seen["data"].append(x0.clone()), data_states(x0, y, taus))[1])
    monkeypatch.setattr(D, "fake_score_update", lambda *a: (
        seen["real"].append(a[6].clone()), fake_update(*a))[1])
    D.main(["--teacher", tiny_teacher, "--out", str(tmp_path / "r"), "--iters", "2", "--steps", "2",
            "--batch-size", "8", "--beta-data", "0.5", "--beta-student", "0.5", "--buffer-size", "8",
            "--refresh", "1", "--fake-updates", "1", "--teacher-substeps", "1",
            "--eval-samples", "4", "--shift-samples", "4", "--ref-samples", "0",
            "--reference-steps", "2"])
    assert len(seen["data"]) == 2 and len(seen["real"]) == 2
    for x0, real in zip(seen["data"], seen["real"]):
        assert len(x0) == 4 and not torch.equal(x0, real[:4])


def test_the_ema_of_g_is_what_is_saved_and_sampled(tiny_teacher, tmp_path):
    """One G step at decay 0.5 from the teacher's copy: the sampling network is the mean of the
    two, G itself is kept beside it (for a resume)."""
    # (lr 10: the first step of the warm-up is lr / 72, and Adam's step is about lr)
    G = run(tiny_teacher, tmp_path, "--iters", "1", "--fake-updates", "1", "--ema-decay", "0.5",
            "--eval-samples", "16", "--lr", "10")
    ck = H.load_checkpoint(str(tmp_path / "ckpt.pt"))
    T = H.load_checkpoint(tiny_teacher)["ema"]
    moved = 0
    for k, v in ck["net"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * T[k] + 0.5 * ck["g"][k])
            moved += int((ck["g"][k] - T[k]).abs().max() > 1e-2)
    assert moved > 0 and all(torch.equal(p, ck["net"][k]) for k, p in G.state_dict().items())


@pytest.mark.parametrize("states", ["all", "own"])
def test_fake_states_own_trains_mu_fake_on_gs_own_state_outputs_only(tiny_teacher, tmp_path,
                                                                     monkeypatch, states):
    """--fake-states own: mu_fake's batch is G's outputs from its own states (those of the mixed
    batch, topped up from the own-state buffer), never its outputs from DDIL's data states;
    all (DMD2's): every output of the batch."""
    samples, fakes, replays = [], [], []
    sample, fake_update, replay = D.generator_sample, D.fake_score_update, C.replay

    def spy_sample(G, x_in, t_in, y, *, bound):
        out = sample(G, x_in, t_in, y, bound=bound)
        samples.append((x_in, out.detach()))
        return out

    def spy_fake(fake_train, head_train, fake, head, opt, x, *rest):
        fakes.append(x.detach())
        return fake_update(fake_train, head_train, fake, head, opt, x, *rest)

    def spy_replay(buf, rollout, n, trajectories, traj_len):
        out = replay(buf, rollout, n, trajectories, traj_len)
        replays.append((rollout.__name__, buf, n, trajectories, out))
        return out
    monkeypatch.setattr(D, "generator_sample", spy_sample)
    monkeypatch.setattr(D, "fake_score_update", spy_fake)
    monkeypatch.setattr(C, "replay", spy_replay)
    run(tiny_teacher, tmp_path, "--iters", "2", "--fake-updates", "1", "--beta-data", "0.5",
        "--beta-student", "0.5", *(["--fake-states", states] if states == "all" else []),
        "--eval-samples", "16")  # own: the default
    per_iter = 2 if states == "own" else 1
    train = samples[:2 * per_iter]  # (the final evaluation's samples come after)
    assert len(fakes) == 2
    for i, x_f in enumerate(fakes):
        main = train[i * per_iter]
        assert len(main[0]) == 8  # 4 data states, then 4 own states
        if states == "all":
            assert torch.equal(x_f, main[1])
            continue
        extra = train[i * per_iter + 1]
        assert len(extra[0]) == 4 and torch.equal(x_f, torch.cat([main[1][4:], extra[1]]))
        own = [r for r in replays if r[0] == "student_source"][2 * i:2 * i + 2]
        assert own[0][1] is own[1][1] and own[1][3] == 0 and own[1][2] == 4  # same buffer, no refresh
        assert torch.equal(extra[0], own[1][4][0])  # the top-up's inputs are those buffer states
        assert torch.equal(main[0][4:], own[0][4][0])


@pytest.mark.parametrize("grid", ["time", "karras"])
def test_every_noise_level_of_g_mu_fake_and_d_is_drawn_on_the_noise_grid(grid, monkeypatch):
    # the DM loss, G's GAN loss and D's real and fake levels all follow --noise-grid
    drawn, grid_t = [], D.grid_t
    monkeypatch.setattr(D, "grid_t", lambda n, g, *a, **kw: drawn.append(g) or grid_t(n, g, *a, **kw))
    T = random_unet(1, num_classes=3).requires_grad_(False)
    G, fake = random_unet(2, num_classes=3), random_unet(3, num_classes=3)
    head = D.gan_head(fake.mid_ch)
    cfg = dmd2_cfg()
    cfg.noise_grid, cfg.gan_weight = grid, 0.1
    y = torch.tensor([0, 1, 2, 0])
    x = D.generator_sample(G, torch.randn(4, 1, 8, 8), torch.ones(4), y, bound="reflect")
    D.generator_update(G, fake, head, T, torch.optim.SGD(G.parameters(), lr=0.1), x, y, cfg)
    assert drawn == [grid, grid]  # the DM loss's and the GAN generator loss's
    opt = torch.optim.SGD(list(fake.parameters()) + list(head.parameters()), lr=0.1)
    rec = D.fake_score_update(fake, head, fake, head, opt, x.detach(), torch.rand(4, 1, 8, 8), y, y, cfg)
    assert drawn == [grid] * 4 and set(rec) == {"loss_fake", "loss_d"}  # + D's real and fake
