"""The DDIL results on digits in one command (issue 7), aggregated into bench/results/.

Every method x variant x seed, the LCM mixing-prior ablation, covariate shift and cost:

    python bench/results.py                                   # --budget full: ~1.5 h, quiet 2-core CPU
    python bench/results.py --budget smoke --seeds 0 --only lcm --out /tmp/r   # seconds: the plumbing
    python bench/results.py --no-run                          # re-aggregate the runs already there

Each run is a subprocess of pd_ddil.py / lcm_ddil.py / dmd2_ddil.py into its own --out under
--runs-dir (default bench/out/<budget>, gitignored); a run whose metrics.json exists is skipped, so
an interrupted benchmark resumes (and a half-done run resumes from its own ckpt.pt). Run names
come from the flags (method, K, betas, bound, seed), so a run the ablation shares with the main
grid (LCM (1,0,0) and (0.5,0,0.5), bound none) is trained once.

The grid (tables below; change them there):
  main:     PD, LCM, DMD2 x {baseline, +reflect, +DDIL, +DDIL+reflect} x --seeds at K = 4. Baseline
            betas (beta_data, beta_teacher, beta_student) are each method's own input distribution
            (PD/LCM: data (1,0,0); DMD2: its backward simulation (0,0,1)); DDIL = (0.5,0,0.5);
            "+reflect" = --bound reflect, else --bound none. LCM reports K = 1, 2, 4 and DMD2
            K = 1, 4 from their own metrics; DMD2 also trains a 1-step G (baseline only), and
            runs the EXTRA row (0.25, 0.25, 0.5) + reflect: DDIL with teacher rollouts.
  ablation: LCM at K = 4, bound none, the six priors of ABLATION and the SCHEDULES (--beta-ramp:
            beta_student rising from 0, DAgger's schedule), on the first ABLATION_SEEDS seeds.

Budget "full" (measured per run, training + evaluation + the --eval-every curve, on a 2-core CPU):
  PD    100 iterations/stage (400), 1000 eval samples, 250 per stage:  ~80 s x 12 runs = 16 min
  LCM   500 iterations, 1000 eval samples:                             ~125 s x 12 = 25 min
  DMD2  300 iterations, batch 32, 4 teacher substeps, 1000 eval:       ~85 s x 12 = 17 min
        + the 1-step G baseline ~60 s x 3, + teacher rollouts ~110 s x 3 = 9 min
  ablation: 5 new priors/schedules x 2 seeds x ~125 s = 21 min (2 priors reuse main runs)
  total ~ 1.5 h (52 runs). Fewer iterations than the scripts' defaults and 1000 instead of 2000
evaluation samples (FD noise floor ~0.03 at 2000 samples, README): absolute FDs are higher than
the README's single runs; the comparison between variants is what the table is for. Iterations/s
come from each run's own training loop; with --jobs > 1 runs share the CPU, so compare them only
at --jobs 1, and run nothing else meanwhile.

A rerun checks itself against the committed numbers:
    python bench/results.py --runs-dir /tmp/rerun --out /tmp/rerun-results --check bench/results/results.json

Aggregation (results.json, table.md, *.png in --out): mean, std (n-1) and min/max over seeds of
FD, KID, precision, recall, entropy per (method, variant, K); the teacher rows (each run's own
DDIM reference at its K and at 64, deduplicated by bound and seed); per method the ratio of mean
iterations/s DDIL / baseline; the training time (evaluation excluded) for DDIL to reach the same
seed's baseline's final FD, both read from the --eval-every curves in log.jsonl (250 samples, the
same noise at every point), beside the baseline's own time to that FD;
the covariate-shift ratio err_own / err_data per grid time, mean over seeds.
"""
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import harness as H  # noqa: E402


@dataclass
class Config:
    budget: str = "full"           # full (~1.5 h on a quiet 2-core CPU) or smoke (minutes, for tests)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    out: str = "bench/results"     # results.json, table.md, *.png
    runs_dir: str = ""             # the runs' --out folders; "" = bench/out/<budget>
    only: str = "pd,lcm,dmd2,ablation"  # comma-separated subset of methods and "ablation"
    jobs: int = 1                  # runs at once (> 1 shares the CPU: it/s are then not comparable)
    teacher: str = ""              # passed to every script ("" = their default teacher)
    data_dir: str = "data"
    device: str = ""               # passed to every script ("" = their default)
    run: bool = True               # --no-run: only aggregate what is already in --runs-dir
    check: str = ""                # a committed results.json: does this run agree within its spread?
    CHOICES = {"budget": ("full", "smoke")}


SCRIPTS = {"pd": "pd_ddil.py", "lcm": "lcm_ddil.py", "dmd2": "dmd2_ddil.py"}
K = 4
BASELINE = {"pd": (1, 0, 0), "lcm": (1, 0, 0), "dmd2": (0, 0, 1)}  # (beta_data, beta_teacher, beta_student)
DDIL = {"pd": (0.5, 0, 0.5), "lcm": (0.5, 0, 0.5), "dmd2": (0.5, 0, 0.5)}
VARIANTS = {"baseline": ("baseline", "none"), "+reflect": ("baseline", "reflect"),
            "+DDIL": ("ddil", "none"), "+DDIL+reflect": ("ddil", "reflect")}
# more rows: DMD2 with teacher rollouts too (its default before this benchmark)
EXTRA = {"dmd2": ((0.25, 0.25, 0.5), "reflect")}
ABLATION = [(1, 0, 0), (0.5, 0, 0.5), (0.5, 0.25, 0.25), (0.25, 0, 0.75), (0, 0, 1), (0.34, 0.33, 0.33)]
# schedules (betas, --beta-ramp): beta_student rising from 0 over the first `ramp` of training (DAgger)
SCHEDULES = [((0.5, 0, 0.5), 0.5)]
ABLATION_METHOD = "lcm"
METRICS = ("fd", "kid", "precision", "recall", "entropy")

BUDGETS = {  # per-script flags; "ablation_seeds": how many of --seeds the ablation uses
    "full": {"ablation_seeds": 2,
             "pd": ["--iters-per-stage", "100", "--eval-samples", "1000", "--stage-eval-samples", "250",
                    "--eval-every", "50"],
             "lcm": ["--iters", "500", "--eval-samples", "1000", "--eval-every", "50"],
             "dmd2": ["--iters", "300", "--batch-size", "32", "--teacher-substeps", "4",
                      "--eval-samples", "1000", "--eval-every", "30"]},
    "smoke": {"ablation_seeds": 1,
              "pd": ["--teacher-steps", "8", "--iters-per-stage", "2", "--batch-size", "8",
                     "--buffer-size", "32", "--refresh", "4", "--eval-samples", "32",
                     "--stage-eval-samples", "16", "--shift-samples", "16", "--ref-samples", "16", "--log-every", "1",
                     "--eval-every", "4", "--eval-every-samples", "16"],
              "lcm": ["--iters", "3", "--batch-size", "8", "--buffer-size", "32", "--refresh", "2",
                      "--refresh-every", "1", "--eval-samples", "32", "--reference-steps", "8", "--ref-samples", "16",
                      "--log-every", "1", "--eval-every", "2", "--eval-every-samples", "16"],
              "dmd2": ["--iters", "3", "--batch-size", "8", "--buffer-size", "16", "--refresh", "2",
                       "--teacher-substeps", "2", "--fake-updates", "2", "--eval-samples", "32",
                       "--shift-samples", "8", "--ref-samples", "16", "--log-every", "1", "--eval-every", "2",
                       "--eval-every-samples", "16"]},
}


# ----------------------------------------------------------------------------------------------
# the plan: groups of runs (a table row each), runs named by their flags
# ----------------------------------------------------------------------------------------------

def run_name(method, steps, betas, bound, seed, ramp=0.0):
    ramp = f"-ramp{ramp:g}" if ramp else ""
    return f"{method}-K{steps}-b{'_'.join(f'{b:g}' for b in betas)}{ramp}-{bound}-s{seed}"


def plan(cfg):
    """(groups, runs): groups {label: {kind, method, variant, betas, bound, runs: [names]}},
    runs {name: (method, steps, betas, bound, seed, ramp)}."""
    only = {s.strip() for s in cfg.only.split(",") if s.strip()}
    if not only or only - set(SCRIPTS) - {"ablation"}:
        H.fail(f"--only {cfg.only!r}: give a comma-separated subset of {','.join(SCRIPTS)},ablation")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        H.fail(f"--seeds {cfg.seeds}: give distinct seeds, e.g. --seeds 0 1 2")
    if cfg.jobs <= 0:
        H.fail(f"--jobs must be positive, got {cfg.jobs}")
    groups, runs = {}, {}

    def add(label, kind, method, variant, steps, betas, bound, seeds, ramp=0.0):
        names = []
        for seed in seeds:
            name = run_name(method, steps, betas, bound, seed, ramp)
            runs[name] = (method, steps, betas, bound, seed, ramp)
            names.append(name)
        groups[label] = dict(kind=kind, method=method, variant=variant, steps=steps,
                             betas=list(betas), bound=bound, ramp=ramp, runs=names)

    for method in SCRIPTS:
        if method not in only:
            continue
        for variant, (which, bound) in VARIANTS.items():
            betas = BASELINE[method] if which == "baseline" else DDIL[method]
            add(f"{method} {variant}", "main", method, variant, K, betas, bound, cfg.seeds)
        if method in EXTRA:
            betas, bound = EXTRA[method]
            variant = "+DDIL (" + ", ".join(f"{b:g}" for b in betas) + f")+{bound}"
            add(f"{method} {variant}", "main", method, variant, K, betas, bound, cfg.seeds)
        if method == "dmd2":  # a G trained for one step (DDIL changes nothing at K = 1: input = noise)
            add("dmd2 baseline, 1-step G", "main", method, "baseline, 1-step G", 1,
                BASELINE[method], "none", cfg.seeds)
    if "ablation" in only:
        seeds = cfg.seeds[:BUDGETS[cfg.budget]["ablation_seeds"]]
        for betas in ABLATION:
            add(f"{ABLATION_METHOD} ablation {betas}", "ablation", ABLATION_METHOD,
                "betas (" + ", ".join(f"{b:g}" for b in betas) + ")", K, betas, "none", seeds)
        for betas, ramp in SCHEDULES:
            add(f"{ABLATION_METHOD} ablation {betas} ramp {ramp:g}", "ablation", ABLATION_METHOD,
                "betas (" + ", ".join(f"{b:g}" for b in betas) + f"), beta_student ramped over "
                f"the first {ramp:.0%}", K, betas, "none", seeds, ramp)
    return groups, runs


def argv_of(cfg, name, spec):
    method, steps, betas, bound, seed, ramp = spec
    argv = [sys.executable, SCRIPTS[method], *BUDGETS[cfg.budget][method],
            "--steps", str(steps), "--beta-data", f"{betas[0]:g}", "--beta-teacher", f"{betas[1]:g}",
            "--beta-student", f"{betas[2]:g}", "--beta-ramp", f"{ramp:g}", "--bound", bound,
            "--seed", str(seed),
            "--data-dir", cfg.data_dir, "--out", os.path.join(cfg.runs_dir, name)]
    argv += ["--teacher", cfg.teacher] if cfg.teacher else []
    argv += ["--device", cfg.device] if cfg.device else []
    return argv


def execute(cfg, runs):
    """Run what is missing, one line per run. Returns the names of the runs that failed."""
    todo = [(n, s) for n, s in runs.items()
            if not os.path.isfile(os.path.join(cfg.runs_dir, n, "metrics.json"))]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"(--jobs {cfg.jobs}) in {cfg.runs_dir}", flush=True)
    env = dict(os.environ)
    if cfg.jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))

    def one(item):
        name, spec = item
        out = os.path.join(cfg.runs_dir, name)
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "stdout.log"), "w") as fh:
            rc = subprocess.run(argv_of(cfg, name, spec), cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT).returncode
        return name, rc, time.time() - t0

    failed = []
    with ThreadPoolExecutor(cfg.jobs) as pool:
        for i, (name, rc, dt) in enumerate(pool.map(one, todo), 1):
            path = os.path.join(cfg.runs_dir, name)
            if rc == 0 and os.path.isfile(os.path.join(path, "metrics.json")):
                m = read_json(os.path.join(path, "metrics.json"))
                steps = runs[name][1]
                fd = m["student"].get(str(steps), {}).get("fd", float("nan"))
                print(f"[{i}/{len(todo)}] {name}: {dt:.0f} s, FD at K={steps} {fd:.4g}", flush=True)
            else:
                failed.append(name)
                with open(os.path.join(path, "stdout.log")) as fh:
                    tail = fh.read().strip().splitlines()[-3:]
                print(f"[{i}/{len(todo)}] {name}: FAILED (exit {rc}) after {dt:.0f} s; "
                      f"{os.path.join(path, 'stdout.log')}: " + " | ".join(tail), flush=True)
    return failed


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def spread(values):
    """mean, std (n-1; 0 for one value), min, max, n of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def fd_curve(log_path):
    """(training seconds, fd) of a log.jsonl's --eval-every records (evaluation time excluded)."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path) as fh:
        recs = [json.loads(ln) for ln in fh if ln.strip()]
    return [(r["train_s"], r["fd"]) for r in recs if "fd" in r and "train_s" in r]


def time_to(curve, target):
    """The first training time at which the curve is at or below target (inf: never)."""
    return next((t for t, fd in curve if fd <= target), float("inf"))


def aggregate(groups, runs_dir):
    """results.json's content (without command/date) from the runs' metrics.json and log.jsonl."""
    loaded, missing = {}, []
    for g in groups.values():
        for name in g["runs"]:
            path = os.path.join(runs_dir, name, "metrics.json")
            if os.path.isfile(path):
                loaded[name] = read_json(path)
            elif name not in missing:
                missing.append(name)

    rows, teacher, seen = [], {}, set()
    for label, g in groups.items():
        ms = [loaded[n] for n in g["runs"] if n in loaded]
        for k in sorted({k for m in ms for k in m["student"]}, key=int):
            row = {"group": label, "kind": g["kind"], "method": g["method"], "variant": g["variant"],
                   "train_steps": g["steps"], "K": int(k), "betas": g["betas"], "bound": g["bound"],
                   "ramp": g["ramp"]}
            for metric in METRICS:
                row[metric] = spread([m["student"][k][metric] for m in ms if k in m["student"]])
            rows.append(row)
        for name in g["runs"]:  # teacher rows: the same DDIM whatever the student, so one per seed
            if name not in loaded:
                continue
            seed = loaded[name]["config"]["seed"]
            for k, m in loaded[name]["teacher"].items():
                if (g["bound"], k, seed) not in seen:
                    seen.add((g["bound"], k, seed))
                    teacher.setdefault((g["bound"], int(k)), []).append(m)
    teacher_rows = [{"bound": b, "K": k, **{metric: spread([m[metric] for m in ms]) for metric in METRICS}}
                    for (b, k), ms in sorted(teacher.items())]

    # the difference to the same method's baseline trained for the same K and evaluated at the
    # same K, on the same seeds (the ablation: its own baseline-prior row); "beyond spread" when
    # the min..max ranges over seeds do not overlap
    def is_base(r):
        return r["betas"] == list(BASELINE[r["method"]]) and r["bound"] == "none" and not r["ramp"]
    base = {(r["kind"], r["method"], r["train_steps"], r["K"]): r["fd"] for r in rows
            if is_base(r) and r["fd"]}
    for r in rows:
        b = base.get((r["kind"], r["method"], r["train_steps"], r["K"]))
        if r["fd"] and b and not is_base(r):
            apart = r["fd"]["max"] < b["min"] or r["fd"]["min"] > b["max"]
            r["fd_vs_baseline"] = {"delta": r["fd"]["mean"] - b["mean"],  # (no spread from one seed)
                                   "beyond_spread": apart if min(r["fd"]["n"], b["n"]) > 1 else None}

    cost, shift = {}, {}
    for method in SCRIPTS:
        mg = {g["variant"]: g for g in groups.values() if g["kind"] == "main" and g["method"] == method
              and g["steps"] == K}
        if not mg:
            continue
        done = {v: [loaded[n] for n in g["runs"] if n in loaded] for v, g in mg.items()}
        ips = {v: spread([m.get("it_per_s") for m in ms]) for v, ms in done.items()}
        tts = {v: spread([m.get("train_time_s") for m in ms]) for v, ms in done.items()}
        curves = {v: [fd_curve(os.path.join(runs_dir, n, "log.jsonl")) for n in g["runs"]]
                  for v, g in mg.items()}
        # per DDIL / baseline pair: the time per iteration (from mean it/s), and the training time
        # for each DDIL run to reach the same seed's baseline's final FD, both FDs read off the
        # --eval-every curves (so on the same samples), beside the baseline's own time to it
        ratio, reach = {}, {}
        for a, b in (("+DDIL", "baseline"), ("+DDIL+reflect", "+reflect")):
            if a not in mg or b not in mg:
                continue
            if ips[a] and ips[b]:
                ratio[f"{a} / {b}"] = ips[b]["mean"] / ips[a]["mean"]
            t_a, t_b = [], []
            for ca, cb in zip(curves[a], curves[b]):
                if ca and cb:
                    t_a.append(time_to(ca, cb[-1][1])), t_b.append(time_to(cb, cb[-1][1]))
            if t_b:
                reach[f"{a} / {b}"] = {"ddil_s": spread(t_a), "baseline_s": spread(t_b),
                                       "never_reached": sum(not math.isfinite(t) for t in t_a),
                                       "runs": len(t_b)}
        reach = reach or "not measured (no --eval-every FD curve in the runs' log.jsonl)"
        cost[method] = {"it_per_s": ips, "train_time_s": tts, "time_per_it_ratio": ratio,
                        "time_to_baseline_fd": reach, "fd_curves": curves}
        shift[method] = {}
        for v, g in mg.items():
            cs = [m["covariate_shift"] for m in done[v] if m.get("covariate_shift")]
            if not cs:
                continue
            ts = [round(t, 6) for t in cs[0]["t"]]
            per_t = {key: [spread([c[key][i] for c in cs if len(c[key]) == len(ts)]) for i in range(len(ts))]
                     for key in ("ratio", "err_data", "err_own", "state_fd")}
            shift[method][v] = {"t": ts, **per_t}
    return {"rows": rows, "teacher": teacher_rows, "cost": cost, "covariate_shift": shift,
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


def table_md(res):
    lines = [f"# DDIL results on digits ({res['budget']} budget)", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Seeds: {res['seeds']}; each cell: mean ± std [min, max] over seeds.", ""]
    head = "| method | variant | K | n | FD | KID | precision | recall | entropy | FD vs baseline |"
    sep = "|---|---|---:|---:|---|---|---|---|---|---|"
    for kind, title in (("main", "## Students"), ("ablation", "## Mixing priors (LCM, K = 4, bound none)")):
        rs = [r for r in res["rows"] if r["kind"] == kind]
        if not rs:
            continue
        lines += [title, "", head, sep]
        for r in rs:
            d = r.get("fd_vs_baseline")
            vs = "" if not d else f"{d['delta']:+.3g}" + {True: " (beyond spread)", False: " (within spread)",
                                                          None: ""}[d["beyond_spread"]]
            n = max((r[m]["n"] for m in METRICS if r[m]), default=0)
            variant = r["variant"] + (f" (G trained for K = {r['train_steps']})"
                                      if r["train_steps"] != r["K"] and r["method"] == "dmd2" else "")
            lines.append(f"| {r['method']} | {variant} | {r['K']} | {n} | " +
                         " | ".join(fmt(r[m]) for m in METRICS) + f" | {vs} |")
        lines.append("")
    if res["teacher"]:
        lines += ["## Teacher DDIM (reference rows)", "",
                  "| bound | K | n | FD | KID | precision | recall | entropy |",
                  "|---|---:|---:|---|---|---|---|---|"]
        for r in res["teacher"]:
            n = max((r[m]["n"] for m in METRICS if r[m]), default=0)
            lines.append(f"| {r['bound']} | {r['K']} | {n} | " + " | ".join(fmt(r[m]) for m in METRICS)
                         + " |")
        lines.append("")
    if res["cost"]:
        lines += ["## Cost", "", "| method | variant | iterations/s | train time (s) |", "|---|---|---|---|"]
        for method, c in res["cost"].items():
            for v in c["it_per_s"]:
                lines.append(f"| {method} | {v} | {fmt(c['it_per_s'][v])} | {fmt(c['train_time_s'][v])} |")
        lines.append("")
        for method, c in res["cost"].items():
            ratios = ", ".join(f"{k} = {v:.2f}" for k, v in c["time_per_it_ratio"].items()) or "–"
            reach = c["time_to_baseline_fd"]
            if not isinstance(reach, str):
                reach = "; ".join(f"{k}: {fmt(v['ddil_s'])} s against {fmt(v['baseline_s'])} s"
                                  + (f" ({v['never_reached']} of {v['runs']} seeds never)"
                                     if v["never_reached"] else "") for k, v in reach.items())
            lines.append(f"- {method}: time per iteration (from mean iterations/s): {ratios}. "
                         f"Training time to the baseline's final FD (curve on --eval-every-samples): {reach}.")
        lines.append("")
    if any(res["covariate_shift"].values()):
        lines += ["## Covariate shift: err_own / err_data per grid time (mean ± std over seeds)", ""]
        for method, vs in res["covariate_shift"].items():
            if not vs:
                continue
            ts = next(iter(vs.values()))["t"]
            lines += [f"{method}:", "", "| variant | " + " | ".join(f"t = {t:.3g}" for t in ts) + " |",
                      "|---|" + "---|" * len(ts)]
            for v, s in vs.items():
                lines.append(f"| {v} | " + " | ".join(fmt(x) for x in s["ratio"]) + " |")
            lines.append("")
    if res["missing"] or res["failed"]:
        lines += [f"Missing runs: {', '.join(res['missing']) or 'none'}; "
                  f"failed: {', '.join(res['failed']) or 'none'}", ""]
    return "\n".join(lines)


def plots(res, out):
    """covariate_shift.png, fd_curves.png and fd.png (small: 80 dpi); skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib", flush=True)
        return []
    written = []
    cs = {m: v for m, v in res["covariate_shift"].items() if v}
    if cs:
        fig, axes = plt.subplots(1, len(cs), figsize=(3.2 * len(cs), 2.8), squeeze=False)
        for ax, (method, vs) in zip(axes[0], cs.items()):
            for v in ("baseline", "+DDIL"):
                if v in vs:
                    ok = [(t, s) for t, s in zip(vs[v]["t"], vs[v]["ratio"]) if s]
                    ax.errorbar([t for t, _ in ok], [s["mean"] for _, s in ok],
                                yerr=[s["std"] for _, s in ok], marker="o", capsize=3, label=v)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set(title=method, xlabel="grid time t", ylabel="err_own / err_data")
            ax.invert_xaxis()  # sampling order: t = 1 first
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(out, "covariate_shift.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    curves = {m: c["fd_curves"] for m, c in res["cost"].items() if any(map(any, c.get("fd_curves", {}).values()))}
    if curves:  # FD over training time, one thin line per seed
        fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
        for ax, (method, cv) in zip(axes[0], curves.items()):
            for v, color in (("baseline", "tab:blue"), ("+DDIL", "tab:orange")):  # as covariate_shift.png
                for i, c in enumerate(cv.get(v, [])):
                    if c:
                        ax.plot([t for t, _ in c], [fd for _, fd in c], color=color, lw=1, marker=".",
                                label=v if i == 0 else None)
            ax.set(title=f"{method}, K = {K}", xlabel="training time (s)", ylabel="FD", yscale="log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(out, "fd_curves.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    panels = {}
    for r in res["rows"]:
        if r["K"] == K and r["train_steps"] == K and r["fd"]:
            key = r["method"] if r["kind"] == "main" else f"{r['method']} priors"
            panels.setdefault(key, []).append(r)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
        for ax, (key, rs) in zip(axes[0], panels.items()):
            x = range(len(rs))
            means = [r["fd"]["mean"] for r in rs]
            ax.bar(x, means, yerr=[r["fd"]["std"] for r in rs], capsize=3, color="tab:blue", alpha=0.7)
            ax.vlines(x, [r["fd"]["min"] for r in rs], [r["fd"]["max"] for r in rs], color="k", lw=0.8)
            ax.set_xticks(list(x))
            ax.set_xticklabels([r["variant"].replace("betas ", "").replace(", beta_student ramped over the first",
                                                                             " ramp")
                                for r in rs], rotation=45, ha="right", fontsize=7)
            ref = [t for t in res["teacher"] if t["bound"] == "none" and t["fd"]]
            if ref:  # the many-step teacher (rows are sorted by K)
                ax.axhline(ref[-1]["fd"]["mean"], color="grey", ls="--", lw=0.8)
                ax.text(0, ref[-1]["fd"]["mean"], f"teacher, {ref[-1]['K']} steps", fontsize=6, va="bottom")
            ax.set(title=f"{key}, K = {K}", ylabel="FD (bars: std; lines: min-max)")
        fig.tight_layout()
        written.append(os.path.join(out, "fd.png"))
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


def check_against(res, path):
    """Rows of `res` whose mean metric lies outside the committed run's [min, max] over seeds (FD,
    KID, precision, recall; rows with one seed on either side are compared by value). Returns
    (agreeing, compared, lines for the disagreements)."""
    if not os.path.isfile(path):
        H.fail(f"--check {path} does not exist: give a results.json written by this script")
    old = {(r["group"], r["K"]): r for r in read_json(path)["rows"]}
    agree, compared, bad = 0, 0, []
    for r in res["rows"]:
        o = old.get((r["group"], r["K"]))
        for metric in ("fd", "kid", "precision", "recall"):
            if not o or not o.get(metric) or not r.get(metric):
                continue
            compared += 1
            lo, hi, new = o[metric]["min"], o[metric]["max"], r[metric]["mean"]
            tol = 1e-9 + 1e-6 * abs(hi)  # float noise when both are one seed
            if lo - tol <= new <= hi + tol:
                agree += 1
            else:
                bad.append(f"{r['group']} K={r['K']} {metric}: {new:.4g} outside [{lo:.4g}, {hi:.4g}]")
    return agree, compared, bad


def main(argv=None):
    cfg = H.parse_config(Config, argv)
    cfg.runs_dir = cfg.runs_dir or os.path.join("bench", "out", cfg.budget)
    command = "python bench/results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    groups, runs = plan(cfg)
    if cfg.teacher and not os.path.isfile(cfg.teacher):
        H.fail(f"--teacher {cfg.teacher} does not exist: train one with teacher.py or leave --teacher out")
    # the scripts run in the repository root: make relative paths the caller's
    cfg.runs_dir, cfg.out = os.path.abspath(cfg.runs_dir), os.path.abspath(cfg.out)
    cfg.teacher = os.path.abspath(cfg.teacher) if cfg.teacher else ""
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    failed = execute(cfg, runs) if cfg.run else []
    res = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "budget": cfg.budget, "seeds": cfg.seeds, "flags": {m: BUDGETS[cfg.budget][m] for m in SCRIPTS},
           **aggregate(groups, cfg.runs_dir), "failed": failed}
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

    if failed:
        H.fail(f"{len(failed)} runs failed ({', '.join(failed)}): see their stdout.log; rerun to retry them")
    return res


if __name__ == "__main__":
    main()
