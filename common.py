"""The shared science of the DDIL reference: what the teacher and the three methods are made of.

Top to bottom: the schedule and v-parameterisation, reflection and the fused Triton sampling step
(with its torch reference), the samplers, the compact U-Net, EMA, and the DDIL mixing buffer that
feeds every method its data / teacher / student states. Plumbing (CLI, torchrun, dataset files,
checkpoints, logging) lives in harness.py; a reader learning a method never needs to open it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Triton is optional: Linux only, and only needed for the fused step on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


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


def t_of_logsnr(lam):
    """The inverse of logsnr: t = (atan(exp(-lam / 2)) - b) / a (float64 tensor)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    return (torch.atan(torch.exp(-0.5 * lam)) - _B) / _A


def alpha_sigma(t):
    """alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr); float tensors shaped like t."""
    lam = logsnr(t).double()
    return torch.sigmoid(lam).sqrt().float(), torch.sigmoid(-lam).sqrt().float()


def x0_from_v(x, v, alpha, sigma):
    return alpha * x - sigma * v


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def diffuse(x0, t, eps=None):
    """Forward diffusion to per-sample times t [B]: x_t = alpha_t x0 + sigma_t eps (eps fresh
    standard normal noise unless given)."""
    alpha, sigma = (bcast(c, x0) for c in alpha_sigma(t))
    return alpha * x0 + sigma * (torch.randn_like(x0) if eps is None else eps)


def bcast(c, x):
    """A float or per-sample [B] coefficient as a tensor broadcastable against x [B, ...]."""
    c = torch.as_tensor(c, dtype=torch.float32, device=x.device)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() == 1 else c


# ----------------------------------------------------------------------------------------------
# reflection and the fused reflected sampling step
# ----------------------------------------------------------------------------------------------

BOUNDS = ("none", "clip", "reflect")


def reflect(x):
    """Fold R into [-1, 1] by mirror reflection at the walls:
    reflect(x) = 1 - |((x + 1) mod 4) - 2|, floor mod."""
    u = x + 1.0
    return 1.0 - (u - 4.0 * torch.floor(u / 4.0) - 2.0).abs()


def bound_x0(x0, bound):
    if bound == "clip":
        return x0.clamp(-1.0, 1.0)
    if bound == "reflect":
        return reflect(x0)
    return x0


def reflected_step_torch(x, v, alpha_t, sigma_t, alpha_s, sigma_s, *, bound, noise=None):
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


def reflected_step_triton(x, v, alpha_t, sigma_t, alpha_s, sigma_s, *, bound, noise=None,
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


def reflected_step(x, v, alpha_t, sigma_t, alpha_s, sigma_s, *, bound, noise=None,
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
        return lambda x, t: model(x, t, y, torch.as_tensor(w, dtype=torch.float32,
                                                           device=x.device).expand(len(x)))
    if y is None or not (torch.as_tensor(w) != 0).any():
        return lambda x, t: model(x, t, y)
    null = torch.full_like(y, config["num_classes"])

    def denoise(x, t):
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return v_u + (1.0 + bcast(w, x)) * (v_c - v_u)
    return denoise


@torch.no_grad()
def ddim_sample(denoise, x, ts, *, bound, noises=None, return_states=False):
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
        x, x0 = reflected_step(x, v, a_t, s_t, a_s, s_s, bound=bound, noise=z)
        if float(s) == 0.0:
            x = x0
    return (x, states) if return_states else x


def generate(net, n, steps, kind="ddim", *, bound, y=None, w=0.0, shape=None, device="cpu"):
    """n images in [-1, 1] from noise with K = steps: kind "ddim" (teacher, PD student) or
    "renoise" (consistency / DMD2 generator: x0_hat = net(x, tau_i), x = alpha x0_hat + sigma z);
    at labels y [n] and guidance weight w as `guided` applies them."""
    cfg = unwrap(net).config
    shape = shape or (cfg["in_ch"], cfg["resolution"], cfg["resolution"])
    x = torch.randn(n, *shape, device=device)
    noises = [torch.randn_like(x) for _ in range(steps)] if kind == "renoise" else None
    return ddim_sample(guided(net, y, w), x, time_grid(steps), bound=bound, noises=noises)


# ----------------------------------------------------------------------------------------------
# compact U-Net (v-prediction), time and optional class / guidance-weight conditioning
# ----------------------------------------------------------------------------------------------

MODEL_PRESETS = {
    # 0.67M params (unconditional), 8x8 grayscale
    "digits": dict(in_ch=1, ch=24, ch_mult=(1, 2, 2), num_res=1, attn_res=(2,), resolution=8),
    # DDPM-like, 38.3M params
    "cifar10": dict(in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res=2, attn_res=(16,),
                    resolution=32, dropout=0.1),
    # ADM-like widths, class-conditional: 277.2M params with its 1000 classes
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
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                           v.transpose(-1, -2))
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
        self.w_mlp = (nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
                      if w_embed else None)
        if w_embed:
            nn.init.zeros_(self.w_mlp[2].weight), nn.init.zeros_(self.w_mlp[2].bias)
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res):
                self.down.append(nn.ModuleList([
                    ResBlock(c, ch * m, emb, dropout),
                    Attention(ch * m) if res in attn_res else nn.Identity()]))
                c = ch * m
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), Attention(c),
                                  ResBlock(c, c, emb, dropout)])
        self.mid_ch = c
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res + 1):
                self.up.append(nn.ModuleList([
                    ResBlock(c + chans.pop(), ch * m, emb, dropout),
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
# DDIL mixing buffer: data / teacher / student states, the heart of DDIL
# ----------------------------------------------------------------------------------------------

SOURCES = ("data", "teacher", "student")


def random_labels(n, num_classes, device="cpu"):
    """Uniform class labels for n new samples (None for an unconditional model)."""
    return torch.randint(0, num_classes, (n,), device=device) if num_classes else None


def source_counts(batch_size, betas):
    """Per-source counts round(B * beta), the remainder going to the largest prior (sums to B)."""
    counts = [int(round(batch_size * b)) for b in betas]
    counts[max(range(len(betas)), key=lambda i: betas[i])] += batch_size - sum(counts)
    return counts


class MixingBuffer:
    """Replay buffer of rollout states (x_t, t, y, w) for one source ('teacher' or 'student').

    A state keeps every conditioning input that made it (time t, class label y, guidance weight w)
    and is trained at exactly that conditioning. Rollouts are expensive, so each refresh pushes a
    few fresh trajectories (every grid state of each) and batches draw uniformly from the stored
    states. A ring of `capacity` states that takes `refresh` trajectories of T grid states at a
    refresh, one refresh every `refresh_every` iterations, is overwritten whole within
    ceil(capacity / (refresh * T)) refreshes, so it keeps no state longer than

        ceil(capacity / (refresh * T)) * refresh_every iterations:

    that is the staleness bound (LCM's defaults, capacity 1024, refresh 32, T = K = 4,
    refresh_every 8: 8 refreshes, 64 iterations; a top-up push when a batch needs more states
    than the ring holds only shortens it). States are stored detached, on the device and in the
    dtype they were pushed with.
    """

    def __init__(self, capacity):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.x = self.t = self.y = self.w = None

    def __len__(self):
        return self.size

    def push(self, x, t, y=None, w=None):
        """Store states x [N, ...] at times t [N], labels y [N] (None: -1) and guidance weights
        w [N] (None: 0); the oldest go first. With N > capacity a uniform random subset of
        capacity states stays: a push is time-major (all trajectories at tau_1, then tau_2, ...),
        so keeping one end of it would keep one end of the time axis."""
        x = x.detach()
        n = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(n)
        y = (torch.full((n,), -1, dtype=torch.long, device=x.device) if y is None
             else y.detach().long())
        w = torch.as_tensor(0.0 if w is None else w, dtype=torch.float32, device=x.device).expand(n)
        if self.x is None:  # zeros, not new_empty: a part-full ring's checkpoint is deterministic
            self.x = x.new_zeros((self.capacity, *x.shape[1:]))
            self.t, self.y, self.w = (t.new_zeros(self.capacity), y.new_zeros(self.capacity),
                                      w.new_zeros(self.capacity))
        if n > self.capacity:
            keep = torch.randperm(n)[:self.capacity].to(x.device)
            x, t, y, w, n = x[keep], t[keep], y[keep], w[keep], self.capacity
        idx = (self.ptr + torch.arange(n, device=x.device)) % self.capacity
        self.x[idx], self.t[idx], self.y[idx], self.w[idx] = x, t, y, w
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.capacity, self.size + n)

    def sample(self, n):
        """n states drawn uniformly with replacement:
        (x [n, ...], t [n], y [n] (-1 = none), w [n])."""
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


@torch.no_grad()
def dagger_rollout(x1, steps, own_step, expert_step=None, p=0.0):
    """The states x1, x_2, ..., x_{steps+1} of a rollout whose every step is the rolling-out
    network's own, own_step(x, i, idx), or, for each trajectory with probability p, the expert's
    action expert_step(x, i, idx) from the same state: DAgger's mixture pi = p pi* + (1 - p) pi_hat
    (p = 0: the network's own sampler). idx are the trajectories' indices (labels, noise)."""
    states, x = [x1], x1
    idx = torch.arange(len(x1), device=x1.device)
    for i in range(steps):
        nxt = own_step(x, i, idx)
        if p > 0:
            expert = torch.rand(len(x), device=x.device) < p
            if expert.any():
                nxt = nxt.clone()
                nxt[expert] = expert_step(x[expert], i, idx[expert]).to(nxt.dtype)
        states.append(nxt)
        x = nxt
    return states


def trajectory(states, taus, y, w):
    """Rollout states [K][n, ...] at times taus [K] -> one flat batch (x [K n], t, y, w), t-major,
    each state keeping its trajectory's label y [n] and guidance weight w ([n] or a number)."""
    n, K = len(states[0]), len(states)
    t = taus.to(states[0].device).repeat_interleave(n)
    w = w.repeat(K) if torch.is_tensor(w) and w.dim() else w
    return torch.cat(states).float(), t, None if y is None else y.repeat(K), w


def select(v, idx):
    """v[idx] for per-sample labels / weights; None and plain numbers pass through."""
    return v[idx] if torch.is_tensor(v) and v.dim() else v


def cat_states(*parts):
    """Concatenate (x, t, y, w) state batches from the DDIL sources (None or empty: skipped; y None:
    no labels, -1; w None: 0); also returns each state's source (0 data, 1 teacher, 2 student)."""
    used = [(i, p) for i, p in enumerate(parts) if p is not None and len(p[0])]
    x, t = (torch.cat([p[k] for _, p in used]) for k in range(2))
    y = torch.cat([torch.full((len(p[0]),), -1, device=x.device) if p[2] is None else p[2].long()
                   for _, p in used])
    w = torch.cat([torch.as_tensor(0.0 if p[3] is None else p[3], dtype=torch.float32,
                                   device=x.device).expand(len(p[0])) for _, p in used])
    src = torch.cat([torch.full((len(p[0]),), i, dtype=torch.long, device=x.device)
                     for i, p in used])
    return x, t, y, w, src


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


def student_of(teacher, **overrides):
    """A trainable copy of a U-Net teacher without dropout (distillation trains students without
    it; PD, CD), with config overrides such as w_embed=True (new layers start at zero)."""
    student = UNet(**{**teacher.config, "dropout": 0.0, **overrides})
    student.to(next(teacher.parameters()).device)
    student.load_state_dict(teacher.state_dict(), strict=not overrides.get("w_embed"))
    return student.train().requires_grad_(True)
