"""Consistency distillation, LCM style in pixel space, with DDIL state mixing.

Grid t_n = n / N (n = 1..N). For a state x_{t_n} the frozen teacher T takes one DDIM step
(x0 bounded by --bound; for a class-conditional teacher with guidance w ~ U[w_min, w_max]):
    x_hat_{n-1} = alpha_{n-1} x0_T + sigma_{n-1} eps_T                  (= x0_T when t_{n-1} = 0)
The consistency function carries the boundary condition f(x, 0) = x by construction:
    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t),   x0_hat = alpha x - sigma v
    c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2),  sd = 0.5, s = 10000
(LCM's 10 per step of 1000), and the student S (initialised from T) minimises
    L = d( f_S(x_{t_n}, t_n),  stopgrad f_target(x_hat_{n-1}, t_{n-1}) ),  d = L2 or pseudo-Huber
with target = EMA of S (--target-ema; 0 = S itself). DDIL draws x_{t_n} from forward-diffused
data at random grid times (beta_data), the teacher's DDIM rollouts (beta_teacher) or the student's
own re-noised sampler (beta_student), the last two at the K sampling times through a replay buffer.
Multistep sampling at tau_i = 1 - (i-1)/K: x0_hat = bound(f_S(x, tau_i)), x = alpha x0_hat + sigma z.
Since c_skip(tau) < 0.25 / (s tau)^2 = 4e-8 at every tau >= 1/4, f = x0_hat to float precision at
the sampling times of K <= 4 (1.6e-7 at K = 8), so the sampler is common.generate(kind="renoise").

Defaults from one digits measurement (800 iterations, teacher at 1000 steps; FD at K = 4, 64-step
teacher 1.85): betas (0.5, 0, 0.5) + bound none 1.46, LCM baseline (1, 0, 0) + none 1.62, (1, 0, 0)
+ reflect 3.02, (0.5, 0, 0.5) + reflect 3.25: reflecting the teacher's targets hurt here.
Deviations: the default grid is 48 (LCM: 50) so that it contains the sampling times of K = 1, 2,
4; the student's f in the loss is unbounded (the bound acts on targets and in sampling);
rollouts are pushed in batches every --refresh-every iterations (cheaper on CPU than a few
trajectories every iteration); exact resume holds per rank-0 buffer (world size 1).

    python lcm_ddil.py                      # digits: trains the teacher if missing (~6 min)
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


@dataclass
class Config:
    dataset: str = "digits"
    data_dir: str = "data"
    out: str = ""                 # default runs/lcm_ddil-<dataset>
    teacher: str = ""             # default runs/teacher-<dataset>/ckpt.pt (trained when missing)
    iters: int = 800
    batch_size: int = 128         # per process
    lr: float = 5e-4
    grad_clip: float = 1.0
    seed: int = 0
    device: str = ""
    ckpt_every: int = 200
    log_every: int = 20
    steps: int = 4                # K student sampling steps (also evaluated at 1 and 2)
    grid: int = 48                # N training grid times t_n = n / N; must contain the K times
    target_ema: float = 0.95      # 0 = the student itself with stop-gradient
    loss: str = "l2"              # l2 or huber (pseudo-Huber)
    huber_c: float = 1e-3
    w_min: float = 1.0            # guidance weights (class-conditional teachers only)
    w_max: float = 4.0
    beta_data: float = 0.5
    beta_teacher: float = 0.0
    beta_student: float = 0.5
    beta_ramp: float = 0.0        # beta_student rises from 0 over this fraction of training
    eval_every: int = 0           # FD at K every this many iterations into log.jsonl (0 = off)
    eval_every_samples: int = 250  # ... on this many samples (the same noise each time)
    bound: str = "none"           # reflect/clip act on teacher targets and sampling (see below)
    buffer_size: int = 1024       # states per rollout source
    refresh: int = 4              # fresh trajectories per iteration and source, on average
    refresh_every: int = 8        # ... pushed as one batch every this many iterations
    eval_samples: int = 2000
    teacher_steps: int = 64       # the many-step teacher row beside the student
    bf16: bool = True             # autocast on CUDA only
    compile: bool = False         # torch.compile the student's training forward (eager on failure)
    grad_accum: int = 1           # micro-batches per step (batch_size / grad_accum each; DDP no_sync)

    CHOICES = {"bound": C.BOUNDS, "loss": ("l2", "huber")}


PRESETS = {  # CD's published recipes (Song et al. 2023, Table 3); batch_size per process for 8 GPUs
    # CIFAR-10: global batch 512 = 8 x 64, lr 4e-4, 800k iterations, target = the student (mu = 0)
    "cifar10": dict(iters=800_000, batch_size=64, lr=4e-4, target_ema=0.0, ckpt_every=5000,
                    log_every=100, buffer_size=8192, eval_samples=50_000),
    # ImageNet-64: global batch 2048 = 8 x 256, each step in 8 micro-batches of 32 (DDP no_sync);
    # lr 8e-6, 600k iterations, target EMA mu = 0.95
    "imagenet64": dict(iters=600_000, batch_size=256, grad_accum=8, lr=8e-6, target_ema=0.95,
                       ckpt_every=5000, log_every=100, buffer_size=8192, eval_samples=50_000),
}

SD, S_T = 0.5, 10_000.0  # consistency scalings: sigma_data and the time scale (10 per 1/1000)


def scalings(t):
    """(c_skip, c_out) at t: c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x."""
    st = S_T * torch.as_tensor(t, dtype=torch.float64)
    return (SD ** 2 / (st ** 2 + SD ** 2)).float(), (st / (st ** 2 + SD ** 2).sqrt()).float()


def consistency_fn(net, x, t, y=None, w=None, bound="none"):
    """f(x, t) = c_skip x + c_out bound(x0_hat(x, t)) for per-sample times t [B]."""
    alpha, sigma = (C.bcast(c, x) for c in C.alpha_sigma(t))
    x0 = C.bound_x0(C.x0_from_v(x, net(x, t, y, w).float(), alpha, sigma), bound)
    c_skip, c_out = (C.bcast(c, x) for c in scalings(t))
    return c_skip * x + c_out * x0


def teacher_v(teacher, x, t, y=None, w=None):
    """The teacher's v, with classifier-free guidance at per-sample weights w (common.guided)."""
    return C.guided(teacher, y, 0.0 if w is None else w, teacher.num_classes)(x, t)


@torch.no_grad()
def teacher_step(teacher, x, t, s, y=None, w=None, bound="reflect"):
    """One DDIM step t -> s (per-sample [B]) of the teacher; lands on x0_hat where s = 0."""
    (a_t, s_t), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(s)
    x_s, x0 = C.reflected_step(x, teacher_v(teacher, x, t, y, w), a_t, s_t, a_s, s_s, bound=bound)
    return torch.where(C.bcast(s, x) == 0, x0, x_s)


def distance(a, b, loss="l2", c=1e-3):
    """Per-sample d: mean squared error, or LCM's elementwise pseudo-Huber sqrt(d^2 + c^2) - c."""
    d2 = (a.float() - b.float()).square()
    return (d2 if loss == "l2" else (d2 + c * c).sqrt() - c).flatten(1).mean(1)


def consistency_loss(student, target, teacher, x, n, grid, y=None, w=None, bound="reflect",
                     loss="l2", huber_c=1e-3):
    """Per-sample CD loss at states x on grid indices n [B] (1..grid): the label is the target
    network's f after one teacher step, computed without grad."""
    t, s = n.float() / grid, (n.float() - 1) / grid
    with torch.no_grad():
        label = consistency_fn(target, teacher_step(teacher, x, t, s, y, w, bound), s, y, w, bound)
    return distance(consistency_fn(student, x, t, y, w), label, loss, huber_c)


def make_target(student, decay):
    """The target network: an EMA copy of the student, or (decay 0) the student itself."""
    return student if decay == 0 else copy.deepcopy(student).requires_grad_(False)


def update_target(target, student, decay):
    if target is not student:
        C.ema_update(target, student, decay)


def sampling_times(steps, grid):
    """The K sampling times 1 = tau_1 > ... > tau_K (and 0); a one-line error if off the grid."""
    if steps <= 0 or grid <= 0 or grid % steps:
        C.fail(f"--steps {steps} sampling times 1 - i/{steps} are not on the --grid {grid} "
               f"training grid t_n = n/{grid}: use a --grid that is a multiple of --steps")
    return C.time_grid(steps)


def check(cfg):
    C.check_positive(cfg, "iters", "batch_size", "log_every", "ckpt_every", "eval_samples",
                     "buffer_size", "refresh", "refresh_every", "teacher_steps", "grad_accum")
    if cfg.batch_size % cfg.grad_accum:
        C.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    if not 0 <= cfg.target_ema < 1:
        C.fail(f"--target-ema must be in [0, 1), got {cfg.target_ema}")
    if cfg.w_min > cfg.w_max:
        C.fail(f"--w-min {cfg.w_min} is above --w-max {cfg.w_max}")
    sampling_times(cfg.steps, cfg.grid)
    return C.check_ddil(cfg)


def main(argv=None):
    cfg = C.parse_config(Config, argv, PRESETS)
    cfg.out = cfg.out or os.path.join("runs", f"lcm_ddil-{cfg.dataset}")
    betas = check(cfg)
    rank, world, device = C.init_dist(cfg.device)
    data = C.load_dataset(cfg.dataset, cfg.data_dir)
    teacher, _ = C.load_teacher(cfg.teacher, cfg.dataset, device)
    C.save_config(cfg, cfg.out)
    taus, K, N = sampling_times(cfg.steps, cfg.grid), cfg.steps, cfg.grid

    # student = teacher (+ a zero-initialised w embedding when the teacher is class-conditional)
    cond = teacher.num_classes > 0
    student = C.UNet(**{**teacher.config, "w_embed": cond}).to(device)
    C.load_weights(student, teacher.state_dict(), "teacher", strict=not cond)
    target = make_target(student, cfg.target_ema)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    buffers = {"teacher": C.MixingBuffer(cfg.buffer_size), "student": C.MixingBuffer(cfg.buffer_size)}
    ckpt_path, step, train_time = os.path.join(cfg.out, "ckpt.pt"), 0, 0.0
    if os.path.isfile(ckpt_path):
        ck = C.load_checkpoint(ckpt_path, map_location=device)
        if ck.get("model_config") != student.config:
            C.fail(f"{ckpt_path} holds a model of another shape; use a fresh --out or the same "
                   f"--dataset / --teacher")
        C.load_weights(student, ck["net"], ckpt_path)
        if target is not student:  # (a run saved with --target-ema 0 has no separate target)
            C.load_weights(target, ck["net"] if ck["target"] is None else ck["target"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        for name, buf in buffers.items():
            buf.load_state_dict(ck["buffers"][name])
        step, train_time = ck["step"], ck.get("train_time_s", 0.0)
        if C.is_main():
            print(f"resuming from {ckpt_path} at step {step}", flush=True)
    net = DDP(student) if world > 1 else student
    res, m = teacher.config["resolution"], cfg.batch_size // cfg.grad_accum  # trial forward shape
    net = C.maybe_compile(net, torch.zeros(m, teacher.config["in_ch"], res, res, device=device),
                          torch.rand(m, device=device),
                          *((torch.zeros(m, dtype=torch.long, device=device), torch.ones(m, device=device))
                            if cond else ()), enabled=cfg.compile)
    if C.is_main():
        print(f"lcm_ddil: K={K}, grid {N}, betas (data, teacher, student) = {betas}, bound "
              f"{cfg.bound}, global batch {cfg.batch_size * world}, {device}", flush=True)

    batches = C.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    shape = (teacher.config["in_ch"], teacher.config["resolution"], teacher.config["resolution"])

    def labels_and_w(m):
        if not cond:
            return None, None
        return (torch.randint(0, teacher.num_classes, (m,), device=device),
                cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(m, device=device))

    def data_states(m):  # forward-diffused data at random grid times
        x0, y = batches.get(step)
        x0, y = x0[:m], (y[:m] if cond else torch.full((m,), -1, device=device))
        t = torch.randint(1, N + 1, (m,), device=device) / N
        alpha, sigma = (C.bcast(c, x0) for c in C.alpha_sigma(t))
        return alpha * x0 + sigma * torch.randn_like(x0), t, y

    def rollout(src, m):  # m trajectories of the teacher's DDIM / the student's sampler, K states each
        x1 = torch.randn(m, *shape, device=device)
        if m == 0:
            return x1, torch.zeros(0, device=device), None
        y, w = labels_and_w(m)
        if src == "teacher":
            v_fn, noises = (lambda x, t: teacher_v(teacher, x, t, y, w)), None
        else:
            v_fn, noises = (lambda x, t: student(x, t, y, w)), [torch.randn_like(x1) for _ in range(K)]
        with C.autocast(device, cfg.bf16):
            _, states = C.ddim_sample(v_fn, x1, taus, cfg.bound, noises, return_states=True)
        return (torch.cat(states).float(), taus[:-1].repeat_interleave(m).to(device),
                y.repeat(K) if cond else None)

    rollouts = {src: (lambda m, src=src: rollout(src, m)) for src in buffers}

    def checkpoint():
        C.save_checkpoint(ckpt_path, {
            "net": student.state_dict(), "model_config": student.config, "sampler": "renoise",
            "steps": K, "config": asdict(cfg), "step": step, "train_time_s": train_time,
            "opt": opt.state_dict(),
            "target": target.state_dict() if target is not student else None,
            "buffers": {name: buf.state_dict() for name, buf in buffers.items()}})

    import evaluate as E  # after init_dist: evaluation splits sampling over ranks
    w_mid = 0.5 * (cfg.w_min + cfg.w_max)
    sampler = C.AtW(student, w_mid) if cond else student
    ev = dict(dataset=cfg.dataset, bound=cfg.bound, seed=cfg.seed, device=device, data_dir=cfg.data_dir)
    log = C.Logger(cfg.out, cfg.iters, step, desc="lcm_ddil")
    while step < cfg.iters:
        t0 = time.time()
        C.step_seed(cfg.seed, rank, step)
        counts = C.source_counts(cfg.batch_size, C.ramped_betas(betas, step / cfg.iters, cfg.beta_ramp))
        refresh = cfg.refresh * cfg.refresh_every if step % cfg.refresh_every == 0 else 0
        x, t, y, src = C.mixed_states(counts, data_states, buffers, rollouts, refresh)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(len(y), device=device) if cond else None
        y = y if cond else None
        n = (t * N).round().long()  # every state sits on the grid (rollouts: at the tau_i)
        opt.zero_grad(set_to_none=True)
        parts = []
        for sync, (x_m, n_m, y_m, w_m) in C.micro_batches(net, cfg.grad_accum, x, n, y, w):
            with sync:
                with C.autocast(device, cfg.bf16):
                    losses_m = consistency_loss(net, target, teacher, x_m, n_m, N, y_m, w_m, cfg.bound,
                                                cfg.loss, cfg.huber_c)
                (losses_m.mean() / cfg.grad_accum).backward()
            parts.append(losses_m.detach())
        losses = torch.cat(parts)
        loss = losses.mean()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        update_target(target, student, cfg.target_ema)
        step += 1
        train_time += time.time() - t0
        log.update()
        if step % cfg.log_every == 0 or step == cfg.iters:
            loss_v = loss.item()
            if loss_v != loss_v or abs(loss_v) == float("inf"):
                C.fail(f"loss is {loss_v} at step {step}; the last good checkpoint is {ckpt_path}; "
                       f"lower --lr and rerun (it resumes)")
            per_src = {f"loss_{s}": losses[src == i].mean().item()
                       for i, s in enumerate(C.SOURCES) if counts[i]}
            log.log(step, loss=loss_v, train_s=round(train_time, 3), **per_src)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            log.log(step, train_s=round(train_time, 3),
                    **E.fd_during_training(sampler, "renoise", K, cfg.eval_every_samples, **ev))
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            checkpoint()
    log.close()
    it_per_s = step / train_time if train_time > 0 else None

    # evaluation: the student at K = 1, 2, K; the teacher at the same K and at many steps
    student.eval()
    y_eval = torch.arange(cfg.eval_samples) % teacher.num_classes if cond else None
    eval_ks = sorted({1, 2, K})
    rows, samples = {}, None
    for k in eval_ks:
        rows[str(k)], x_k = E.evaluate_net(sampler, "renoise", k, cfg.eval_samples, y=y_eval, **ev)
        samples = x_k if k == K else samples
    teacher_rows = E.reference_rows(teacher, eval_ks + [cfg.teacher_steps], cfg.eval_samples, **ev)
    result = {"student": rows, "teacher": {str(k): m for k, m in teacher_rows.items()}}
    if C.is_main():
        # covariate shift: the CD loss on forward-diffused data vs on the student's own states
        def error_fn(x_t, t):  # (conditional: the null label at w_mid, as grid_states samples)
            n_t = torch.full((len(x_t),), round(t * N), device=device)
            yy, ww = (None, None) if not cond else (
                torch.full((len(x_t),), teacher.num_classes, device=device),
                torch.full((len(x_t),), w_mid, device=device))
            with torch.no_grad(), C.autocast(device, cfg.bf16):
                return consistency_loss(student, target, teacher, x_t, n_t, N, yy, ww, cfg.bound,
                                        cfg.loss, cfg.huber_c)
        data_st, own_st = E.grid_states(sampler, "renoise", K, min(cfg.eval_samples, 1000), **ev)
        result["covariate_shift"] = E.covariate_shift(error_fn, data_st, own_st)
        result.update(it_per_s=it_per_s, train_time_s=train_time, config=asdict(cfg))
        C.save_grid(samples[:64], os.path.join(cfg.out, "samples.png"), nrow=8)
        C.write_json(result, os.path.join(cfg.out, "metrics.json"))
        print(f"{'':>12} {'fd':>10} {'kid':>10} {'precision':>9} {'recall':>7} {'entropy':>8}")
        for k in eval_ks:
            print(E.fmt_row(f"student K={k}", rows[str(k)]))
        for k, m in teacher_rows.items():
            print(E.fmt_row(f"teacher K={k}", m))
        cs = result["covariate_shift"]
        print("covariate shift (t: err_own / err_data): " +
              ", ".join(f"{t:.2f}: {r:.2f}" for t, r in zip(cs["t"], cs["ratio"])))
    C.barrier()
    return result


if __name__ == "__main__":
    main()
