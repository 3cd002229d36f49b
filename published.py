"""Published teachers behind our interface: `net(x, t, y=None, w=None, return_features=False) -> v`.

Our schedule (common.py): VP, logSNR(t) = -2 log tan(a t + b) in [-20, 20] for t in [0, 1],
alpha^2 = sigmoid(logSNR), sigma^2 = sigmoid(-logSNR), z = alpha x0 + sigma eps,
v = alpha eps - sigma x0, x0 = alpha z - sigma v, eps = sigma z + alpha v.

What this module provides (diffusers is optional: imported lazily, one-line error when missing):

* `DiffusersTeacher`: a diffusers `UNet2DModel` (eps- or v-prediction, DDPM beta schedule) on our
  continuous schedule: t -> logSNR(t) -> a fractional DDPM timestep (logSNR interpolated linearly
  between the scheduler's integer timesteps), output converted to our v.
* `EDMTeacher`: an EDM-preconditioned denoiser D(x; s) = c_skip x + c_out F(c_in x, c_noise, labels)
  (VE, sigma_data 0.5) mapped exactly to our VP v; F is any raw network (NVlabs' or OpenAI's).
* `adm_to_diffusers` / `diffusers_to_adm`: OpenAI ADM (guided-diffusion / consistency_models)
  state-dict keys <-> diffusers `UNet2DModel` keys, written from both layouts.
* `read_edm_pickle` / `load_edm_pickle_weights`: tensors out of an NVlabs EDM network pickle
  WITHOUT executing anything in it (restricted unpickler, inert stand-in classes). Using them needs
  the user's own checkout of NVlabs' EDM code (non-commercial licence: never vendored here).
* `load_published_teacher(spec, device, edm_repo=None)`: `diffusers:<folder|hub id>`,
  `edm-adm:<state dict .pt>`, `edm-pkl:<network .pkl>`.
* `build_from_config` / `student_copy`: rebuild a wrapped network from its `.config` (checkpoints),
  and the trainable copy a distillation student starts from.

See docs/published_teachers.md for the derivations and what integration into the method scripts needs.
"""
import collections
import copy
import io
import json
import math
import os
import pickle
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import harness as H

PREFIXES = ("diffusers", "edm-adm", "edm-pkl")
HEADS = H.HEADS  # a student's output: v for eps teachers (auto), the teacher's own, or v


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        H.fail("published teachers of this kind need the optional package diffusers: "
               "pip install diffusers")
    return diffusers


def _lam_ab(lam):
    """(alpha, sigma) of a logSNR tensor, computed in float64 (exact at |logSNR| = 20)."""
    lam = lam.double()
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


class _FeatureHook:
    """Keeps the output of one submodule (the mid block) of the latest forward."""

    def __init__(self, module):
        self.out = None
        self.handle = module.register_forward_hook(self._keep) if module is not None else None

    def _keep(self, module, inputs, output):
        self.out = output[0] if isinstance(output, (tuple, list)) else output


def _features(hook, what):
    if hook is None or hook.handle is None:
        raise ValueError(f"{what}: return_features needs a feature module (the mid block); "
                         f"none was given")
    return hook.out


# ----------------------------------------------------------------------------------------------
# DDPM schedules (diffusers scheduler configs) as logSNR tables
# ----------------------------------------------------------------------------------------------

def ddpm_alphas_cumprod(scheduler_config):
    """alphas_cumprod [N] (float64) of a diffusers DDPM/DDIM scheduler config: beta_schedule
    linear, scaled_linear or squaredcos_cap_v2 (or trained_betas), beta_start, beta_end,
    num_train_timesteps; computed here so no scheduler class is needed."""
    cfg = dict(scheduler_config)
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr schedules reach logSNR = -inf: not supported")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} not supported (linear, scaled_linear, "
                         f"squaredcos_cap_v2)")
    return torch.cumprod(1.0 - betas, 0)


class DiffusersTeacher(nn.Module):
    """A diffusers `UNet2DModel` (DDPM-style discrete schedule) as a v-prediction network on our
    continuous schedule. forward(x, t, y=None, w=None, return_features=False) -> v (float32).

    Time: lam = logsnr(t) is clamped to the teacher's range [lam_T[N-1], lam_T[0]] (about
    [-10.1, +9.2] for linear betas 1e-4..0.02 over 1000 steps: our schedule's [-20, 20] goes beyond
    it at both ends), then mapped to the fractional timestep k whose linearly interpolated table
    logSNR lam_T(k) equals it; k goes to the network as a float tensor (UNet2DModel casts a Python
    number to long; a float tensor keeps the fraction). Outside the range the network sees its
    boundary timestep; the input z is passed unchanged (both schedules are variance preserving, so
    inside the range z means the same thing to both).

    Output -> our v, with (a, s) our alpha, sigma at t and (a', s') the teacher's at the clamped
    logSNR (equal inside the range):
      v-prediction: x0 = a' z - s' v', eps = s' z + a' v', v = a eps - s x0 (no division; v = v'
        inside the range).
      eps-prediction: eps -> x0 = (z - s eps) / a multiplies the eps error by 1/a (2e4 at t = 1).
        Bounded form: above logSNR 0 (a >= 0.707), v = a eps - s x0 with x0 = (z - s eps) / a,
        i.e. v = (eps - s z) / a; below logSNR 0 (s >= 0.707), x0 = clamp((z - s' eps) / a', -1, 1)
        from the teacher's own (clamped) level, and v = (a z - x0) / s, which is exactly our v for
        that x0 (x0 = a z - s v recovers it). clip_x0=False drops the clamp (students: a clamp has
        zero gradient where it is active); the error amplification is then 1/a'_min (156 for
        linear 1e-4..0.02), not 1/a (2e4).
    Values and gradients stay finite at t = 0 and t = 1 (every divisor is bounded away from 0).

    Labels: a class-conditional UNet2DModel (num_class_embeds) gets y as class_labels. Our null
    label is `num_classes`. By default num_classes = num_class_embeds and there is no null label:
    y = None or y = num_classes raise (classifier-free guidance is impossible with such a teacher;
    use guidance 0). If the model was trained with a null embedding as its last class, pass
    num_classes = num_class_embeds - 1: then y = num_classes (and y = None) use it.

    `.config`: in_ch, resolution, num_classes, w_embed=False, kind="diffusers", prediction_type,
    clip_x0, unet_config and scheduler_config (build_from_config rebuilds the module from it).
    return_features: the mid block's output (a forward hook), `.mid_ch` channels.
    """

    def __init__(self, unet, scheduler_config, in_ch=None, resolution=None, num_classes=None,
                 prediction_type=None, clip_x0=True, mid_ch=None):
        super().__init__()
        self.unet = unet
        ucfg = {k: v for k, v in dict(getattr(unet, "config", {}) or {}).items() if not k.startswith("_")}
        scfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        pred = prediction_type or scfg.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {pred!r} not supported (epsilon, v_prediction)")
        embeds = ucfg.get("num_class_embeds") or 0
        num_classes = embeds if num_classes is None else num_classes
        if num_classes not in (embeds, embeds - 1) or (embeds == 0 and num_classes):
            raise ValueError(f"num_classes {num_classes} with {embeds} class embeddings: use "
                             f"{embeds} (no null label) or {embeds - 1} (the last one is null)")
        self.num_classes, self.has_null = num_classes, bool(embeds) and num_classes == embeds - 1
        self.prediction_type, self.clip_x0 = pred, clip_x0
        lam = torch.log(ddpm_alphas_cumprod(scfg)) - torch.log1p(-ddpm_alphas_cumprod(scfg))
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError("the scheduler's logSNR is not strictly decreasing in the timestep")
        self.register_buffer("lam_table", lam, persistent=False)  # float64 [N], decreasing
        boc = ucfg.get("block_out_channels")
        self.mid_ch = mid_ch if mid_ch is not None else (boc[-1] if boc else None)
        self.config = dict(kind="diffusers", in_ch=in_ch or ucfg.get("in_channels"),
                           resolution=resolution or ucfg.get("sample_size"),
                           num_classes=num_classes, w_embed=False, prediction_type=pred,
                           clip_x0=clip_x0, unet_config=_plain_config(ucfg),
                           scheduler_config=_plain_config(scfg))
        self._hook = _FeatureHook(getattr(unet, "mid_block", None))

    # --- time ---------------------------------------------------------------------------------
    @property
    def logsnr_range(self):
        """(min, max) logSNR of the teacher's timesteps 0..N-1."""
        return float(self.lam_table[-1]), float(self.lam_table[0])

    @property
    def t_range(self):
        """(t_min, t_max): our times whose logSNR lies inside the teacher's range."""
        lo, hi = self.logsnr_range
        return float(C.t_of_logsnr(hi)), float(C.t_of_logsnr(lo))

    def timestep(self, t):
        """Our t [B] -> the teacher's fractional timestep k [B] (float64), clamped to [0, N-1]."""
        lam = C.logsnr(t).double()
        return self._timestep_of_logsnr(lam)

    def _timestep_of_logsnr(self, lam):
        table = self.lam_table.to(lam.device)
        n = table.numel()
        lam = lam.clamp(float(table[-1]), float(table[0]))
        neg = -table  # increasing
        i = torch.searchsorted(neg, (-lam).contiguous(), right=True).clamp(1, n - 1)
        lo, hi = neg[i - 1], neg[i]
        return (i - 1).double() + ((-lam) - lo) / (hi - lo)

    def logsnr_of_timestep(self, k):
        """The teacher's logSNR at fractional timesteps k (the table interpolated linearly)."""
        table = self.lam_table.to(torch.as_tensor(k).device)
        k = torch.as_tensor(k, dtype=torch.float64, device=table.device).clamp(0, table.numel() - 1)
        i = k.floor().long().clamp(max=table.numel() - 2)
        return table[i] + (k - i) * (table[i + 1] - table[i])

    # --- labels ---------------------------------------------------------------------------------
    def _labels(self, y, batch, device):
        if not (getattr(self.unet, "config", None) or {}).get("num_class_embeds"):
            return None
        if y is None:
            if not self.has_null:
                raise ValueError("this class-conditional teacher has no null label: pass labels y")
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        y = y.long()
        if not self.has_null and bool((y >= self.num_classes).any()):
            raise ValueError("this teacher has no null label (classifier-free guidance needs one): "
                             "use guidance 0, or num_classes = num_class_embeds - 1 if its last "
                             "class embedding is the null one")
        return y

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x, t, y=None, w=None, return_features=False):
        z = x.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        lam = C.logsnr(t).double()
        k = self._timestep_of_logsnr(lam)
        lam_c = self.logsnr_of_timestep(k)
        a, s = (C.bcast(c.float(), z) for c in _lam_ab(lam))
        at, st = (C.bcast(c.float(), z) for c in _lam_ab(lam_c))
        out = self.unet(x, k.to(torch.float32), class_labels=self._labels(y, x.shape[0], x.device))
        out = (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).float()
        if self.prediction_type == "v_prediction":
            x0, eps = at * z - st * out, st * z + at * out
            v = a * eps - s * x0
        else:
            low = (lam < 0).reshape(-1, *([1] * (z.dim() - 1)))
            x0_low = (z - st * out) / at
            if self.clip_x0:
                x0_low = x0_low.clamp(-1.0, 1.0)
            # each branch divides by a quantity >= 0.707 where it is selected; the clamps only
            # keep the unselected branch finite (its gradient is multiplied by 0, never by inf)
            v = torch.where(low, (a * z - x0_low) / s.clamp_min(0.5), (out - s * z) / a.clamp_min(0.5))
        if return_features:
            return v, _features(self._hook, "DiffusersTeacher")
        return v


def _plain_config(cfg):
    """A JSON-able copy of a (diffusers Frozen)dict: tuples to lists, private keys dropped."""
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not str(k).startswith("_")},
                                 default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


# ----------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022) preconditioned denoisers
# ----------------------------------------------------------------------------------------------

C_NOISE = {
    "edm": lambda s: torch.log(s) / 4.0,      # NVlabs' EDMPrecond
    "adm": lambda s: 250.0 * torch.log(s),    # OpenAI consistency_models (1000 * 0.25 * ln s)
}


class EDMTeacher(nn.Module):
    """An EDM-preconditioned denoiser as our v-prediction network, exactly.

    EDM (VE): D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), labels), with
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    sd = sigma_data. Our z = alpha x0 + sigma eps is the VE point x = z / alpha at s = sigma / alpha.
    With Delta = sigma^2 + sd^2 alpha^2 (= alpha^2 (s^2 + sd^2); >= min(1, sd^2) since
    alpha^2 + sigma^2 = 1): c_in x = z / sqrt(Delta), c_skip x = sd^2 alpha z / Delta,
    c_out = sigma sd / sqrt(Delta), and v = (alpha z - D) / sigma becomes the division-free
        v = alpha sigma (1 - sd^2) / Delta * z - sd / sqrt(Delta) * F(z / sqrt(Delta), c_noise, labels)
    (alpha z - sd^2 alpha z / Delta = alpha z sigma^2 (1 - sd^2) / Delta, then divide by sigma).
    s = exp(-logSNR / 2) spans [4.5e-5, 2.2e4] on our schedule; it is clamped to
    [sigma_min, sigma_max] (0.002, 80) only inside c_noise: the rest of the map stays exact, and
    values and gradients are finite at t = 0 and t = 1.

    net: the raw network F(x_in, c_noise [B], class_labels) -> F (a module, so its parameters are
    ours); c_noise "edm" (ln(s) / 4, NVlabs) or "adm" (250 ln(s), OpenAI consistency_models) or a
    callable. Labels: one_hot_labels=True (NVlabs) passes y as one-hot [B, num_classes] and our null
    label (y = num_classes, or y = None) as the all-zero row, NVlabs' label-dropout input (only
    meaningful for guidance if the model was trained with label dropout); False (OpenAI) passes
    integer labels, and there is no null label: y = None / y = num_classes raise.
    feature_module: a submodule whose output return_features returns (the mid block), mid_ch its
    channels. config_extra: entries merged into `.config` (what build_from_config needs).
    """

    def __init__(self, net, num_classes=0, in_ch=3, resolution=64, sigma_data=0.5,
                 sigma_min=0.002, sigma_max=80.0, c_noise="edm", one_hot_labels=False,
                 feature_module=None, mid_ch=None, config_extra=None):
        super().__init__()
        self.net = net
        self.num_classes, self.one_hot = num_classes, one_hot_labels
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.c_noise = C_NOISE[c_noise] if isinstance(c_noise, str) else c_noise
        self.mid_ch = mid_ch
        self.config = dict(kind="edm", in_ch=in_ch, resolution=resolution, num_classes=num_classes,
                           w_embed=False, sigma_data=sigma_data, sigma_min=sigma_min,
                           sigma_max=sigma_max, c_noise=c_noise if isinstance(c_noise, str) else "custom",
                           one_hot_labels=one_hot_labels, **(config_extra or {}))
        self._hook = _FeatureHook(feature_module)

    def _labels(self, y, batch, device):
        if not self.num_classes:
            return None
        if self.one_hot:
            if y is None:
                return torch.zeros(batch, self.num_classes, device=device)
            y = y.long()
            return F.one_hot(y.clamp(max=self.num_classes), self.num_classes + 1)[:, :-1].float()
        if y is None or bool((y.long() >= self.num_classes).any()):
            raise ValueError("this EDM teacher takes integer labels and has no null label: pass "
                             "labels in [0, num_classes) and use guidance 0")
        return y.long()

    def forward(self, x, t, y=None, w=None, return_features=False):
        z = x.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        lam = C.logsnr(t).double()
        a, s = _lam_ab(lam)
        sd = self.sigma_data
        delta = s ** 2 + sd ** 2 * a ** 2
        s_ve = torch.exp(-0.5 * lam).clamp(self.sigma_min, self.sigma_max)
        c_noise = self.c_noise(s_ve).float()
        k_z = C.bcast((a * s * (1 - sd ** 2) / delta).float(), z)
        k_f = C.bcast((sd / delta.sqrt()).float(), z)
        x_in = (z * C.bcast(delta.rsqrt().float(), z)).to(x.dtype)
        f = self.net(x_in, c_noise, self._labels(y, x.shape[0], x.device))
        f = (f.sample if hasattr(f, "sample") else f).float()
        v = k_z * z - k_f * f
        if return_features:
            return v, _features(self._hook, "EDMTeacher")
        return v


class UNet2DCall(nn.Module):
    """Adapter: a diffusers UNet2DModel as an EDM raw network F(x_in, c_noise, class_labels)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, class_labels=None):
        return self.unet(x, c_noise.float(), class_labels=class_labels).sample


# ----------------------------------------------------------------------------------------------
# OpenAI ADM state dict <-> diffusers UNet2DModel
# ----------------------------------------------------------------------------------------------

# consistency_models' EDM ImageNet-64 teacher (edm_imagenet64_ema.pt) as a UNet2DModel config:
# 192 channels, mult 1,2,3,4, 3 res blocks, attention at 32/16/8 (levels 1..3), 64-dim heads,
# scale-shift norm, resblock up/down, 1000 classes.
ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
    block_out_channels=[192, 384, 576, 768], attention_head_dim=64,
    down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    resnet_time_scale_shift="scale_shift", norm_num_groups=32, attn_norm_num_groups=32,
    upsample_type="resnet", downsample_type="resnet")

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def adm_module_pairs(unet_config):
    """[(adm_prefix, diffusers_prefix, kind)] for a UNet2DModel config of ADM's layout (resnet
    up/downsampling blocks, optional attention per level); kind is "copy", "resnet" or "attn".

    ADM numbering: input_blocks.0 is conv_in; then per level `layers_per_block` blocks
    input_blocks.k = [ResBlock, (AttentionBlock)] and, except on the last level, a downsampling
    ResBlock input_blocks.k.0; middle_block = [ResBlock, AttentionBlock, ResBlock]; output_blocks
    run the levels in reverse, `layers_per_block + 1` blocks each, the level's upsampling ResBlock
    (except on level 0) appended to its last block (index 1 without attention, 2 with).
    """
    cfg = dict(unet_config)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    ok_down, ok_up = {"ResnetDownsampleBlock2D", "AttnDownBlock2D"}, {"ResnetUpsampleBlock2D", "AttnUpBlock2D"}
    if not set(down) <= ok_down or not set(up) <= ok_up or cfg.get("downsample_type") != "resnet" \
            or cfg.get("upsample_type") != "resnet":
        raise ValueError("the ADM key map covers resblock up/down layouts only (Resnet*/Attn* "
                         "blocks, downsample_type = upsample_type = 'resnet')")
    n = cfg["layers_per_block"]
    pairs = [("time_embed.0", "time_embedding.linear_1", "copy"),
             ("time_embed.2", "time_embedding.linear_2", "copy"),
             ("input_blocks.0.0", "conv_in", "copy")]
    if cfg.get("num_class_embeds"):
        pairs.append(("label_emb", "class_embedding", "copy"))
    k = 1
    for i, kind in enumerate(down):
        for j in range(n):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if kind.startswith("Attn"):
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if i < len(down) - 1:
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{i}.downsamplers.0", "resnet"))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", "resnet"),
              ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "resnet")]
    k = 0
    for i, kind in enumerate(up):
        attn = kind.startswith("Attn")
        for j in range(n + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if i < len(up) - 1:
            pairs.append((f"output_blocks.{k - 1}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0", "resnet"))
    pairs += [("out.0", "conv_norm_out", "copy"), ("out.2", "conv_out", "copy")]
    return pairs


def _qkv_perm(ch, heads, order):
    """Row order of ADM's fused qkv weight: "flash" (consistency_models' default attention,
    QKVFlashAttention: rows (three, heads, d)) or "legacy" (QKVAttentionLegacy: rows (heads,
    three, d)). Returns the index that puts rows in (three, heads, d) order."""
    idx = torch.arange(3 * ch)
    if order == "flash":
        return idx
    if order != "legacy":
        raise ValueError(f"qkv_order must be 'flash' or 'legacy', got {order!r}")
    d = ch // heads
    return idx.reshape(heads, 3, d).transpose(0, 1).reshape(-1)


def adm_to_diffusers(adm_sd, unet_config, qkv_order="flash"):
    """An ADM state dict -> UNet2DModel state dict. Strict: every ADM key must be used (ValueError
    naming the first ones left over or missing). Attention: ADM's 1x1 conv1d qkv [3C, C, 1] is
    split into to_q / to_k / to_v [C, C] (rows in qkv_order, see _qkv_perm), proj_out -> to_out.0."""
    src, out, used = dict(adm_sd), {}, set()
    heads_of = _heads_fn(unet_config)

    def take(key):
        if key not in src:
            raise ValueError(f"ADM state dict lacks {key!r}: not the layout of this unet config")
        used.add(key)
        return src[key]
    for a, d, kind in adm_module_pairs(unet_config):
        if kind == "copy":
            for p in ("weight", "bias"):
                if f"{a}.{p}" in src:
                    out[f"{d}.{p}"] = take(f"{a}.{p}")
        elif kind == "resnet":
            for ak, dk in _RESNET:
                for p in ("weight", "bias"):
                    if ak == "skip_connection" and f"{a}.{ak}.{p}" not in src:
                        continue
                    out[f"{d}.{dk}.{p}"] = take(f"{a}.{ak}.{p}")
        else:
            out[f"{d}.group_norm.weight"], out[f"{d}.group_norm.bias"] = take(f"{a}.norm.weight"), take(f"{a}.norm.bias")
            w, b = take(f"{a}.qkv.weight"), take(f"{a}.qkv.bias")
            perm = _qkv_perm(w.shape[1], heads_of(w.shape[1]), qkv_order)
            for name, wi, bi in zip(("to_q", "to_k", "to_v"), w[perm].reshape(3, w.shape[1], -1).unbind(0),
                                    b[perm].chunk(3)):
                out[f"{d}.{name}.weight"], out[f"{d}.{name}.bias"] = wi.reshape(w.shape[1], w.shape[1]).clone(), bi.clone()
            out[f"{d}.to_out.0.weight"] = take(f"{a}.proj_out.weight").reshape(w.shape[1], w.shape[1])
            out[f"{d}.to_out.0.bias"] = take(f"{a}.proj_out.bias")
    left = [k for k in src if k not in used]
    if left:
        raise ValueError(f"ADM keys not covered by the map for this config: {left[:4]}")
    return out


def diffusers_to_adm(sd, unet_config, qkv_order="flash"):
    """The inverse of adm_to_diffusers: a UNet2DModel state dict -> ADM key layout (for tests and
    for writing checkpoints the other way)."""
    src, out, used = dict(sd), {}, set()
    heads_of = _heads_fn(unet_config)

    def take(key):
        used.add(key)
        return src[key]
    for a, d, kind in adm_module_pairs(unet_config):
        if kind == "copy":
            for p in ("weight", "bias"):
                if f"{d}.{p}" in src:
                    out[f"{a}.{p}"] = take(f"{d}.{p}")
        elif kind == "resnet":
            for ak, dk in _RESNET:
                for p in ("weight", "bias"):
                    if f"{d}.{dk}.{p}" in src or dk != "conv_shortcut":
                        out[f"{a}.{ak}.{p}"] = take(f"{d}.{dk}.{p}")
        else:
            out[f"{a}.norm.weight"], out[f"{a}.norm.bias"] = take(f"{d}.group_norm.weight"), take(f"{d}.group_norm.bias")
            w = torch.cat([take(f"{d}.{n}.weight") for n in ("to_q", "to_k", "to_v")])
            b = torch.cat([take(f"{d}.{n}.bias") for n in ("to_q", "to_k", "to_v")])
            ch = w.shape[1]
            inv = torch.argsort(_qkv_perm(ch, heads_of(ch), qkv_order))
            out[f"{a}.qkv.weight"], out[f"{a}.qkv.bias"] = w[inv][..., None].clone(), b[inv].clone()
            out[f"{a}.proj_out.weight"] = take(f"{d}.to_out.0.weight")[..., None]
            out[f"{a}.proj_out.bias"] = take(f"{d}.to_out.0.bias")
    left = [k for k in src if k not in used]
    if left:
        raise ValueError(f"UNet2DModel keys not covered by the ADM map: {left[:4]}")
    return out


def _heads_fn(unet_config):
    hd = dict(unet_config).get("attention_head_dim") or 0
    return lambda ch: max(1, ch // hd) if hd else 1


# ----------------------------------------------------------------------------------------------
# NVlabs EDM pickles, read without executing anything
# ----------------------------------------------------------------------------------------------

class _Inert:
    """Stand-in for every class or function a pickle names (bar a few torch rebuild helpers): it
    records what the pickle does with it (call arguments, state, items) and runs nothing."""
    module, name = "?", "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    def __repr__(self):
        return f"<inert {self.module}.{self.name}>"


def _load_storage_bytes(b):
    """torch.storage._load_from_bytes without arbitrary code: torch.load(weights_only=True), torch's
    restricted unpickler for a storage written by torch.save."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_SAFE = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage_bytes,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


def _latin1_encode(s, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles use it for bytes (latin1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} refused")
    return s.encode("latin1")


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, fh):
        super().__init__(fh)
        self.classes = []

    def find_class(self, module, name):
        import _compat_pickle  # protocol-2 pickles name Python 2 modules (__builtin__.set)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]()
        self.classes.append(f"{module}.{name}")
        return type(name, (_Inert,), {"module": module, "name": name})

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not expected in a network pickle")


def _persistent_meta(obj):
    """NVlabs persistence: obj = _reconstruct_persistent_obj(meta), meta = dict(type, version,
    module_src, class_name, state). Returns meta or None."""
    if isinstance(obj, _Inert) and obj.args and isinstance(obj.args[0], dict) \
            and "module_src" in obj.args[0] and "state" in obj.args[0]:
        return obj.args[0]
    return None


def _obj_state(obj):
    meta = _persistent_meta(obj)
    if meta is not None:
        return meta["state"]
    if isinstance(obj, _Inert):
        state = obj.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else None
    return obj if isinstance(obj, dict) and "_parameters" in obj else None


def _plain(obj):
    """Inert records -> plain Python (dict-like stand-ins such as EasyDict -> dict)."""
    if isinstance(obj, _Inert):
        if obj.items:
            return {k: _plain(v) for k, v in obj.items.items()}
        if isinstance(obj.state, dict):
            return {k: _plain(v) for k, v in obj.state.items()}
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _collect(obj, prefix, out):
    state = _obj_state(obj)
    if state is None:
        return
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if torch.is_tensor(tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)


def read_edm_pickle(path, key="ema"):
    """Read an NVlabs EDM network pickle (e.g. edm-imagenet-64x64-cond-adm.pkl) WITHOUT executing
    any of it. Those pickles are `torch_utils.persistence` objects that embed their source code and
    exec it on a normal pickle.load; here a restricted unpickler's find_class returns an inert
    stand-in for every name (recording module.name), except torch's tensor-rebuild helpers, whose
    storages are read back by torch.load(weights_only=True), OrderedDict, set and latin1 bytes.

    Returns dict(state_dict={name: tensor} of the `key` network (the whole pickle if it is not a
    dict holding `key`), class_name, module_src (text, never run), init_args, init_kwargs (plain
    Python, to build the network with the user's own code), classes (every name the pickle asked
    for)). Using the weights needs the user's own EDM checkout (training.networks): NVlabs' code is
    under a non-commercial licence and is never vendored here.
    """
    if not os.path.isfile(path):
        H.fail(f"EDM pickle {path!r} not found")
    with open(path, "rb") as fh:
        up = _InertUnpickler(fh)
        try:
            top = up.load()
        except Exception as e:
            H.fail(f"could not read {path!r} as a network pickle ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:120] if str(e) else ''})")
    obj = top[key] if isinstance(top, dict) and key in top else top
    sd = {}
    _collect(obj, "", sd)
    meta = _persistent_meta(obj) or {}
    state = _obj_state(obj) or {}
    return dict(state_dict=sd, class_name=meta.get("class_name", getattr(obj, "name", None)),
                module_src=meta.get("module_src"), init_args=tuple(_plain(state.get("_init_args", ()))),
                init_kwargs=_plain(state.get("_init_kwargs", {})), classes=sorted(set(up.classes)))


def load_edm_pickle_weights(path, key="ema"):
    """The flat {name: tensor} state dict of an NVlabs EDM pickle's EMA network, read without
    executing code (see read_edm_pickle). The names are those of the network's own module tree
    (e.g. model.enc.64x64_conv.weight for EDMPrecond(DhariwalUNet)); load them into a network
    built from the user's own EDM checkout."""
    return read_edm_pickle(path, key)["state_dict"]


# ----------------------------------------------------------------------------------------------
# loading published teachers, rebuilding, student copies
# ----------------------------------------------------------------------------------------------

def is_published_spec(spec):
    """True for `diffusers:...`, `edm-adm:...`, `edm-pkl:...` --teacher values."""
    return isinstance(spec, str) and spec.split(":", 1)[0] in PREFIXES and ":" in spec


def _read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _diffusers_folder(where):
    """(unet folder, scheduler config dict) of a local pipeline folder (unet/ + scheduler/) or of a
    model folder (config.json + scheduler_config.json beside it or in ../scheduler/)."""
    if os.path.isdir(os.path.join(where, "unet")):
        unet_dir = os.path.join(where, "unet")
        cands = [os.path.join(where, "scheduler", "scheduler_config.json")]
    else:
        unet_dir = where
        cands = [os.path.join(where, "scheduler_config.json"),
                 os.path.join(os.path.dirname(os.path.abspath(where)), "scheduler", "scheduler_config.json")]
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        H.fail(f"diffusers teacher {where!r}: no UNet config.json under {unet_dir!r}")
    for c in cands:
        if os.path.isfile(c):
            return unet_dir, _read_json(c)
    H.fail(f"diffusers teacher {where!r}: no scheduler config (looked for {', '.join(cands)})")


def load_published_teacher(spec, device="cpu", edm_repo=None, num_classes=None):
    """A published teacher (eval mode, frozen) from a --teacher spec:

    diffusers:<folder or hub id>  a UNet2DModel pipeline folder (unet/, scheduler/) or model folder
        with scheduler_config.json beside it; a hub id (owner/name) downloads through diffusers /
        huggingface_hub at run time. -> DiffusersTeacher (num_classes: see its docstring).
    edm-adm:<state dict .pt>  OpenAI's ADM EDM teacher (consistency_models' edm_imagenet64_ema.pt),
        ImageNet-64 layout (ADM_IMAGENET64), keys mapped into a UNet2DModel, wrapped by EDMTeacher
        with c_noise = 250 ln s and integer labels.
    edm-pkl:<network .pkl>  NVlabs EDM: refused unless edm_repo (the user's checkout of
        github.com/NVlabs/edm) is given; then the weights are read without executing the pickle,
        and the network is built by the user's own training.networks (class and init kwargs from
        the pickle), wrapped by EDMTeacher (c_noise = ln(s) / 4, one-hot labels).
    Every failure is one line (harness.fail): unknown prefix, missing file, missing diffusers.
    """
    if not is_published_spec(spec):
        H.fail(f"--teacher {spec!r}: unknown published-teacher prefix; use one of "
               f"{', '.join(p + ':' for p in PREFIXES)}")
    kind, where = spec.split(":", 1)
    if kind == "edm-pkl":
        teacher = _load_edm_pkl(where, edm_repo)
    elif kind == "edm-adm":
        teacher = _load_edm_adm(where)
    else:
        teacher = _load_diffusers(where, num_classes)
    return teacher.to(device).eval().requires_grad_(False)


def _load_diffusers(where, num_classes=None):
    diffusers = _need_diffusers()
    if os.path.isdir(where):
        unet_dir, sched = _diffusers_folder(where)
        unet = diffusers.UNet2DModel.from_pretrained(unet_dir)
    elif os.path.exists(where) or where.startswith((".", os.sep)) or where.count("/") != 1:
        H.fail(f"diffusers teacher {where!r} not found (a local folder, or a hub id owner/name)")
    else:
        try:
            from huggingface_hub import hf_hub_download
            unet = diffusers.UNet2DModel.from_pretrained(where, subfolder="unet")
            sched = _read_json(hf_hub_download(where, "scheduler_config.json", subfolder="scheduler"))
        except Exception as e:  # offline, no such repo, not a UNet2DModel pipeline
            H.fail(f"diffusers teacher {where!r} could not be loaded from the hub "
                   f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    return DiffusersTeacher(unet, sched, num_classes=num_classes)


def _adm_config_from(sd, base=None):
    cfg = copy.deepcopy(dict(base or ADM_IMAGENET64))
    if "input_blocks.0.0.weight" in sd:
        cfg["in_channels"] = int(sd["input_blocks.0.0.weight"].shape[1])
    if "out.2.weight" in sd:
        cfg["out_channels"] = int(sd["out.2.weight"].shape[0])
    cfg["num_class_embeds"] = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None
    return cfg


def edm_adm_teacher(unet, num_classes=None):
    """EDMTeacher around an ADM-layout UNet2DModel (OpenAI consistency_models' EDM teacher)."""
    ucfg = _plain_config(unet.config)
    nc = ucfg.get("num_class_embeds") or 0 if num_classes is None else num_classes
    return EDMTeacher(UNet2DCall(unet), num_classes=nc, in_ch=ucfg["in_channels"],
                      resolution=ucfg["sample_size"], c_noise="adm", one_hot_labels=False,
                      feature_module=unet.mid_block, mid_ch=ucfg["block_out_channels"][-1],
                      config_extra=dict(backbone="diffusers-unet2d", unet_config=ucfg))


def _load_edm_adm(where, qkv_order="flash", unet_config=None):
    """edm-adm: the ADM state dict at `where` into a UNet2DModel of `unet_config` (default
    ADM_IMAGENET64; in/out channels and classes read from the tensors), wrapped by EDMTeacher."""
    sd = H.load_checkpoint(where)  # "not found" before "needs diffusers"
    diffusers = _need_diffusers()
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    cfg = _adm_config_from(sd, unet_config)
    try:
        mapped = adm_to_diffusers(sd, cfg, qkv_order)
    except ValueError as e:
        H.fail(f"{where}: {e} (edm-adm expects the ImageNet-64 ADM layout of edm_imagenet64_ema.pt)")
    unet = diffusers.UNet2DModel(**cfg)
    H.load_weights(unet, {k: v.float() for k, v in mapped.items()}, what=where)
    return edm_adm_teacher(unet)


def _load_edm_pkl(where, edm_repo):
    if not edm_repo:
        H.fail(f"edm-pkl:{where}: NVlabs EDM pickles need your own EDM checkout "
               f"(github.com/NVlabs/edm, non-commercial licence, not shipped here): pass its path "
               f"as edm_repo (--edm-repo); the pickle is then read without executing it")
    if not os.path.isdir(os.path.join(edm_repo, "training")):
        H.fail(f"--edm-repo {edm_repo!r} has no training/ package: point it at an EDM checkout")
    info = read_edm_pickle(where)
    import importlib
    sys.path.insert(0, os.path.abspath(edm_repo))
    try:
        networks = importlib.import_module("training.networks")
    except Exception as e:
        H.fail(f"could not import training.networks from {edm_repo!r} ({type(e).__name__}: {e})")
    finally:
        sys.path.remove(os.path.abspath(edm_repo))
    cls = getattr(networks, info["class_name"] or "", None)
    if cls is None:
        H.fail(f"{where}: network class {info['class_name']!r} not in {edm_repo}/training/networks.py")
    net = cls(*info["init_args"], **info["init_kwargs"])
    H.load_weights(net, info["state_dict"], what=where)
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    # DMD2's GAN head reads the encoder's output (DhariwalUNet / SongUNet: the last `enc` block)
    enc = getattr(net.model, "enc", None)
    last = list(enc.values())[-1] if isinstance(enc, nn.ModuleDict) and len(enc) else None
    return EDMTeacher(net.model, num_classes=label_dim, in_ch=int(net.img_channels),
                      resolution=int(net.img_resolution), sigma_data=float(net.sigma_data),
                      c_noise="edm", one_hot_labels=True, feature_module=last,
                      mid_ch=getattr(last, "out_channels", None),
                      config_extra=dict(backbone="edm-pkl", source=os.path.abspath(where)))


def build_from_config(config):
    """Rebuild a wrapped network (random weights) from its `.config`, so a checkpoint holding
    (config, state_dict) can be loaded: kind "diffusers", and kind "edm" with a diffusers
    UNet2DModel backbone. NVlabs backbones need the user's EDM code: load them with edm-pkl."""
    cfg = dict(config)
    if cfg.get("kind") == "diffusers":
        diffusers = _need_diffusers()
        unet = diffusers.UNet2DModel.from_config(cfg["unet_config"])
        return DiffusersTeacher(unet, cfg["scheduler_config"], in_ch=cfg["in_ch"],
                                resolution=cfg["resolution"], num_classes=cfg["num_classes"],
                                prediction_type=cfg["prediction_type"], clip_x0=cfg["clip_x0"])
    if cfg.get("kind") == "edm" and cfg.get("backbone") == "diffusers-unet2d":
        diffusers = _need_diffusers()
        return edm_adm_teacher(diffusers.UNet2DModel.from_config(cfg["unet_config"]), cfg["num_classes"])
    H.fail(f"cannot rebuild a network of kind {cfg.get('kind')!r} / backbone "
           f"{cfg.get('backbone')!r} from its config")


def student_copy(teacher, clip_x0=False, head="auto"):
    """A trainable copy of a wrapped teacher: same backbone and output parameterisation, dropout
    off, train mode. For an eps-prediction DiffusersTeacher the x0 clamp below logSNR 0 is dropped
    by default (clip_x0=False): a clamp passes no gradient where it is active. At t = 1 the copy
    then outputs v = (alpha z - x0) / sigma with x0 = (z - s' eps) / a' taken at the teacher's
    clamped level (a' = alpha at its lowest logSNR), so its error amplification is 1/a'_min, not
    1/alpha(1). v-prediction and EDM copies need no change (their maps have no division by a small
    number). Guidance-weight inputs (w_embed, LCM) are not available for wrapped networks.

    head="v" (an eps-prediction DiffusersTeacher only; "auto", the default, picks it there and
    "copy" everywhere else): the copy's output is read as v on the teacher's level,
    x0 = a' z - s' v', eps = s' z + a' v', with no division anywhere, so x0 at t = 1 is an output,
    not (z - s' eps) / a'. Its weights still predict eps: warm_up_head fits it to the teacher's v
    before distillation (PD's reason for its x0 / "both" heads). Measured on digits
    (bench/diffusers_digits.py): the copied eps head fails where a student jumps from t = 1 (LCM
    and DMD2 at K = 1: FD 13 and 27 against 3.0 for the teacher's 1-step DDIM); the fitted v head
    gives 0.63 and 2.1, and PD at K = 4 0.094 against the copy's 0.27."""
    if head not in HEADS:
        raise ValueError(f"student head {head!r}: one of {', '.join(HEADS)}")
    eps = isinstance(teacher, DiffusersTeacher) and teacher.prediction_type == "epsilon"
    head = ("v" if eps else "copy") if head == "auto" else head
    if getattr(teacher, "_hook", None) is not None:
        teacher._hook.out = None  # the last forward's features: a graph tensor deepcopy refuses
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if isinstance(student, DiffusersTeacher):
        student.clip_x0 = clip_x0
        student.config["clip_x0"] = clip_x0
    if head == "v":
        if not isinstance(student, DiffusersTeacher) or student.prediction_type != "epsilon":
            H.fail("--student-head v re-reads an eps-prediction diffusers teacher's output as v; "
                   "this teacher's student already predicts a bounded output: use --student-head copy")
        student.prediction_type = student.config["prediction_type"] = "v_prediction"
        student.refit = True  # warm_up_head fits it before distillation
    # deepcopy copies the feature hook together with its module (one memo): the copy's hook
    # records the copy's mid block
    return student.train().requires_grad_(True)


def warm_up_head(student, teacher, data, iters, batch_size, lr, seed=0):
    """Fit a re-read head (student_copy(head="v")), or a narrower student (teacher.make_student
    with width < 1), to the teacher before distillation:
    min E ||v_student(z_t, t, y) - v_teacher(z_t, t, y)||^2 over data z_t = alpha x0 + sigma eps,
    t ~ U[0, 1], Adam at lr, `iters` steps. The same batches and noise on every rank (world size 1
    batches, seeded per step), so DDP ranks start from the same student. Returns the last loss;
    None (and nothing done) for any other student."""
    if not getattr(student, "refit", False):
        return None
    device = next(student.parameters()).device
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    batches, loss = H.Batches(data, batch_size, seed, device=device), torch.tensor(float("nan"))
    for step in range(iters):
        H.step_seed(seed, 0, 1_000_000 + step)  # not the distillation's (seed, rank, step) stream
        x0, y = batches.get(step)
        t = torch.rand(x0.shape[0], device=device)
        z = C.diffuse(x0, t)
        y = y if teacher.num_classes else None
        with torch.no_grad():
            v = teacher(z, t, y)
        loss = (student(z, t, y) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if hasattr(student, "_hook"):  # the last forward's features hold a graph: copies refuse it
        student._hook.out = None
    loss = loss.item()
    if H.is_main():
        print(f"student: fitted to the teacher's v for {iters} iterations, loss {loss:.3g}", flush=True)
    return loss
