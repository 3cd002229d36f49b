"""How good can a one-step copy of the digits teacher be? A capacity probe for DMD2's one step.

The teacher's 64-step DDIM is a deterministic map from noise z to a sample x(z). A copy of the
teacher trained to regress that map in one step (x0_hat(z, t = 1) against x(z), mean squared
error; Luhman & Luhman's knowledge distillation) has the easiest possible target: every label is
the teacher's own sample, with no distribution to match. Its FD against the data, on fresh noise,
is what one step of this network reaches with a paired target; DMD2's one-step G (which has no
pairs) can match it or, with its GAN on real data, beat it.

    python bench/one_step_probe.py      # about 10 minutes on this 2-core CPU

Writes bench/results/one_step_probe.json and .md: FD on 1000 fresh samples every 500 iterations
and FD on 2000 at the end, beside the teacher's at 64 steps (the same protocol as the scripts).
"""
import os
import shlex
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import harness as H  # noqa: E402
from teacher import load_teacher  # noqa: E402


@dataclass
class Config:
    pairs: int = H.flag(4096, "(noise, teacher sample) pairs to regress.")
    iters: int = H.flag(3000, "Training iterations.")
    batch_size: int = H.flag(64, "Batch size.")
    lr: float = H.flag(1e-4, "Adam's learning rate.")
    seed: int = H.flag(0, "Seed of the pairs, the batches and the evaluations.")
    out: str = H.flag("bench/results", "Where one_step_probe.json and .md go.")


def main(argv=None):
    cfg = H.parse_config(Config, argv)
    command = "python bench/one_step_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    T = load_teacher("", "digits")
    torch.manual_seed(cfg.seed)
    z = torch.randn(cfg.pairs, 1, 8, 8)
    with torch.no_grad():  # the teacher's 64-step DDIM from each z, as it is evaluated (clip)
        x = torch.cat([C.ddim_sample(C.guided(T), zb, C.time_grid(64), bound="clip")
                       for zb in z.split(4096)])
    G = C.student_of(T)
    opt = torch.optim.Adam(G.parameters(), lr=cfg.lr)
    one = torch.ones(cfg.batch_size)
    a1, s1 = C.alpha_sigma(one)
    curve = []
    for step in range(1, cfg.iters + 1):
        idx = torch.randint(0, cfg.pairs, (cfg.batch_size,))
        x0 = C.x0_from_v(z[idx], G(z[idx], one), C.bcast(a1, z[idx]), C.bcast(s1, z[idx]))
        loss = F.mse_loss(x0, x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            fd = E.fd_during_training(G, "renoise", 1, 1000, seed=cfg.seed + 1, bound="clip")["fd"]
            curve.append((step, fd, float(loss)))
            print(f"{step}: loss {float(loss):.4g}, FD {fd:.4g}", flush=True)
    G.eval()
    final, _ = E.evaluate_net(G, "renoise", 1, 2000, seed=cfg.seed, bound="clip")
    teacher, _ = E.evaluate_net(T, "ddim", 64, 2000, seed=cfg.seed, bound="clip", cached=True)
    res = {"command": command, "config": vars(cfg), "curve": curve, "fd": final["fd"],
           "precision": final["precision"], "recall": final["recall"],
           "teacher_fd": teacher["fd"], "wall_s": time.time() - t0}
    os.makedirs(cfg.out, exist_ok=True)
    H.write_json(res, os.path.join(cfg.out, "one_step_probe.json"))
    lines = ["# One step of the digits teacher's network, regressing its 64-step map", "",
             f"`{command}` ({res['wall_s'] / 60:.0f} min). FD on 1000 fresh samples every 500 "
             "iterations (loss: the batch's MSE):", "",
             "| iteration | loss | FD |", "|---|---|---|"]
    lines += [f"| {s} | {ls:.4g} | {fd:.4g} |" for s, fd, ls in curve]
    lines += ["", f"Final, 2000 samples: FD **{final['fd']:.4f}** (precision {final['precision']:.2f}, "
              f"recall {final['recall']:.2f}) against the teacher's {teacher['fd']:.4f} at 64 steps "
              f"(ratio {final['fd'] / teacher['fd']:.2f})."]
    with open(os.path.join(cfg.out, "one_step_probe.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
