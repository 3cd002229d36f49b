"""The DDIL benchmark on digits (issue 15): labs x methods x variants x K x seeds, resumable, with
paired statistics against each baseline, aggregated into bench/results/.

    python bench/results.py                                   # --budget full: 280 runs, ~15 h (see BUDGET)
    python bench/results.py --lab uncond --seeds 0 1          # a part of it; rerun to resume
    python bench/results.py --lab cond --ks 4 --variants baseline,+DDIL   # the core comparison first
    python bench/results.py --budget smoke --seeds 0 --only lcm --lab uncond --out /tmp/r  # the plumbing
    python bench/results.py --no-run                          # re-aggregate the runs already there

Each run is a subprocess of pd_ddil.py / lcm_ddil.py / dmd2_ddil.py into its own --out under
--runs-dir (default bench/out/<budget>, gitignored); a run whose metrics.json exists is skipped, so
an interrupted benchmark resumes (and a half-done run resumes from its own ckpt.pt). Run names come
from the flags: <lab>-<method>-K<steps>-b<betas>-<bound>[-mix<p>]-s<seed>. Runs go seed by seed
(every run of seed 0, then seed 1, ...), so a benchmark stopped part-way has whole seeds to pair.

The grid (tables below; change them there):
  labs     uncond: the digits teacher (runs/teacher-digits, or --teacher);
           cond:   --cond, the class-conditional teacher (runs/teacher-digits-cond, trained on
                   demand by the first run, or --teacher-cond), guided at w = 2: PD and DMD2
                   distil the teacher guided at 2 (--guidance 2); LCM trains a w-conditioned
                   student on w in [1, 3] (--w-min 1 --w-max 3), evaluated at the middle, 2. Why 2:
                   inside the range published guided distillation uses on class-conditional
                   ImageNet, w in [0, 4] in this convention, v = v_u + (1 + w)(v_c - v_u).
  methods  pd, lcm, dmd2
  variants (beta_data, beta_teacher, beta_student), training --bound, --rollout-teacher-p:
           baseline        each method's own inputs: PD/LCM (1, 0, 0), DMD2 (0, 0, 1); bound none
           +DDIL           (0.5, 0, 0.5), bound none
           +DDIL+reflect   (0.5, 0, 0.5), bound reflect
           +DDIL mixed     (0.5, 0, 0.5), bound none, --rollout-teacher-p 0.5 (DAgger's mixture:
                           each step of the student's own rollout is the teacher's w.p. 0.5)
           +reflect        DMD2 only: (0, 0, 1), bound reflect, dmd2_ddil.py's default (the best
                           DMD2 variant of the earlier, issue-7 benchmark; remeasured here)
  K        2 and 4; and K = 1 for DMD2: baseline and +reflect only, since at K = 1 every input is
           noise and the betas change nothing.
  Evaluation always with --sample-bound clip; every run logs an FD curve (--eval-every) and FD
  against --ref-samples of the teacher's own samples (fd_teacher; 5000 in the full budget).
  Per lab: 3 methods x 4 variants x 2 K + 2 (DMD2 +reflect) + 2 (DMD2 K = 1) = 28 cells; x 2 labs x
  5 seeds = 280 runs.

BUDGET "full" (per-script flags in BUDGETS): PD 100 iterations per stage, LCM 500 iterations, DMD2
1200 iterations at batch 32, each where its baseline's FD curve has flattened (fd_curves.png). DMD2
needs the most: its FD first rises from the teacher-initialised G (1.9 at iteration 150) and falls
until about 900 iterations (a 3000-iteration baseline run, unconditional, K = 4, FD on 250 samples
every 150 iterations: 1.88, 1.08, 0.46, 0.50, 0.41, 0.35, then 0.16..0.39 up to 2700; final FD on
1000 samples 0.19 at 3000 iterations, against 0.15 for the benchmark's 1200-iteration run of the same
seed); an earlier budget of 300 iterations stopped in the middle of that fall, so runs made under it
are stale (see below). Measured wall time per run at --jobs 2 on this 2-core CPU (one thread each, median over
the 10 baseline and +DDIL runs of a cell), unconditional / guided: K = 2 PD 145 / 150 s, LCM 220 / 250 s,
DMD2 350 / 345 s; K = 4 PD 145 / 240 s, LCM 210 / 460 s, DMD2 375 / 375 s. The whole grid took
29.2 hours of run time, about 15 hours elapsed at --jobs 2; run it in parts (--lab, --only, --ks,
--variants, --seeds), each rerun resumes.
results.json records each run's wall time (bench_wall.json in its folder). Iterations/s come from
each run's own training loop (evaluation excluded); with --jobs > 1 runs share the CPU, so compare
costs only at --jobs 1, and run nothing else meanwhile: --budget cost does that in short runs,
    python bench/results.py --budget cost --ks 4 --seeds 0 --jobs 1 --out bench/out/cost-results
whose table.md's cost column is then the clean time per iteration against the baseline.

A finished run is skipped only if its config.json matches the flags the grid would give it now
(paths aside): run names encode the grid, not the budget, so a run made under other flags stops the
benchmark with its name; move it away (or give another --runs-dir).

STATISTICS (paired_ci): every variant against the baseline of the same (lab, method, K), paired by
seed (only seeds present in both arms, and for each metric only seeds where both have a finite
value): the mean paired difference variant - baseline with a 95% confidence interval from
Student's t (n - 1 degrees of freedom), the minimum detectable difference at 80% power,
(t_{0.975,n-1} + t_{0.8,n-1}) sd / sqrt(n), and the min..max of each arm. Metrics: fd (vs data),
fd_teacher, paired_px (null for re-noising samplers at K > 1: LCM, DMD2) and the covariate-shift
ratio err_own / err_data at the last grid time (the smallest t). Lower is better for the three
distances: "better" / "worse" only when the interval excludes 0, else "no difference"; for the
ratio "lower" / "higher" (1 = no covariate shift). +DDIL+reflect and +DDIL mixed are also paired
against +DDIL (vs_ddil): that difference is the effect of the training bound, of the mixed rollouts.

A rerun checks itself against committed numbers (mean inside the committed [min, max] over seeds):
    python bench/results.py --runs-dir /tmp/rerun --out /tmp/rerun-results --check bench/results/results.json
"""
import dataclasses
import importlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import harness as H  # noqa: E402
import teacher as T  # noqa: E402


@dataclass
class Config:
    budget: str = H.flag("full", "The budget: full (about 15 h on a 2-core CPU, in parts), cost "
                         "(time per iteration) or smoke (the tests' check of the plumbing).",
                         choices=("full", "smoke", "cost"))
    seeds: list = H.flag([0, 1, 2, 3, 4], "The seeds, distinct: each cell runs once per seed and "
                         "the statistics pair a variant with its baseline by seed.")
    out: str = H.flag("bench/results", "Where results.json, table.md and the plots (*.png) go.")
    runs_dir: str = H.flag("", "The folder of the runs' --out folders; default bench/out/<budget>.")
    only: str = H.flag("pd,lcm,dmd2", "A comma-separated subset of the methods.")
    lab: str = H.flag("uncond,cond", "A comma-separated subset of the labs.")
    variants: str = H.flag("", "A comma-separated subset of the variants; default all of them.")
    ks: str = H.flag("", "A comma-separated subset of K; default all of them (1, 2, 4).")
    jobs: int = H.flag(1, "Runs at once (more than 1 shares the CPU: their it/s are then not "
                       "comparable).")
    teacher: str = H.flag("", "The uncond lab's teacher; default the scripts' own.")
    teacher_cond: str = H.flag("", "The cond lab's teacher; default the scripts' own "
                               "class-conditional one (their --cond default).")
    data_dir: str = H.flag("data", "The data folder, passed to every run as --data-dir.")
    device: str = H.flag("", "The device, passed to every run as --device; default each "
                         "script's own.")
    run: bool = H.flag(True, "Run the grid's missing runs; --no-run only aggregates what is "
                       "already in --runs-dir.")
    check: str = H.flag("", "A committed results.json to check this benchmark against (each "
                        "mean inside its committed spread over seeds); default no check.")


SCRIPTS = {"pd": "pd_ddil.py", "lcm": "lcm_ddil.py", "dmd2": "dmd2_ddil.py"}
W = 2  # the cond lab's guidance weight (module docstring: why 2)
LABS = {"uncond": {m: [] for m in SCRIPTS},
        "cond": {"pd": ["--cond", "--guidance", f"{W:g}"],
                 "lcm": ["--cond", "--w-min", f"{W - 1:g}", "--w-max", f"{W + 1:g}"],  # evaluated at W
                 "dmd2": ["--cond", "--guidance", f"{W:g}"]}}
BASELINE = {"pd": (1, 0, 0), "lcm": (1, 0, 0), "dmd2": (0, 0, 1)}  # (beta_data, beta_teacher, beta_student)
DDIL = (0.5, 0, 0.5)
# variant: (betas: "baseline" or "ddil", training --bound, --rollout-teacher-p)
VARIANTS = {"baseline": ("baseline", "none", 0.0), "+DDIL": ("ddil", "none", 0.0),
            "+DDIL+reflect": ("ddil", "reflect", 0.0), "+DDIL mixed": ("ddil", "none", 0.5)}
STEPS = (2, 4)
# extra (method, K): variants beside VARIANTS; DMD2's "+reflect", (0, 0, 1) + reflect, is its default
EXTRA = {("dmd2", 1): {"baseline": ("baseline", "none", 0.0), "+reflect": ("baseline", "reflect", 0.0)},
         ("dmd2", 2): {"+reflect": ("baseline", "reflect", 0.0)},
         ("dmd2", 4): {"+reflect": ("baseline", "reflect", 0.0)}}
METRICS = ("fd", "kid", "fd_teacher", "kid_teacher", "paired_px", "paired_feat", "precision", "recall",
           "entropy", "cond_acc")
COMPARED = ("fd", "fd_teacher", "paired_px", "shift_ratio")  # paired against the baseline
VS_DDIL = ("+DDIL+reflect", "+DDIL mixed")  # also paired against +DDIL: the effect of reflect, of mixing
LOWER_IS_BETTER = {"fd": True, "fd_teacher": True, "paired_px": True, "shift_ratio": None}

BUDGETS = {  # per-script flags (labs and variants add theirs)
    "full": {"pd": ["--iters-per-stage", "100", "--eval-samples", "1000", "--stage-eval-samples", "250",
                    "--eval-every", "50", "--ref-samples", "5000"],
             "lcm": ["--iters", "500", "--eval-samples", "1000", "--eval-every", "50", "--ref-samples", "5000"],
             "dmd2": ["--iters", "1200", "--batch-size", "32", "--teacher-substeps", "4",
                      "--eval-samples", "1000", "--eval-every", "100", "--ref-samples", "5000"]},
    "smoke": {"pd": ["--teacher-steps", "8", "--reference-steps", "8", "--iters-per-stage", "2",
                     "--batch-size", "8", "--buffer-size", "32", "--refresh", "4", "--eval-samples", "32",
                     "--stage-eval-samples", "16", "--shift-samples", "16", "--ref-samples", "16",
                     "--log-every", "1", "--eval-every", "4", "--eval-every-samples", "16"],
              "lcm": ["--iters", "3", "--batch-size", "8", "--buffer-size", "32", "--refresh", "2",
                      "--refresh-every", "1", "--eval-samples", "32", "--reference-steps", "8",
                      "--ref-samples", "16", "--log-every", "1", "--eval-every", "2", "--eval-every-samples", "16"],
              "dmd2": ["--iters", "3", "--batch-size", "8", "--buffer-size", "16", "--refresh", "2",
                       "--teacher-substeps", "2", "--fake-updates", "2", "--eval-samples", "32",
                       "--reference-steps", "8", "--shift-samples", "8", "--ref-samples", "16", "--log-every", "1",
                       "--eval-every", "2", "--eval-every-samples", "16"]},
    # time per iteration only (at --jobs 1, nothing else running): the full budget's training flags
    # for a fifth to a quarter of its iterations, evaluation cut to the least; its FDs mean nothing
    "cost": {"pd": ["--iters-per-stage", "25", "--eval-samples", "64", "--stage-eval-samples", "16",
                    "--shift-samples", "64", "--ref-samples", "64"],
             "lcm": ["--iters", "120", "--eval-samples", "64", "--shift-samples", "64", "--ref-samples", "64"],
             "dmd2": ["--iters", "240", "--batch-size", "32", "--teacher-substeps", "4", "--eval-samples", "64",
                      "--shift-samples", "64", "--ref-samples", "64"]},
}
# Student's t quantiles for df = 1..30 (scipy.stats.t.ppf), used when scipy is not installed
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281, 2.201, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
T80 = (1.3764, 1.0607, 0.9785, 0.941, 0.9195, 0.9057, 0.896, 0.8889, 0.8834, 0.8791, 0.8755, 0.8726,
       0.8702, 0.8681, 0.8662, 0.8647, 0.8633, 0.862, 0.861, 0.86, 0.8591, 0.8583, 0.8575, 0.8569,
       0.8562, 0.8557, 0.8551, 0.8546, 0.8542, 0.8538)


# ----------------------------------------------------------------------------------------------
# the plan: cells (a table row each), runs named by their flags
# ----------------------------------------------------------------------------------------------

def run_name(lab, method, steps, betas, bound, p, seed):
    mix = f"-mix{p:g}" if p else ""
    return f"{lab}-{method}-K{steps}-b{'_'.join(f'{b:g}' for b in betas)}-{bound}{mix}-s{seed}"


def subset(text, allowed, flag):
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or set(chosen) - set(allowed):
        H.fail(f"{flag} {text!r}: give a comma-separated subset of {','.join(allowed)}")
    return [a for a in allowed if a in chosen]


def plan(cfg):
    """(cells, runs): cells {label: {lab, method, variant, steps, betas, bound, p, runs: {seed: name}}},
    runs {name: (lab, method, steps, betas, bound, p, seed)} in execution order (seed-major)."""
    methods, labs = subset(cfg.only, SCRIPTS, "--only"), subset(cfg.lab, LABS, "--lab")
    all_variants = list(dict.fromkeys([*VARIANTS, *(v for e in EXTRA.values() for v in e)]))
    variants = subset(cfg.variants or ",".join(all_variants), all_variants, "--variants")
    all_ks = sorted({*STEPS, *(k for _, k in EXTRA)})
    ks = [int(k) for k in subset(cfg.ks or ",".join(map(str, all_ks)), list(map(str, all_ks)), "--ks")]
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        H.fail(f"--seeds {cfg.seeds}: give distinct seeds, e.g. --seeds 0 1 2 3 4")
    if cfg.jobs <= 0:
        H.fail(f"--jobs must be positive, got {cfg.jobs}")
    cells = {}
    for lab in labs:
        for method in methods:
            grid = [(k, VARIANTS) for k in STEPS] + [(k, v) for (m, k), v in EXTRA.items() if m == method]
            for steps, table in sorted(grid, key=lambda kv: kv[0]):
                for variant, (which, bound, p) in table.items():
                    if steps not in ks or variant not in variants:
                        continue
                    betas = BASELINE[method] if which == "baseline" else DDIL
                    cells[f"{lab} {method} K={steps} {variant}"] = dict(
                        lab=lab, method=method, variant=variant, steps=steps, betas=list(betas), bound=bound,
                        p=p, runs={s: run_name(lab, method, steps, betas, bound, p, s) for s in cfg.seeds})
    runs = {c["runs"][s]: (c["lab"], c["method"], c["steps"], tuple(c["betas"]), c["bound"], c["p"], s)
            for s in cfg.seeds for c in cells.values()}
    return cells, runs


def argv_of(cfg, name, spec):
    lab, method, steps, betas, bound, p, seed = spec
    argv = [sys.executable, SCRIPTS[method], *BUDGETS[cfg.budget][method], *LABS[lab][method],
            "--steps", str(steps), "--beta-data", f"{betas[0]:g}", "--beta-teacher", f"{betas[1]:g}",
            "--beta-student", f"{betas[2]:g}", "--bound", bound, "--rollout-teacher-p", f"{p:g}",
            "--sample-bound", "clip", "--seed", str(seed),
            "--data-dir", cfg.data_dir, "--out", os.path.join(cfg.runs_dir, name)]
    teacher = cfg.teacher_cond if lab == "cond" else cfg.teacher
    argv += ["--teacher", teacher] if teacher else []
    argv += ["--device", cfg.device] if cfg.device else []
    return argv


def teacher_missing(cfg, lab):
    """The lab's teacher will be trained by its first run (which then goes alone)."""
    given = cfg.teacher_cond if lab == "cond" else cfg.teacher
    if given:
        return not os.path.isfile(given)
    default = os.path.join(ROOT, T.default_teacher_path("digits", lab == "cond"))
    return not os.path.isfile(default) and T.shipped_teacher_path("digits", lab == "cond") is None


PATHS = ("out", "data_dir", "teacher", "device")  # where a run lives, not what it measured


def config_of(argv):
    """The whole config.json a script's argv would write now (its flags and every default), and
    each flag's value in a run made before the flag existed (harness.before_flags)."""
    module = importlib.import_module(os.path.splitext(os.path.basename(argv[1]))[0])
    cfg = H.parse_config(module.Config, argv[2:], getattr(module, "PRESETS", None))
    return json.loads(json.dumps(dataclasses.asdict(cfg))), H.before_flags(cfg)


def same_value(have, want):
    if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(
            have, bool) and not isinstance(want, bool):
        return math.isclose(have, want)
    return have == want


def stale_runs(cfg, runs, argv_of=argv_of):
    """The runs in --runs-dir whose config.json differs from the one their command would write now
    (another budget, an older grid, a default changed since): "name: key was, now" lines. Run names
    encode only the grid's flags. A key the run's config.json lacks (a flag newer than the run) is
    taken as its value before the flag, as a resume takes it (harness.check_same_run).
    argv_of(cfg, name, spec): each run's command (bench/shift_gap.py adds flags to it)."""
    stale = []
    for name, spec in runs.items():
        path = os.path.join(cfg.runs_dir, name, "config.json")
        if not os.path.isfile(path):
            continue
        config = read_json(path)
        now, before = config_of(argv_of(cfg, name, spec))
        for key, want in now.items():
            have = config.get(key, before[key])
            if key in PATHS or same_value(have, want):
                continue
            stale.append(f"{name}: {key} {have}, now {want}")
            break
    return stale


def execute(cfg, runs, argv_of=argv_of):
    """Run what is missing, one line per run (argv_of as in stale_runs). Returns (failed, busy): the
    names of the runs that failed, and of those another process was training (left to it)."""
    todo = [(n, s) for n, s in runs.items()
            if not os.path.isfile(os.path.join(cfg.runs_dir, n, "metrics.json"))]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"(--jobs {cfg.jobs}) in {cfg.runs_dir}", flush=True)
    env = dict(os.environ)
    if cfg.jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))
    # a lab whose teacher is trained on demand: its first run goes alone, so that parallel runs
    # do not each train it
    first = []
    for lab in LABS:
        if cfg.jobs > 1 and teacher_missing(cfg, lab):
            first += [next((item for item in todo if item[1][0] == lab), None)]
    first = [item for item in first if item]
    rest = [item for item in todo if item not in first]

    def one(item):
        name, spec = item
        out = os.path.join(cfg.runs_dir, name)
        if os.path.isfile(os.path.join(out, "metrics.json")):  # finished meanwhile (another instance)
            return name, 0, 0.0
        if H.out_in_use(out):  # another benchmark is training it: opening stdout.log would truncate it
            return name, "another process is training it", 0.0
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "stdout.log"), "w") as fh:
            rc = subprocess.run(argv_of(cfg, name, spec), cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT).returncode
        dt = time.time() - t0
        if rc == 0:
            H.write_json({"wall_s": dt, "jobs": cfg.jobs}, os.path.join(out, "bench_wall.json"))
        return name, rc, dt

    failed, busy, i = [], [], 0
    for batch, jobs in ((first, 1), (rest, cfg.jobs)):
        with ThreadPoolExecutor(jobs) as pool:
            for name, rc, dt in pool.map(one, batch):
                i += 1
                path = os.path.join(cfg.runs_dir, name)
                if rc == 0 and os.path.isfile(os.path.join(path, "metrics.json")):
                    m = read_json(os.path.join(path, "metrics.json"))
                    row = m["student"].get(str(runs[name][2]), {})
                    print(f"[{i}/{len(todo)}] {name}: {dt:.0f} s, FD {row.get('fd', float('nan')):.4g}, "
                          f"FD vs teacher {row.get('fd_teacher') or float('nan'):.4g}", flush=True)
                elif isinstance(rc, str):
                    print(f"[{i}/{len(todo)}] {name}: skipped, {rc}; rerun when it ends", flush=True)
                    busy.append(name)
                else:
                    failed.append(name)
                    with open(os.path.join(path, "stdout.log")) as fh:
                        tail = fh.read().strip().splitlines()[-3:]
                    print(f"[{i}/{len(todo)}] {name}: FAILED (exit {rc}) after {dt:.0f} s; "
                          f"{os.path.join(path, 'stdout.log')}: " + " | ".join(tail), flush=True)
    return failed, busy


def stop_if_unfinished(failed, busy):
    """The closing line of a benchmark whose grid is not complete: a failed run is retried by a
    rerun; a run another process was training is counted once that process has finished it."""
    why = []
    if failed:
        why.append(f"{len(failed)} runs failed ({', '.join(failed)}): see their stdout.log; rerun to retry them")
    if busy:
        why.append(f"{len(busy)} runs were left to another process training them ({', '.join(busy)}): rerun "
                   f"when it ends to include them")
    if why:
        H.fail("; ".join(why))


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def spread(values):
    """mean, std (n-1; 0 for one value), min, max, n of the finite values."""
    v = [float(x) for x in values if finite(x)]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def t_quantiles(df):
    """(t_{0.975, df}, t_{0.8, df}) of Student's t: scipy, else the table T975 / T80 (df <= 30;
    beyond, the normal quantiles)."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df)), float(t.ppf(0.8, df))
    except ImportError:
        return (T975[df - 1], T80[df - 1]) if df <= len(T975) else (1.96, 0.8416)


def paired_ci(a, b):
    """Paired comparison of two arms measured on the same seeds: a[i] and b[i] belong together.
    Returns n, the mean difference a - b, its sd (n - 1), the 95% confidence interval from
    Student's t with n - 1 degrees of freedom (lo, hi, half_width), the minimum detectable
    difference at 80% power (t_{0.975,n-1} + t_{0.8,n-1}) sd / sqrt(n), and the min..max of each
    arm. With one pair there is no interval (those keys None); with none, None."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci: {len(a)} against {len(b)} values")
    if not a:
        return None
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(d), statistics.fmean(d)
    res = {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "half_width": None, "mdd": None,
           "a": [min(a), max(a)], "b": [min(b), max(b)]}
    if n > 1:
        sd = statistics.stdev(d)
        t975, t80 = t_quantiles(n - 1)
        half = t975 * sd / math.sqrt(n)
        res.update(sd=sd, lo=mean - half, hi=mean + half, half_width=half,
                   mdd=(t975 + t80) * sd / math.sqrt(n))
    return res


def verdict(ci, lower_is_better=True):
    """"better" / "worse" (lower_is_better None: "lower" / "higher") when the interval excludes 0."""
    if not ci or ci["lo"] is None:
        return "n < 2"
    words = ("better", "worse") if lower_is_better else ("lower", "higher") if lower_is_better is None \
        else ("worse", "better")
    return words[0] if ci["hi"] < 0 else words[1] if ci["lo"] > 0 else "no difference"


def compare_by_seed(variant, baseline, lower_is_better=True):
    """variant, baseline: {seed: value}. The paired comparison on the seeds where both are finite."""
    seeds = sorted(s for s in variant if s in baseline and finite(variant[s]) and finite(baseline[s]))
    ci = paired_ci([variant[s] for s in seeds], [baseline[s] for s in seeds])
    return ci and {**ci, "seeds": seeds, "verdict": verdict(ci, lower_is_better)}


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------

def fd_curve(log_path):
    """(training iteration, fd) of a log.jsonl's --eval-every records. A run resumed from its
    ckpt.pt logs the steps after the checkpoint again: the last record of a step wins."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path) as fh:
        recs = [json.loads(ln) for ln in fh if ln.strip()]
    return sorted({r["step"]: r["fd"] for r in recs if "fd" in r and "step" in r}.items())


def value(m, key, k):
    """One run's metric at evaluated K = k; shift_ratio: the covariate-shift ratio at the last grid
    time (sampling order: the smallest t)."""
    if key == "shift_ratio":
        ratio = (m.get("covariate_shift") or {}).get("ratio") or [None]
        return ratio[-1]
    return m["student"].get(str(k), {}).get(key)


def aggregate(cells, runs_dir):
    """results.json's content (without command/date) from the runs' metrics.json and log.jsonl."""
    loaded, missing, wall = {}, [], {}
    for c in cells.values():
        for name in c["runs"].values():
            path = os.path.join(runs_dir, name, "metrics.json")
            if os.path.isfile(path):
                loaded[name] = read_json(path)
                w = os.path.join(runs_dir, name, "bench_wall.json")
                wall[name] = read_json(w)["wall_s"] if os.path.isfile(w) else None
            elif name not in missing:
                missing.append(name)

    def done(c):  # {seed: metrics} of a cell's finished runs
        return {s: loaded[n] for s, n in c["runs"].items() if n in loaded}

    rows, teacher, ref, seen = [], {}, {}, set()
    for label, c in cells.items():
        ms = done(c)
        for k in sorted({k for m in ms.values() for k in m["student"]}, key=int):
            row = {"cell": label, **{key: c[key] for key in ("lab", "method", "variant", "betas", "bound", "p")},
                   "train_steps": c["steps"], "K": int(k), "seeds": sorted(s for s, m in ms.items()
                                                                        if k in m["student"])}
            for metric in METRICS:
                row[metric] = spread([value(m, metric, k) for m in ms.values()])
            if int(k) == c["steps"]:  # the covariate shift and cost belong to the trained K
                row["shift_ratio"] = spread([value(m, "shift_ratio", k) for m in ms.values()])
                row["it_per_s"] = spread([m.get("it_per_s") for m in ms.values()])
                row["train_time_s"] = spread([m.get("train_time_s") for m in ms.values()])
                row["wall_s"] = spread([wall[c["runs"][s]] for s in ms])
            rows.append(row)
        for s, m in ms.items():  # the teacher rows: the same DDIM whatever the student, one per seed
            for k, r in m["teacher"].items():
                if (c["lab"], k, s) not in seen:
                    seen.add((c["lab"], k, s))
                    teacher.setdefault((c["lab"], int(k)), []).append(r)
            if m.get("teacher_ref") and (c["lab"], "ref", s) not in seen:
                seen.add((c["lab"], "ref", s))
                ref.setdefault(c["lab"], []).append(m["teacher_ref"])
    teacher_rows = [{"lab": lab, "K": k, **{metric: spread([r.get(metric) for r in rs]) for metric in METRICS}}
                    for (lab, k), rs in sorted(teacher.items())]
    teacher_ref = {lab: {"n": rs[0]["n"], "steps": rs[0]["steps"], "floor_fd": spread([r["floor_fd"] for r in rs]),
                         "floor_kid": spread([r["floor_kid"] for r in rs])} for lab, rs in ref.items()}

    # every variant against the baseline of the same (lab, method, K), paired by seed; the +DDIL
    # variants that change one more thing also against +DDIL, which isolates that thing
    by_cell = {(r["cell"], r["K"]): r for r in rows}

    def paired(c, ref):
        mv, mr = done(c), done(ref)
        return {key: compare_by_seed({s: value(m, key, c["steps"]) for s, m in mv.items()},
                                     {s: value(m, key, c["steps"]) for s, m in mr.items()}, LOWER_IS_BETTER[key])
                for key in COMPARED}

    def same_cell(c, variant):
        return next(((n, b) for n, b in cells.items() if b["variant"] == variant and
                     (b["lab"], b["method"], b["steps"]) == (c["lab"], c["method"], c["steps"])), (None, None))

    for label, c in cells.items():
        row = by_cell.get((label, c["steps"]))
        if c["variant"] == "baseline" or row is None:
            continue
        _, ddil = same_cell(c, "+DDIL")
        if c["variant"] in VS_DDIL and ddil:
            row["vs_ddil"] = paired(c, ddil)
        b_label, base = same_cell(c, "baseline")
        if base is None:
            continue
        row["vs_baseline"] = paired(c, base)
        b_row = by_cell.get((b_label, c["steps"]))
        ips_v, ips_b = row.get("it_per_s"), b_row and b_row.get("it_per_s")
        row["cost_ratio"] = ips_b["mean"] / ips_v["mean"] if ips_v and ips_b and ips_v["mean"] else None

    shift, curves = {}, {}
    for label, c in cells.items():
        ms = done(c)
        cs = [m["covariate_shift"] for m in ms.values() if m.get("covariate_shift")]
        if cs:
            ts = [round(t, 6) for t in cs[0]["t"]]
            shift[label] = {"t": ts, **{key: [spread([x[key][i] for x in cs if len(x[key]) == len(ts)])
                                              for i in range(len(ts))]
                                        for key in ("ratio", "err_data", "err_own", "state_fd")}}
        curves[label] = {s: fd_curve(os.path.join(runs_dir, c["runs"][s], "log.jsonl")) for s in ms}
    walls = [w for w in wall.values() if finite(w)]
    return {"cells": {label: {k: v for k, v in c.items() if k != "runs"} for label, c in cells.items()},
            "rows": rows, "teacher": teacher_rows, "teacher_ref": teacher_ref, "covariate_shift": shift,
            "fd_curves": curves, "runs_done": len(loaded), "runs_wall_s": sum(walls) if walls else None,
            "missing": missing}


# ----------------------------------------------------------------------------------------------
# outputs: table.md and plots
# ----------------------------------------------------------------------------------------------

def fmt(s, digits=3):
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}g}"
    return f"{s['mean']:.{digits}g} ± {s['std']:.2g} [{s['min']:.{digits}g}, {s['max']:.{digits}g}]"


def fmt_diff(c):
    if not c:
        return "–"
    if c["lo"] is None:
        return f"{c['mean']:+.3g} (n = 1)"
    return (f"{c['mean']:+.3g} [{c['lo']:+.3g}, {c['hi']:+.3g}] (n = {c['n']}, MDD {c['mdd']:.2g}) "
            f"**{c['verdict']}**")


def hours(s):
    return f"{s / 3600:.2f} h" if s is not None else "–"


def table_md(res):
    lines = [f"# DDIL benchmark on digits ({res['budget']} budget)", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Wall time of this command: {hours(res['wall_s'])}; of the {res['runs_done']} runs aggregated "
             f"(as run by this script, at the --jobs they ran under): {hours(res['runs_wall_s'])}  ",
             f"Seeds: {res['seeds']}. Per-script flags: " +
             "; ".join(f"{m}: `{' '.join(f)}`" for m, f in res["flags"].items()) + "  ",
             "Cells: mean ± std [min, max] over seeds. Differences: variant - baseline of the same lab, "
             "method and K, paired by seed (only seeds in both), mean [95% CI, Student's t] (n, minimum "
             "detectable difference at 80% power); better / worse only when the interval excludes 0. "
             "Cost: iterations/s of the baseline / the variant's. Shift ratio: err_own / err_data at the "
             "last grid time (1 = no covariate shift; lower / higher, not better / worse).", ""]
    if res["teacher_ref"]:
        lines += ["## Teacher reference (fd_teacher's set and its noise floor: FD between two such sets)", "",
                  "| lab | samples | steps | floor FD | floor KID |", "|---|---:|---:|---|---|"]
        lines += [f"| {lab} | {r['n']} | {r['steps']} | {fmt(r['floor_fd'])} | {fmt(r['floor_kid'])} |"
                  for lab, r in res["teacher_ref"].items()] + [""]
    rows = [r for r in res["rows"] if r["K"] == r["train_steps"]]
    for lab in LABS:
        lr = [r for r in rows if r["lab"] == lab]
        if not lr:
            continue
        w = f" (guided at w = {W})" if lab == "cond" else ""
        lines += [f"## Lab {lab}{w}", ""]
        for method in SCRIPTS:
            for k in sorted({r["K"] for r in lr if r["method"] == method}):
                rs = [r for r in lr if r["method"] == method and r["K"] == k]
                lines += [f"### {lab} {method}, K = {k}", "",
                          "| variant | n | FD | FD vs teacher | paired px | shift ratio | cost |"
                          + (" cond. acc. |" if lab == "cond" else ""),
                          "|---|---:|---|---|---|---|---:|" + ("---|" if lab == "cond" else "")]
                for r in rs:
                    cost = f"{r['cost_ratio']:.2f}" if r.get("cost_ratio") else "–"
                    lines.append(f"| {r['variant']} | {len(r['seeds'])} | {fmt(r['fd'])} | {fmt(r['fd_teacher'])} | "
                                 f"{fmt(r['paired_px'])} | {fmt(r.get('shift_ratio'))} | {cost} |"
                                 + (f" {fmt(r['cond_acc'])} |" if lab == "cond" else ""))
                for vs, ref in (("vs_baseline", "baseline"), ("vs_ddil", "+DDIL")):
                    diffs = [r for r in rs if r.get(vs)]
                    if diffs:
                        lines += ["", f"| variant - {ref} | Δ FD | Δ FD vs teacher | Δ paired px | Δ shift ratio |",
                                  "|---|---|---|---|---|"]
                        lines += [f"| {r['variant']} | " + " | ".join(fmt_diff(r[vs][key]) for key in COMPARED) + " |"
                                  for r in diffs]
                lines.append("")
    if res["teacher"]:
        lines += ["## Teacher DDIM rows (the cond lab guided at w = 2)", "",
                  "| lab | K | n | FD | FD vs teacher | paired px | cond. acc. |", "|---|---:|---:|---|---|---|---|"]
        for r in res["teacher"]:
            lines.append(f"| {r['lab']} | {r['K']} | {r['fd']['n'] if r['fd'] else 0} | {fmt(r['fd'])} | "
                         f"{fmt(r['fd_teacher'])} | {fmt(r['paired_px'])} | {fmt(r['cond_acc'])} |")
        lines.append("")
    if res["missing"] or res["failed"]:
        lines += [f"Missing runs ({len(res['missing'])}): {', '.join(res['missing']) or 'none'}; "
                  f"failed: {', '.join(res['failed']) or 'none'}", ""]
    return "\n".join(lines)


COLORS = {"baseline": "tab:blue", "+DDIL": "tab:orange", "+DDIL+reflect": "tab:green",
          "+DDIL mixed": "tab:red", "+reflect": "tab:purple"}


def plots(res, out):
    """fd_curves.png and covariate_shift.png: a panel per (lab, K, method), a row per (lab, K)
    (80 dpi); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib", flush=True)
        return []
    panels = {}
    for label, c in res["cells"].items():
        panels.setdefault((c["lab"], c["steps"], c["method"]), []).append(label)
    written = []
    for fname, ylabel in (("fd_curves.png", "FD during training"), ("covariate_shift.png", "err_own / err_data")):
        keys = [pk for pk in panels if any(res["fd_curves" if fname == "fd_curves.png" else "covariate_shift"]
                                           .get(label) for label in panels[pk])]
        if not keys:
            continue
        rows = sorted({pk[:2] for pk in keys}, key=lambda r: (list(LABS).index(r[0]), -r[1]))
        methods = [m for m in SCRIPTS if any(pk[2] == m for pk in keys)]
        fig, axes = plt.subplots(len(rows), len(methods), figsize=(3.3 * len(methods), 2.8 * len(rows)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()  # until a panel draws on it (DMD2 alone has K = 1)
        for (lab, k, method), labels in panels.items():
            if (lab, k, method) not in keys:
                continue
            ax = axes[rows.index((lab, k))][methods.index(method)]
            ax.set_axis_on()
            for label in labels:
                v, color = res["cells"][label]["variant"], COLORS.get(res["cells"][label]["variant"])
                if fname == "fd_curves.png":
                    curves = [c for c in res["fd_curves"].get(label, {}).values() if c]
                    if not curves:  # a variant with no finished run yet: no line, no legend entry
                        continue
                    by_step = {}  # the seeds' mean and min..max at each evaluated iteration
                    for step, fd in (point for curve in curves for point in curve):
                        by_step.setdefault(step, []).append(fd)
                    steps = sorted(by_step)
                    ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], color=color, lw=1,
                            marker=".", label=f"{v} (n = {len(curves)})")
                    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                    color=color, alpha=0.2, lw=0)
                    ax.set(xlabel="training iteration", yscale="log")
                elif label in res["covariate_shift"]:
                    cs = res["covariate_shift"][label]
                    ok = [(t, s) for t, s in zip(cs["t"], cs["ratio"]) if s]
                    ax.errorbar([t for t, _ in ok], [s["mean"] for _, s in ok], yerr=[s["std"] for _, s in ok],
                                marker="o", capsize=3, color=color, label=v)
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                    ax.set(xlabel="grid time t")
                    if not ax.xaxis_inverted():
                        ax.invert_xaxis()  # sampling order: t = 1 first
            ax.set(title=f"{lab} {method}, K = {k}", ylabel=ylabel)
            if ax.get_legend_handles_labels()[0]:  # runs without FD curves (--budget cost) draw none
                ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(os.path.join(out, fname))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


def check_against(res, path):
    """Rows of `res` whose mean metric lies outside the committed run's [min, max] over seeds (FD,
    FD vs teacher, KID, precision, recall; rows with one seed on either side are compared by value).
    Returns (agreeing, compared, lines for the disagreements)."""
    if not os.path.isfile(path):
        H.fail(f"--check {path} does not exist: give a results.json written by this script")
    old = {(r.get("cell"), r["K"]): r for r in read_json(path)["rows"]}  # (older layouts: no cell)
    agree, compared, bad = 0, 0, []
    for r in res["rows"]:
        o = old.get((r["cell"], r["K"]))
        for metric in ("fd", "fd_teacher", "kid", "precision", "recall"):
            if not o or not o.get(metric) or not r.get(metric):
                continue
            compared += 1
            lo, hi, new = o[metric]["min"], o[metric]["max"], r[metric]["mean"]
            tol = 1e-9 + 1e-6 * abs(hi)  # float noise when both are one seed
            if lo - tol <= new <= hi + tol:
                agree += 1
            else:
                bad.append(f"{r['cell']} K={r['K']} {metric}: {new:.4g} outside [{lo:.4g}, {hi:.4g}]")
    return agree, compared, bad


def main(argv=None):
    t0 = time.time()
    cfg = H.parse_config(Config, argv)
    cfg.runs_dir = cfg.runs_dir or os.path.join("bench", "out", cfg.budget)
    command = "python bench/results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    cells, runs = plan(cfg)
    for flag, path in (("--teacher", cfg.teacher), ("--teacher-cond", cfg.teacher_cond)):
        if path and not os.path.isfile(path):
            H.fail(f"{flag} {path} does not exist: train one with teacher.py or leave {flag} out")
    # the scripts run in the repository root: make relative paths the caller's
    cfg.runs_dir, cfg.out = os.path.abspath(cfg.runs_dir), os.path.abspath(cfg.out)
    cfg.teacher = os.path.abspath(cfg.teacher) if cfg.teacher else ""
    cfg.teacher_cond = os.path.abspath(cfg.teacher_cond) if cfg.teacher_cond else ""
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    stale = stale_runs(cfg, runs)
    if stale:
        H.fail(f"{len(stale)} runs in {cfg.runs_dir} were made with other flags ({stale[0]}"
               f"{', ...' if len(stale) > 1 else ''}): move them away or give another --runs-dir")
    failed, busy = execute(cfg, runs) if cfg.run else ([], [])
    res = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "budget": cfg.budget, "seeds": cfg.seeds, "flags": {m: BUDGETS[cfg.budget][m] for m in SCRIPTS},
           "lab_flags": LABS, **aggregate(cells, cfg.runs_dir), "failed": failed}
    res["wall_s"] = time.time() - t0
    if cfg.check:
        agree, compared, bad = check_against(res, cfg.check)
        res["check"] = {"against": cfg.check, "agree": agree, "compared": compared, "outside": bad}
        print(f"check against {cfg.check}: {agree} of {compared} row metrics inside the committed "
              f"spread" + "".join(f"\n  {b}" for b in bad), flush=True)
    os.makedirs(cfg.out, exist_ok=True)
    H.write_json(res, os.path.join(cfg.out, "results.json"))
    with open(os.path.join(cfg.out, "table.md"), "w") as fh:
        fh.write(table_md(res) + "\n")
    written = plots(res, cfg.out)
    print(f"wrote {', '.join(['results.json', 'table.md'] + [os.path.basename(p) for p in written])} "
          f"in {cfg.out}", flush=True)

    stop_if_unfinished(failed, busy)
    return res


if __name__ == "__main__":
    main()
