"""Mutation check of the fast tests: does each one-line break of a method's loop wiring (or of
its training target) make a test fail?

Each break is (name, file, the exact original text, its replacement). It is applied to a scratch
copy of the repository (the files `git ls-files` lists, untracked ones not ignored included, as
they are in the working tree), and the method's fast tests run there, its wiring tests first:

    python -m pytest -q -x -m "not slow" tests/test_wiring.py::test_<method>_wiring \
        tests/test_<method>.py

One line per break: caught (with the first failing test) or SURVIVED, and the tests' time. An
original text that no longer occurs exactly once in its file is "stale" (the code changed:
update the break). Exit status 1 if any break survived, is stale, or stopped pytest otherwise
(ERROR: a break that does not even import is no test of the tests). A baseline run of the same
tests without a break comes first: were it to fail, every break would look caught.

    python dev/mutations.py                 # every break, ~10 min on 2 CPU cores
    python dev/mutations.py --jobs 2        # two at a time, each in its own scratch copy
    python dev/mutations.py --list
    python dev/mutations.py --only pd-stages-all-teacher0 --only lcm-teacher-grid-K
"""
import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PD, LCM, DMD2 = "pd_ddil.py", "lcm_ddil.py", "dmd2_ddil.py"
TESTS = {  # the fast tests of a method's breaks: its wiring tests first (they fail soonest)
    PD: ["tests/test_wiring.py::test_pd_wiring", "tests/test_pd.py"],
    LCM: ["tests/test_wiring.py::test_lcm_wiring",
          "tests/test_wiring.py::test_lcm_student_states_grid_reaches_the_buffer", "tests/test_lcm.py"],
    DMD2: ["tests/test_wiring.py::test_dmd2_wiring", "tests/test_dmd2.py"],
}
BREAKS = [  # (name, file, original, replacement)
    # PD: the sources, the stage teachers, the training step
    ("pd-student-net-is-teacher", PD, "rollout_states(student, *new_trajectories(n)",
     "rollout_states(teacher, *new_trajectories(n)"),
    ("pd-teacher-net-is-student", PD, "rollout_states(teacher, *new_trajectories(n)",
     "rollout_states(student, *new_trajectories(n)"),
    ("pd-teacher-sub-1", PD, "N=N, sub=2,", "N=N, sub=1,"),
    ("pd-student-sub-2", PD, "N=N, sub=1,", "N=N, sub=2,"),
    ("pd-teacher-w-0", PD, "w=w, N=N, sub=2", "w=0.0, N=N, sub=2"),
    ("pd-teacher-w-every-stage", PD, "w=w, N=N, sub=2", "w=w_guide, N=N, sub=2"),
    ("pd-student-w-guided", PD, "w=0.0, N=N, sub=1", "w=w, N=N, sub=1"),
    ("pd-student-expert-teacher0", PD, "expert=teacher, expert_w=w",
     "expert=teacher0, expert_w=w"),
    ("pd-student-expert-w-0", PD, "expert_w=w,", "expert_w=0.0,"),
    ("pd-student-p-0", PD, "p=cfg.rollout_teacher_p)", "p=0.0)"),
    # the rollouts run as the samplers are evaluated: --sample-bound, not the training --bound
    ("pd-teacher-train-bound", PD, "bound=cfg.sample_bound)", "bound=cfg.bound)"),
    ("pd-student-train-bound", PD, "bound=cfg.sample_bound, expert=teacher",
     "bound=cfg.bound, expert=teacher"),
    ("pd-stages-all-teacher0", PD, "teacher0 if stage == 0", "teacher0 if True"),
    ("pd-stage-teacher-is-student", PD,
     "else copy.deepcopy(student).eval().requires_grad_(False)", "else student"),
    ("pd-train-step-teacher0", PD, "loss = train_step(net, student, teacher, opt",
     "loss = train_step(net, student, teacher0, opt"),
    ("pd-every-stage-guided", PD, "(w_guide if stage == 0 else 0.0)", "w_guide"),
    ("pd-target-ratio", PD, "r = s_s / s_t", "r = s_t / s_s"),
    # LCM
    ("lcm-student-net-is-teacher", LCM, "student_rollout(student, *new_trajectories(n)",
     "student_rollout(teacher, *new_trajectories(n)"),
    ("lcm-teacher-net-is-student", LCM, "teacher_rollout(teacher, *new_trajectories(n)",
     "teacher_rollout(student, *new_trajectories(n)"),
    ("lcm-teacher-grid-K", LCM, "steps=K, grid=N,", "steps=K, grid=K,"),
    ("lcm-student-no-grid", LCM, "grid=N, p=cfg.rollout_teacher_p", "p=cfg.rollout_teacher_p"),
    ("lcm-student-expert-student", LCM, "expert=teacher, grid=N", "expert=student, grid=N"),
    ("lcm-student-w-0", LCM, "student_rollout(student, *new_trajectories(n), steps=K",
     "student_rollout(student, *new_trajectories(n)[:2], torch.zeros(n), steps=K"),
    ("lcm-w-one-per-batch", LCM, "guidance_weights(n, *w_range, device))",
     "guidance_weights(1, *w_range, device).expand(n))"),
    ("lcm-w-range-from-0", LCM, "w_range = (cfg.w_min, cfg.w_max)", "w_range = (0.0, cfg.w_max)"),
    ("lcm-labels-dropped", LCM, "C.random_labels(n, nc, device),", "None,"),
    ("lcm-student-p-0", LCM, "p=cfg.rollout_teacher_p,", "p=0.0,"),
    ("lcm-student-fill-off", LCM, 'fill=cfg.student_states == "grid")', "fill=False)"),
    ("lcm-teacher-train-bound", LCM, "bound=cfg.sample_bound)", "bound=cfg.bound)"),
    ("lcm-student-train-bound", LCM, "steps=K, bound=cfg.sample_bound,",
     "steps=K, bound=cfg.bound,"),
    ("lcm-target-is-student", LCM, "label = consistency_fn(target, x_s",
     "label = consistency_fn(student, x_s"),
    # DMD2
    ("dmd2-student-net-is-teacher", DMD2, "backward_simulation(G, *new_trajectories(n)",
     "backward_simulation(T, *new_trajectories(n)"),
    ("dmd2-student-net-is-fake", DMD2, "backward_simulation(G, *new_trajectories(n)",
     "backward_simulation(fake, *new_trajectories(n)"),
    ("dmd2-teacher-net-is-student", DMD2, "teacher_rollout(T, *new_trajectories(n)",
     "teacher_rollout(G, *new_trajectories(n)"),
    ("dmd2-teacher-substeps-1", DMD2, "substeps=cfg.teacher_substeps, bound=",
     "substeps=1, bound="),
    ("dmd2-student-substeps-1", DMD2, "substeps=cfg.teacher_substeps, p=", "substeps=1, p="),
    ("dmd2-student-expert-G", DMD2, "expert=T,", "expert=G,"),
    ("dmd2-student-expert-w-0", DMD2, "expert_w=cfg.guidance,", "expert_w=0.0,"),
    ("dmd2-teacher-w-0", DMD2, "cfg.guidance, taus,", "0.0, taus,"),
    ("dmd2-labels-dropped", DMD2, "C.random_labels(n, nc, device)", "None"),
    ("dmd2-student-p-0", DMD2, "p=cfg.rollout_teacher_p)", "p=0.0)"),
    ("dmd2-teacher-train-bound", DMD2, "teacher_substeps, bound=cfg.sample_bound)",
     "teacher_substeps, bound=cfg.bound)"),
    ("dmd2-student-train-bound", DMD2, "taus, bound=cfg.sample_bound,", "taus, bound=cfg.bound,"),
    ("dmd2-real-fake-swapped", DMD2, "p_real, p_fake = x - x0_real, x - x0_fake",
     "p_real, p_fake = x - x0_fake, x - x0_real"),
    ("dmd2-karras-grid-flipped", DMD2, "-2 * ((lo + k * (hi - lo))", "-2 * ((hi + k * (lo - hi))"),
    ("dmd2-time-grid-is-karras", DMD2, 'if grid == "time":', 'if grid == "none":'),
    ("dmd2-dm-t-uniform", DMD2, "t = grid_t(x.shape[0], grid, k_min, k_max, x.device)",
     "t = torch.rand(x.shape[0], device=x.device)"),
    ("dmd2-auto-grid-always-karras", DMD2, 'return "time" if cfg.guidance > 0 else "karras"',
     'return "karras"'),
    ("dmd2-dm-grid-ignores-flag", DMD2, "noise_grid(cfg), cfg.dm_min_step, cfg.dm_max_step)",
     '"karras", cfg.dm_min_step, cfg.dm_max_step)'),
    ("dmd2-ema-never-updated", DMD2, "C.ema_update(G_eval, G, cfg.ema_decay)", "pass"),
    ("dmd2-ema-not-saved", DMD2, '"net": G_eval.state_dict(),', '"net": G.state_dict(),'),
    ("dmd2-fake-own-rows-data", DMD2, "x_f = torch.cat([x[own], x_o])",
     "x_f = torch.cat([x[~own], x_o])"),
    ("dmd2-fake-own-never", DMD2, 'if cfg.fake_states == "own" and K > 1', 'if False and K > 1'),
]


def scratch_copy():
    """A temporary copy of the repository's files as they are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tmp = tempfile.mkdtemp(prefix="mutations-")
    for rel in filter(None, out.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):  # (deleted in the working tree: skipped)
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(tmp, rel))
    return tmp


def run_tests(repo, files):
    """The fast tests in repo: (pytest's exit status, seconds, the first failing test or '')."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size break must not reuse a stale .pyc
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", *files],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    failed = [ln.split(" ")[1] for ln in r.stdout.splitlines()
              if ln.startswith(("FAILED ", "ERROR "))]
    return r.returncode, time.time() - t0, (failed[0] if failed else r.stdout[-300:].strip())


def try_break(repo, brk):
    """Apply one break in repo, run its tests, restore the file: the line to print, and
    whether the break was caught."""
    name, path, old, new = brk
    full = os.path.join(repo, path)
    with open(full) as fh:
        text = fh.read()
    if text.count(old) != 1:
        return f"stale: {name} ({path} holds {old!r} {text.count(old)} times)", False
    with open(full, "w") as fh:
        fh.write(text.replace(old, new))
    try:
        rc, secs, what = run_tests(repo, TESTS[path])
    finally:
        with open(full, "w") as fh:
            fh.write(text)
    verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR rc={rc}")
    return f"{verdict:10s} {name:30s} {secs:6.1f}s  {what if rc else ''}".rstrip(), rc == 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run this break only "
                    "(repeatable)")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unbroken run first")
    ap.add_argument("--jobs", type=int, default=1, help="breaks tried at once, each in its own "
                    "scratch copy (the times then include the contention)")
    args = ap.parse_args(argv)
    names = [b[0] for b in BREAKS]
    assert len(set(names)) == len(names), "duplicate break names"
    if args.list:
        for name, path, old, new in BREAKS:
            print(f"{name:30s} {path}: {old!r} -> {new!r}")
        return 0
    unknown = set(args.only or []) - set(names)
    if unknown:
        sys.exit(f"error: no break named {', '.join(sorted(unknown))} (see --list)")
    breaks = [b for b in BREAKS if not args.only or b[0] in args.only]

    repos = queue.Queue()
    for _ in range(max(1, min(args.jobs, len(breaks)))):
        repos.put(scratch_copy())
    try:
        if not args.no_baseline:  # a failing suite would count every break as caught
            files = sorted({f for b in breaks for f in TESTS[b[1]]})
            rc, secs, what = run_tests(repos.queue[0], files)
            print(f"{'baseline':10s} {'(no break)':30s} {secs:6.1f}s  "
                  f"{'passes' if rc == 0 else 'FAILS: ' + what}", flush=True)
            if rc != 0:
                return 1

        def job(brk):
            repo = repos.get()
            try:
                return try_break(repo, brk)
            finally:
                repos.put(repo)
        caught = 0
        with ThreadPoolExecutor(repos.qsize()) as pool:
            for line, ok in pool.map(job, breaks):  # printed in the list's order
                print(line, flush=True)
                caught += ok
    finally:
        while not repos.empty():
            shutil.rmtree(repos.get(), ignore_errors=True)
    print(f"{caught} of {len(breaks)} breaks caught")
    return 0 if caught == len(breaks) else 1


if __name__ == "__main__":
    sys.exit(main())
