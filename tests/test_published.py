"""published.py: published teachers behind our v interface. Offline, CPU, tiny models, seconds.

Tests that build a real diffusers UNet2DModel skip without diffusers (CI installs requirements.txt
only); the Gaussian-oracle, EDM, key-map-free and pickle tests need torch alone.
"""
import collections
import json
import pickle
import sys
import types

import pytest
import torch
import torch.nn as nn

import common as C
import published as P

M, S2 = 0.25, 0.2 ** 2  # Gaussian data x0 ~ N(M, S2) per pixel: every |E[x0 | z]| < 1


def gaussian_x0_eps(z, a, s, mean=M, var=S2):
    """E[x0 | z], E[eps | z] for z = a x0 + s eps, x0 ~ N(mean, var), eps ~ N(0, 1)."""
    tot = a * a * var + s * s
    return mean + a * var * (z - a * mean) / tot, s * (z - a * mean) / tot


def our_v(z, t, mean=M):
    a, s = (C.bcast(c.double(), z) for c in P._lam_ab(C.logsnr(t).double()))
    x0, eps = gaussian_x0_eps(z.double(), a, s, mean)
    return (a * eps - s * x0).float()


def sample_z(t, n=4, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    a, s = C.alpha_sigma(t)
    x0 = M + S2 ** 0.5 * torch.randn(n, *shape, generator=g)
    return C.bcast(a, x0) * x0 + C.bcast(s, x0) * torch.randn(n, *shape, generator=g)


class FakeDDPMUNet(nn.Module):
    """UNet2DModel-like oracle: the exact eps (or v) of Gaussian data at its (fractional) timestep
    k. Between integer timesteps its noise level is alphas_cumprod interpolated linearly in k
    (interp="abar": a network's own guess, not the wrapper's rule) or logSNR interpolated linearly
    (interp="logsnr": the wrapper's rule, so the conversion alone is tested)."""

    def __init__(self, sched, pred, interp="abar"):
        super().__init__()
        self.register_buffer("abar", P.ddpm_alphas_cumprod(sched))
        self.pred, self.interp, self.seen = pred, interp, []
        self.gain = nn.Parameter(torch.ones(()))  # something to take a gradient of
        self.config = {"num_class_embeds": None, "in_channels": 1, "sample_size": 4}

    def effective_logsnr(self, k):
        k = torch.as_tensor(k, dtype=torch.float64)
        i = k.floor().long().clamp(0, len(self.abar) - 2)
        lam = torch.log(self.abar / (1 - self.abar))
        if self.interp == "logsnr":
            return lam[i] + (k - i) * (lam[i + 1] - lam[i])
        ab = self.abar[i] + (k - i) * (self.abar[i + 1] - self.abar[i])
        return torch.log(ab / (1 - ab))

    def forward(self, sample, timestep, class_labels=None):
        self.seen.append(timestep.detach().clone())
        ab = torch.sigmoid(self.effective_logsnr(timestep.double()))
        a, s = C.bcast(ab.sqrt(), sample), C.bcast((1 - ab).sqrt(), sample)
        x0, eps = gaussian_x0_eps(sample.double(), a, s)
        out = eps if self.pred == "epsilon" else a * eps - s * x0
        return (out.float() * self.gain,)


SCHEDS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          num_train_timesteps=1000),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000),
}


def wrapped(sched, pred, interp="abar", **kw):
    return P.DiffusersTeacher(FakeDDPMUNet(SCHEDS[sched], pred, interp),
                              {**SCHEDS[sched], "prediction_type": pred}, **kw)


@pytest.mark.parametrize("interp", ["logsnr", "abar"])
@pytest.mark.parametrize("sched,pred", [("linear", "epsilon"), ("linear", "v_prediction"),
                                        ("scaled_linear", "v_prediction"), ("scaled_linear", "epsilon"),
                                        ("squaredcos_cap_v2", "epsilon")])
def test_diffusers_teacher_gaussian_oracle(sched, pred, interp):
    """Inside the teacher's logSNR range the wrapper gives the analytic v of OUR schedule. The only
    error allowed is the interpolation's: the network's effective logSNR at the fractional timestep
    differs from ours by dlam (0 for interp="logsnr"; up to 0.08 near timestep 0 for "abar", where
    the table's logSNR steps are 0.7 apart), and |dv/dlogSNR| is well under 0.3 here."""
    teacher = wrapped(sched, pred, interp)
    lo, hi = teacher.logsnr_range
    for frac in (0.0, 0.002, 0.02, 0.2, 0.45, 0.55, 0.8, 0.98, 1.0):  # both eps branches, both ends
        lam = hi + frac * (lo - hi)
        t = torch.full((4,), float(C.t_of_logsnr(lam)))
        z = sample_z(t[:1].expand(4))
        lam_t = C.logsnr(t).double().clamp(lo, hi)  # float32 t at the range's ends rounds past it
        dlam = (teacher.unet.effective_logsnr(teacher.timestep(t)) - lam_t).abs().max().item()
        err = (teacher(z, t) - our_v(z, t)).abs().max().item()
        # eps -> x0 = (z - s' eps) / a' below logSNR 0 multiplies float32 rounding by 1/a'
        a_t = float(P._lam_ab(teacher.logsnr_of_timestep(teacher.timestep(t[:1])))[0])
        rounding = 1e-6 / a_t if pred == "epsilon" and lam < 0 else 0.0
        assert err < 2e-4 + 0.3 * dlam + rounding, (sched, pred, lam, err, dlam)
        if interp == "logsnr":
            assert dlam < 1e-4


def test_linear_ddpm_range_and_clamp():
    """Linear 1e-4..0.02 over 1000 steps spans logSNR +9.2..-10.1; beyond, timesteps clamp."""
    teacher = wrapped("linear", "epsilon")
    lo, hi = teacher.logsnr_range
    assert hi == pytest.approx(9.21, abs=0.02) and lo == pytest.approx(-10.1, abs=0.05)
    k = teacher.timestep(torch.tensor([0.0, 1.0]))
    assert k.tolist() == [0.0, 999.0]
    t_min, t_max = teacher.t_range
    assert 0 < t_min < t_max < 1
    assert float(C.logsnr(torch.tensor(t_max))) == pytest.approx(lo, abs=1e-3)


def test_fractional_timesteps_reach_the_network():
    teacher = wrapped("linear", "epsilon")
    t = torch.tensor([0.1234, 0.377, 0.5, 0.8123])
    teacher(sample_z(t), t)
    k = teacher.unet.seen[-1]
    assert k.dtype == torch.float32
    assert ((k - k.round()).abs() > 1e-3).all(), k
    assert torch.allclose(k.double(), teacher.timestep(t), atol=1e-3)


def test_timestep_logsnr_round_trip():
    teacher = wrapped("linear", "v_prediction")
    lo, hi = teacher.logsnr_range
    t = torch.linspace(float(C.t_of_logsnr(hi)), float(C.t_of_logsnr(lo)), 97)
    back = teacher.logsnr_of_timestep(teacher.timestep(t))
    assert (back - C.logsnr(t).double()).abs().max() < 1e-4
    # and the table itself: integer timesteps give the scheduler's own logSNR
    ab = P.ddpm_alphas_cumprod(SCHEDS["linear"])
    k = torch.tensor([0.0, 17.0, 500.0, 999.0])
    assert torch.allclose(teacher.logsnr_of_timestep(k), torch.log(ab / (1 - ab))[k.long()])


@pytest.mark.parametrize("pred,clip", [("epsilon", True), ("epsilon", False), ("v_prediction", True)])
def test_diffusers_teacher_finite_at_ends(pred, clip):
    teacher = wrapped("linear", pred, clip_x0=clip)
    for tv in (0.0, 1.0):
        x = (3 * torch.randn(4, 1, 4, 4)).requires_grad_(True)
        v = teacher(x, torch.full((4,), tv))
        assert torch.isfinite(v).all()
        (v ** 2).sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(teacher.unet.gain.grad).all()
        # at t = 1, v = (a z - x0) / s: the implied x0 = alpha z - sigma v is the teacher's x0
        if tv == 1.0 and pred == "epsilon" and clip:
            a, s = C.alpha_sigma(torch.tensor(1.0))
            assert (a * x - s * v).abs().max() <= 1.0 + 1e-5


class FakeEDMNet(nn.Module):
    """The raw F of an EDM-preconditioned oracle: D(x; s) = E[x0 | x0 + s eps] for Gaussian data
    whose mean depends on the label (M + 0.1 y; no label: M)."""

    def __init__(self, c_noise_inv, sd=0.5, one_hot=False):
        super().__init__()
        self.inv, self.sd, self.one_hot, self.seen = c_noise_inv, sd, one_hot, []
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x_in, c_noise, labels):
        self.seen.append((c_noise.detach().clone(), labels))
        s = C.bcast(self.inv(c_noise.double()), x_in)
        sd2 = self.sd ** 2
        x = x_in.double() * (s * s + sd2).sqrt()
        if labels is None:
            mean = M
        elif self.one_hot:
            mean = C.bcast(M + 0.1 * (labels.double() * torch.arange(labels.shape[1])).sum(1), x)
        else:
            mean = C.bcast(M + 0.1 * labels.double(), x)
        D = mean + S2 / (S2 + s * s) * (x - mean)
        c_skip, c_out = sd2 / (s * s + sd2), s * self.sd / (s * s + sd2).sqrt()
        return ((D - c_skip * x) / c_out).float() * self.gain


@pytest.mark.parametrize("kind", ["edm", "adm"])
def test_edm_teacher_gaussian_oracle(kind):
    inv = (lambda c: torch.exp(4 * c)) if kind == "edm" else (lambda c: torch.exp(c / 250))
    one_hot = kind == "edm"
    teacher = P.EDMTeacher(FakeEDMNet(inv, one_hot=one_hot), num_classes=3, in_ch=1, resolution=4,
                           c_noise=kind, one_hot_labels=one_hot)
    y = torch.tensor([0, 1, 2, 1])
    mean = C.bcast(M + 0.1 * y.double(), torch.zeros(4, 1, 4, 4))
    for lam in (12.0, 6.0, 1.0, -0.5, -4.0, -8.5):  # s = exp(-lam / 2) inside [0.002, 80]
        t = torch.full((4,), float(C.t_of_logsnr(lam)))
        z = sample_z(t) + 0.1 * mean.float()
        a, s = (C.bcast(c.double(), z) for c in P._lam_ab(C.logsnr(t).double()))
        x0, eps = gaussian_x0_eps(z.double(), a, s, mean)
        err = (teacher(z, t, y) - (a * eps - s * x0)).abs().max().item()
        assert err < 1e-4, (kind, lam, err)
    c_noise, labels = teacher.net.seen[-1]
    if one_hot:
        assert labels.shape == (4, 3) and labels.sum(1).tolist() == [1, 1, 1, 1]
        teacher(z, t, torch.tensor([3, 3, 0, 1]))  # null label -> all-zero rows
        assert teacher.net.seen[-1][1][:2].abs().sum() == 0
    else:
        assert labels.dtype == torch.long
        with pytest.raises(ValueError, match="no null label"):
            teacher(z, t, torch.tensor([3, 3, 0, 1]))


def test_edm_teacher_finite_at_ends_and_c_noise_clamp():
    teacher = P.EDMTeacher(FakeEDMNet(lambda c: torch.exp(4 * c)), in_ch=1, resolution=4)
    for tv in (0.0, 1.0):
        x = (3 * torch.randn(4, 1, 4, 4)).requires_grad_(True)
        v = teacher(x, torch.full((4,), tv))
        assert torch.isfinite(v).all()
        v.square().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(teacher.net.gain.grad).all()
        s = torch.exp(4 * teacher.net.seen[-1][0])
        assert torch.allclose(s.float(), torch.full((4,), 0.002 if tv == 0 else 80.0), rtol=1e-4)


def test_edm_division_free_form_matches_ve_map():
    """v = alpha sigma (1 - sd^2) / Delta z - sd / sqrt(Delta) F equals (alpha z - D) / sigma."""
    torch.manual_seed(0)
    net = lambda x_in, c, y: torch.tanh(x_in * 1.3 + c[:, None, None, None])  # noqa: E731
    teacher = P.EDMTeacher(net, in_ch=1, resolution=4)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9])
    z = torch.randn(4, 1, 4, 4)
    a, s = (C.bcast(c.double(), z) for c in P._lam_ab(C.logsnr(t).double()))
    sve, sd = s / a, 0.5
    x = z.double() / a
    c_noise = torch.log(sve.flatten().clamp(0.002, 80)) / 4
    D = sd ** 2 / (sve ** 2 + sd ** 2) * x + sve * sd / (sve ** 2 + sd ** 2).sqrt() * \
        net((x / (sve ** 2 + sd ** 2).sqrt()).float(), c_noise.float(), None).double()
    assert torch.allclose(teacher(z, t), ((a * z - D) / s).float(), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# a real (tiny) diffusers UNet2DModel
# ----------------------------------------------------------------------------------------------

def tiny_unet(num_class_embeds=None, seed=0, **kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
               block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg)


def test_real_unet2d_wrapped_and_sampled():
    teacher = P.DiffusersTeacher(tiny_unet(), SCHEDS["linear"]).eval()
    assert teacher.config["in_ch"] == 1 and teacher.config["resolution"] == 8
    assert teacher.config["kind"] == "diffusers" and teacher.config["w_embed"] is False
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 8)
    out = C.ddim_sample(C.guided(teacher), x, C.time_grid(4), bound="clip")
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    v, feats = teacher(x, torch.full((3,), 0.5), return_features=True)
    assert feats.shape == (3, teacher.mid_ch, 4, 4) and v.shape == x.shape
    imgs = C.generate(teacher, 2, 2, bound="clip")
    assert imgs.shape == (2, 1, 8, 8) and torch.isfinite(imgs).all()


def test_real_unet2d_labels_and_null():
    # 4 embeddings, the last one a null label: guidance works
    teacher = P.DiffusersTeacher(tiny_unet(num_class_embeds=4), SCHEDS["linear"], num_classes=3).eval()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    out = C.ddim_sample(C.guided(teacher, y, 1.5), x, C.time_grid(2), bound="clip")
    assert torch.isfinite(out).all()
    t = torch.full((2,), 0.4)
    assert not torch.allclose(teacher(x, t, y), teacher(x, t, torch.tensor([1, 1])))
    # no null embedding: plain conditional sampling works, guidance refuses
    plain = P.DiffusersTeacher(tiny_unet(num_class_embeds=3), SCHEDS["linear"]).eval()
    assert plain.num_classes == 3
    C.ddim_sample(C.guided(plain, y, 0.0), x, C.time_grid(2), bound="clip")
    with pytest.raises(ValueError, match="no null label"):
        C.ddim_sample(C.guided(plain, y, 1.0), x, C.time_grid(2), bound="clip")


def test_build_from_config_and_student_copy():
    teacher = P.DiffusersTeacher(tiny_unet(), {**SCHEDS["linear"], "prediction_type": "epsilon"}).eval()
    rebuilt = P.build_from_config(teacher.config)
    rebuilt.load_state_dict(teacher.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.95])
    assert torch.equal(rebuilt.eval()(x, t), teacher(x, t))
    student = P.student_copy(teacher)
    assert student.training and not student.clip_x0 and teacher.clip_x0
    v, feats = student(x, torch.ones(2), return_features=True)
    v.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert feats.shape[1] == student.mid_ch
    assert all(p.grad is None for p in teacher.parameters())


class FixedOutput(nn.Module):
    """Stands in for a UNet2DModel: returns one learnable tensor, so d(output)/d(x0) is readable."""

    def __init__(self, shape):
        super().__init__()
        self.o = nn.Parameter(torch.randn(shape))

    def forward(self, x, k, class_labels=None):
        return self.o


@pytest.mark.parametrize("head, most", [("copy", 150.0), ("v", 1.0)])
def test_student_head_v_has_no_division_at_t1(head, most):
    """The copied eps head reaches x0 at t = 1 only through (z - s' eps) / a' (1 / a' = 156 for
    linear betas); the head re-read as v gives x0 = a' z - s' v' (|dx0 / dout| <= 1)."""
    teacher = P.DiffusersTeacher(FixedOutput((2, 1, 8, 8)), {**SCHEDS["linear"], "prediction_type": "epsilon"})
    student = P.student_copy(teacher, head=head)
    z, t = torch.randn(2, 1, 8, 8), torch.ones(2)
    a, s = (C.bcast(c, z) for c in C.alpha_sigma(t))
    C.x0_from_v(z, student(z, t), a, s).sum().backward()
    gain = student.unet.o.grad.abs().max().item()
    assert (gain > most) if head == "copy" else (gain <= most)
    # inside the teacher's range the re-read head outputs the network's output itself: v = v'
    t = torch.full((2,), 0.5)
    if head == "v":
        assert student.config["prediction_type"] == "v_prediction" and teacher.prediction_type == "epsilon"
        torch.testing.assert_close(student(z, t), student.unet.o.detach().expand_as(z), atol=1e-5, rtol=1e-5)


def test_warm_up_head_fits_the_teacher():
    teacher = P.DiffusersTeacher(tiny_unet(seed=2), {**SCHEDS["linear"], "prediction_type": "epsilon"}).eval()
    student = P.student_copy(teacher, head="v")
    torch.manual_seed(0)
    x0 = torch.rand(256, 1, 8, 8) * 2 - 1
    t = torch.rand(256)
    z = C.diffuse(x0, t)

    def gap():
        with torch.no_grad():
            return (student(z, t) - teacher(z, t)).square().mean().item()
    before = gap()
    data = ((x0 * 127.5 + 127.5).round().to(torch.uint8), torch.zeros(256, dtype=torch.long))
    twin = P.student_copy(teacher, head="v")
    P.warm_up_head(student, teacher, data, 50, 64, 2e-3, seed=0)
    assert gap() < 0.7 * before  # a random tiny teacher: 0.55 after 50 iterations
    P.warm_up_head(twin, teacher, data, 50, 64, 2e-3, seed=0)  # every rank fits the same head
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), twin.state_dict().values()))
    # auto: v for an eps diffusers teacher, the teacher's own head for the others
    assert P.student_copy(teacher).prediction_type == "v_prediction" and P.student_copy(teacher).refit
    vt = P.DiffusersTeacher(tiny_unet(), {**SCHEDS["linear"], "prediction_type": "v_prediction"})
    assert P.student_copy(vt).prediction_type == "v_prediction" and not getattr(P.student_copy(vt), "refit", False)
    copied = P.student_copy(teacher, head="copy")
    assert copied.prediction_type == "epsilon" and P.warm_up_head(copied, teacher, data, 5, 8, 1e-3) is None
    with pytest.raises(SystemExit, match="student-head copy"):  # a v teacher needs no new head
        P.student_copy(P.DiffusersTeacher(tiny_unet(), {**SCHEDS["linear"], "prediction_type": "v_prediction"}),
                       head="v")


# ----------------------------------------------------------------------------------------------
# ADM <-> diffusers key map
# ----------------------------------------------------------------------------------------------

ADM_TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, num_class_embeds=3,
                block_out_channels=[8, 16], attention_head_dim=4,
                down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                resnet_time_scale_shift="scale_shift", norm_num_groups=4, attn_norm_num_groups=4,
                upsample_type="resnet", downsample_type="resnet")


def test_adm_key_names_of_the_imagenet64_layout():
    """Known ADM names (consistency_models' edm_imagenet64_ema.pt) land on the right modules."""
    pairs = {a: (d, k) for a, d, k in P.adm_module_pairs(P.ADM_IMAGENET64)}
    assert pairs["input_blocks.0.0"] == ("conv_in", "copy")
    assert pairs["label_emb"] == ("class_embedding", "copy")
    assert pairs["input_blocks.4.0"] == ("down_blocks.0.downsamplers.0", "resnet")
    assert pairs["input_blocks.5.1"] == ("down_blocks.1.attentions.0", "attn")
    assert pairs["middle_block.1"] == ("mid_block.attentions.0", "attn")
    assert pairs["output_blocks.3.2"] == ("up_blocks.0.upsamplers.0", "resnet")
    assert pairs["output_blocks.15.0"] == ("up_blocks.3.resnets.3", "resnet")
    assert pairs["out.2"] == ("conv_out", "copy")
    assert "input_blocks.15.0" in pairs and "input_blocks.16.0" not in pairs
    assert "output_blocks.16.0" not in pairs and "output_blocks.11.2" in pairs


@pytest.mark.parametrize("order", ["flash", "legacy"])
def test_adm_key_map_round_trip_strict(order):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = diffusers.UNet2DModel(**ADM_TINY)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    adm = P.diffusers_to_adm(src.state_dict(), ADM_TINY, order)
    for key, shape in [("input_blocks.0.0.weight", (8, 1, 3, 3)), ("label_emb.weight", (3, 32)),
                       ("time_embed.2.weight", (32, 32)),
                       ("input_blocks.2.0.in_layers.0.weight", (8,)),  # downsampling ResBlock
                       ("input_blocks.3.0.skip_connection.weight", (16, 8, 1, 1)),
                       ("input_blocks.3.1.qkv.weight", (48, 16, 1)),
                       ("middle_block.1.proj_out.weight", (16, 16, 1)),
                       ("output_blocks.1.2.emb_layers.1.weight", (32, 32)),  # upsampling ResBlock
                       ("output_blocks.3.0.out_layers.3.weight", (8, 8, 3, 3)),
                       ("out.2.bias", (1,))]:
        assert tuple(adm[key].shape) == shape, key
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in adm)
    back = P.adm_to_diffusers(adm, ADM_TINY, order)
    dst = diffusers.UNet2DModel(**ADM_TINY)
    dst.load_state_dict(back, strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    q = src.state_dict()["mid_block.attentions.0.to_q.weight"]
    if order == "flash":  # rows (three, heads, d): q is the first third
        assert torch.equal(adm["middle_block.1.qkv.weight"][:16, :, 0], q)
    else:  # rows (heads, three, d) with 4-dim heads: head 0's q, then its k
        assert torch.equal(adm["middle_block.1.qkv.weight"][:4, :, 0], q[:4])
    with pytest.raises(ValueError, match="not covered"):
        P.adm_to_diffusers({**adm, "extra.weight": torch.zeros(1)}, ADM_TINY, order)


def test_edm_adm_spec_end_to_end(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = diffusers.UNet2DModel(**ADM_TINY)
    path = tmp_path / "edm_tiny_ema.pt"
    torch.save(P.diffusers_to_adm(src.state_dict(), ADM_TINY), path)
    teacher = P._load_edm_adm(str(path), unet_config=ADM_TINY).eval()
    assert teacher.config["kind"] == "edm" and teacher.num_classes == 3
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    out = C.ddim_sample(C.guided(teacher, y), x, C.time_grid(3), bound="clip")
    assert torch.isfinite(out).all()
    rebuilt = P.build_from_config(teacher.config)
    rebuilt.load_state_dict(teacher.state_dict())
    t = torch.tensor([0.0, 1.0])
    v, feats = teacher(x, t, y, return_features=True)
    assert torch.equal(rebuilt.eval()(x, t, y), v) and feats.shape == (2, 16, 4, 4)
    # the real spec checks the ImageNet-64 layout: a tiny state dict is refused in one line
    with pytest.raises(SystemExit, match="layout"):
        P.load_published_teacher(f"edm-adm:{path}")


# ----------------------------------------------------------------------------------------------
# load_published_teacher
# ----------------------------------------------------------------------------------------------

def test_spec_errors_are_one_line(tmp_path):
    for spec, match in [("hub:foo/bar", "unknown published-teacher prefix"),
                        (f"edm-adm:{tmp_path}/missing.pt", "not found"),
                        (f"edm-pkl:{tmp_path}/x.pkl", "EDM checkout")]:
        with pytest.raises(SystemExit, match=match) as e:
            P.load_published_teacher(spec)
        assert "\n" not in str(e.value)
    assert P.is_published_spec("diffusers:a/b") and not P.is_published_spec("runs/x/ckpt.pt")


def test_missing_diffusers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(SystemExit, match="pip install diffusers"):
        P.load_published_teacher("diffusers:some/model")


def test_diffusers_folder_spec(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    import json
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **SCHEDS["linear"], "prediction_type": "v_prediction"}))
    teacher = P.load_published_teacher(f"diffusers:{tmp_path}")
    assert teacher.prediction_type == "v_prediction" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    ref = P.DiffusersTeacher(unet, {**SCHEDS["linear"], "prediction_type": "v_prediction"}).eval()
    assert torch.allclose(teacher(x, t), ref(x, t), atol=1e-6)
    # the model folder itself, with scheduler/ beside it
    assert P.load_published_teacher(f"diffusers:{tmp_path / 'unet'}").prediction_type == "v_prediction"
    with pytest.raises(SystemExit, match="not found"):
        P.load_published_teacher(f"diffusers:{tmp_path}/nope/deeper")


# ----------------------------------------------------------------------------------------------
# NVlabs persistence pickles, read without executing them
# ----------------------------------------------------------------------------------------------

def _persistence_modules(sentinel):
    """A stand-in of NVlabs' torch_utils.persistence: _reconstruct_persistent_obj execs the
    embedded source, as the real one does; the source writes `sentinel`."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})
        return meta
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    return {"torch_utils": pkg, "torch_utils.persistence": mod}


class _Persistent:
    def __init__(self, fn, class_name, src, state):
        self.fn, self.meta = fn, dict(type="class", version=4, module_src=src,
                                      class_name=class_name, state=state)

    def __reduce__(self):
        return self.fn, (self.meta,)


def write_persistence_pickle(path, sentinel, net, class_name="EDMPrecond", init_kwargs=None, protocol=2):
    """A pickle shaped like an EDM snapshot: {'ema': persistent(EDMPrecond) with a persistent child
    'model'}, each carrying source that creates `sentinel` when executed."""
    mods = _persistence_modules(sentinel)
    fn = mods["torch_utils.persistence"]._reconstruct_persistent_obj
    src = f"open({str(sentinel)!r}, 'w').write('executed')\n"

    def state_of(module, name):
        st = dict(training=False, _parameters=collections.OrderedDict(module._parameters),
                  _buffers=collections.OrderedDict(module._buffers), _non_persistent_buffers_set=set(),
                  _modules=collections.OrderedDict(), _init_args=(), _init_kwargs=init_kwargs or {})
        for child_name, child in module._modules.items():
            st["_modules"][child_name] = _Persistent(fn, type(child).__name__, src, state_of(child, child_name))
        return st
    top = {"ema": _Persistent(fn, class_name, src, state_of(net, "ema")), "loss_fn": None,
           "dataset_kwargs": {"resolution": 4}}
    old = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        with open(path, "wb") as fh:
            pickle.dump(top, fh, protocol=protocol)  # 2: bytes via _codecs.encode, __builtin__ names
    finally:
        for k, v in old.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mods


class TinyEDMPrecond(nn.Module):
    def __init__(self, img_resolution=4, img_channels=1, label_dim=0, sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1))


@pytest.mark.parametrize("protocol", [2, 4])
def test_persistence_pickle_loads_without_executing(tmp_path, monkeypatch, protocol):
    sentinel = tmp_path / "EXECUTED"
    torch.manual_seed(0)
    net = TinyEDMPrecond()
    path = tmp_path / "network-snapshot.pkl"
    mods = write_persistence_pickle(path, sentinel, net, init_kwargs={"img_resolution": 4}, protocol=protocol)
    # positive control: a plain pickle.load with the persistence module importable runs the source
    for k, m in mods.items():
        monkeypatch.setitem(sys.modules, k, m)
    with open(path, "rb") as fh:
        pickle.load(fh)
    assert sentinel.exists()
    sentinel.unlink()
    # ours: nothing runs, even with the module importable
    info = P.read_edm_pickle(str(path))
    assert not sentinel.exists()
    sd = info["state_dict"]
    assert set(sd) == set(net.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    assert info["class_name"] == "EDMPrecond" and info["init_kwargs"] == {"img_resolution": 4}
    assert "torch_utils.persistence._reconstruct_persistent_obj" in info["classes"]
    assert "executed" in info["module_src"]
    assert set(P.load_edm_pickle_weights(str(path))) == set(sd)
    assert not sentinel.exists()


def test_edm_pkl_with_user_checkout(tmp_path):
    """edm-pkl with an EDM checkout: the user's training.networks builds the network (here a fake
    checkout defining a tiny EDMPrecond), the weights come from the inert reader."""
    repo = tmp_path / "edm"
    (repo / "training").mkdir(parents=True)
    (repo / "training" / "__init__.py").write_text("")
    (repo / "training" / "networks.py").write_text(
        "import torch.nn as nn\n"
        "class Block(nn.Conv2d):\n"  # EDM's UNetBlock keeps its out_channels, as a conv does
        "    pass\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 1, 3, padding=1)\n"
        "        self.enc = nn.ModuleDict({'in': Block(1, 4, 3, padding=1), 'down': Block(4, 8, 3, stride=2, padding=1)})\n"
        "    def forward(self, x, noise_labels, class_labels, augment_labels=None):\n"
        "        h = self.enc['down'](self.enc['in'](x))\n"
        "        return self.conv(x) + noise_labels[:, None, None, None] + 0.1 * h.mean()\n"
        "class EDMPrecond(nn.Module):\n"
        "    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5):\n"
        "        super().__init__()\n"
        "        self.img_resolution, self.img_channels = img_resolution, img_channels\n"
        "        self.label_dim, self.sigma_data = label_dim, sigma_data\n"
        "        self.model = Model()\n")
    sys.path.insert(0, str(repo))
    try:
        import importlib
        nets = importlib.import_module("training.networks")
        torch.manual_seed(0)
        net = nets.EDMPrecond(img_resolution=4, img_channels=1)
    finally:
        sys.path.remove(str(repo))
    sentinel = tmp_path / "EXECUTED"
    path = tmp_path / "edm.pkl"
    write_persistence_pickle(path, sentinel, net, init_kwargs=dict(img_resolution=4, img_channels=1))
    try:
        teacher = P.load_published_teacher(f"edm-pkl:{path}", edm_repo=str(repo))
        assert not sentinel.exists()
        assert torch.equal(teacher.net.conv.weight, net.model.conv.weight)
        assert teacher.config["in_ch"] == 1 and teacher.config["c_noise"] == "edm"
        v = teacher(torch.randn(2, 1, 4, 4), torch.tensor([0.0, 1.0]))
        assert torch.isfinite(v).all()
        # the scripts pass --edm-repo through: here the 4x4 network meets the 8x8 digits
        import pd_ddil
        with pytest.raises(SystemExit, match="makes 1x4"):
            pd_ddil.main(["--teacher", f"edm-pkl:{path}", "--edm-repo", str(repo), "--out", str(tmp_path / "pd")])
        with pytest.raises(SystemExit, match="your own EDM checkout"):
            pd_ddil.main(["--teacher", f"edm-pkl:{path}", "--out", str(tmp_path / "pd")])
        # a short PD run from an 8x8 EDM-preconditioned teacher: student copied, trained, evaluated
        net8 = nets.EDMPrecond(img_resolution=8, img_channels=1)
        write_persistence_pickle(tmp_path / "edm8.pkl", sentinel, net8, init_kwargs=dict(img_resolution=8, img_channels=1))
        student = pd_ddil.main(["--teacher", f"edm-pkl:{tmp_path / 'edm8.pkl'}", "--edm-repo", str(repo),
                                "--out", str(tmp_path / "pd8"), "--teacher-steps", "4", "--steps", "2",
                                "--iters-per-stage", "2", "--batch-size", "4", "--eval-samples", "12",
                                "--stage-eval-samples", "8", "--shift-samples", "4", "--ref-samples", "0",
                                "--reference-steps", "4", "--eval-every", "0"])
        assert isinstance(student, P.EDMTeacher) and (tmp_path / "pd8" / "metrics.json").is_file()
        # DMD2's GAN head on the encoder's output (its last `enc` block), as DMD2 reads the EDM net
        assert teacher.mid_ch == 8
        assert teacher(torch.randn(2, 1, 4, 4), torch.rand(2), return_features=True)[1].shape == (2, 8, 2, 2)
        import dmd2_ddil
        G = dmd2_ddil.main(["--teacher", f"edm-pkl:{tmp_path / 'edm8.pkl'}", "--edm-repo", str(repo),
                            "--out", str(tmp_path / "dmd2"), "--steps", "1", "--iters", "2", "--batch-size", "4",
                            "--fake-updates", "1", "--eval-samples", "12", "--shift-samples", "4",
                            "--ref-samples", "0", "--reference-steps", "4"])
        assert json.loads((tmp_path / "dmd2" / "log.jsonl").read_text().splitlines()[-1])["loss_d"] > 0
        assert not torch.equal(G.net.enc["down"].weight, net8.model.enc["down"].weight)
        assert not torch.equal(student.net.conv.weight, net8.model.conv.weight)  # it trained
        assert not sentinel.exists()
    finally:
        for k in [k for k in sys.modules if k == "training" or k.startswith("training.")]:
            sys.modules.pop(k)


@pytest.mark.parametrize("method, head", [("pd", "copy"), ("lcm", "copy"), ("dmd2", "copy"), ("pd", "auto"),
                                          ("lcm", "v"), ("dmd2", "v")])
def test_each_method_distils_a_diffusers_teacher_end_to_end(method, head, tmp_path, capsys):
    """--teacher diffusers:<folder>: the student is a copy of the wrapped UNet2DModel, trained,
    checkpointed, and sampled again through evaluate.py from the checkpoint alone."""
    import json
    import dmd2_ddil
    import evaluate
    import lcm_ddil
    import pd_ddil
    unet = tiny_unet(seed=1)
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    (tmp_path / "teacher" / "scheduler").mkdir()
    (tmp_path / "teacher" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **SCHEDS["linear"], "prediction_type": "epsilon"}))
    out = tmp_path / method
    common = ["--teacher", f"diffusers:{tmp_path / 'teacher'}", "--out", str(out), "--batch-size", "4",
              "--eval-samples", "12", "--shift-samples", "4", "--buffer-size", "16", "--refresh", "2",
              "--log-every", "1", "--beta-data", "0.5", "--beta-student", "0.5", "--reference-steps", "4",
              "--ref-samples", "12", "--head-warmup", "2"] + ([] if head == "auto" else ["--student-head", head])
    main, extra = {"pd": (pd_ddil.main, ["--teacher-steps", "4", "--steps", "2", "--iters-per-stage", "2",
                                         "--stage-eval-samples", "8"]),
                   "lcm": (lcm_ddil.main, ["--iters", "2", "--steps", "2", "--grid", "4", "--refresh-every", "1"]),
                   "dmd2": (dmd2_ddil.main, ["--iters", "2", "--steps", "2", "--teacher-substeps", "2",
                                             "--fake-updates", "1"])}[method]
    student = main(common + extra)
    assert isinstance(student, P.DiffusersTeacher) and student.clip_x0 is False
    assert student.prediction_type == {"copy": "epsilon", "v": "v_prediction", "auto": "v_prediction"}[head]
    assert ("fitted to the teacher's v for 2 iterations" in capsys.readouterr().out) == (head != "copy")
    m = json.loads((out / "metrics.json").read_text())
    res = evaluate.main([str(out / "ckpt.pt"), "--steps", "2", "--num-samples", "12", "--out", str(tmp_path / "ev")])
    assert all(m["student"]["2"][k] == v for k, v in res["rows"]["2"].items())  # rebuilt from its config
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    teacher = P.load_published_teacher(f"diffusers:{tmp_path / 'teacher'}")
    assert any(not torch.equal(a, b) for a, b in zip(ck["net"].values(), teacher.state_dict().values()))
