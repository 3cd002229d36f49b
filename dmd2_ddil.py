"""DMD2 + DDIL: distil a v-prediction teacher into a K-step generator by distribution matching.

Three networks, all initialised from the teacher: the real score mu_real (the frozen teacher T),
the fake score mu_fake (trainable: it tracks the score of G's samples) and the generator G
(trainable). At sampling time tau_i, G maps a state x to a sample
    x0 = bound(alpha x - sigma v_G(x, tau_i));
K-step sampling re-noises in between, x_{tau_{i+1}} = alpha x0 + sigma z (common.generate kind
"renoise").

Distribution matching (DMD) on G's sample x, per sample:
    t = t_k, k ~ U{20..980} on a 1000-level noise grid,  x_t = alpha_t x + sigma_t eps
    p_real = x - x0_real(x_t),  p_fake = x - x0_fake(x_t)      (x0 of mu_real, mu_fake)
    grad   = (p_real - p_fake) / mean_CHW |p_real|
    L_DM   = 0.5 ||x - sg(x - grad)||^2            (so dL/dx = grad: the KL gradient, normalised)
Guidance (class-conditional teachers, as DMD2's text-to-image runs): the real score is the
teacher classifier-free guided at --guidance w, x0_real from v_u + (1 + w)(v(x_t, y) - v_u); G
and mu_fake are plain conditional networks at the sample's label y.
Fake score: the teacher's v loss on sg(x) at t ~ U[0, 1].
GAN: a small head D on mu_fake's bottleneck features, noised data vs noised G samples (each image
at its own level k ~ U{0..999}), non-saturating:
    L_G += gan_weight * softplus(-D(x_t))
    L_D  = disc_weight * (softplus(-D(real_t)) + softplus(D(x_t)))
Two time scales: mu_fake and D step every iteration, G every --fake-updates iterations. AdamW
(weight decay 0.01) with a 72-iteration warm-up for both, as DMD2.

G's inputs, the DDIL part. DMD2 trains a multi-step G on its own "backward simulation": noise ->
G -> re-noise -> G ... stopped at a grid time tau_i, without grad. DDIL replaces that input
distribution by the mixture drawn in the training loop (common.replay), with priors
    beta_data    real data forward-diffused to tau_i,
    beta_teacher the teacher's DDIM rollout (--teacher-substeps steps per student step) to tau_i,
    beta_student G's own backward simulation (DMD2's input distribution),
served through MixingBuffers. Original DMD2 = --beta-data 0 --beta-teacher 0 --beta-student 1
--bound none. With K = 1 the only input time is tau_1 = 1: G's input is pure noise whatever the
betas, and DDIL changes nothing there but the bound on G's sample.

Choices and deviations (DMD2 code: tianweiy/DMD2):
- The real/fake x0 in the DM gradient are the raw network predictions (no bound): they stand for
  scores, not sampler steps. --bound acts on G's sample in training; --sample-bound (default
  clip, as published samplers) on the evaluated samples and on both rollouts, which so run as
  the samplers are evaluated (G's backward simulation is its evaluated K-step sampler).
- The 1/2 ||.||^2 is a mean over elements as in DMD2's code, so the published GAN weights apply.
- Noise levels as DMD2 draws them (grid_t): an index of a 1000-level grid, read as a logsnr and
  so a t here. DMD2's ImageNet-64 code indexes EDM's Karras grid, its guided text-to-image code
  its teacher's training timesteps. --noise-grid auto: the Karras grid unguided; guided, the
  time grid (t = k / 999, our teachers' training times). The Karras grid puts 37% of the DM
  levels below logsnr -4 (the time grid 7%), and with the guided real score G's modes collapse
  there: one look per class (bench/results/ab-grid-karras.md).
- mu_fake keeps the teacher's own loss (v at t ~ U[0, 1]) rather than EDM's: it should differ
  from the real score only where G's samples differ from the data. The GAN's real images are the
  step's data batch. DDIL's data source diffuses the images of an independent batch (were they
  the same, G's outputs from them would be near-copies of the real images beside them in D's
  loss).
- Backward-simulation states go through a replay buffer like DDIL's other rollouts, so baseline
  and DDIL differ only in the betas and the bound. DMD2 simulates fresh from the current G; here
  the buffer of G's own states holds (refresh / refresh_every) x K x fake_updates x
  --sim-staleness states, so none is more than --sim-staleness G updates old (default 1: states
  from the G of the previous update at most; G does not move between its updates). That costs
  nothing: the same --refresh trajectories per iteration are simulated whatever the capacity.
  (When the capacity is below the batch's share of own states, every batch tops it up with fresh
  trajectories.)
- Covariate-shift diagnostic: G's imitation error at a state x_t is the per-sample MSE between
  G's sample and the teacher's DDIM sample from the same x_t (teacher_substeps steps per student
  step down to 0): G is trained to sample, so the teacher's *sample* from that state, not its
  one-step x0 mean, is the label it should imitate.
- --fake-states own (default; all is DMD2's): with DDIL's data states in G's batch, mu_fake and D
  learn only G's outputs from its own states (topped up from their buffer): the distribution the
  DM gradient must correct is G's sampling distribution, not a mixture half made of near-copies
  of data. Guided lab, K = 4, +DDIL, 5 paired seeds: FD -0.060 [-0.096, -0.023] against all
  (bench/flag_ab.py, bench/results/ab-fake-all.md). With G's own states alone (DMD2's betas, and
  every K = 1 run) the two are the same.
- --ema-decay (default 0, as DMD2) evaluates and saves an EMA of G; the backward simulation
  still runs G itself (DMD2's definition: G's inputs are its own samples).
- The full list against DMD2's code and paper: docs/deviations.md.
- Defaults: betas (0, 0, 1) + --bound reflect on G's output at every K. Against DMD2 as
  published (--bound none) it helped a one-step G in the old benchmark; at K = 4 under this
  recipe the two are not told apart (unconditional, 3 paired seeds: bench/dmd2_sweep.py).
  --steps stays 4 (1500 iterations, about 15 minutes on a laptop CPU): DDIL acts at K >= 2, and
  a one-step G needs --lr 3e-5 --iters 10000 (over an hour) to come near its teacher.

    python dmd2_ddil.py                        # digits, shipped teacher: 4-step G, DMD2 + reflect
    python dmd2_ddil.py --beta-data 0.5 --beta-student 0.5        # + DDIL's data states
    python dmd2_ddil.py --bound none           # DMD2 as published
    python dmd2_ddil.py --cond --guidance 2    # the guided, class-conditional digits lab
    python dmd2_ddil.py --steps 1 --lr 3e-5 --iters 10000   # one step: 1.34x-1.44x the teacher's
                                               # FD on seeds 0-2 (3.6x at the defaults; see
                                               # bench/dmd2_sweep.py)
"""
import copy
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C
import evaluate as E
import harness as H
import published as P
from teacher import load_teacher, make_student


@dataclass
class Config(H.DistillConfig):
    # runs made before --noise-grid drew from the Karras grid: resuming one, or the benchmark's
    # stale check, compares that, not auto (harness.before_flags)
    BEFORE_FLAG: ClassVar[dict] = {"noise_grid": "karras"}
    guidance: float = H.flag(0.0, "Classifier-free guidance weight w of the real score "
                             "(class-conditional teachers only).")
    fake_updates: int = H.flag(5, "mu_fake (and D) steps per G step (the two time-scale rule).")
    gan_weight: float = H.flag(3e-3, "Weight of G's GAN loss (0 turns the GAN off).")
    disc_weight: float = H.flag(1e-2, "Weight of the discriminator's loss in mu_fake's update.")
    noise_grid: str = H.flag("auto", "The 1000-level grid whose index DMD2 draws the DM and GAN "
                             "noise levels from: karras, EDM's sampling grid (DMD2's ImageNet-64 "
                             "code), or time, t = k / 999, the teacher's training times (as its "
                             "text-to-image code); auto: time with a guided real score (the "
                             "Karras grid's high noise collapses G's modes there), else karras.",
                             choices=("auto", "karras", "time"))
    dm_min_step: int = H.flag(20, "Lowest index of that grid that the DM loss draws its noise "
                              "level from (DMD2: 2%).")
    dm_max_step: int = H.flag(980, "Highest index of that grid for the DM loss (DMD2: 98%).")
    weight_decay: float = H.flag(0.01, "AdamW's decoupled weight decay of G, mu_fake and D.")
    fake_states: str = H.flag("own", "Whose outputs mu_fake (and D) learn from: own, only G's "
                              "outputs from its own states, topped up from their buffer, so that "
                              "with DDIL's data states mu_fake still tracks G's sampling "
                              "distribution, the one the DM gradient must correct; or all of G's "
                              "outputs in the batch (DMD2's, whose inputs are all G's own states: "
                              "the two differ only with DDIL's data or teacher states).",
                              choices=("own", "all"))
    ema_decay: float = H.flag(0.0, "EMA decay of an averaged copy of G, updated at every G step, "
                              "that is evaluated and saved as the sampling network (0: none; "
                              "DMD2 evaluates G itself).")
    teacher_substeps: int = H.flag(8, "Teacher DDIM steps per student step, in the teacher's "
                                   "rollouts and the diagnostic's labels.")
    sim_staleness: int = H.flag(1, "G's own states in the buffer are at most this many G updates "
                                "old (1: on-policy, as DMD2's backward simulation).")
    # the shared flags' defaults for DMD2 on digits: G's own states only, reflected (docstring)
    iters: int = 1500
    beta_data: float = 0.0
    beta_teacher: float = 0.0
    beta_student: float = 1.0
    bound: str = "reflect"
    buffer_size: int = 256
    refresh: int = 4
    refresh_every: int = 1
    shift_samples: int = 256
    grad_clip: float = 10.0


PRESETS = {  # per-process batch for 8 GPUs; DMD2's ImageNet-64 recipe: lr 2e-6 for G and mu_fake,
    # 5 mu_fake steps per G step, GAN weights 3e-3 / 1e-2, bf16. Global batch 8 x 40 = 320 and
    # 200k iterations are this code's choice (DMD2's own run length and batch are not checked
    # here). One step, as DMD2's ImageNet-64 result (reflection bounds only G's output there).
    "imagenet64": dict(steps=1, iters=200_000, batch_size=40, lr=2e-6, fake_updates=5,
                       ckpt_every=5000,
                       log_every=100, buffer_size=8192, eval_samples=50_000, ref_samples=0,
                       cond=True),
    # no published CIFAR-10 DMD2 recipe: the ImageNet-64 one, at a 32x32 batch of 8 x 64 = 512
    "cifar10": dict(steps=1, iters=200_000, batch_size=64, lr=2e-6, fake_updates=5,
                    ckpt_every=5000,
                    log_every=100, buffer_size=8192, eval_samples=50_000, ref_samples=0),
}


# ---- the losses -------------------------------------------------------------------------------

def coefs(t, x):
    return (C.bcast(c, x) for c in C.alpha_sigma(t))


KARRAS = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)  # EDM's sampling grid
GRID_LEVELS = 1000  # both grids' length
WARMUP_ITERS = 72  # DMD2: 500 scheduler steps, which its 7 processes share


@functools.lru_cache(maxsize=None)
def grid_times(grid, device="cpu"):
    """The 1000 noise levels of a grid that DMD2 draws an index k of, as our times t, low to high.
    karras: EDM's sampling grid, sigma_k = (s_min^(1/rho) + k / 999 (s_max^(1/rho) -
    s_min^(1/rho)))^rho over [0.002, 80] (DMD2's ImageNet-64 code); EDM's sigma is the
    noise-to-signal ratio sigma / alpha of our schedule, so logsnr = -2 log sigma_k.
    time: t_k = k / 999, the times our teachers train at (DMD2's text-to-image code draws its
    teacher's training timesteps the same way). Made once per grid and device (cached)."""
    k = torch.arange(GRID_LEVELS, dtype=torch.float64) / (GRID_LEVELS - 1)
    if grid == "time":
        return k.float().to(device)
    lo, hi = (KARRAS[s] ** (1 / KARRAS["rho"]) for s in ("sigma_min", "sigma_max"))
    return C.t_of_logsnr(-2 * ((lo + k * (hi - lo)) ** KARRAS["rho"]).log()).float().to(device)


def grid_t(n, grid, k_min=0, k_max=GRID_LEVELS - 1, device="cpu"):
    """Noise levels as DMD2 draws them: t of an index k ~ U{k_min..k_max} of the grid. For the
    DM loss (k 20..980) the Karras grid puts the median at t = 0.76 and 37% of the levels below
    logsnr -4; the time grid, t = 0.5 and 7%."""
    k = torch.randint(k_min, k_max + 1, (n,), device=device)
    return grid_times(grid, torch.device(device))[k]


def noise_grid(cfg):
    """--noise-grid auto: time for a guided real score, else karras (docstring: why). Call after
    main zeroes cfg.guidance for an unconditional teacher."""
    if cfg.noise_grid != "auto":
        return cfg.noise_grid
    return "time" if cfg.guidance > 0 else "karras"


def x0_of(denoise, x, t):
    """x0_hat = alpha x - sigma v of a v-denoiser(x, t) (fp32)."""
    alpha, sigma = coefs(t, x)
    return C.x0_from_v(x, denoise(x, t).float(), alpha, sigma)


def dm_grad(x, x0_real, x0_fake):
    """DMD gradient (p_real - p_fake) / mean_CHW |p_real|; it points from the data towards G's
    distribution, so x - grad moves G's samples towards the data."""
    p_real, p_fake = x - x0_real, x - x0_fake
    return torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))


def dm_loss(x, real, fake, grid, k_min, k_max):
    """0.5 ||x - sg(x - grad)||^2 at x_t = alpha x + sigma eps, t = grid_t(grid, k_min, k_max);
    real / fake are v-denoisers(x, t). Returns (loss, grad)."""
    t = grid_t(x.shape[0], grid, k_min, k_max, x.device)
    x_t = C.diffuse(x.detach(), t)
    with torch.no_grad():
        grad = dm_grad(x.detach(), x0_of(real, x_t, t), x0_of(fake, x_t, t))
    return 0.5 * F.mse_loss(x, (x - grad).detach()), grad


def gan_head(ch):
    """Realism classifier on mu_fake's bottleneck features: two convs, pool, linear -> one logit."""
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), C.norm(ch), nn.SiLU(),
                         nn.Conv2d(ch, ch, 3, padding=1), C.norm(ch), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1))


def gan_g_loss(logits_fake):
    return F.softplus(-logits_fake).mean()  # non-saturating: G wants D(fake) high


def gan_d_loss(logits_real, logits_fake):
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def fake_score_loss(fake, head, x, real, y, y_real, gan, grid):
    """mu_fake's v loss on sg(x) at t ~ U[0, 1] (the teacher's own loss), plus D's loss on noised
    data vs noised x, each image at its own level on the whole noise grid. One forward pass over
    [x_t, real_t, fake_t] (DDP wants one). Returns (loss_v, loss_d or None)."""
    x, B = x.detach(), x.shape[0]
    t = torch.rand(B, device=x.device)
    alpha, sigma = coefs(t, x)
    eps = torch.randn_like(x)
    x_t, v = alpha * x + sigma * eps, C.v_from_x0_eps(x, eps, alpha, sigma)
    if not gan:
        return F.mse_loss(fake(x_t, t, y).float(), v), None
    t_real, t_fake = grid_t(B, grid, device=x.device), grid_t(B, grid, device=x.device)
    inp = torch.cat([x_t, C.diffuse(real, t_real), C.diffuse(x, t_fake)])
    ys = None if y is None else torch.cat([y, y_real, y])
    v_pred, feats = fake(inp, torch.cat([t, t_real, t_fake]), ys, return_features=True)
    logits_real, logits_fake = head(feats[B:]).float().squeeze(1).chunk(2)
    return F.mse_loss(v_pred[:B].float(), v), gan_d_loss(logits_real, logits_fake)


# ---- G's inputs: DDIL's three state sources, (x_t, t, y, w) at the sampling times tau_i ---------

def data_states(x0, y, taus):
    """Real data forward-diffused to a random sampling time:
    x_t = alpha x0 + sigma eps, t ~ U{taus}."""
    t = taus.to(x0.device)[torch.randint(0, len(taus), (x0.shape[0],), device=x0.device)]
    return C.diffuse(x0, t), t, y, None


@torch.no_grad()
def backward_simulation(G, x1, y, taus, *, bound, expert=None, expert_w=0.0, substeps=1, p=0.0):
    """DMD2's backward simulation: G's re-noising sampler from noise x1 at tau_1 to tau_K, no grad.
    Returns the states at every sampling time, [K n] (tau-major), with their times and labels.
    With p > 0 each step is, with probability p, the expert's own action from that state (its
    DDIM at guidance expert_w, `substeps` per student step): --rollout-teacher-p, DAgger's
    mixture."""
    K = len(taus)
    noises = [torch.randn_like(x1) for _ in range(K - 1)]
    fine = C.time_grid(K * substeps)

    def own_step(x, i, idx):  # G's sample from tau_i, re-noised to tau_{i+1}
        denoise = C.guided(G, C.select(y, idx))
        return C.ddim_sample(denoise, x, taus[i:i + 2], bound=bound, noises=[noises[i][idx]])

    def expert_step(x, i, idx):  # the expert's DDIM over the same interval
        denoise = C.guided(expert, C.select(y, idx), expert_w)
        return C.ddim_sample(denoise, x, fine[i * substeps:(i + 1) * substeps + 1], bound=bound)

    return C.trajectory(C.dagger_rollout(x1, K - 1, own_step, expert_step, p), taus, y, None)


@torch.no_grad()
def teacher_rollout(T, x1, y, w, taus, *, substeps, bound):
    """The (guided) teacher's DDIM from x1 at tau_1 down to tau_K on a grid `substeps` times finer;
    returns the states at the sampling times, [K n], with their times, labels and guidance."""
    K = len(taus)
    fine = C.time_grid(K * substeps)[:(K - 1) * substeps + 1]
    x, states = C.ddim_sample(C.guided(T, y, w), x1, fine, bound=bound, return_states=True)
    return C.trajectory(states[::substeps] + [x], taus, y, w)


@torch.no_grad()
def teacher_sample_from(T, x_t, t, K, substeps, y=None, w=0.0, *, bound):
    """The teacher's DDIM sample from states x_t at one sampling time t (G's imitation label)."""
    i = int(round((1.0 - t) * K))
    ts = C.time_grid(K * substeps)[i * substeps:]
    return C.ddim_sample(C.guided(T, y, w), x_t, ts, bound=bound)


# ---- the two updates --------------------------------------------------------------------------

def generator_sample(G, x_in, t_in, y, *, bound):
    """G's sample x0 = bound(alpha x - sigma v_G(x, tau)) from states x_in at times t_in."""
    alpha, sigma = coefs(t_in, x_in)
    return C.bound_x0(C.x0_from_v(x_in, G(x_in, t_in, y).float(), alpha, sigma), bound)


def generator_update(G, fake, head, T, opt, x, y, cfg):
    """One step of G on its samples x: the DM loss against the guided real score and the fake
    score, plus the GAN generator loss. mu_fake and D get no gradient.
    Returns {loss name: value}."""
    fake.requires_grad_(False), head.requires_grad_(False)
    with H.autocast(x.device, cfg.bf16):
        loss_dm, _ = dm_loss(x, C.guided(T, y, cfg.guidance), lambda x, t: fake(x, t, y),
                             noise_grid(cfg), cfg.dm_min_step, cfg.dm_max_step)
        loss, rec = loss_dm, {"loss_dm": loss_dm.item()}
        if cfg.gan_weight > 0:
            tg = grid_t(x.shape[0], noise_grid(cfg), device=x.device)
            feats = fake(C.diffuse(x, tg), tg, y, return_features=True)[1]
            loss_gan = gan_g_loss(head(feats).float().squeeze(1))
            loss, rec["loss_gan_g"] = loss + cfg.gan_weight * loss_gan, loss_gan.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(G.parameters(), cfg.grad_clip)
    opt.step()
    fake.requires_grad_(True), head.requires_grad_(True)
    return rec


def fake_score_update(fake_train, head_train, fake, head, opt, x, real, y, y_real, cfg):
    """One step of mu_fake (and the GAN head D) on G's detached samples x and the real batch."""
    gan = cfg.gan_weight > 0
    with H.autocast(x.device, cfg.bf16):
        loss_f, loss_d = fake_score_loss(fake_train, head_train, x, real, y, y_real, gan,
                                         noise_grid(cfg))
        loss = loss_f + (cfg.disc_weight * loss_d if gan else 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(fake.parameters()) + list(head.parameters()), cfg.grad_clip)
    opt.step()
    return {"loss_fake": loss_f.item(), **({"loss_d": loss_d.item()} if gan else {})}


# ---- the run ----------------------------------------------------------------------------------

def check(cfg):
    """One-line errors for bad flags, before any work; returns the betas."""
    H.check_positive(cfg, "iters", "batch_size", "log_every", "ckpt_every", "steps", "buffer_size",
                     "refresh", "refresh_every", "reference_steps", "teacher_substeps",
                     "fake_updates", "shift_samples", "sim_staleness")
    E.check_sample_counts(cfg)
    if cfg.grad_accum != 1:  # G's and mu_fake's updates each take the whole batch at once
        H.fail("--grad-accum is not implemented for DMD2: lower --batch-size per process instead")
    if not 0 <= cfg.ema_decay < 1:
        H.fail(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.gan_weight < 0 or cfg.disc_weight < 0 or cfg.guidance < 0:
        H.fail("--gan-weight, --disc-weight and --guidance must be >= 0")
    if not 0 <= cfg.dm_min_step < cfg.dm_max_step < GRID_LEVELS or cfg.weight_decay < 0:
        H.fail(f"need 0 <= --dm-min-step < --dm-max-step < {GRID_LEVELS} and --weight-decay >= 0, "
               f"got {cfg.dm_min_step}, {cfg.dm_max_step}, {cfg.weight_decay}")
    return H.check_ddil(cfg)


def main(argv=None):
    cfg = H.parse_config(Config, argv, PRESETS)
    betas = check(cfg)
    rank, world, device, data = H.setup(cfg, "dmd2_ddil")
    E.check_feature_extractor(cfg.dataset, device, cfg.inception_weights)
    T = load_teacher(cfg.teacher, cfg.dataset, device, cfg.cond, cfg.edm_repo, cfg.data_dir)
    nc, K, B = T.num_classes, cfg.steps, cfg.batch_size
    cfg.guidance = cfg.guidance if nc else 0.0

    # G and mu_fake copy the teacher, without dropout (or, --student-width < 1, a narrower G)
    G = make_student(T, cfg.student_head, width=cfg.student_width, seed=cfg.seed)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if not os.path.isfile(ckpt_path):  # a fresh run fits a re-read v head first; a resume loads it
        P.warm_up_head(G, T, data, cfg.head_warmup, cfg.batch_size, cfg.lr, cfg.seed)
    fake = copy.deepcopy(G)
    G_eval = copy.deepcopy(G).requires_grad_(False) if cfg.ema_decay else G  # what is sampled
    torch.manual_seed(cfg.seed)  # the head's random init: same seed, same run
    head = gan_head(T.mid_ch).to(device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_f = torch.optim.AdamW(list(fake.parameters()) + list(head.parameters()), lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    taus = C.time_grid(K)[:-1]
    # DMD2 simulates G's inputs from the current G; a ring of (refresh / refresh_every) x K x
    # fake_updates x sim_staleness states holds none older than sim_staleness G updates (G only
    # moves every fake_updates iterations), at no extra cost: the simulation per iteration is
    # the same
    per_update = cfg.refresh * K * cfg.fake_updates * cfg.sim_staleness // cfg.refresh_every
    buffers = {"teacher": C.MixingBuffer(cfg.buffer_size),
               "student": C.MixingBuffer(min(cfg.buffer_size, max(1, per_update)))}
    ck, step, train_time = H.resume(ckpt_path, device, G.config, {
        "net": G_eval, "g": G, "fake": fake, "head": head, "opt_g": opt_g, "opt_f": opt_f,
        "buffers": buffers})
    shape = (G.config["in_ch"], G.config["resolution"], G.config["resolution"])
    H.check_free_space(cfg.out, [G, fake, head], [G, fake, head],
                       sum(b.capacity for b in buffers.values()), shape, world)
    G_train, fake_train = (H.compile_trial(DDP(n) if world > 1 else n, cfg, shape, labels=nc > 0)
                           for n in (G, fake))
    head_train = DDP(head) if world > 1 and cfg.gan_weight > 0 else head
    if H.is_main():
        print(f"dmd2_ddil: K={K}, betas (data, teacher, student) = {betas}, bound {cfg.bound}, "
              f"GAN {'on' if cfg.gan_weight > 0 else 'off'}, noise grid {noise_grid(cfg)}"
              + (f", guidance w {cfg.guidance:g}" if nc else "")
              + f", global batch {cfg.batch_size * world}, {device}"
              + ("; K = 1: G's input is pure noise, the betas do not apply" if K == 1 else ""),
              flush=True)

    def new_trajectories(n):  # noise and labels of n fresh rollouts
        return torch.randn(n, *shape, device=device), C.random_labels(n, nc, device)

    # rollouts run as the samplers are evaluated: --sample-bound (--bound acts on G's output)
    def teacher_source(n):  # the guided teacher's DDIM, teacher_substeps per student step
        return teacher_rollout(T, *new_trajectories(n), cfg.guidance, taus,
                               substeps=cfg.teacher_substeps, bound=cfg.sample_bound)

    def student_source(n):  # G's own backward simulation, DAgger-mixed with the teacher
        return backward_simulation(G, *new_trajectories(n), taus, bound=cfg.sample_bound,
                                   expert=T, expert_w=cfg.guidance,
                                   substeps=cfg.teacher_substeps, p=cfg.rollout_teacher_p)

    # G is sampled plainly (w = 0): it has learnt the guided real score's distribution
    protocol = dict(dataset=cfg.dataset, bound=cfg.sample_bound, seed=cfg.seed, device=device,
                    data_dir=cfg.data_dir, w=0.0, inception_weights=cfg.inception_weights)
    batches = H.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    # DDIL's data states come from batches of their own: were they diffused from the GAN's real
    # images, G's outputs from them would be near-copies of the real images beside them
    data_batches = H.Batches(data, cfg.batch_size, cfg.seed + 1, rank, world, device)
    log = H.Logger(cfg.out, cfg.iters, step, desc="dmd2_ddil")
    while step < cfg.iters:
        t0 = time.time()
        H.step_seed(cfg.seed, rank, step)
        for group in opt_g.param_groups + opt_f.param_groups:  # DMD2's linear warm-up
            group["lr"] = cfg.lr * min(1.0, (step + 1) / WARMUP_ITERS)
        real, y_real = batches.get(step)
        y_real = y_real if nc else None
        if K == 1:  # G's input is pure noise at tau_1 = 1
            x_in, t_in, y = (torch.randn_like(real), torch.ones(B, device=device),
                             C.random_labels(B, nc, device))
        else:
            n_data, n_teacher, n_student = C.source_counts(
                B, C.ramped_betas(betas, step / cfg.iters, cfg.beta_ramp))
            refresh = cfg.refresh if step % cfg.refresh_every == 0 else 0
            x_d, y_d = data_batches.get(step) if n_data else (real, y_real)
            x_in, t_in, y, _, src = C.cat_states(
                data_states(x_d[:n_data], y_d[:n_data] if nc else None, taus),
                C.replay(buffers["teacher"], teacher_source, n_teacher, refresh, K),
                C.replay(buffers["student"], student_source, n_student, refresh, K))
            y = y if nc else None
        # every iteration makes samples for mu_fake; every fake_updates-th one also steps G on them
        g_step = step % cfg.fake_updates == 0
        with torch.set_grad_enabled(g_step), H.autocast(device, cfg.bf16):
            x = generator_sample(G_train if g_step else G, x_in, t_in, y, bound=cfg.bound)
        rec = generator_update(G, fake, head, T, opt_g, x, y, cfg) if g_step else {}
        if g_step and cfg.ema_decay:
            C.ema_update(G_eval, G, cfg.ema_decay)
        x_f, y_f = x, y
        if cfg.fake_states == "own" and K > 1 and n_student < B:  # G's sampling distribution only
            x_o, t_o, y_o, _ = C.replay(buffers["student"], student_source, B - n_student, 0, K)
            with torch.no_grad(), H.autocast(device, cfg.bf16):
                x_o = generator_sample(G, x_o, t_o, y_o if nc else None, bound=cfg.bound)
            own = src == 2
            x_f = torch.cat([x[own], x_o])
            y_f = torch.cat([y[own], y_o]) if nc else None
        rec.update(fake_score_update(fake_train, head_train, fake, head, opt_f, x_f, real, y_f,
                                     y_real, cfg))
        step += 1
        train_time += time.time() - t0
        log.update()
        if step % cfg.log_every == 0 or step == cfg.iters:
            H.check_finite_loss(rec, step, ckpt_path)
            log.log(step, train_s=round(train_time, 3), **rec)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            log.log(step, train_s=round(train_time, 3),
                    **E.fd_during_training(G_eval, "renoise", K, cfg.eval_every_samples,
                                           **protocol))
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            H.save_checkpoint(ckpt_path, {
                "net": G_eval.state_dict(), "g": G.state_dict() if cfg.ema_decay else None,
                "model_config": G.config, "sampler": "renoise", "steps": K,
                "w": cfg.guidance, "config": asdict(cfg), "fake": fake.state_dict(),
                "head": head.state_dict(), "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(),
                "step": step, "buffers": {k: b.state_dict() for k, b in buffers.items()},
                "train_time_s": train_time}, per_rank=("buffers",))
    log.close()

    # final evaluation: G at 1 and K steps; the guided teacher at the same K and at 64
    G = G_eval.eval()

    def imitation_error(x_t, t, y):  # G's sample vs the teacher's DDIM sample from the state
        with torch.no_grad():
            g = generator_sample(G, x_t, torch.full((len(x_t),), t, device=device), y,
                                 bound=cfg.bound)
            label = teacher_sample_from(T, x_t, t, K, cfg.teacher_substeps, y, cfg.guidance,
                                        bound=cfg.bound)
            return (g - label).pow(2).mean(dim=(1, 2, 3))
    ks = sorted({1, K})
    E.final_evaluation(cfg.out, G, "renoise", ks, T, sorted({1, K, cfg.reference_steps}),
                       cfg.eval_samples, imitation_error, cfg.shift_samples,
                       ref_samples=cfg.ref_samples, w_student=0.0,
                       extra={"it_per_s": step / max(train_time, 1e-9),
                              "train_time_s": train_time, "config": asdict(cfg)},
                       **{**protocol, "w": cfg.guidance})
    H.barrier()
    return G


if __name__ == "__main__":
    main()
