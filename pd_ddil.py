"""Progressive distillation (Salimans & Ho 2022) with DDIL mixing and the reflected formulation.

Stages halve the sampler: a teacher with 2N DDIM steps teaches a student with N (64 -> 32 -> ...
-> --steps); the student starts as a copy of the teacher and becomes the next stage's teacher.
For a state x_t at a student grid time t = i/N, the teacher takes two DDIM steps
t -> t' = t - 1/(2N) -> s = t - 1/N, giving z'' (x0_hat bounded by --bound in both steps). The
target is the x0 that makes one DDIM step from x_t land on z'':

    x_tilde = (z'' - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)
    (at s = 0: the teacher's last x0_hat)
    loss    = max(SNR_t, 1) * || x0_student - x_tilde ||^2,   x0_student = alpha_t x_t - sigma_t v

DDIL: the batch's states come from a mixture, round(B * beta) of each (common.mixed_states):
forward-diffused data at the grid times (beta_data), states of the 2N-step teacher sampler at the
grid times (beta_teacher), states of the student's own N-step sampler (beta_student); rollouts
run without grad and go through a MixingBuffer. Original PD: --beta-data 1 --beta-teacher 0
--beta-student 0 --bound none.

Reflected formulation: --bound bounds x0_hat in every teacher step, every rollout and sampling.
The student's x0 in the loss is NOT bounded (as PD's original): bounding it would kill or flip
the gradient outside [-1, 1]. Nothing is lost: x_tilde is a convex combination of the teacher's
two bounded x0_hats (both weights >= 0 since alpha/sigma falls with t), so it lies in [-1, 1],
and a student that matches it takes the same bounded step as the unbounded one, landing on z''.

Defaults (measured on digits, one seed, 150 iterations per stage, 500 eval samples): betas
0.5 / 0 / 0.5 with --bound none gave the 4-step student FD 0.076 against 0.086 for original PD
and 0.097 for the same betas with --bound reflect, so reflect is available but not the default.

Deviations from the paper's recipe: the rollouts are refreshed in one batched sampler call every
--refresh-every iterations (default N), so they cost about one network call of batch --refresh
per iteration; the student trains in eval mode (PD uses no dropout; nothing else in the U-Net
depends on the mode).

    python pd_ddil.py                                         # digits, 64 -> 4 steps, CPU
    python pd_ddil.py --beta-data 1 --beta-student 0 --bound none --out runs/pd-baseline
    torchrun --nproc_per_node=8 pd_ddil.py --dataset cifar10
"""
import copy
import math
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
    out: str = ""                  # default runs/pd_ddil-<dataset>
    teacher: str = ""              # "" = runs/teacher-<dataset>/ckpt.pt (trained first if missing)
    teacher_steps: int = 64        # the first stage's teacher sampler
    steps: int = 4                 # K, the final student's sampler; teacher_steps / 2^stages
    iters_per_stage: int = 400
    iters: int = 0                 # stop after this many iterations in all (0 = every stage); rerun resumes
    batch_size: int = 64           # per process
    lr: float = 5e-4               # Adam, decayed linearly to 0 within each stage
    grad_clip: float = 1.0
    beta_data: float = 0.5
    beta_teacher: float = 0.0
    beta_student: float = 0.5
    beta_ramp: float = 0.0         # beta_student rises from 0 over this fraction of training
    eval_every: int = 0            # FD at K every this many iterations into log.jsonl (0 = off)
    eval_every_samples: int = 250  # ... on this many samples (the same noise each time)
    bound: str = "none"            # measured: reflect hurt PD on digits (module docstring)
    buffer_size: int = 1024        # states per rollout source
    refresh: int = 32              # trajectories per refresh, in one batched sampler call
    refresh_every: int = 0         # iterations between refreshes; 0 = N (about --refresh fresh states / iteration)
    eval_samples: int = 2000
    stage_eval_samples: int = 500  # each stage's FD in log.jsonl
    shift_samples: int = 500       # states per grid time for the covariate-shift diagnostic
    seed: int = 0
    device: str = ""
    ckpt_every: int = 200
    log_every: int = 10
    bf16: bool = True              # student forward under autocast on CUDA; targets stay fp32
    compile: bool = False          # torch.compile the student's training forward (eager on failure)
    grad_accum: int = 1            # micro-batches per step (batch_size / grad_accum each; DDP no_sync)

    CHOICES = {"bound": C.BOUNDS, "dataset": tuple(C.DATASETS)}


PRESETS = {  # per-process batch for 8 GPUs: 8 x 16 = 128, the published CIFAR-10 batch; on one GPU
    # pass --batch-size 128 (fits; --grad-accum 2 halves the activations). lr 5e-5 decayed to 0 per
    # stage, 50k iterations per stage, grad-clip 1, no EMA, no dropout (the student trains in eval mode)
    "cifar10": dict(lr=5e-5, iters_per_stage=50_000, batch_size=16, eval_samples=50_000,
                    ckpt_every=5000, log_every=100),
    # not a published recipe (DESIGN names none for PD at 64x64): the CIFAR-10 one at the same batch
    "imagenet64": dict(lr=5e-5, iters_per_stage=50_000, batch_size=16, eval_samples=50_000,
                       ckpt_every=5000, log_every=100),
}


def stage_steps(teacher_steps, steps):
    """The students' step counts, one per stage: 64, 4 -> [32, 16, 8, 4]."""
    ratio = teacher_steps // steps if steps > 0 else 0
    if steps <= 0 or ratio < 2 or ratio * steps != teacher_steps or ratio & (ratio - 1):
        C.fail(f"--steps {steps} is not reachable by halving --teacher-steps {teacher_steps}: "
               f"use teacher_steps / 2^k with k >= 1 (e.g. --steps {max(1, teacher_steps // 16)})")
    return [teacher_steps >> k for k in range(1, int(math.log2(ratio)) + 1)]


# ----------------------------------------------------------------------------------------------
# the PD target and loss
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def pd_target(teacher, x_t, t, N, bound, y=None):
    """x_tilde: the x0 whose single DDIM step t -> s lands on the teacher's two steps (fp32)."""
    i = torch.round(t * N)  # grid index: the times come from i/N exactly, whatever the state's source
    t, t_mid, s = i / N, (i - 0.5) / N, (i - 1) / N
    (a_t, s_t), (a_m, s_m), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(t_mid), C.alpha_sigma(s)
    z1, _ = C.reflected_step(x_t, teacher(x_t, t, y).float(), a_t, s_t, a_m, s_m, bound=bound)
    z2, x0_last = C.reflected_step(z1, teacher(z1, t_mid, y).float(), a_m, s_m, a_s, s_s, bound=bound)
    r = s_s / s_t
    x_tilde = (z2 - C.bcast(r, x_t) * x_t) / C.bcast(a_s - r * a_t, x_t)
    return torch.where(C.bcast(s == 0, x_t).bool(), x0_last, x_tilde)


def pd_loss(student, teacher, x_t, t, N, bound, y=None, bf16=True):
    """Per-sample truncated-SNR loss max(SNR_t, 1) * mean_pixels (x0_student - x_tilde)^2."""
    x_tilde = pd_target(teacher, x_t, t, N, bound, y)
    alpha, sigma = (C.bcast(c, x_t) for c in C.alpha_sigma(t))
    with C.autocast(x_t.device, bf16):
        v = student(x_t, t, y)
    x0 = alpha * x_t - sigma * v.float()  # unbounded: see the module docstring
    weight = torch.exp(C.logsnr(t)).clamp(min=1.0).to(x_t.device)
    return weight * (x0 - x_tilde).square().flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# DDIL state sources: forward-diffused data and sampler rollouts, all at the student grid i/N
# ----------------------------------------------------------------------------------------------

def data_states(x0, y, N):
    """x_t = alpha x0 + sigma eps at grid times t = i/N, i ~ U{1..N}."""
    t = torch.randint(1, N + 1, (x0.shape[0],), device=x0.device).float() / N
    alpha, sigma = (C.bcast(c, x0) for c in C.alpha_sigma(t))
    return alpha * x0 + sigma * torch.randn_like(x0), t, y


@torch.no_grad()
def rollout_states(net, n, N, sub, bound, shape, num_classes, device):
    """n trajectories of the N*sub-step DDIM sampler from noise; every sub-th state, i.e. the
    states at t = 1, (N-1)/N, ..., 1/N, flattened: (x [n N, ...], t [n N], y [n N], -1 = none)."""
    if n == 0:  # no refresh this iteration
        return torch.zeros(0, *shape, device=device), torch.zeros(0, device=device), None
    y = torch.randint(num_classes, (n,), device=device) if num_classes else None
    x1 = torch.randn(n, *shape, device=device)
    _, states = C.ddim_sample(C.guided(net, y), x1, C.time_grid(N * sub), bound, return_states=True)
    t = (torch.arange(N, 0, -1, device=device).float() / N).repeat_interleave(n)
    return torch.cat(states[::sub]), t, (y.repeat(N) if y is not None else None)


def stage_teacher(ck, path, device):
    """The teacher of the stage a checkpoint was written in (frozen)."""
    teacher = C.UNet(**ck["model_config"]).to(device)
    C.load_weights(teacher, ck["teacher"], what=path)
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = C.parse_config(Config, argv, PRESETS)
    cfg.out = cfg.out or os.path.join("runs", f"pd_ddil-{cfg.dataset}")
    stages = stage_steps(cfg.teacher_steps, cfg.steps)
    C.check_positive(cfg, "iters_per_stage", "batch_size", "buffer_size", "refresh",
                     "eval_samples", "stage_eval_samples", "shift_samples", "ckpt_every",
                     "log_every", "grad_accum")
    if cfg.batch_size % cfg.grad_accum:
        C.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    if cfg.iters < 0 or cfg.refresh_every < 0 or cfg.lr <= 0:
        C.fail("--iters and --refresh-every must be >= 0 and --lr > 0")
    betas = C.check_ddil(cfg)
    rank, world, device = C.init_dist(cfg.device)
    data = C.load_dataset(cfg.dataset, cfg.data_dir)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    ck = C.load_checkpoint(ckpt_path, map_location=device) if os.path.isfile(ckpt_path) else None
    if ck is not None:  # a resume must continue the same schedule, or it is not the same run
        old = ck.get("config", {})
        for k in ("teacher_steps", "steps", "iters_per_stage", "batch_size", "seed"):
            if old.get(k) != getattr(cfg, k):
                C.fail(f"{ckpt_path} was trained with --{k.replace('_', '-')} {old.get(k)}, not "
                       f"{getattr(cfg, k)}: pass the same value to resume, or a fresh --out")
    teacher0, _ = C.load_teacher(cfg.teacher, cfg.dataset, device)
    C.save_config(cfg, cfg.out)

    # the student starts as a copy of the teacher; eval mode throughout (PD: no dropout)
    student = copy.deepcopy(teacher0).requires_grad_(True)
    step, train_time = 0, 0.0
    if ck is not None:
        C.load_weights(student, ck["net"], what=ckpt_path)
        step, train_time = ck["step"], ck["train_time_s"]
        if C.is_main():
            print(f"resuming from {ckpt_path} at step {step} (stage {ck['stage']})", flush=True)
    net = DDP(student) if world > 1 else student
    shape = (student.config["in_ch"], student.config["resolution"], student.config["resolution"])
    m = cfg.batch_size // cfg.grad_accum  # trial forward at the training micro-batch shape
    net = C.maybe_compile(net, torch.zeros(m, *shape, device=device), torch.rand(m, device=device),
                          torch.zeros(m, dtype=torch.long, device=device) if student.num_classes else None,
                          enabled=cfg.compile)
    ips, total = cfg.iters_per_stage, len(stages) * cfg.iters_per_stage
    stop = min(cfg.iters or total, total)
    num_classes = student.num_classes
    batches = C.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    log = C.Logger(cfg.out, total, step, desc="pd_ddil")
    if C.is_main():
        print(f"pd_ddil: stages {cfg.teacher_steps} -> {' -> '.join(map(str, stages))}, "
              f"{ips} iterations each; batch {cfg.batch_size} x {world}, betas {betas} "
              f"(data, teacher, student); bound {cfg.bound}; {device}", flush=True)
    import evaluate as E  # after init_dist: evaluation splits sampling over ranks

    def checkpoint():
        C.save_checkpoint(ckpt_path, {
            "net": student.state_dict(), "model_config": student.config, "sampler": "ddim",
            "steps": N, "config": asdict(cfg), "teacher": teacher.state_dict(),
            "opt": opt.state_dict(), "step": step, "stage": stage, "train_time_s": train_time,
            "buffers": {k: b.state_dict() for k, b in buffers.items()}})

    for stage in range(step // ips, len(stages)):
        if step >= stop:
            break
        N = stages[stage]
        if ck is not None and ck["stage"] == stage:  # resuming mid-stage: restore its state
            teacher = stage_teacher(ck, ckpt_path, device)
            opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
            opt.load_state_dict(ck["opt"])
            buffers = {k: C.MixingBuffer(cfg.buffer_size) for k in ("teacher", "student")}
            for k, sd in ck["buffers"].items():
                buffers[k].load_state_dict(sd)
        else:  # a new stage: the student becomes the teacher; fresh optimiser and buffers
            teacher = copy.deepcopy(student).requires_grad_(False)
            opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
            buffers = {k: C.MixingBuffer(cfg.buffer_size) for k in ("teacher", "student")}
        ck = None
        rollouts = {"teacher": lambda n: rollout_states(teacher, n, N, 2, cfg.bound, shape, num_classes, device),
                    "student": lambda n: rollout_states(student, n, N, 1, cfg.bound, shape, num_classes, device)}
        every = cfg.refresh_every or N
        while step < min((stage + 1) * ips, stop):
            t0 = time.time()
            C.step_seed(cfg.seed, rank, step)
            j = step - stage * ips  # iteration within the stage
            x0, y0 = batches.get(step)
            counts = C.source_counts(cfg.batch_size, C.ramped_betas(betas, step / total, cfg.beta_ramp))
            x_t, t, y, _ = C.mixed_states(
                counts, lambda n: data_states(x0[:n], y0[:n], N), buffers, rollouts,
                refresh=cfg.refresh if j % every == 0 else 0)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (1.0 - j / ips)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for sync, (x_m, t_m, y_m) in C.micro_batches(net, cfg.grad_accum, x_t, t,
                                                         y if num_classes else None):
                with sync:
                    loss_m = pd_loss(net, teacher, x_m, t_m, N, cfg.bound, y_m, cfg.bf16).mean()
                    (loss_m / cfg.grad_accum).backward()
                loss = loss + loss_m.detach() / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            train_time += time.time() - t0
            log.update()
            if step % cfg.log_every == 0 or step == stop:
                loss_v = loss.item()
                if not math.isfinite(loss_v):
                    C.fail(f"loss is {loss_v} at step {step}; the last good checkpoint is "
                           f"{ckpt_path}; lower --lr and rerun (it resumes)")
                log.log(step, stage=stage, N=N, loss=loss_v, lr=opt.param_groups[0]["lr"],
                        train_s=round(train_time, 3))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                # the student of every stage sampled at the final K: one curve across stages
                log.log(step, stage=stage, train_s=round(train_time, 3),
                        **E.fd_during_training(student, "ddim", cfg.steps, cfg.eval_every_samples,
                                               dataset=cfg.dataset, bound=cfg.bound, seed=cfg.seed,
                                               device=device, data_dir=cfg.data_dir))
            if step % cfg.ckpt_every == 0 or step == stop:
                checkpoint()
        if step < (stage + 1) * ips:  # stopped by --iters mid-stage; the checkpoint is written
            break
        m, _ = E.evaluate_net(student, "ddim", N, cfg.stage_eval_samples, cfg.dataset, cfg.bound,
                              cfg.seed, device, cfg.data_dir)
        log.log(step, stage=stage, N=N, stage_fd=m["fd"])
        checkpoint()
    log.close()
    if step < total:
        if C.is_main():
            print(f"stopped at step {step} of {total}; rerun the same command to resume", flush=True)
        return student

    # final evaluation: the student at K, the teacher at K and 64 beside it, covariate shift
    K = cfg.steps
    if ck is not None:  # a finished run, rerun: only the evaluation is left to do
        teacher = stage_teacher(ck, ckpt_path, device)
    ev = dict(dataset=cfg.dataset, bound=cfg.bound, seed=cfg.seed, device=device, data_dir=cfg.data_dir)
    m_student, samples = E.evaluate_net(student, "ddim", K, cfg.eval_samples, **ev)
    m_teacher = E.reference_rows(teacher0, sorted({K, 64}), cfg.eval_samples, **ev)
    data_st, own_st = E.grid_states(student, "ddim", K, cfg.shift_samples, **ev)
    with torch.no_grad():  # the imitation error: the final student vs the last stage's teacher
        shift = E.covariate_shift(
            lambda x, t: pd_loss(student, teacher, x, torch.full((len(x),), t, device=device), K,
                                 cfg.bound, None, cfg.bf16), data_st, own_st)
    C.save_grid(samples[:64], os.path.join(cfg.out, "samples.png"), nrow=8)
    C.write_json({"student": {str(K): m_student},
                  "teacher": {str(k): v for k, v in m_teacher.items()},
                  "covariate_shift": shift, "it_per_s": total / max(train_time, 1e-9),
                  "train_time_s": train_time, "config": asdict(cfg)},
                 os.path.join(cfg.out, "metrics.json"))
    if C.is_main():
        print(E.HEADER)
        print(E.fmt_row(f"student {K}", m_student))
        for k, v in m_teacher.items():
            print(E.fmt_row(f"teacher {k}", v))
        print("covariate shift (err_own / err_data per t): " +
              " ".join(f"{t:.2f}:{r:.2f}" for t, r in zip(shift["t"], shift["ratio"])), flush=True)
    C.barrier()
    return student


if __name__ == "__main__":
    main()
