"""Weights digests of tiny runs of every method, guided and unguided, all three DDIL sources on.

A refactor that claims "behaviour unchanged" prints the same digests before and after:

    python dev/digests.py > before.json   # on the old code
    python dev/digests.py > after.json    # on the new code
    diff before.json after.json

Each run is a few iterations on CPU from a teacher trained for 20 iterations (about 2 min in all).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_SOURCES = ["--beta-data", "1", "--beta-teacher", "1", "--beta-student", "1",
               "--rollout-teacher-p", "0.5", "--buffer-size", "16", "--refresh", "2",
               "--eval-samples", "4", "--shift-samples", "4", "--ref-samples", "0",
               "--reference-steps", "2", "--seed", "3"]
RUNS = {
    "pd": ["pd_ddil.py", "--teacher-steps", "8", "--steps", "2", "--iters-per-stage", "3",
           "--batch-size", "12", "--stage-eval-samples", "4", "--refresh-every", "2"],
    "lcm": ["lcm_ddil.py", "--iters", "4", "--batch-size", "12", "--steps", "2", "--grid", "8",
            "--refresh-every", "2"],
    "dmd2": ["dmd2_ddil.py", "--iters", "4", "--batch-size", "12", "--steps", "2",
             "--fake-updates", "2", "--teacher-substeps", "2", "--bound", "none"],
}
GUIDED = {"pd": ["--guidance", "2"], "lcm": [], "dmd2": ["--guidance", "2"]}


def digest(state_dict):
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def main():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lab, cond in (("uncond", []), ("cond", ["--cond"])):
            teacher = os.path.join(tmp, f"teacher-{lab}")
            run([os.path.join(ROOT, "teacher.py"), "--iters", "20", "--out", teacher,
                 "--sample-steps", "4", "--sample-count", "4", *cond], tmp)
            for method, args in RUNS.items():
                run_out = os.path.join(tmp, f"{method}-{lab}")
                run([os.path.join(ROOT, args[0]), *args[1:], *ALL_SOURCES, *cond,
                     *(GUIDED[method] if cond else []), "--teacher", os.path.join(teacher, "ckpt.pt"),
                     "--out", run_out], tmp)
                ck = torch.load(os.path.join(run_out, "ckpt.pt"), weights_only=True)
                out[f"{method}-{lab}"] = digest(ck["net"])
                print(f"{method}-{lab}: {out[f'{method}-{lab}']}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
