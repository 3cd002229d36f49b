"""How far the teachers' predictions of the clean image leave the data range [-1, 1] along their
own sampler: what `--bound reflect` folds back during training.

    python bench/x0_range.py                       # both digits teachers, ~1 min on one core
    python bench/x0_range.py --guidance 0 2 4 --num-samples 1000

For each teacher (unconditional; conditional at each guidance weight, balanced labels), a
--steps-step unbounded DDIM from the same noise, recording x0_hat = alpha x_t - sigma v at every
step: the share of pixels outside [-1, 1], their mean excess (|x0_hat| - 1)_+ over all pixels and
the largest |x0_hat|. Prints a markdown table (with the command) at a few sampling times.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import teacher as T  # noqa: E402


@torch.no_grad()
def x0_range(denoise, x, ts):
    """[(t, share outside [-1, 1], mean excess, max |x0_hat|)] at each step of an unbounded DDIM."""
    rows = []

    def probe(x, t):
        v = denoise(x, t)
        alpha, sigma = C.alpha_sigma(t[0])
        x0 = alpha * x - sigma * v
        rows.append((float(t[0]), (x0.abs() > 1).float().mean().item(),
                     (x0.abs() - 1).clamp(min=0).mean().item(), x0.abs().max().item()))
        return v
    C.ddim_sample(probe, x, ts, bound="none")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/teacher-digits/ckpt.pt")
    p.add_argument("--teacher-cond", default="runs/teacher-digits-cond/ckpt.pt")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 2.0])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    cfg = p.parse_args(argv)
    torch.set_num_threads(1)
    ts = C.time_grid(cfg.steps)
    show = {1.0, 0.75, 0.5, 0.25, float(ts[-2])}
    print("command: python bench/x0_range.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n| teacher | t | share of x0_hat outside [-1, 1] | mean excess | max abs(x0_hat) |")
    print("|---|---|---|---|---|")
    labs = [("unconditional", cfg.teacher, False, 0.0)]
    labs += [(f"conditional, w = {w:g}", cfg.teacher_cond, True, w) for w in cfg.guidance]
    for name, path, cond, w in labs:
        net, _ = T.load_teacher(path, "digits", cond=cond)
        gen = torch.Generator().manual_seed(cfg.seed)  # the same noise for every teacher
        x = torch.randn(cfg.num_samples, 1, 8, 8, generator=gen)
        y = E.eval_labels(cfg.num_samples, net.config["num_classes"]) if cond else None
        for t, share, excess, top in x0_range(C.guided(net, y, w), x, ts):
            if any(abs(t - s) < 1e-6 for s in show):
                print(f"| {name} | {t:.2f} | {share:.3f} | {excess:.3f} | {top:.2f} |")


if __name__ == "__main__":
    main()
