"""Network FLOPs per training iteration of each script at the cifar10 / imagenet64 presets, and
the GPU-hours they imply: the estimate docs/reproduce.md quotes.

    python bench/flops.py                          # ~10 s on a CPU
    python bench/flops.py --peak-tflops 989 --utilization 0.3

F, one network forward of one sample, is counted by torch.utils.flop_counter on the preset
U-Net (a multiply-add is 2 FLOPs). A backward costs 2F. Per iteration and rank, at each script's
preset flags (its own parse_config, so the counts follow the flags):
- teacher.py: B (1 + 2) F.
- PD: per state the teacher's two DDIM steps (2F, 4F when classifier-free guided: stage 0 of a
  guided run) and the student's forward and backward (3F); rollouts: --refresh trajectories of
  the teacher's 2N steps and of the student's N steps every N iterations.
- LCM: per state one teacher step (2F guided), the target's forward and the student's forward
  and backward (1F + 3F); rollouts every --refresh-every iterations: --refresh teacher
  trajectories on the training grid down to tau_K ((K-1) grid / K steps) and student ones (K-1).
- DMD2: G's sample (1F), mu_fake's v loss and the GAN's D loss on three batches with backward
  (9F); every --fake-updates iterations G's step: the real score (2F guided), the fake score
  (1F), the GAN through mu_fake to G (3F) and G's backward (2F); rollouts: G's backward
  simulation (K-1 steps) and the teacher's ((K-1) x substeps) per refresh.
The final evaluation (50k samples at the student's K and the teacher's rows up to 64 steps) is
listed apart. GPU-hours = FLOPs / (peak x utilization); the utilization is an assumption
(U-Nets in bf16 commonly reach 30-40% of an H100's dense peak), not a measurement.
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import dmd2_ddil  # noqa: E402
import harness as H  # noqa: E402
import lcm_ddil  # noqa: E402
import pd_ddil  # noqa: E402
import teacher  # noqa: E402


def forward_flops(preset, num_classes):
    """F: FLOPs of one forward of one sample through the preset U-Net."""
    net = C.build_unet(preset, num_classes=num_classes).eval()
    r, ch = net.config["resolution"], net.config["in_ch"]
    y = torch.zeros(1, dtype=torch.long) if num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, ch, r, r), torch.rand(1), y)
    return counter.get_total_flops()


def rollout_share(cfg):
    """(teacher on, student on) from the priors."""
    return cfg.beta_teacher > 0, cfg.beta_student > 0


def per_iteration(script, cfg, guided):
    """Forward-equivalents (in F) per iteration and rank; PD averaged over its stages."""
    B, g = cfg.batch_size, 2 if guided else 1
    if script == "teacher":
        return 3 * B
    teach, own = rollout_share(cfg)
    if script == "pd_ddil":
        stages = pd_ddil.stage_steps(cfg.teacher_steps, cfg.steps)
        per_state = (2 * g + 2 * (len(stages) - 1)) / len(stages) + 3  # guidance at stage 0 only
        return B * per_state + cfg.refresh * (2 * g * teach + 1 * own)  # every N its: N, 2N steps
    if script == "lcm_ddil":
        K, N = cfg.steps, cfg.grid
        rollouts = cfg.refresh * ((K - 1) * N / K * g * teach + (K - 1) * own) / cfg.refresh_every
        return B * (g + 1 + 3) + rollouts
    K = cfg.steps
    rollouts = cfg.refresh * (K - 1) * (cfg.teacher_substeps * g * teach + own) / cfg.refresh_every
    g_step = (g + 1 + 3 + 2) / cfg.fake_updates
    return B * (1 + 9 + g_step) + rollouts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=8, help="GPUs (the presets are per process for 8)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16 peak")
    p.add_argument("--utilization", type=float, default=0.3, help="assumed share of the peak")
    args = p.parse_args(argv)
    rate = args.peak_tflops * 1e12 * args.utilization
    print(f"command: python bench/flops.py --world {args.world} --peak-tflops {args.peak_tflops:g} "
          f"--utilization {args.utilization:g}\n")
    print("| preset | script | variant | F (GFLOP) | F per iteration and rank | iterations | "
          "training PFLOP | GPU-hours | final evaluation GPU-hours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset in ("cifar10", "imagenet64"):
        nc = 1000 if dataset == "imagenet64" else 0
        F = forward_flops(dataset, nc)
        for script, mod in (("teacher", teacher), ("pd_ddil", pd_ddil), ("lcm_ddil", lcm_ddil),
                            ("dmd2_ddil", dmd2_ddil)):
            variants = {"": []} if script == "teacher" else {
                "baseline": ["--beta-data", "1", "--beta-teacher", "0", "--beta-student", "0"],
                "+DDIL": []}
            if script == "dmd2_ddil":  # the preset is DMD2's one-step G; DDIL needs K >= 2
                k4 = ["--steps", "4", "--bound", "none"]
                variants = {"K = 1": [], "K = 4, baseline": k4,
                            "K = 4, +DDIL": k4 + ["--beta-data", "0.5", "--beta-student", "0.5"]}
            for name, flags in variants.items():
                cfg = H.parse_config(mod.Config, ["--dataset", dataset, *flags], mod.PRESETS)
                guided = bool(getattr(cfg, "cond", False)) and (
                    getattr(cfg, "guidance", 0) > 0 or getattr(cfg, "w_max", 0) > 0)
                iters = (len(pd_ddil.stage_steps(cfg.teacher_steps, cfg.steps)) * cfg.iters_per_stage
                         if script == "pd_ddil" else cfg.iters)
                per_it = per_iteration(script, cfg, guided)
                total = per_it * F * iters * args.world
                evaluation = 0.0
                if script != "teacher":  # student at 1, 2, K; teacher rows at 1, 2, K and 64
                    ks = sorted({1, 2, cfg.steps})
                    evaluation = cfg.eval_samples * (sum(ks) * 2 + cfg.reference_steps) * F
                print(f"| {dataset} | {script} | {name or '-'} | {F / 1e9:.1f} | {per_it:,.0f} | "
                      f"{iters:,} | {total / 1e15:,.0f} | {total / rate / 3600:,.0f} | "
                      f"{evaluation / rate / 3600:.2f} |")


if __name__ == "__main__":
    main()
