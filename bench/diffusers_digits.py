"""A published-style teacher on a CPU: a diffusers UNet2DModel trained as DDPM trains (eps
prediction, linear betas 1e-4..0.02 over 1000 steps, integer timesteps) on the embedded digits,
saved as a diffusers pipeline folder, then distilled by each method through
`--teacher diffusers:<folder>`, beside the same runs from our own digits teacher.

    pip install diffusers
    python bench/diffusers_digits.py                  # ~1 h on a quiet 2-core CPU
    python bench/diffusers_digits.py --iters 200 --budget smoke --out /tmp/dd --table /tmp/dd.md  # plumbing

Resumable: the teacher folder and every run's metrics.json are kept and skipped when present.
Writes bench/results/diffusers_digits.md (--table) and <out>/table.md: FD (1000 samples, sampling
bound clip) of each student at K = 1 (where it samples one step) and 4, and of each teacher's DDIM
at 4 and 64 steps. The DDPM teacher is distilled twice per method: the student a copy
of its eps head (`--student-head copy`: x0 at t = 1 through (z - s' eps) / a', a gain of 1/a' = 156)
and the head re-read as v and fitted to the teacher first (`--student-head v`, 300 iterations).
"""
import argparse
import copy
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
             "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
BUDGETS = {
    "full": {"pd": ["--iters-per-stage", "150"], "lcm": ["--iters", "500"],
             "dmd2": ["--iters", "300", "--batch-size", "32", "--teacher-substeps", "4"],
             "all": ["--eval-samples", "1000", "--ref-samples", "0"], "warmup": "300"},
    "smoke": {"pd": ["--teacher-steps", "8", "--iters-per-stage", "2"], "lcm": ["--iters", "2", "--reference-steps", "8"],
              "dmd2": ["--iters", "2", "--teacher-substeps", "2", "--reference-steps", "8"],
              "all": ["--eval-samples", "50", "--ref-samples", "0", "--batch-size", "8", "--shift-samples", "8"],
              "warmup": "2"},
}


def train_ddpm(out, iters, seed=0, batch=128, lr=1e-3):
    """DDPM's loss on the digits with a small UNet2DModel; the EMA weights are saved."""
    import diffusers
    import harness as H
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=16,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    ema = copy.deepcopy(unet).requires_grad_(False)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    batches = H.Batches(H.load_dataset("digits"), batch, seed)
    for step in range(iters):
        H.step_seed(seed, 0, step)
        x0, _ = batches.get(step)
        k = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(x0)
        a = abar[k].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, k).sample - eps).square().mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1e-3)
        if step % 500 == 0 or step == iters - 1:
            print(f"ddpm teacher step {step}: loss {loss.item():.4f}", flush=True)
    ema.save_pretrained(os.path.join(out, "unet"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    json.dump(SCHEDULER, open(os.path.join(out, "scheduler", "scheduler_config.json"), "w"), indent=2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=4000, help="DDPM teacher training iterations")
    p.add_argument("--budget", choices=BUDGETS, default="full")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "diffusers_digits"))
    p.add_argument("--table", default=os.path.join(ROOT, "bench", "results", "diffusers_digits.md"),
                   help="where the table goes (also <out>/table.md)")
    args = p.parse_args()
    teacher_dir = os.path.join(args.out, "ddpm-digits")
    if not os.path.isfile(os.path.join(teacher_dir, "scheduler", "scheduler_config.json")):
        train_ddpm(teacher_dir, args.iters)
    budget, rows = BUDGETS[args.budget], []
    # the DDPM teacher's students with both heads (published.student_copy), then our own teacher's
    for teacher_name, spec, head in (("diffusers DDPM", f"diffusers:{teacher_dir}", "copy"),
                                     ("diffusers DDPM", f"diffusers:{teacher_dir}", "v"), ("ours", "", "copy")):
        for method in ("pd", "lcm", "dmd2"):
            out = os.path.join(args.out, f"{method}-{'ddpm' if spec else 'ours'}" + ("-v" if head == "v" else ""))
            cmd = [sys.executable, f"{method}_ddil.py", "--out", out, *budget[method], *budget["all"]]
            cmd += ["--teacher", spec] if spec else []
            cmd += ["--student-head", "v", "--head-warmup", budget["warmup"]] if head == "v" else []
            if not os.path.isfile(os.path.join(out, "metrics.json")):
                print("+ " + " ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
            m = json.load(open(os.path.join(out, "metrics.json")))
            K = str(m["config"]["steps"])
            ref = max(m["teacher"], key=int)
            px = m["student"][K].get("paired_px")
            one = f"{m['student']['1']['fd']:.3f}" if "1" in m["student"] else "-"
            rows.append(f"| {teacher_name} | {head} | {method} | {one} | {m['student'][K]['fd']:.3f} | "
                        f"{'-' if px is None else f'{px:.4f}'} | {m['teacher'][K]['fd']:.3f} | "
                        f"{m['teacher'][ref]['fd']:.3f} |")
    table = ("| teacher | student head | method | student FD, K = 1 | student FD, K = 4 | paired px error, K = 4 "
             "| teacher DDIM, 4 steps | teacher DDIM, many steps |\n|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows) + "\n")
    command = " ".join(["python bench/diffusers_digits.py", *sys.argv[1:]])
    for path in (os.path.join(args.out, "table.md"), args.table):
        with open(path, "w") as fh:
            fh.write(f"command: `{command}`\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
