"""Shared pieces of the DDIL reference: everything the teacher and the three method files use.

Sections, top to bottom: config/CLI, distributed, schedule & parameterisation, reflection and the
fused Triton step, samplers, U-Net, EMA, data, the DDIL mixing buffer, checkpoints, logging and
images, teacher loading. Each is small and flat; read the one you need.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton is optional: Linux only, and only needed for the fused step on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def fail(msg):
    """Stop with a one-line error and a non-zero exit (no traceback): bad flags, data, checkpoints."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# config / CLI
# ----------------------------------------------------------------------------------------------

def parse_config(cls, argv=None, presets=None):
    """Build argparse flags from a dataclass (`max_steps` -> `--max-steps`) and parse argv.

    presets: {dataset: {field: value}} applied as defaults once --dataset is known, so
    `--dataset cifar10` switches model size, batch, lr, ... and explicit flags still win.
    """
    parser = argparse.ArgumentParser(
        description=(sys.modules["__main__"].__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda msg: fail(f"{msg} (see --help)")  # one line, no usage dump
    for f in dataclasses.fields(cls):
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        typ = f.type if isinstance(f.type, type) else eval(f.type)  # dataclass string annotations
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, (list, tuple)):
            elem = type(default[0]) if default else float
            parser.add_argument(flag, type=elem, nargs="+", default=default)
        else:
            choices = getattr(cls, "CHOICES", {}).get(f.name)
            parser.add_argument(flag, type=typ if default is not None else str, default=default,
                                choices=choices)
    if presets:
        known, _ = parser.parse_known_args(argv)
        if getattr(known, "dataset", None) in presets:
            parser.set_defaults(**presets[known.dataset])
    return cls(**vars(parser.parse_args(argv)))


def save_config(cfg, out):
    if is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=2)
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)


def check_positive(cfg, *names):
    """One-line error for the first of cfg's named fields that is not positive."""
    for name in names:
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


def check_betas(beta_data, beta_teacher, beta_student):
    """Validate DDIL mixing priors; returns them normalised to sum to 1."""
    betas = (beta_data, beta_teacher, beta_student)
    if not all(map(math.isfinite, betas)):  # NaN passes every comparison below
        fail(f"mixing priors must be finite numbers, got --beta-data {beta_data} --beta-teacher "
             f"{beta_teacher} --beta-student {beta_student}")
    if min(betas) < 0:
        fail(f"mixing priors must be >= 0, got --beta-data {beta_data} --beta-teacher "
             f"{beta_teacher} --beta-student {beta_student}")
    if sum(betas) <= 0:
        fail("mixing priors sum to 0: give at least one of --beta-data, --beta-teacher, "
             "--beta-student a positive value")
    return tuple(b / sum(betas) for b in betas)


def check_ddil(cfg):
    """The flags every method script shares (priors, their ramp, the FD curve) -> the priors."""
    if not 0 <= cfg.beta_ramp <= 1:
        fail(f"--beta-ramp is a fraction of training in [0, 1], got {cfg.beta_ramp}")
    if cfg.eval_every < 0:
        fail(f"--eval-every must be >= 0 (0 = no FD curve), got {cfg.eval_every}")
    check_positive(cfg, "eval_every_samples")
    return check_betas(cfg.beta_data, cfg.beta_teacher, cfg.beta_student)


def ramped_betas(betas, frac, ramp):
    """The priors at training fraction `frac` in [0, 1]. With ramp > 0, beta_student rises linearly
    from 0 to its value over the first `ramp` of training, the difference going to beta_data: a
    student's own rollouts are only worth imitating once it has learnt to sample (DAgger's mixing
    schedule, which DDIL's fixed priors leave out). ramp = 0 returns the fixed priors."""
    if ramp <= 0 or frac >= ramp:
        return betas
    b_data, b_teacher, b_student = betas
    s = b_student * frac / ramp
    return (b_data + b_student - s, b_teacher, s)


# ----------------------------------------------------------------------------------------------
# distributed: `python x.py` is world size 1; `torchrun --nproc_per_node=N x.py` is N ranks
# ----------------------------------------------------------------------------------------------

def init_dist(device=""):
    """Start torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Returns (rank, world_size, device). Idempotent, so a script can call a second script's main.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not device:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(f"--device {device} asked for, but CUDA is not available: use --device cpu")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(x):
    """Concatenate a tensor (same shape on every rank) from all ranks along dim 0."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def step_seed(seed, rank, step):
    """Seed the global RNG from (seed, rank, step): resuming at any step, on any world size,
    reproduces an uninterrupted run exactly, with no RNG state to carry in checkpoints."""
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (DMD2 needs bf16; fp16 diverged in its paper); a no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=enabled and torch.device(device).type == "cuda")


def maybe_compile(net, *example, enabled=True):
    """torch.compile(net), or net itself if compiling fails. torch.compile is lazy (errors show at
    the first call), so a trial forward on `example` inputs, without grad, runs here; a failure
    prints one warning and training goes on eagerly."""
    if not enabled:
        return net
    try:
        compiled = torch.compile(net)
        if example:
            with torch.no_grad():
                compiled(*example)
        return compiled
    except Exception as e:  # depends on the platform's compiler toolchain
        if is_main():
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                  f"running eagerly", flush=True)
        return net


def micro_batches(net, n, *tensors):
    """Gradient accumulation: split one step's batch (dim 0, divisible by n; None passes through)
    into n micro-batches and yield (sync, chunks) for each. `with sync:` around the backward skips
    DDP's all-reduce (no_sync) on all but the last one, so gradients are reduced once per
    optimiser step; scale each micro-batch's loss by 1/n. n = 1 is the plain step."""
    import contextlib
    chunks = [t.split(t.shape[0] // n) if torch.is_tensor(t) else [t] * n for t in tensors]
    for i in range(n):
        last = i == n - 1
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()
        yield sync, [c[i] for c in chunks]


# ----------------------------------------------------------------------------------------------
# schedule & parameterisation: VP, cosine logSNR clipped to [-20, 20], v-prediction
# ----------------------------------------------------------------------------------------------

LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0
_B = math.atan(math.exp(-0.5 * LOGSNR_MAX))
_A = math.atan(math.exp(-0.5 * LOGSNR_MIN)) - _B


def logsnr(t):
    """logsnr(t) = -2 log tan(a t + b): cosine schedule mapped so logsnr(0)=20, logsnr(1)=-20."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return (-2.0 * torch.log(torch.tan(_A * t + _B))).float()


def alpha_sigma(t):
    """alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr); float tensors shaped like t."""
    lam = logsnr(t).double()
    return torch.sigmoid(lam).sqrt().float(), torch.sigmoid(-lam).sqrt().float()


def x0_from_v(x, v, alpha, sigma):
    return alpha * x - sigma * v


def eps_from_v(x, v, alpha, sigma):
    return sigma * x + alpha * v


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def bcast(c, x):
    """A float or per-sample [B] coefficient as a tensor broadcastable against x [B, ...]."""
    c = torch.as_tensor(c, dtype=torch.float32, device=x.device)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() == 1 else c


# ----------------------------------------------------------------------------------------------
# reflection and the fused reflected sampling step
# ----------------------------------------------------------------------------------------------

BOUNDS = ("none", "clip", "reflect")


def reflect(x):
    """Fold R into [-1, 1] by mirror reflection at the walls: 1 - |((x + 1) mod 4) - 2|, floor mod."""
    u = x + 1.0
    return 1.0 - (u - 4.0 * torch.floor(u / 4.0) - 2.0).abs()


def bound_x0(x0, bound):
    if bound == "clip":
        return x0.clamp(-1.0, 1.0)
    if bound == "reflect":
        return reflect(x0)
    return x0


def reflected_step_torch(x, v, alpha_t, sigma_t, alpha_s, sigma_s, noise=None, bound="reflect"):
    """Reference: x0 = bound(alpha_t x - sigma_t v); eps = (x - alpha_t x0) / sigma_t (or z);
    x_s = alpha_s x0 + sigma_s eps. Computes in fp32, returns in x's dtype."""
    dtype, x, v = x.dtype, x.float(), v.float()
    a_t, s_t, a_s, s_s = (bcast(c, x) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    x0 = bound_x0(a_t * x - s_t * v, bound)
    if noise is not None:
        eps = noise.float()
    elif bound == "none":
        eps = s_t * x + a_t * v  # same value as below, without dividing by a tiny sigma_t
    else:
        eps = (x - a_t * x0) / s_t  # keep the step consistent with the bounded x0
    return (a_s * x0 + s_s * eps).to(dtype), x0.to(dtype)


if triton is not None:
    @triton.jit
    def _step_math(x, v, z, a_t, s_t, a_s, s_s, BOUND: tl.constexpr, HAS_NOISE: tl.constexpr):
        """The step in fp32 registers; BOUND 0/1/2 = none/clip/reflect. Returns (x_s, x0)."""
        x0 = a_t * x - s_t * v
        if BOUND == 1:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        if BOUND == 2:  # floor mod written out: Triton's float % follows C (truncation) semantics
            u = x0 + 1.0
            x0 = 1.0 - tl.abs(u - 4.0 * tl.floor(u / 4.0) - 2.0)
        if HAS_NOISE:
            eps = z
        elif BOUND == 0:
            eps = s_t * x + a_t * v
        else:
            eps = (x - a_t * x0) / s_t
        return a_s * x0 + s_s * eps, x0

    @triton.jit
    def _reflected_step_kernel(x_ptr, v_ptr, z_ptr, xs_ptr, x0_ptr, at_ptr, st_ptr, as_ptr, ss_ptr,
                               n, per_row, BOUND: tl.constexpr, HAS_NOISE: tl.constexpr,
                               BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = offs // per_row  # per-sample coefficients, gathered by row
        a_t = tl.load(at_ptr + row, mask=mask, other=1.0)
        s_t = tl.load(st_ptr + row, mask=mask, other=1.0)
        a_s = tl.load(as_ptr + row, mask=mask, other=1.0)
        s_s = tl.load(ss_ptr + row, mask=mask, other=1.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x
        if HAS_NOISE:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs, x0 = _step_math(x, v, z, a_t, s_t, a_s, s_s, BOUND, HAS_NOISE)
        tl.store(xs_ptr + offs, xs.to(xs_ptr.dtype.element_ty), mask=mask)
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def reflected_step_triton(x, v, alpha_t, sigma_t, alpha_s, sigma_s, noise=None, bound="reflect",
                          block=1024):
    """The fused step: one pass reads x, v (and z) and writes x_s and x0_hat."""
    if triton is None:
        raise RuntimeError("triton is not installed: use backend='torch'")
    x, v = x.contiguous(), v.contiguous()
    noise = noise.contiguous() if noise is not None else x  # dummy pointer when HAS_NOISE=False
    B = x.shape[0]
    coef = [torch.as_tensor(c, dtype=torch.float32, device=x.device).expand(B).contiguous()
            for c in (alpha_t, sigma_t, alpha_s, sigma_s)]
    xs, x0 = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    _reflected_step_kernel[(triton.cdiv(n, block),)](
        x, v, noise, xs, x0, *coef, n, n // B, BOUND=BOUNDS.index(bound),
        HAS_NOISE=noise is not x, BLOCK=block)
    return xs, x0


def reflected_step(x, v, alpha_t, sigma_t, alpha_s, sigma_s, noise=None, bound="reflect",
                   backend="auto"):
    """One sampler step t -> s on v-predictions with x0_hat bounded; returns (x_s, x0_hat).

    noise=None: the DDIM step x_s = alpha_s x0 + sigma_s eps_hat; noise=z: the re-noising step
    x_s = alpha_s x0 + sigma_s z (consistency / DMD2 multi-step sampling). backend "auto" uses
    the Triton kernel on CUDA tensors and the torch reference elsewhere.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton is not None)
    fn = reflected_step_triton if use_triton else reflected_step_torch
    return fn(x, v, alpha_t, sigma_t, alpha_s, sigma_s, noise=noise, bound=bound)


# ----------------------------------------------------------------------------------------------
# samplers: plain functions over a v-denoiser `model(x, t[B], y) -> v`
# ----------------------------------------------------------------------------------------------

def time_grid(steps, t_max=1.0):
    """K sampling steps: times 1 = tau_1 > ... > tau_K > tau_{K+1} = 0, evenly spaced in t."""
    return torch.linspace(t_max, 0.0, steps + 1)


def guided(model, y=None, w=0.0):
    """The v-denoiser (x, t[B]) -> v of `model` at labels y and guidance weight w (a float or
    per-sample [B]). A guidance-distilled student (w_embed: LCM) takes w as an input; any other
    class-conditional model gets classifier-free guidance, v = v_u + (1 + w) (v(x, y) - v_u) with
    v_u = v(x, null label). No labels, or w = 0: one plain pass."""
    config = getattr(unwrap(model), "config", {})
    if config.get("w_embed"):
        return lambda x, t: model(x, t, y, torch.as_tensor(w, dtype=torch.float32, device=x.device).expand(len(x)))
    if y is None or not (torch.as_tensor(w) != 0).any():
        return lambda x, t: model(x, t, y)
    null = torch.full_like(y, config["num_classes"])

    def denoise(x, t):
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return v_u + (1.0 + bcast(w, x)) * (v_c - v_u)
    return denoise


@torch.no_grad()
def ddim_sample(denoise, x, ts, bound="reflect", noises=None, return_states=False, backend="auto"):
    """Deterministic DDIM from x at ts[0] through ts[1:]; noises[i] (optional) turns step i into
    the re-noising step of consistency / DMD2 multi-step samplers.

    Returns the final x0 (the last step lands on t = 0 with x_0 = x0_hat) and, with
    return_states, the list of the states x at ts[:-1] that the sampler visited.
    """
    states = []
    for i in range(len(ts) - 1):
        states.append(x)
        t, s = ts[i], ts[i + 1]
        a_t, s_t = alpha_sigma(t)
        a_s, s_s = alpha_sigma(s)
        tb = torch.full((x.shape[0],), float(t), device=x.device)
        v = denoise(x, tb)
        z = noises[i] if noises is not None and float(s) > 0 else None
        x, x0 = reflected_step(x, v, a_t, s_t, a_s, s_s, noise=z, bound=bound, backend=backend)
        if float(s) == 0.0:
            x = x0
    return (x, states) if return_states else x


def generate(net, n, steps, kind="ddim", bound="clip", y=None, w=0.0, shape=None, device="cpu"):
    """n images in [-1, 1] from noise with K = steps: kind "ddim" (teacher, PD student) or
    "renoise" (consistency / DMD2 generator: x0_hat = net(x, tau_i), x = alpha x0_hat + sigma z);
    at labels y [n] and guidance weight w as `guided` applies them."""
    cfg = unwrap(net).config
    shape = shape or (cfg["in_ch"], cfg["resolution"], cfg["resolution"])
    x = torch.randn(n, *shape, device=device)
    noises = [torch.randn_like(x) for _ in range(steps)] if kind == "renoise" else None
    return ddim_sample(guided(net, y, w), x, time_grid(steps), bound, noises)


# ----------------------------------------------------------------------------------------------
# compact U-Net (v-prediction), time and optional class / guidance-weight conditioning
# ----------------------------------------------------------------------------------------------

MODEL_PRESETS = {
    # ~0.7M params, 8x8 grayscale
    "digits": dict(in_ch=1, ch=24, ch_mult=(1, 2, 2), num_res=1, attn_res=(2,), resolution=8),
    # DDPM-like, ~35M params
    "cifar10": dict(in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res=2, attn_res=(16,),
                    resolution=32, dropout=0.1),
    # ADM-like widths, class-conditional
    "imagenet64": dict(in_ch=3, ch=192, ch_mult=(1, 2, 3, 4), num_res=3, attn_res=(32, 16, 8),
                       resolution=64, num_classes=1000, dropout=0.1),
}


def fourier(x, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, dropout=0.0):
        super().__init__()
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)  # scale and shift (FiLM)
        self.n2, self.drop = norm(cout), nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight), nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(self.drop(F.silu(h)))


class Attention(nn.Module):
    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """v-prediction U-Net. forward(x, t, y=None, w=None, return_features=False).

    t in [0, 1]; y class labels with `num_classes` as the null label (classifier-free guidance);
    w a guidance-weight input (LCM), zero-initialised so a student starts equal to its teacher;
    return_features also returns the bottleneck feature map (DMD2's GAN head reads it).
    """

    def __init__(self, in_ch=1, ch=32, ch_mult=(1, 2, 2), num_res=2, attn_res=(), resolution=8,
                 num_classes=0, dropout=0.0, w_embed=False):
        super().__init__()
        self.config = dict(in_ch=in_ch, ch=ch, ch_mult=tuple(ch_mult), num_res=num_res,
                           attn_res=tuple(attn_res), resolution=resolution,
                           num_classes=num_classes, dropout=dropout, w_embed=w_embed)
        self.num_classes, emb = num_classes, 4 * ch
        self.t_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y_emb = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.w_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb)) if w_embed else None
        if w_embed:
            nn.init.zeros_(self.w_mlp[2].weight), nn.init.zeros_(self.w_mlp[2].bias)
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, emb, dropout),
                                                Attention(ch * m) if res in attn_res else nn.Identity()]))
                c = ch * m
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), Attention(c), ResBlock(c, c, emb, dropout)])
        self.mid_ch = c
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + chans.pop(), ch * m, emb, dropout),
                                              Attention(ch * m) if res in attn_res else nn.Identity()]))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None, w=None, return_features=False):
        emb = self.t_mlp(fourier(1000.0 * t, self.t_mlp[0].in_features))
        if self.y_emb is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            emb = emb + self.y_emb(y)
        if self.w_mlp is not None and w is not None:
            emb = emb + self.w_mlp(fourier(100.0 * w, self.w_mlp[0].in_features))
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else layer[1](layer[0](h, emb))
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        feats = h
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)
            else:
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), emb))
        v = self.out(h)
        return (v, feats) if return_features else v


def build_unet(preset=None, **overrides):
    cfg = dict(MODEL_PRESETS[preset]) if preset else {}
    cfg.update(overrides)
    return UNet(**cfg)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def unwrap(model):
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------
# data: images in [-1, 1], NCHW float; labels long
# ----------------------------------------------------------------------------------------------

DATASETS = {  # channels, resolution, classes
    "digits": (1, 8, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10), "imagenet64": (3, 64, 1000),
}


def load_dataset(name, data_dir="data", train=True):
    """Return (images uint8 [N, C, H, W], labels long [N]).

    digits: scikit-learn's load_digits, shipped with the package (no download).
    cifar10: CIFAR-10's python pickles under data_dir (downloaded where online).
    mnist: torchvision's MNIST files under data_dir (downloaded where online).
    imagenet64: downsampled-ImageNet npz batches (`data` N x 12288 uint8, `labels` 1..1000)
    or an ImageFolder of images, under data_dir.
    cifar10 and imagenet64 are converted once to .npy files in data_dir and memory-mapped (see
    _cached_arrays): processes, torchrun's ranks among them, share one copy in the page cache.
    digits and mnist are small and held in memory.
    """
    if name not in DATASETS:
        fail(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.from_numpy(np.round(d.images * 255.0 / 16.0).astype(np.uint8))[:, None]
        return x, torch.from_numpy(d.target).long()
    if name == "cifar10":
        x, y = _load_cifar10(data_dir, train)
    elif name == "mnist":
        import torchvision
        split = "train" if train else "t10k"
        raw = [os.path.join(data_dir, "MNIST", "raw", f"{split}-{k}-ubyte") for k in ("images-idx3", "labels-idx1")]
        _download(lambda: torchvision.datasets.MNIST(data_dir, train=train, download=True),
                  lambda: all(map(os.path.isfile, raw)),
                  f"mnist not found under --data-dir {data_dir!r} (MNIST/raw/{split}-*-ubyte)")
        ds = torchvision.datasets.MNIST(data_dir, train=train)
        return ds.data[:, None].contiguous(), ds.targets.long()
    else:
        x, y = _load_imagenet64(data_dir, train)
    # the memory maps are copy-on-write ("c"): writable, so torch.from_numpy shares them without
    # its read-only warning, and a stray in-place write copies one page instead of crashing
    return torch.from_numpy(x), torch.from_numpy(y)


def _download(fetch, present, missing):
    """Rank 0 fetches (torchvision verifies the archive's md5) while the others wait; then every
    rank checks `present()` and stops with one line naming the directory where it is not."""
    if not present():
        if is_main():
            try:
                fetch()
            except Exception as e:  # offline, or a corrupt download
                fail(f"{missing} and could not be downloaded ({type(e).__name__}); put the files there")
        barrier()
        if not present():
            fail(f"{missing}; put the files there")


CACHE_VERSION = 1  # bump when the cache's layout changes: every old cache then rebuilds


def _cached_arrays(data_dir, name, files, item_shape, count, chunks):
    """(images uint8 [N, *item_shape], labels int64 [N]) as memory maps of
    <data_dir>/<name>-uint8.npy and <name>-labels.npy, converted once from `files`.

    Each rank holding its own copy of imagenet64 would be 15.7 GB per rank; a memory map of one
    file is shared through the page cache. The first process to find the cache missing or stale
    converts it (temporary files, then os.replace: a crash or a reader never sees half a file, and
    an old cache another run has open stays valid) under a file lock, <name>.lock: torchrun's
    other ranks, on any node sharing data_dir, wait at the lock and then open the new cache. A
    lock, not barrier(): load_dataset is also called by rank 0 alone (evaluate's reference
    features), where a collective would hang. <name>.json records the source files' paths, sizes
    and mtimes: when they change, the cache is rebuilt. Where data_dir cannot be written, every
    process loads the data into its own memory, as before, and says so.

    count() -> N; chunks() yields (uint8 [n, *item_shape], labels int64 [n]) in order, checking
    the sources and stopping with one line on a bad one.
    """
    import hashlib
    xp, yp, jp = (os.path.join(data_dir, name + s) for s in ("-uint8.npy", "-labels.npy", ".json"))
    h = hashlib.sha256()
    for f in files:  # a digest, so the json stays small for 1.28M ImageFolder files
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, data_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stamp = {"version": CACHE_VERSION, "files": len(files), "digest": h.hexdigest()}
    if not _cache_fresh(xp, yp, jp, stamp):
        import fcntl
        try:
            lock = open(os.path.join(data_dir, name + ".lock"), "a")
        except OSError as e:  # read-only data_dir
            lock = None
            print(f"note: cannot write in {data_dir} ({e.strerror or e}); every process loads the "
                  f"data into its own memory (make --data-dir writable to share one copy)", flush=True)
        if lock is not None:
            with lock:  # closing it releases the lock, as the kernel does if this process dies
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                except OSError:  # a filesystem without locks: converting twice is only slower
                    pass
                if not _cache_fresh(xp, yp, jp, stamp):  # not converted while we waited
                    _write_cache(xp, yp, jp, stamp, (_count(count, name, data_dir), *item_shape), chunks)
    if _cache_fresh(xp, yp, jp, stamp):
        return np.load(xp, mmap_mode="c"), np.load(yp, mmap_mode="c")
    n = _count(count, name, data_dir)
    x, y, i = np.empty((n, *item_shape), np.uint8), np.empty(n, np.int64), 0
    for xc, yc in chunks():
        x[i:i + len(xc)], y[i:i + len(xc)] = xc, yc
        i += len(xc)
    return x, y


def _count(count, name, data_dir):
    n = count()
    if n == 0:  # an empty memory map cannot be opened, and there is nothing to train on
        fail(f"the {name} files under --data-dir {data_dir!r} hold no images")
    return n


def _cache_fresh(xp, yp, jp, stamp):
    """The json names the same sources and both .npy files have the sizes it recorded."""
    try:
        with open(jp) as fh:
            j = json.load(fh)
        return j["sources"] == stamp and j["bytes"] == [os.path.getsize(xp), os.path.getsize(yp)]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_cache(xp, yp, jp, stamp, shape, chunks):
    import socket
    tag = f".tmp{socket.gethostname()}-{os.getpid()}"  # unique across nodes sharing a filesystem
    tmps = [p + tag for p in (xp, yp, jp)]
    try:
        ys, n = [], 0
        # written sequentially, not through a memory map: a full disk is then an OSError here,
        # not a SIGBUS when the kernel finds no block for a page of a sparse file
        with open(tmps[0], "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for xc, yc in chunks():
                fh.write(np.ascontiguousarray(xc, np.uint8).data)
                ys.append(np.asarray(yc, np.int64))
                n += len(xc)
            fh.flush()
            os.fsync(fh.fileno())
        if n != shape[0]:
            fail(f"the sources of {xp} changed while it was being written; run again")
        with open(tmps[1], "wb") as fh:
            np.save(fh, np.concatenate(ys) if ys else np.empty(0, np.int64))
        with open(tmps[2], "w") as fh:
            json.dump({"sources": stamp, "bytes": [os.path.getsize(t) for t in tmps[:2]]}, fh)
        for t, p in zip(tmps, (xp, yp, jp)):  # the json last: it vouches for both arrays
            os.replace(t, p)
        print(f"converted {shape[0]} images once to {xp} (memory-mapped from now on)", flush=True)
    except OSError as e:  # read-only data_dir, full disk
        print(f"note: could not write {xp} ({e.strerror or e}); every process loads the data into "
              f"its own memory instead (make --data-dir writable to share one copy)", flush=True)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)


CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


def _load_cifar10(data_dir, train):
    """CIFAR-10's python version (data_dir/cifar-10-batches-py, or data_dir itself): pickles with
    `data` N x 3072 uint8 (R, G, B planes, each 32x32 row-major) and `labels` 0..9.

    Read here rather than through torchvision.datasets.CIFAR10, which checks every file's md5
    against the release: the format is all we need, and a cluster's re-packed copy or a test's
    small fake files are as valid. torchvision still downloads (and checks) the archive.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if os.path.isfile(os.path.join(data_dir, CIFAR_FILES[train][0])):
        folder = data_dir
    paths = [os.path.join(folder, f) for f in CIFAR_FILES[train]]

    def fetch():
        import torchvision
        torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
    _download(fetch, lambda: all(map(os.path.isfile, paths)),
              f"cifar10 not found under --data-dir {data_dir!r} (cifar-10-batches-py/"
              f"{', '.join(CIFAR_FILES[train])})")
    return _cached_arrays(data_dir, f"cifar10-{'train' if train else 'test'}", paths, (3, 32, 32),
                          lambda: sum(len(_read_cifar_batch(p)[1]) for p in paths),
                          lambda: map(_read_cifar_batch, paths))


def _read_cifar_batch(path):
    """One CIFAR-10 python batch -> (uint8 [N, 3, 32, 32], int64 [N] in 0..9), read as data.

    pickle.load would run whatever a file under --data-dir asks for; this unpickler admits only
    the globals CIFAR-10's pickles name (numpy's array reconstruction, numpy 1 and 2 spellings,
    and the bytes of a protocol-2 re-pickle) and stops with one line on anything else.
    """
    import codecs
    import pickle
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):  # written by numpy 1 / numpy 2
        allowed[(mod + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(mod + ".numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5

    def latin1(s, encoding):  # Python 3 pickles bytes at protocol 2 as _codecs.encode(s, "latin1")
        if encoding != "latin1":
            fail(f"{path}: refusing to unpickle _codecs.encode(..., {encoding!r}); CIFAR-10 batches "
                 f"only need latin1: replace the file with one from the CIFAR-10 python release")
        return codecs.encode(s, "latin1")
    allowed[("_codecs", "encode")] = latin1

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                fail(f"{path}: refusing to unpickle the global {module}.{name}, which CIFAR-10 "
                     f"batches never hold: replace the file with one from the CIFAR-10 python release")
            return allowed[(module, name)]

    try:
        with open(path, "rb") as fh:
            d = Unpickler(fh, encoding="latin1").load()  # written by Python 2's cPickle
    except Exception as e:  # truncated or not a pickle: one line, no traceback
        fail(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:120] if str(e) else ''}); replace it with one from the release")
    if not isinstance(d, dict):
        fail(f"{path} holds a {type(d).__name__}, not a CIFAR-10 batch dict: replace it with one from the release")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}  # b"data" too
    for key in ("data", "labels"):
        if key not in d:
            fail(f"{path} has no {key!r} entry: not a CIFAR-10 python batch; replace it with one from the release")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"a {x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
        fail(f"{path}: `data` is {what}, expected uint8 N x 3072 (32x32 RGB planes); replace it with one from the release")
    try:
        y = np.asarray(d["labels"])
    except ValueError:  # ragged
        y = np.asarray(None)
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        fail(f"{path}: `labels` should be {len(x)} integers, one per image, got {y.dtype} of shape "
             f"{y.shape}; replace it with one from the release")
    if len(y) and (y.min() < 0 or y.max() > 9):
        fail(f"{path}: labels span {y.min()}..{y.max()}, expected 0..9; replace it with one from the release")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _npz_member(f, key):
    """One array of an npz batch, with a one-line error for a file that is not one."""
    import zipfile
    try:
        with np.load(f) as d:
            return d[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(f"{f} is not a downsampled-ImageNet npz batch with `data` and `labels` "
             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


def _load_imagenet64(data_dir, train):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): npz batches in data_dir or one folder
    below (the release unpacks to Imagenet64_train_part1_npz/ ...), `data` N x 12288 uint8 (R, G,
    B planes, each 64x64 row-major) and `labels` 1..1000. Otherwise an ImageFolder
    data_dir/{train,val}/<class>/<image>, box-downsampled to 64x64 where larger.
    """
    import glob
    split = "train" if train else "val"
    pattern = "train_data_batch_*.npz" if train else "val_data*.npz"
    files = glob.glob(os.path.join(data_dir, pattern)) + glob.glob(os.path.join(data_dir, "*", pattern))
    files.sort(key=lambda f: (len(os.path.basename(f)), os.path.basename(f)))  # batch_2 before _10
    if files:
        def chunks():  # one batch file at a time: peak memory is one file, not the data set
            for f in files:
                x, y = _npz_member(f, "data"), np.asarray(_npz_member(f, "labels"))
                if x.ndim != 2 or x.shape != (len(y), 3 * 64 * 64) or x.dtype != np.uint8:
                    fail(f"{f}: `data` is {x.dtype} of shape {x.shape}, expected uint8 ({len(y)}, 12288): "
                         f"use the 64x64 downsampled-ImageNet npz batches")
                if len(y) and (y.min() < 1 or y.max() > 1000):
                    fail(f"{f}: labels span {y.min()}..{y.max()}, expected 1..1000 as in the "
                         f"downsampled-ImageNet release")
                yield x.reshape(-1, 3, 64, 64), y - 1  # labels 1..1000 -> 0..999
        return _cached_arrays(data_dir, f"imagenet64-{split}", files, (3, 64, 64),
                              lambda: sum(len(_npz_member(f, "labels")) for f in files), chunks)
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        fail(f"imagenet64 not found under --data-dir {data_dir!r}: put the downsampled-ImageNet "
             f"64x64 npz batches ({pattern}) or an ImageFolder ({folder}/<class>/*.png) there")
    import torchvision
    from PIL import Image
    try:
        ds = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, OSError) as e:
        fail(f"imagenet64 ImageFolder {folder!r} holds no images ({type(e).__name__}); "
             f"expected {folder}/<class>/*.png")
    if len(ds.classes) > DATASETS["imagenet64"][2]:
        fail(f"ImageFolder {folder!r} has {len(ds.classes)} classes; imagenet64 models have at most 1000")

    def chunks():
        for path, label in ds.samples:
            try:
                im = ds.loader(path)  # PIL, converted to RGB
            except OSError as e:  # not an image, truncated
                fail(f"{path}: cannot read the image ({type(e).__name__}); remove or replace it")
            hwc = np.asarray(im if im.size == (64, 64) else im.resize((64, 64), Image.BOX))
            yield hwc.transpose(2, 0, 1)[None], np.array([label])
    return _cached_arrays(data_dir, f"imagenet64-{split}-folder", [p for p, _ in ds.samples],
                          (3, 64, 64), lambda: len(ds.samples), chunks)


def to_float(x_uint8):
    return x_uint8.float() / 127.5 - 1.0


class Batches:
    """Infinite, seeded, rank-aware batches: epoch e is a permutation seeded by (seed, e), split
    across ranks. A pure function of the step, so a resumed run sees the same batches."""

    def __init__(self, data, batch_size, seed=0, rank=0, world=1, device="cpu"):
        self.x, self.y = data
        self.bs, self.seed, self.rank, self.world, self.device = batch_size, seed, rank, world, device
        self.per_epoch = max(1, len(self.x) // (batch_size * world))
        self._perm_epoch, self._perm = None, None

    def get(self, step):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.x), generator=g), epoch
        start = (i * self.world + self.rank) * self.bs
        idx = self._perm[start:start + self.bs]
        if len(idx) < self.bs:  # datasets smaller than one global batch: wrap around
            idx = self._perm[torch.arange(start, start + self.bs) % len(self.x)]
        # move uint8 and convert on the device: a quarter of the host-to-device bytes
        return to_float(self.x[idx].to(self.device)), self.y[idx].to(self.device)


# ----------------------------------------------------------------------------------------------
# DDIL mixing buffer: data / teacher / student states, the heart of DDIL
# ----------------------------------------------------------------------------------------------

SOURCES = ("data", "teacher", "student")


def random_labels(n, num_classes, device="cpu"):
    """Uniform class labels for n new samples (None for an unconditional model)."""
    return torch.randint(0, num_classes, (n,), device=device) if num_classes else None


def source_counts(batch_size, betas):
    """Per-source counts round(B * beta), the remainder going to the largest prior (sums to B)."""
    counts = [int(round(batch_size * b)) for b in betas]
    counts[int(np.argmax(betas))] += batch_size - sum(counts)
    return counts


class MixingBuffer:
    """Replay buffer of rollout states (x_t, t, y, w) for one source ('teacher' or 'student').

    A state keeps every conditioning input that made it (time t, class label y, guidance weight w)
    and is trained at exactly that conditioning. Rollouts are expensive, so each iteration pushes a
    few fresh trajectories (every grid state of each) and batches draw uniformly from the stored
    states. A ring of `capacity` states refreshed with `refresh` trajectories of T grid states per
    iteration keeps no state longer than ceil(capacity / (refresh * T)) iterations: that is the
    staleness bound. States are stored detached, on the device and in the dtype they were pushed with.
    """

    def __init__(self, capacity):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.x = self.t = self.y = self.w = None

    def __len__(self):
        return self.size

    def push(self, x, t, y=None, w=None):
        """Store states x [N, ...] at times t [N], labels y [N] (None: -1) and guidance weights
        w [N] (None: 0); the oldest go first. With N > capacity only the newest capacity stay."""
        x = x.detach()
        n = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
        y = torch.full((n,), -1, dtype=torch.long, device=x.device) if y is None else y.detach().long()
        w = torch.as_tensor(0.0 if w is None else w, dtype=torch.float32, device=x.device).expand(n)
        if self.x is None:
            self.x = x.new_empty((self.capacity, *x.shape[1:]))
            self.t, self.y, self.w = t.new_empty(self.capacity), y.new_empty(self.capacity), w.new_empty(self.capacity)
        m = min(n, self.capacity)
        idx = (self.ptr + torch.arange(m, device=x.device)) % self.capacity
        self.x[idx], self.t[idx], self.y[idx], self.w[idx] = x[-m:], t[-m:], y[-m:], w[-m:]
        self.ptr, self.size = (self.ptr + m) % self.capacity, min(self.capacity, self.size + m)

    def sample(self, n):
        """n states drawn uniformly with replacement: (x [n, ...], t [n], y [n] (-1 = none), w [n])."""
        idx = torch.randint(0, self.size, (n,)).to(self.x.device)
        return self.x[idx], self.t[idx], self.y[idx], self.w[idx]

    def state_dict(self):
        return {k: getattr(self, k) for k in ("x", "t", "y", "w", "size", "ptr")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, v)


def replay(buf, rollout, n, trajectories, traj_len):
    """n rollout states from buf after pushing `trajectories` fresh ones from rollout(m) -> (x, t,
    y, w) (m trajectories, traj_len states each, made without grad); the first batches push as many
    as the buffer needs to serve n. None when n = 0 (the source is off: no rollout runs)."""
    if n == 0:
        return None
    need = max(trajectories, math.ceil((n - len(buf)) / traj_len))
    if need > 0:
        with torch.no_grad():
            buf.push(*rollout(need))
    return buf.sample(n)


def cat_states(*parts):
    """Concatenate (x, t, y, w) state batches from the DDIL sources (None or empty: skipped; y None:
    no labels, -1; w None: 0); also returns each state's source (0 data, 1 teacher, 2 student)."""
    used = [(i, p) for i, p in enumerate(parts) if p is not None and len(p[0])]
    x, t = (torch.cat([p[k] for _, p in used]) for k in range(2))
    y = torch.cat([torch.full((len(p[0]),), -1, device=x.device) if p[2] is None else p[2].long()
                   for _, p in used])
    w = torch.cat([torch.as_tensor(0.0 if p[3] is None else p[3], dtype=torch.float32,
                                   device=x.device).expand(len(p[0])) for _, p in used])
    src = torch.cat([torch.full((len(p[0]),), i, dtype=torch.long, device=x.device) for i, p in used])
    return x, t, y, w, src


# ----------------------------------------------------------------------------------------------
# checkpoints: atomic writes, weights_only loads, one-line shape errors
# ----------------------------------------------------------------------------------------------

def check_out_dir(out):
    """Create --out, or stop with one line when it names a file or cannot be created (call it
    before anything is written there)."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out!r} is a file, not a directory: pick another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only filesystem
        fail(f"cannot create --out {out!r} ({e.strerror or e}): pick another --out")
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f"--out {out!r} is not writable: pick another --out")


def _atomic_write(path, write, what):
    """write(fh) to a temporary file beside path, fsync, os.replace: a crash, a full disk or a
    lost permission never leaves a half-written file, and the previous one stays. An OSError
    removes the temporary file and stops with one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as fh:  # a file object, not a path: torch.save then raises OSError
            write(fh)                # on a full disk, not a RuntimeError without an errno
            fh.flush()
            os.fsync(fh.fileno())  # NFS and delayed allocation report a full disk only here
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {what} is kept" if os.path.isfile(path) else ""
        fail(f"could not write {what} {path} ({e.strerror or e}): free space or pick another --out{kept}")
    finally:
        try:
            os.remove(tmp)
        except OSError:  # already replaced, or never created
            pass


_SAVED_STEPS = {}  # abspath -> the step this process last wrote there (no need to read it back)


def save_checkpoint(path, state, per_rank=()):
    """Write atomically (_atomic_write), and never a diverged state: a NaN or inf in any floating
    tensor, on any rank, stops every rank with one line that names it and the last good
    checkpoint, which stays.

    per_rank: the keys of state that each rank holds for itself (its replay buffers). Rank 0's go
    into the checkpoint; rank r's into PATH.rank<r>.step<N> beside it, written before the
    checkpoint that vouches for them, so a resumed torchrun run gives every rank its own state
    back (load_checkpoint). Older sidecars are removed once the new checkpoint is in place."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    step = state.get("step") if isinstance(state, dict) else None
    mine = state if rank == 0 else {"step": step, **{k: state[k] for k in per_rank}}
    bad = nonfinite_key(mine)
    if world > 1:  # every rank stops, or none does
        found = [None] * world
        dist.all_gather_object(found, bad)
        bad = next((f"rank {r}'s {b}" for r, b in enumerate(found) if b is not None), None)
    if bad is not None:
        at = f" at step {step}" if step is not None else ""
        resume = " (it resumes from there)" if os.path.isfile(path) else ""
        fail(f"not writing {path}: {bad} holds NaN or inf{at}; {last_checkpoint(path)}: "
             f"lower --lr and rerun{resume}")
    if rank > 0 and per_rank:
        _atomic_write(f"{path}.rank{rank}.step{step}", lambda fh: torch.save(mine, fh), "checkpoint")
    barrier()
    if rank == 0:
        _atomic_write(path, lambda fh: torch.save(state, fh), "checkpoint")
        if step is not None:
            _SAVED_STEPS[os.path.abspath(path)] = step
    barrier()
    if rank > 0 and per_rank:  # the checkpoint now vouches for this step's sidecar only
        import glob
        for old in glob.glob(glob.escape(f"{path}.rank{rank}.step") + "*"):
            if old != f"{path}.rank{rank}.step{step}":
                os.remove(old)


def check_finite_loss(losses, step, ckpt_path):
    """Stop with one line when a logged loss {name: value} is NaN or inf, naming the checkpoint
    that a rerun resumes from (save_checkpoint never writes a non-finite state)."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        fail(f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}; "
             f"{last_checkpoint(ckpt_path)}: lower --lr and rerun (it resumes)")


def last_checkpoint(path):
    """'the last checkpoint is PATH (step N)' or 'no checkpoint was written yet': the piece of a
    one-line error that tells a diverged run where a rerun resumes from."""
    if not os.path.isfile(path):
        return "no checkpoint was written yet"
    step = _SAVED_STEPS.get(os.path.abspath(path))
    if step is None:
        try:  # mmap: the tensors are not read, only the pickle around them
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
        except Exception:
            return f"the last checkpoint is {path} (unreadable)"
    return f"the last checkpoint is {path}" + (f" (step {step})" if step is not None else "")


def nonfinite_key(obj, key=""):
    """The key path ('opt.state.3.exp_avg') of the first floating tensor in obj, through dicts,
    lists and tuples, that holds a NaN or inf; None when all are finite. A MixingBuffer state
    (a dict with `size` and `ptr`) is checked in its first `size` rows only: the rest was never
    written (new_empty) and may hold any bits."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            # one reduction, no full-size temporary: a NaN or inf makes the sum non-finite; a
            # non-finite sum of finite values (overflow) is confirmed element-wise
            s = obj.detach().sum(dtype=torch.float32)
            if not torch.isfinite(s) and not torch.isfinite(obj.detach()).all():
                return key or "the state"
        return None
    if isinstance(obj, dict):
        rows = obj["size"] if "ptr" in obj and isinstance(obj.get("size"), int) else None
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        rows, items = None, enumerate(obj)
    else:
        return None
    for k, v in items:
        if rows is not None and torch.is_tensor(v) and v.dim():
            v = v[:rows]
        bad = nonfinite_key(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


def load_checkpoint(path, map_location="cpu", per_rank=()):
    """torch.load(weights_only=True) with one-line errors. per_rank: the keys that this rank
    saved for itself (save_checkpoint); rank r > 0 gets its own from PATH.rank<r>.step<N>, or,
    where there is none (a run resumed on more ranks), empty ones with a note (they refill)."""
    ck = _load(path, map_location)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank > 0 and per_rank:
        own = f"{path}.rank{rank}.step{ck.get('step')}"
        if os.path.isfile(own):
            ck.update({k: v for k, v in _load(own, map_location).items() if k in per_rank})
        else:
            print(f"note: rank {rank} has no saved {', '.join(per_rank)} for step {ck.get('step')} "
                  f"(a run resumed on more ranks?): starting them empty", flush=True)
            for k in per_rank:
                ck.pop(k, None)
    return ck


def _load(path, map_location):
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f"could not load checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def load_weights(model, state_dict, what="model", strict=True):
    """load_state_dict with a one-line error that names both shapes of the first mismatch."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            fail(f"{what}: checkpoint tensor {k} has shape {tuple(v.shape)} but the model expects "
                 f"{tuple(own[k].shape)}; use a checkpoint of the same --dataset / model preset")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        fail(f"{what}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
             f"{unexpected[:3]}); use a checkpoint of the same --dataset / model preset")


# ----------------------------------------------------------------------------------------------
# logging and images
# ----------------------------------------------------------------------------------------------

class Logger:
    """A tqdm bar on rank 0 and one JSON line per log call in OUT/log.jsonl."""

    def __init__(self, out, total, initial=0, desc=None):
        self.main = is_main()
        self.path, self.t0 = os.path.join(out, "log.jsonl"), time.time()
        self.bar = None
        if self.main:
            from tqdm import tqdm
            os.makedirs(out, exist_ok=True)
            if os.path.isfile(self.path):  # resuming: drop records past the checkpoint's step
                keep = []
                with open(self.path) as fh:
                    for ln in fh:
                        try:
                            rec = json.loads(ln)
                        except ValueError:  # a line cut short by a crash or a full disk
                            continue
                        if isinstance(rec, dict) and rec.get("step", 0) <= initial:
                            keep.append(ln.rstrip("\n") + "\n")
                _atomic_write(self.path, lambda fh: fh.write("".join(keep).encode()), "log")
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            disable=None, mininterval=1.0)

    def log(self, step, **metrics):
        if not self.main:
            return
        rec = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError as e:
            fail(f"could not write the log {self.path} ({e.strerror or e}): free space or pick another --out")
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def save_grid(x, path, nrow=None):
    """Save images in [-1, 1] as one PNG grid (atomically, see _atomic_write)."""
    import torchvision
    if not is_main():
        return
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[-1] < 32:  # small images (digits 8x8): upscale so the grid can be looked at
        x = F.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = nrow or int(math.ceil(math.sqrt(len(x))))
    _atomic_write(path, lambda fh: torchvision.utils.save_image(x, fh, format="png", nrow=nrow, padding=2),
                  "image")


def write_json(obj, path):
    if is_main():
        _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()), "file")


# ----------------------------------------------------------------------------------------------
# teacher loading
# ----------------------------------------------------------------------------------------------

def default_teacher_path(dataset, cond=False):
    return os.path.join("runs", f"teacher-{dataset}{'-cond' if cond else ''}", "ckpt.pt")


def load_net(path, device="cpu"):
    """The sampling network of any checkpoint this project writes, with its sampler kind.

    Teacher checkpoints hold the EMA network under "ema"; student checkpoints hold the network
    to sample with under "net" and say how under "sampler" ("ddim" or "renoise").
    Returns (net in eval mode, sampler kind, checkpoint dict).
    """
    ck = load_checkpoint(path, map_location=device)
    key = "net" if "net" in ck else "ema"
    if key not in ck or "model_config" not in ck:
        fail(f"{path} holds no network ('net' or 'ema' with 'model_config'): pass a ckpt.pt "
             f"written by teacher.py or a method script")
    model = UNet(**ck["model_config"]).to(device)
    load_weights(model, ck[key], what=path)
    return model.eval().requires_grad_(False), ck.get("sampler", "ddim"), ck


def load_teacher(path, dataset, device="cpu", cond=False):
    """The teacher's EMA network (eval mode, frozen) and its saved config dict.

    With no path, runs/teacher-<dataset>[-cond]/ckpt.pt; when that is missing, train it first
    through teacher.py (saying so), so a method script runs end to end on a fresh machine.
    """
    if not path:
        path = default_teacher_path(dataset, cond)
        if not os.path.isfile(path):
            args = ["--dataset", dataset, "--out", os.path.dirname(path)] + (["--cond"] if cond else [])
            if is_main():
                print(f"no teacher at {path}: training the default {dataset} teacher first "
                      f"(python teacher.py {' '.join(args)})", flush=True)
            import teacher
            teacher.main(args)
            barrier()
    model, _, ck = load_net(path, device)
    if ck.get("config", {}).get("dataset") != dataset:
        fail(f"teacher {path} was trained on {ck.get('config', {}).get('dataset')!r} but --dataset "
             f"is {dataset!r}; pass a matching --teacher")
    return model, ck["config"]


def student_of(teacher, **overrides):
    """A trainable copy of the teacher without dropout (distillation trains students without it;
    PD, CD), with config overrides such as w_embed=True (new layers start at zero)."""
    student = UNet(**{**teacher.config, "dropout": 0.0, **overrides}).to(next(teacher.parameters()).device)
    load_weights(student, teacher.state_dict(), "teacher", strict=not overrides.get("w_embed"))
    return student.train().requires_grad_(True)
