"""The shipped digits teachers are what `python teacher.py` makes: train both with the defaults,
then compare weights and sample quality with assets/teacher-digits[-cond].pt.

    python bench/teachers.py            # trains both teachers (about 7 min each on 2 CPU cores)
    python bench/teachers.py --no-train # compares teachers already in --out

For each lab: the largest difference between the trained EMA weights and the shipped ones
relative to fp16's rounding (the shipped weights are the fp32 EMA rounded to fp16: a ratio <= 1
means the same weights), and FD / precision / recall of both at 64 DDIM steps on the same 2000
samples (same noise), against the real digits. Prints a markdown table with the command.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate as E  # noqa: E402
import teacher as T  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "teachers"),
                   help="where the trained teachers go")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="train the teachers with python teacher.py (their defaults) first")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per FD")
    args = p.parse_args(argv)
    print(f"command: python bench/teachers.py{'' if args.train else ' --no-train'} "
          f"--num-samples {args.num_samples}\n")
    rows = []
    for lab, cond in (("uncond", []), ("cond", ["--cond"])):
        out = os.path.join(args.out, f"teacher-digits{'-cond' if cond else ''}")
        if args.train and not os.path.isfile(os.path.join(out, "ckpt.pt")):
            t0 = time.time()
            subprocess.run([sys.executable, os.path.join(ROOT, "teacher.py"), "--out", out, *cond],
                           check=True, cwd=ROOT)
            print(f"trained {out} in {time.time() - t0:.0f} s", flush=True)
        shipped = T.shipped_teacher_path("digits", bool(cond))
        trained_net, _, trained = T.load_net(os.path.join(out, "ckpt.pt"))
        shipped_net, _, ship = T.load_net(shipped)
        ratio = max(float(((trained["ema"][k].float() - ship["ema"][k].float()).abs()
                           / (trained["ema"][k].float().abs() * 2.0 ** -11 + 6e-8)).max())
                    for k in ship["ema"] if ship["ema"][k].is_floating_point())
        for name, net in (("trained", trained_net), ("shipped", shipped_net)):
            m, _ = E.evaluate_net(net, "ddim", 64, args.num_samples, "digits", "clip", 0, "cpu")
            rows.append((lab, name, ratio, m["fd"], m["precision"], m["recall"]))
    print("| lab | teacher | weights: max diff / fp16 rounding | FD, 64 steps | precision | recall |")
    print("|---|---|---|---|---|---|")
    for lab, name, ratio, fd, prec, rec in rows:
        shown = f"{ratio:.2f}" if name == "trained" else ""
        print(f"| {lab} | {name} | {shown} | {fd:.4f} | {prec:.3f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
