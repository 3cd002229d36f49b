"""Consistency distillation, LCM style in pixel space, with DDIL state mixing.

Grid t_n = n / N (n = 1..N). For a state x_{t_n} the frozen teacher T takes one DDIM step (x0
bounded by --bound; a class-conditional teacher at the state's label y and guidance weight w,
classifier-free guided):
    x_hat_{n-1} = alpha_{n-1} x0_T + sigma_{n-1} eps_T                  (= x0_T when t_{n-1} = 0)
The consistency function carries the boundary condition f(x, 0) = x by construction:
    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t),   x0_hat = alpha x - sigma v
    c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2),  sd = 0.5, s = 10000
(LCM's 10 per step of 1000), and the student S (initialised from T, without dropout; with a
w input when guided, as LCM) minimises
    L = d( f_S(x_{t_n}, t_n, y, w),  stopgrad f_target(x_hat_{n-1}, t_{n-1}, y, w) )
with d = L2 or pseudo-Huber (--loss) and target = EMA of S (--target-ema; 0 = S itself).
Guidance: w ~ U[--w-min, --w-max] per state (class-conditional teachers; w = 0 is CD's unguided
setting).

DDIL: each batch mixes, round(B beta) states each,
    data     x_t = alpha x0 + sigma eps at random grid times (a fresh w per state),
    teacher  the teacher's own DDIM trajectory on the training grid (N steps at the state's w),
             kept at the K sampling times tau_i,
    student  S's own multistep sampler, kept at the tau_i (--student-states grid: each carried
             on by the teacher's DDIM to the grid times above tau_{i+1}, so that own states
             reach every t_n the consistency chain links; an own-only student needs them),
the rollouts served through replay buffers that keep every state's (t, y, w).
Multistep sampling at tau_i = 1 - (i-1)/K:
    x0_hat = bound(f_S(x, tau_i)),   x = alpha x0_hat + sigma z.
Since c_skip(tau) < 0.25 / (s tau)^2 = 4e-8 at every tau >= 1/4, f = x0_hat to float precision at
the sampling times of K <= 4 (1.6e-7 at K = 8), so the sampler is common.generate(kind="renoise").

Deviations: the default grid is 48 (LCM: 50) so that it contains the sampling times of K = 1, 2,
4; the student's f in the loss is unbounded (--bound acts on the teacher's step behind each
target; --sample-bound on the evaluated samples and both rollouts, which so run as the samplers
are evaluated); rollouts are pushed in batches every --refresh-every
iterations (cheaper on CPU than a few trajectories every iteration).

    python lcm_ddil.py         # digits, the shipped teacher: about 2.5 min on 2 CPU cores
    python lcm_ddil.py --cond  # the guided, class-conditional digits lab
    python lcm_ddil.py --beta-data 1 --beta-teacher 0 --beta-student 0 --bound none  # LCM / CD
    torchrun --nproc_per_node=8 lcm_ddil.py --dataset cifar10
"""
import copy
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C
import evaluate as E
import harness as H
import published as P
from teacher import load_teacher, make_student


@dataclass
class Config(H.DistillConfig):
    grid: int = H.flag(48, "N, the training grid t_n = n / N; it must contain the K sampling "
                       "times.")
    target_ema: float = H.flag(0.95, "EMA decay of the target network (0 = the student itself "
                               "with stop-gradient).")
    loss: str = H.flag("l2", "The distance d of the consistency loss: l2, or LCM's pseudo-Huber.",
                       choices=("l2", "huber"))
    huber_c: float = H.flag(1e-3, "The pseudo-Huber distance's c, sqrt(d^2 + c^2) - c.")
    w_min: float = H.flag(1.0, "Lowest guidance weight w ~ U[w-min, w-max] of a class-conditional "
                          "teacher (the student is evaluated at the middle of the range).")
    w_max: float = H.flag(3.0, "Highest guidance weight; --w-max 0 is CD's unguided setting "
                          "(then --w-min is ignored).")
    student_states: str = H.flag("taus", "The student's own states trained on: taus, its states "
                                 "at the K sampling times (DDIL's); or grid, each carried on by "
                                 "the teacher's DDIM along the training grid to the next sampling "
                                 "time, so that the own states reach every grid time the "
                                 "consistency chain links (trained on the tau_i alone, an "
                                 "own-only student never trains its targets' times t_{n-1}).",
                                 choices=("taus", "grid"))
    # the shared flags' defaults for LCM on digits
    iters: int = 800
    batch_size: int = 128
    lr: float = 5e-4
    ckpt_every: int = 200
    log_every: int = 20
    shift_samples: int = 1000


PRESETS = {  # CD's published recipes (Song et al. 2023, Table 3); batch_size per process for 8 GPUs
    # CIFAR-10: global batch 512 = 8 x 64, lr 4e-4, 800k iterations, target = the student (mu = 0)
    "cifar10": dict(iters=800_000, batch_size=64, lr=4e-4, target_ema=0.0, ckpt_every=5000,
                    log_every=100, buffer_size=8192, eval_samples=50_000, ref_samples=0),
    # ImageNet-64: class-conditional and unguided (w = 0) as CD; global batch 2048 = 8 x 256, each
    # step in 8 micro-batches of 32 (DDP no_sync); lr 8e-6, 600k iterations, target EMA mu = 0.95.
    # LCM-style guided distillation instead: --w-min 1 --w-max 3 (a w-conditioned student).
    "imagenet64": dict(iters=600_000, batch_size=256, grad_accum=8, lr=8e-6, target_ema=0.95,
                       cond=True, w_min=0.0, w_max=0.0, ckpt_every=5000, log_every=100,
                       buffer_size=8192, eval_samples=50_000, ref_samples=0),
}

SD, S_T = 0.5, 10_000.0  # consistency scalings: sigma_data and the time scale (10 per 1/1000)


# ---- the consistency function and loss --------------------------------------------------------

def scalings(t):
    """(c_skip, c_out) at t: c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x."""
    st = S_T * torch.as_tensor(t, dtype=torch.float64)
    return (SD ** 2 / (st ** 2 + SD ** 2)).float(), (st / (st ** 2 + SD ** 2).sqrt()).float()


def consistency_fn(net, x, t, y=None, w=0.0, *, bound):
    """f(x, t) = c_skip x + c_out bound(x0_hat(x, t)) for per-sample times t [B], at labels y and
    guidance w (a w-conditioned student takes w as an input: common.guided)."""
    alpha, sigma = (C.bcast(c, x) for c in C.alpha_sigma(t))
    x0 = C.bound_x0(C.x0_from_v(x, C.guided(net, y, w)(x, t).float(), alpha, sigma), bound)
    c_skip, c_out = (C.bcast(c, x) for c in scalings(t))
    return c_skip * x + c_out * x0


@torch.no_grad()
def teacher_step(teacher, x, t, s, y=None, w=0.0, *, bound):
    """One DDIM step t -> s (per-sample [B]) of the (guided) teacher; lands on x0_hat where
    s = 0."""
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    v = C.guided(teacher, y, w)(x, t).float()
    x_s, x0 = C.reflected_step(x, v, a_t, s_t, a_s, s_s, bound=bound)
    return torch.where(C.bcast(s, x) == 0, x0, x_s)


def distance(a, b, loss="l2", c=1e-3):
    """Per-sample d: mean squared error, or LCM's elementwise pseudo-Huber sqrt(d^2 + c^2) - c."""
    d2 = (a.float() - b.float()).square()
    return (d2 if loss == "l2" else (d2 + c * c).sqrt() - c).flatten(1).mean(1)


def consistency_loss(student, target, teacher, x, n, grid, y=None, w=0.0, *, bound,
                     loss="l2", huber_c=1e-3):
    """Per-sample CD loss at states x on grid indices n [B] (1..grid): the label is the target
    network's f after one teacher step, computed without grad."""
    t, s = n.float() / grid, (n.float() - 1) / grid
    with torch.no_grad():
        x_s = teacher_step(teacher, x, t, s, y, w, bound=bound)
        label = consistency_fn(target, x_s, s, y, w, bound=bound)
    return distance(consistency_fn(student, x, t, y, w, bound="none"), label, loss, huber_c)


def make_target(student, decay):
    """The target network: an EMA copy of the student, or (decay 0) the student itself."""
    return student if decay == 0 else copy.deepcopy(student).requires_grad_(False)


def update_target(target, student, decay):
    if target is not student:
        C.ema_update(target, student, decay)


def sampling_times(steps, grid):
    """The K sampling times 1 = tau_1 > ... > tau_K (and 0); a one-line error if off the grid."""
    if steps <= 0 or grid <= 0 or grid % steps:
        H.fail(f"--steps {steps} sampling times 1 - i/{steps} are not on the --grid {grid} "
               f"training grid t_n = n/{grid}: use a --grid that is a multiple of --steps")
    return C.time_grid(steps)


# ---- DDIL's three state sources: (x_t, t, y, w) -----------------------------------------------

def guidance_weights(n, w_min, w_max, device="cpu"):
    """w ~ U[w_min, w_max] per state (LCM samples one guidance weight per training example)."""
    return w_min + (w_max - w_min) * torch.rand(n, device=device)


def data_states(x0, y, w, grid):
    """Forward-diffused data at random grid times:
    x_t = alpha x0 + sigma eps, t = n/N, n ~ U{1..N}."""
    t = torch.randint(1, grid + 1, (x0.shape[0],), device=x0.device) / grid
    return C.diffuse(x0, t), t, y, w


@torch.no_grad()
def teacher_rollout(teacher, x1, y, w, *, steps, grid, bound):
    """The teacher's own DDIM trajectory from noise x1 on the N-step training grid (at labels y,
    guidance w), kept at the K sampling times tau_1..tau_K: [K n] states, tau-major."""
    sub = grid // steps
    ts = C.time_grid(grid)[:(steps - 1) * sub + 1]  # 1 ... tau_K on the training grid
    x, states = C.ddim_sample(C.guided(teacher, y, w), x1, ts, bound=bound, return_states=True)
    return C.trajectory(states[::sub] + [x], C.time_grid(steps)[:-1], y, w)


@torch.no_grad()
def student_rollout(student, x1, y, w, *, steps, bound, expert=None, grid=0, p=0.0, fill=False):
    """The student's own K-step sampler (re-noising) from noise x1: its states at tau_1..tau_K.
    With p > 0 each step is, with probability p, the expert's own action from that state (its
    DDIM on the training grid down to the next tau: --rollout-teacher-p, DAgger's mixture).
    fill: each own state at tau_i is carried on by the expert's DDIM along the training grid
    to the grid time just above tau_{i+1}, giving states at all N grid times t_N..t_1."""
    taus, fine, sub = C.time_grid(steps), C.time_grid(grid or steps), (grid or steps) // steps
    noises = [torch.randn_like(x1) for _ in range(steps)]

    def own_step(x, i, idx):  # one re-noising step tau_i -> tau_{i+1}
        denoise = C.guided(student, C.select(y, idx), w[idx])
        return C.ddim_sample(denoise, x, taus[i:i + 2], bound=bound, noises=[noises[i][idx]])

    def expert_step(x, i, idx):  # the expert's DDIM on the training grid over the same interval
        denoise = C.guided(expert, C.select(y, idx), w[idx])
        return C.ddim_sample(denoise, x, fine[i * sub:(i + 1) * sub + 1], bound=bound)

    states = C.dagger_rollout(x1, steps - 1, own_step, expert_step, p)
    if not fill:
        return C.trajectory(states, taus[:-1], y, w)
    filled = []  # from tau_i along fine[i sub .. (i+1) sub - 1], the grid times above tau_i+1
    for i, x in enumerate(states):
        x_end, visited = C.ddim_sample(C.guided(expert, y, w), x, fine[i * sub:(i + 1) * sub],
                                       bound=bound, return_states=True)
        filled += visited + [x_end]
    return C.trajectory(filled, fine[:-1], y, w)


# ---- one training step ------------------------------------------------------------------------

def train_step(net, student, target, teacher, opt, x, t, y, w, cfg):
    """One CD update on states (x, t, y, w): the loss over --grad-accum micro-batches, grad clip,
    the optimiser step, the target's EMA update. Returns the per-sample losses."""
    n = (t * cfg.grid).round().long()  # every state sits on the grid (rollouts: at the tau_i)
    opt.zero_grad(set_to_none=True)
    parts = []
    for sync, (x_m, n_m, y_m, w_m) in H.micro_batches(net, cfg.grad_accum, x, n, y, w):
        with sync:
            with H.autocast(x.device, cfg.bf16):
                losses = consistency_loss(net, target, teacher, x_m, n_m, cfg.grid, y_m, w_m,
                                          bound=cfg.bound, loss=cfg.loss, huber_c=cfg.huber_c)
            (losses.mean() / cfg.grad_accum).backward()
        parts.append(losses.detach())
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    opt.step()
    update_target(target, student, cfg.target_ema)
    return torch.cat(parts)


def check(cfg):
    H.check_positive(cfg, "iters", "batch_size", "log_every", "ckpt_every",
                     "buffer_size", "refresh", "refresh_every", "reference_steps", "grad_accum",
                     "shift_samples")
    E.check_sample_counts(cfg)
    if cfg.batch_size % cfg.grad_accum:
        H.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    if not 0 <= cfg.target_ema < 1:
        H.fail(f"--target-ema must be in [0, 1), got {cfg.target_ema}")
    if cfg.w_max < 0 or (cfg.w_max > 0 and not 0 <= cfg.w_min <= cfg.w_max):  # w_max 0: unguided
        H.fail(f"need 0 <= --w-min <= --w-max (or --w-max 0: unguided), got {cfg.w_min}, "
               f"{cfg.w_max}")
    sampling_times(cfg.steps, cfg.grid)
    return H.check_ddil(cfg)


def main(argv=None):
    cfg = H.parse_config(Config, argv, PRESETS)
    betas = check(cfg)
    rank, world, device, data = H.setup(cfg, "lcm_ddil")
    E.check_feature_extractor(cfg.dataset, device, cfg.inception_weights)
    teacher = load_teacher(cfg.teacher, cfg.dataset, device, cfg.cond, cfg.edm_repo, cfg.data_dir)
    K, N, nc = cfg.steps, cfg.grid, teacher.num_classes
    guided = nc > 0 and cfg.w_max > 0  # a w-conditioned student distils the guided teacher
    w_eval = 0.5 * (cfg.w_min + cfg.w_max) if guided else 0.0

    torch.manual_seed(cfg.seed)  # the w embedding's random init: same seed, same run
    student = make_student(teacher, cfg.student_head, w_embed=guided, width=cfg.student_width,
                           seed=cfg.seed)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if not os.path.isfile(ckpt_path):  # a fresh run fits a re-read v head first; a resume loads it
        P.warm_up_head(student, teacher, data, cfg.head_warmup, cfg.batch_size, cfg.lr, cfg.seed)
    target = make_target(student, cfg.target_ema)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    buffers = {"teacher": C.MixingBuffer(cfg.buffer_size),
               "student": C.MixingBuffer(cfg.buffer_size)}
    ck, step, train_time = H.resume(ckpt_path, device, student.config, {
        "net": student, "target": target if target is not student else None, "opt": opt,
        "buffers": buffers})
    shape = (teacher.config["in_ch"], teacher.config["resolution"], teacher.config["resolution"])
    nets = [student] if target is student else [student, target]
    H.check_free_space(cfg.out, nets, [student], 2 * cfg.buffer_size, shape, world)
    net = H.compile_trial(DDP(student) if world > 1 else student, cfg, shape, labels=guided,
                          w=guided)
    if H.is_main():
        print(f"lcm_ddil: K={K}, grid {N}, betas (data, teacher, student) = {betas}, bound "
              f"{cfg.bound}" + (f", w ~ U[{cfg.w_min:g}, {cfg.w_max:g}]" if nc else "") +
              f", global batch {cfg.batch_size * world}, {device}", flush=True)

    w_range = (cfg.w_min, cfg.w_max) if guided else (0.0, 0.0)

    def new_trajectories(n):  # noise, labels and guidance weights of n fresh rollouts
        return (torch.randn(n, *shape, device=device), C.random_labels(n, nc, device),
                guidance_weights(n, *w_range, device))

    # rollouts run as the samplers are evaluated: --sample-bound (--bound acts on the targets)
    def teacher_source(n):  # the teacher's DDIM on the N-step training grid, kept at the K times
        return teacher_rollout(teacher, *new_trajectories(n), steps=K, grid=N,
                               bound=cfg.sample_bound)

    own_len = N if cfg.student_states == "grid" else K  # states per own trajectory

    def student_source(n):  # the student's own K-step sampler, DAgger-mixed with the teacher
        return student_rollout(student, *new_trajectories(n), steps=K, bound=cfg.sample_bound,
                               expert=teacher, grid=N, p=cfg.rollout_teacher_p,
                               fill=cfg.student_states == "grid")

    protocol = dict(dataset=cfg.dataset, bound=cfg.sample_bound, seed=cfg.seed, device=device,
                    data_dir=cfg.data_dir, w=w_eval, inception_weights=cfg.inception_weights)
    batches = H.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    log = H.Logger(cfg.out, cfg.iters, step, desc="lcm_ddil")
    while step < cfg.iters:
        t0 = time.time()
        H.step_seed(cfg.seed, rank, step)
        n_data, n_teacher, n_student = C.source_counts(
            cfg.batch_size, C.ramped_betas(betas, step / cfg.iters, cfg.beta_ramp))
        refresh = cfg.refresh if step % cfg.refresh_every == 0 else 0
        x0, y0 = batches.get(step)
        x, t, y, w, src = C.cat_states(
            data_states(x0[:n_data], y0[:n_data], guidance_weights(n_data, *w_range, device), N),
            C.replay(buffers["teacher"], teacher_source, n_teacher, refresh, K),
            C.replay(buffers["student"], student_source, n_student, refresh, own_len))
        losses = train_step(net, student, target, teacher, opt, x, t, y if nc else None, w, cfg)
        step += 1
        train_time += time.time() - t0
        log.update()
        if step % cfg.log_every == 0 or step == cfg.iters:
            loss = losses.mean().item()
            H.check_finite_loss({"loss": loss}, step, ckpt_path)
            per_src = {f"loss_{s}": losses[src == i].mean().item()
                       for i, s in enumerate(C.SOURCES) if (src == i).any()}
            log.log(step, loss=loss, train_s=round(train_time, 3), **per_src)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            log.log(step, train_s=round(train_time, 3),
                    **E.fd_during_training(student, "renoise", K, cfg.eval_every_samples,
                                           **protocol))
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            H.save_checkpoint(ckpt_path, {
                "net": student.state_dict(), "model_config": student.config, "sampler": "renoise",
                "steps": K, "w": w_eval, "config": asdict(cfg), "step": step,
                "train_time_s": train_time, "opt": opt.state_dict(),
                "target": target.state_dict() if target is not student else None,
                "buffers": {name: buf.state_dict() for name, buf in buffers.items()},
            }, per_rank=("buffers",))
    log.close()

    # evaluation: the student at K = 1, 2, K; the teacher at the same K and at many steps
    student.eval()

    def imitation_error(x_t, t, y):  # the CD loss at a state, at the evaluation's w
        n_t = torch.full((len(x_t),), round(t * N), device=device)
        with torch.no_grad(), H.autocast(device, cfg.bf16):
            return consistency_loss(student, target, teacher, x_t, n_t, N, y, w_eval,
                                    bound=cfg.bound, loss=cfg.loss, huber_c=cfg.huber_c)
    ks = sorted({1, 2, K})
    E.final_evaluation(cfg.out, student, "renoise", ks, teacher, ks + [cfg.reference_steps],
                       cfg.eval_samples, imitation_error, cfg.shift_samples,
                       ref_samples=cfg.ref_samples,
                       extra={"it_per_s": step / train_time if train_time > 0 else None,
                              "train_time_s": train_time, "config": asdict(cfg)}, **protocol)
    H.barrier()
    return student


if __name__ == "__main__":
    main()
