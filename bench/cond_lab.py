"""The guided, class-conditional digits lab: PD, LCM and DMD2 distilled from the conditional
teacher (`teacher.py --cond`, trained on demand) at guidance weight w = 2, baseline and DDIL, one
seed each, with FD, KID and class-conditional accuracy; the teacher rows at the same w beside them.

    python bench/cond_lab.py                 # ~30 min on a 2-core CPU after the teacher (~17 min)
    python bench/cond_lab.py --only lcm      # one method

Each run is a subprocess into bench/out/cond_lab/<name> (gitignored); a run whose metrics.json
exists is skipped, so an interrupted lab resumes. The table goes to bench/results/cond_lab.md.
Every script evaluates with the same protocol as `python evaluate.py CKPT`: balanced labels, the
sampling bound clip, the student at w (its input for LCM; learnt for PD and DMD2), the teacher
classifier-free guided at the same w.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 2.0  # within the range guided distillation uses on class-conditional ImageNet (w in [0, 4])
RUNS = {  # name: (script, flags): each script's defaults, then its baseline (its own inputs)
    "pd-ddil": ("pd_ddil.py", ["--guidance", f"{W:g}"]),
    "lcm-ddil": ("lcm_ddil.py", ["--w-min", "1", "--w-max", "3"]),
    "dmd2-ddil": ("dmd2_ddil.py", ["--guidance", f"{W:g}"]),
    "pd-baseline": ("pd_ddil.py", ["--guidance", f"{W:g}", "--beta-data", "1", "--beta-student", "0"]),
    "lcm-baseline": ("lcm_ddil.py", ["--w-min", "1", "--w-max", "3", "--beta-data", "1", "--beta-student", "0"]),
    "dmd2-baseline": ("dmd2_ddil.py", ["--guidance", f"{W:g}", "--bound", "none"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="pd, lcm or dmd2")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "bench", "out", "cond_lab"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cond_lab.md"))
    args = p.parse_args()
    rows = []
    for name, (script, flags) in RUNS.items():
        if args.only and not name.startswith(args.only + "-"):
            continue
        out = os.path.join(args.runs_dir, name)
        cmd = [sys.executable, script, "--cond", "--out", out, *flags]
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            print("+ " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
        m = json.load(open(os.path.join(out, "metrics.json")))
        K = str(m["config"]["steps"])
        rows.append((name, m["student"][K], K, f"{script} " + " ".join(flags)))
        rows.append((f"teacher K={K} (w {m['w']:g})", m["teacher"][K], K, ""))
        rows.append(("teacher K=64", m["teacher"]["64"], "64", ""))
    lines = ["| run | K | FD | KID | cond. accuracy | entropy | flags (`python <script> --cond ...`) |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for name, r, K, cmd in rows:
        if name.startswith("teacher") and (name, K) in seen:
            continue
        seen.add((name, K))
        lines.append(f"| {name} | {K} | {r['fd']:.3f} | {r['kid']:.4f} | {r['cond_acc']:.3f} | "
                     f"{r['entropy']:.3f} | {cmd} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.only:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
