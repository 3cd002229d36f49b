"""Progressive distillation (Salimans & Ho 2022) with DDIL mixing and the reflected formulation.

Stages halve the sampler: a teacher with 2N DDIM steps teaches a student with N (64 -> 32 -> ...
-> --steps); the student starts as a copy of the teacher and becomes the next stage's teacher.
For a state x_t at a student grid time t = i/N, the teacher takes two DDIM steps
t -> t' = t - 1/(2N) -> s = t - 1/N, giving z'' (x0_hat bounded by --bound in both steps). The
target is the x0 that makes one DDIM step from x_t land on z'':

    x_tilde = (z'' - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)
    (at s = 0: the teacher's last x0_hat)
    loss    = max(SNR_t, 1) * || x0_student - x_tilde ||^2,   x0_student = alpha_t x_t - sigma_t v

DDIL: the batch's states come from a mixture, round(B * beta) of each (common.cat_states):
forward-diffused data at the grid times (beta_data), states of the 2N-step teacher sampler at the
grid times (beta_teacher), states of the student's own N-step sampler (beta_student); rollouts
run without grad and go through a MixingBuffer (common.replay). Original PD: --beta-data 1
--beta-teacher 0 --beta-student 0 --bound none.

Guidance (class-conditional teachers, as guided PD, Meng et al. 2023): the first stage's teacher
is classifier-free guided at --guidance w, v = v_u + (1 + w)(v(x, y) - v_u); its student learns
the guided trajectory as a plain conditional network, and later stages distil that student.
Every state keeps the label it was made with (data: its own; rollouts: a uniform label).

Reflected formulation: --bound bounds x0_hat in the teacher steps behind every target.
--sample-bound (default clip, as published samplers) bounds every sampler that stands for a
policy: the evaluated samples and both rollouts, so DDIL trains on the states the evaluated
samplers visit (on-policy).
The student's x0 in the loss is NOT bounded (as PD's original): bounding it would kill or flip
the gradient outside [-1, 1]. Nothing is lost: x_tilde is a convex combination of the teacher's
two bounded x0_hats (both weights >= 0 since alpha/sigma falls with t), so it lies in [-1, 1],
and a student that matches it takes the same bounded step as the unbounded one, landing on z''.

Deviations from the paper's recipe: the rollouts are refreshed in one batched sampler call every
--refresh-every iterations (default N), so they cost about one (the student's N-step sampler) or
two (the teacher's 2N-step one) network calls of batch --refresh per iteration; the student has
no dropout (PD uses none).

    python pd_ddil.py                        # digits: the shipped teacher, 64 -> 4 steps, CPU
    python pd_ddil.py --cond --guidance 2    # the guided, class-conditional lab
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
import evaluate as E
import harness as H
import published as P
from teacher import build_net, load_teacher, make_student


@dataclass
class Config(H.DistillConfig):
    guidance: float = H.flag(0.0, "Classifier-free guidance weight w of the first stage's teacher "
                             "(class-conditional teachers only).")
    teacher_steps: int = H.flag(64, "The first stage's teacher sampler: its DDIM steps, halved "
                                "each stage down to --steps.")
    iters_per_stage: int = H.flag(400, "Training iterations of each stage.")
    stage_eval_samples: int = H.flag(500, "Samples of each stage's FD in log.jsonl.")
    iters: int = H.flag(0, "Stop after this many iterations in all, to resume later with the "
                        "same command (0 = every stage).")
    refresh_every: int = H.flag(0, "Iterations between refreshes of the rollout buffers "
                                "(0 = N, the stage's student steps).")
    lr: float = H.flag(5e-4, "Adam's learning rate at the start of each stage, decayed linearly "
                       "to 0 within it.")
    # the shared flags' defaults for PD on digits
    ckpt_every: int = 200
    log_every: int = 10


PRESETS = {  # per-process batch for 8 GPUs: 8 x 16 = 128, the published CIFAR-10 batch; on one GPU
    # pass --batch-size 128 (fits; --grad-accum 2 halves the activations). lr 5e-5 decayed to 0
    # per stage, 50k iterations per stage, grad-clip 1, no EMA, no dropout (the student trains in
    # eval mode)
    "cifar10": dict(lr=5e-5, iters_per_stage=50_000, batch_size=16, eval_samples=50_000,
                    ref_samples=0, ckpt_every=5000, log_every=100),
    # not a published recipe (PD published none at 64x64): the CIFAR-10 one at the same batch
    "imagenet64": dict(lr=5e-5, iters_per_stage=50_000, batch_size=16, eval_samples=50_000,
                       ref_samples=0, ckpt_every=5000, log_every=100, cond=True),
}


def stage_steps(teacher_steps, steps):
    """The students' step counts, one per stage: 64, 4 -> [32, 16, 8, 4]."""
    ratio = teacher_steps // steps if steps > 0 else 0
    if steps <= 0 or ratio < 2 or ratio * steps != teacher_steps or ratio & (ratio - 1):
        H.fail(f"--steps {steps} is not reachable by halving --teacher-steps {teacher_steps}: "
               f"use teacher_steps / 2^k with k >= 1 (e.g. --steps {max(1, teacher_steps // 16)})")
    return [teacher_steps >> k for k in range(1, int(math.log2(ratio)) + 1)]


# ----------------------------------------------------------------------------------------------
# the PD target and loss
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def pd_target(teacher, x_t, t, N, bound, y=None, w=0.0):
    """x_tilde: the x0 whose single DDIM step t -> s lands on the teacher's two steps (fp32); the
    teacher at labels y, classifier-free guided at w."""
    i = torch.round(t * N)  # grid index: the times are i/N exactly, whatever the state's source
    t, t_mid, s = i / N, (i - 0.5) / N, (i - 1) / N
    (a_t, s_t), (a_m, s_m), (a_s, s_s) = C.alpha_sigma(t), C.alpha_sigma(t_mid), C.alpha_sigma(s)
    v_teacher = C.guided(teacher, y, w)
    z1, _ = C.reflected_step(x_t, v_teacher(x_t, t).float(), a_t, s_t, a_m, s_m, bound=bound)
    z2, x0_last = C.reflected_step(z1, v_teacher(z1, t_mid).float(), a_m, s_m, a_s, s_s,
                                   bound=bound)
    r = s_s / s_t
    x_tilde = (z2 - C.bcast(r, x_t) * x_t) / C.bcast(a_s - r * a_t, x_t)
    return torch.where(C.bcast(s == 0, x_t).bool(), x0_last, x_tilde)


def pd_loss(student, teacher, x_t, t, N, bound, y=None, w=0.0, bf16=True):
    """Per-sample truncated-SNR loss max(SNR_t, 1) * mean_pixels (x0_student - x_tilde)^2; the
    student is a plain conditional network (it learns the guided teacher's steps)."""
    x_tilde = pd_target(teacher, x_t, t, N, bound, y, w)
    alpha, sigma = (C.bcast(c, x_t) for c in C.alpha_sigma(t))
    with H.autocast(x_t.device, bf16):
        v = student(x_t, t, y)
    x0 = alpha * x_t - sigma * v.float()  # unbounded: see the module docstring
    weight = torch.exp(C.logsnr(t)).clamp(min=1.0).to(x_t.device)
    return weight * (x0 - x_tilde).square().flatten(1).mean(1)


def train_step(net, student, teacher, opt, x_t, t, y, w, N, lr, cfg):
    """One PD update on states (x_t, t, y): the loss over --grad-accum micro-batches at learning
    rate lr, grad clip, the optimiser step. Returns the mean loss (a tensor)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for sync, (x_m, t_m, y_m) in H.micro_batches(net, cfg.grad_accum, x_t, t, y):
        with sync:
            loss_m = pd_loss(net, teacher, x_m, t_m, N, cfg.bound, y_m, w, cfg.bf16).mean()
            (loss_m / cfg.grad_accum).backward()
        loss = loss + loss_m.detach() / cfg.grad_accum
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    opt.step()
    return loss


# ----------------------------------------------------------------------------------------------
# DDIL state sources: forward-diffused data and sampler rollouts, all at the student grid i/N
# ----------------------------------------------------------------------------------------------

def data_states(x0, y, N):
    """x_t = alpha x0 + sigma eps at grid times t = i/N, i ~ U{1..N}."""
    t = torch.randint(1, N + 1, (x0.shape[0],), device=x0.device).float() / N
    return C.diffuse(x0, t), t, y, None


@torch.no_grad()
def rollout_states(net, x1, y, w, N, sub, *, bound, expert=None, expert_w=0.0, p=0.0):
    """The trajectories of net's N*sub-step DDIM sampler from noise x1 (labels y, guidance w), kept
    at every sub-th state, i.e. at t = 1, (N-1)/N, ..., 1/N: (x [n N, ...], t, y, w), t-major.
    The teacher's rollouts run its own 2N-step sampler (sub = 2), the student's its N steps; with
    p > 0 each student step is, with probability p, the expert's (the stage teacher's two DDIM
    steps at its guidance expert_w): --rollout-teacher-p, DAgger's mixture."""
    ts, fine = C.time_grid(N * sub), C.time_grid(N * 2)

    def own_step(x, i, idx):  # net's sub DDIM steps from t = 1 - i/N to 1 - (i+1)/N
        denoise = C.guided(net, C.select(y, idx), w)
        return C.ddim_sample(denoise, x, ts[i * sub:(i + 1) * sub + 1], bound=bound)

    def expert_step(x, i, idx):  # the expert's two DDIM steps over the same interval
        denoise = C.guided(expert, C.select(y, idx), expert_w)
        return C.ddim_sample(denoise, x, fine[2 * i:2 * i + 3], bound=bound)

    states = C.dagger_rollout(x1, N - 1, own_step, expert_step, p)
    return C.trajectory(states, torch.arange(N, 0, -1).float() / N, y, w)


def stage_teacher(ck, path, device):
    """The teacher of the stage a checkpoint was written in (frozen)."""
    teacher = build_net(ck["teacher_config"]).to(device)
    H.load_weights(teacher, ck["teacher"], what=path)
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def check(cfg):
    """One-line errors for bad flags, before any work; returns (the stages' step counts, betas)."""
    stages = stage_steps(cfg.teacher_steps, cfg.steps)
    H.check_positive(cfg, "iters_per_stage", "batch_size", "buffer_size", "refresh",
                     "shift_samples", "ckpt_every",
                     "log_every", "grad_accum", "reference_steps")
    E.check_sample_counts(cfg)
    if cfg.batch_size % cfg.grad_accum:
        H.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    if cfg.iters < 0 or cfg.refresh_every < 0 or cfg.lr <= 0 or cfg.guidance < 0:
        H.fail("--iters, --refresh-every and --guidance must be >= 0 and --lr > 0")
    return stages, H.check_ddil(cfg)


def main(argv=None):
    cfg = H.parse_config(Config, argv, PRESETS)
    stages, betas = check(cfg)
    rank, world, device, data = H.setup(cfg, "pd_ddil")
    E.check_feature_extractor(cfg.dataset, device, cfg.inception_weights)
    teacher0 = load_teacher(cfg.teacher, cfg.dataset, device, cfg.cond, cfg.edm_repo, cfg.data_dir)
    nc = teacher0.num_classes
    w_guide = cfg.guidance if nc else 0.0  # the first teacher's guidance; later stages are plain

    # a copy of the teacher without dropout (or, --student-width < 1, a narrower network)
    student = make_student(teacher0, cfg.student_head, width=cfg.student_width, seed=cfg.seed)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if not os.path.isfile(ckpt_path):  # a fresh run fits a re-read v head first; a resume loads it
        P.warm_up_head(student, teacher0, data, cfg.head_warmup, cfg.batch_size, cfg.lr, cfg.seed)
    ck, step, train_time = H.resume(ckpt_path, device, student.config, {"net": student})
    shape = (student.config["in_ch"], student.config["resolution"], student.config["resolution"])
    H.check_free_space(cfg.out, [student, student], [student], 2 * cfg.buffer_size, shape, world)
    net = H.compile_trial(DDP(student) if world > 1 else student, cfg, shape, labels=nc > 0)
    ips, total = cfg.iters_per_stage, len(stages) * cfg.iters_per_stage
    stop = min(cfg.iters or total, total)
    batches = H.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    log = H.Logger(cfg.out, total, step, desc="pd_ddil")
    if H.is_main():
        print(f"pd_ddil: stages {cfg.teacher_steps} -> {' -> '.join(map(str, stages))}, "
              f"{ips} iterations each; batch {cfg.batch_size} x {world}, betas {betas} "
              f"(data, teacher, student); bound {cfg.bound}"
              + (f"; guidance w {w_guide:g}" if nc else "") + f"; {device}", flush=True)
    # the student is sampled plainly (w = 0): it has learnt the guided teacher's steps
    protocol = dict(dataset=cfg.dataset, bound=cfg.sample_bound, seed=cfg.seed, device=device,
                    data_dir=cfg.data_dir, w=0.0, inception_weights=cfg.inception_weights)

    def new_trajectories(n):  # noise and labels of n fresh rollouts
        return torch.randn(n, *shape, device=device), C.random_labels(n, nc, device)

    for stage in range(step // ips, len(stages)):
        if step >= stop:
            break
        N, w = stages[stage], (w_guide if stage == 0 else 0.0)
        resuming = ck is not None and ck["stage"] == stage  # mid-stage: restore its state
        if resuming:
            teacher = stage_teacher(ck, ckpt_path, device)
        else:  # a new stage: the student becomes the teacher; fresh optimiser and buffers
            teacher = (teacher0 if stage == 0
                       else copy.deepcopy(student).eval().requires_grad_(False))
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        buffers = {k: C.MixingBuffer(cfg.buffer_size) for k in ("teacher", "student")}
        if resuming:
            opt.load_state_dict(ck["opt"])
            for k, sd in ck.get("buffers", {}).items():
                buffers[k].load_state_dict(sd)
        ck = None
        every = cfg.refresh_every or N

        # rollouts run as the samplers are evaluated: --sample-bound (--bound acts on the targets)
        def teacher_source(n):  # the stage teacher's own 2N-step sampler, at its guidance
            return rollout_states(teacher, *new_trajectories(n), w=w, N=N, sub=2,
                                  bound=cfg.sample_bound)

        def student_source(n):  # the student's own N-step sampler, DAgger-mixed with the teacher
            return rollout_states(student, *new_trajectories(n), w=0.0, N=N, sub=1,
                                  bound=cfg.sample_bound, expert=teacher, expert_w=w,
                                  p=cfg.rollout_teacher_p)
        while step < min((stage + 1) * ips, stop):
            t0 = time.time()
            H.step_seed(cfg.seed, rank, step)
            j = step - stage * ips  # iteration within the stage
            n_data, n_teacher, n_student = C.source_counts(
                cfg.batch_size, C.ramped_betas(betas, step / total, cfg.beta_ramp))
            refresh = cfg.refresh if j % every == 0 else 0
            x0, y0 = batches.get(step)
            x_t, t, y, _, _ = C.cat_states(
                data_states(x0[:n_data], y0[:n_data], N),
                C.replay(buffers["teacher"], teacher_source, n_teacher, refresh, N),
                C.replay(buffers["student"], student_source, n_student, refresh, N))
            loss = train_step(net, student, teacher, opt, x_t, t, y if nc else None, w, N,
                              cfg.lr * (1.0 - j / ips), cfg)
            step += 1
            train_time += time.time() - t0
            log.update()
            if step % cfg.log_every == 0 or step == stop:
                loss_v = loss.item()
                H.check_finite_loss({"loss": loss_v}, step, ckpt_path)
                log.log(step, stage=stage, N=N, loss=loss_v, lr=opt.param_groups[0]["lr"],
                        train_s=round(train_time, 3))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                # the student of every stage sampled at the final K: one curve across stages
                log.log(step, stage=stage, train_s=round(train_time, 3),
                        **E.fd_during_training(student, "ddim", cfg.steps, cfg.eval_every_samples,
                                               **protocol))
            if step % cfg.ckpt_every == 0 or step == stop or step == (stage + 1) * ips:
                H.save_checkpoint(ckpt_path, {
                    "net": student.state_dict(), "model_config": student.config, "sampler": "ddim",
                    "steps": N, "w": w_guide, "config": asdict(cfg),
                    "teacher": teacher.state_dict(), "teacher_config": teacher.config,
                    "opt": opt.state_dict(), "step": step, "stage": stage,
                    "train_time_s": train_time,
                    "buffers": {k: b.state_dict() for k, b in buffers.items()},
                }, per_rank=("buffers",))
        if step < (stage + 1) * ips:  # stopped by --iters mid-stage; the checkpoint is written
            break
        stage_metrics, _ = E.evaluate_net(student, "ddim", N, cfg.stage_eval_samples, **protocol)
        log.log(step, stage=stage, N=N, stage_fd=stage_metrics["fd"])
    log.close()
    if step < total:
        if H.is_main():
            print(f"stopped at step {step} of {total}; rerun the same command to resume",
                  flush=True)
        return student

    # final evaluation: the student at K; the first teacher at K and at 64 with its guidance
    K, w = cfg.steps, (w_guide if len(stages) == 1 else 0.0)
    if ck is not None:  # a finished run, rerun: only the evaluation is left to do
        teacher = stage_teacher(ck, ckpt_path, device)
    student.eval()

    def imitation_error(x_t, t, y):  # the final student vs the last stage's teacher
        with torch.no_grad():
            return pd_loss(student, teacher, x_t, torch.full((len(x_t),), t, device=device), K,
                           cfg.bound, y, w, cfg.bf16)
    E.final_evaluation(cfg.out, student, "ddim", [K], teacher0, sorted({K, cfg.reference_steps}),
                       cfg.eval_samples, imitation_error, cfg.shift_samples,
                       ref_samples=cfg.ref_samples, w_student=0.0,
                       extra={"it_per_s": total / max(train_time, 1e-9), "train_time_s": train_time,
                              "config": asdict(cfg)}, **{**protocol, "w": w_guide})
    H.barrier()
    return student


if __name__ == "__main__":
    main()
