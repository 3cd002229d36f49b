"""DMD2's one-step generator on digits: a sweep of the settings that matter at this scale, with FD
curves to convergence, against the 64-step teacher on the same seeds and protocol.

    python bench/dmd2_sweep.py                              # every setting, seed 0 (resumable)
    python bench/dmd2_sweep.py --settings recipe,ema --seeds 0 1 2
    python bench/dmd2_sweep.py --no-run                     # aggregate what is there
    python bench/dmd2_sweep.py --steps 4 --iters 1500 --settings recipe --seeds 0 1 2  # a K-step G

Each run is `python dmd2_ddil.py --steps K --iters ITERS --eval-every 500 --eval-every-samples
1000 <setting's flags> --seed S` into <runs-dir>/[cond-]<setting>[-K<K>]-s<S> (default
bench/out/dmd2_sweep, gitignored); a run whose metrics.json exists is skipped, and one whose
config.json differs from what its command would write now stops the sweep (bench/results.py's check). K (--steps) is 1
unless given; a K-step sweep writes its own dmd2_sweep[-cond]-K<K>.json and .md. Settings change
one thing from the recipe (dmd2_ddil.py's defaults) unless their name says otherwise. Per run:
    fd       the final FD of G at K on 2000 samples (metrics.json)
    teacher  the 64-step teacher's FD, same seed and protocol; ratio = fd / teacher
    curve    FD on 1000 samples every 500 iterations (the same noise each time)
    noise    the sd of FD over 4 independent 1000-sample sets of the final G: the curve's noise
    settled  the last three curve points lie within 2 noise of each other
    drift    the mean of the curve's last 5 points minus that of the 5 before (2500 iterations
             each), with a 95% interval (Welch): a curve still falling has it below 0. The
             curve's points share their noise, so their spread is G's own oscillation: a curve
             can be flat (drift across 0) and not settled by the three-point test
Outputs: bench/results/dmd2_sweep.json and .md (the table and, with matplotlib, the curves).
"""
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate as E  # noqa: E402
import harness as H  # noqa: E402
import results as R  # noqa: E402
from teacher import load_net  # noqa: E402

SETTINGS = {  # name: flags on top of the recipe (dmd2_ddil.py's defaults)
    "recipe": [],
    "lr3e-5": ["--lr", "3e-5"],
    "lr3e-5-10k": ["--lr", "3e-5", "--iters", "10000"],  # (the same run, longer)
    "ema0.99": ["--ema-decay", "0.99"],
    "lr3e-5-ema-10k": ["--lr", "3e-5", "--ema-decay", "0.99", "--iters", "10000"],  # the two best
    "gan1e-2": ["--gan-weight", "1e-2"],
    "fake10": ["--fake-updates", "10"],
    "bound-none": ["--bound", "none"],  # DMD2 as published: G's output unbounded in training
    "no-gan": ["--gan-weight", "0"],
    "karras": ["--noise-grid", "karras"],  # the guided lab's default before auto (time) there
    "karras-lr3e-5-10k": ["--noise-grid", "karras", "--lr", "3e-5", "--iters", "10000"],
}
CURVE_SAMPLES, NOISE_SETS = 1000, 4


@dataclass
class Config:
    settings: str = H.flag(",".join(SETTINGS), "A comma-separated subset of SETTINGS.")
    seeds: list = H.flag([0], "The seeds of every setting.")
    iters: int = H.flag(4000, "Training iterations of every run.")
    steps: int = H.flag(1, "K, G's sampling steps, in every run.")
    out: str = H.flag("bench/results", "Where dmd2_sweep.json and .md go.")
    runs_dir: str = H.flag("bench/out/dmd2_sweep", "The runs' folder.")
    lab: str = H.flag("uncond", "uncond, or cond (--cond --guidance 2, as bench/results.py).",
                      choices=("uncond", "cond"))
    run: bool = H.flag(True, "Run the missing runs; --no-run only aggregates.")


def run_name(cfg, setting, seed):
    k = f"-K{cfg.steps}" if cfg.steps != 1 else ""
    return f"{'' if cfg.lab == 'uncond' else 'cond-'}{setting}{k}-s{seed}"


def argv_of(cfg, setting, seed):
    return [sys.executable, "dmd2_ddil.py", "--steps", str(cfg.steps), "--iters", str(cfg.iters),
            "--eval-every", "500", "--eval-every-samples", str(CURVE_SAMPLES),
            *R.LABS[cfg.lab]["dmd2"], *SETTINGS[setting], "--seed", str(seed),
            "--out", os.path.join(cfg.runs_dir, run_name(cfg, setting, seed))]


def curve_noise(run_dir):
    """The sd of G's FD over NOISE_SETS independent CURVE_SAMPLES-sample sets (cached)."""
    path = os.path.join(run_dir, "fd_noise.json")
    if os.path.isfile(path):
        return R.read_json(path)["sd"]
    net, kind, ck = load_net(os.path.join(run_dir, "ckpt.pt"))
    fds = [E.evaluate_net(net, kind, ck["steps"], CURVE_SAMPLES, seed=5000 + i,
                          w=E.checkpoint_w(net, ck)[1])[0]["fd"] for i in range(NOISE_SETS)]
    H.write_json({"fds": fds, "sd": statistics.stdev(fds)}, path)
    return statistics.stdev(fds)


def drift(curve, n=5):
    """(mean of the last n FDs - mean of the n before, its 95% half-width); None for a curve of
    fewer than 2n points (a shorter one would reach back into the first fall)."""
    fds = [fd for _, fd in curve]
    if len(fds) < 2 * n:
        return None
    a, b = fds[-2 * n:-n], fds[-n:]
    se = (statistics.variance(a) / n + statistics.variance(b) / n) ** 0.5
    return statistics.fmean(b) - statistics.fmean(a), R.T975[2 * n - 3] * se  # df 2n - 2


def row(cfg, setting, seed):
    d = os.path.join(cfg.runs_dir, run_name(cfg, setting, seed))
    m = R.read_json(os.path.join(d, "metrics.json"))
    curve = R.fd_curve(os.path.join(d, "log.jsonl"))
    noise = curve_noise(d)
    last = [fd for _, fd in curve[-3:]]
    g = m["student"][str(cfg.steps)]
    fd, teacher = g["fd"], m["teacher"]["64"]["fd"]
    return {"setting": setting, "seed": seed, "fd": fd, "teacher": teacher, "ratio": fd / teacher,
            "fd_teacher": g.get("fd_teacher"), "curve": curve, "noise": noise,
            "settled": len(last) == 3 and max(last) - min(last) <= 2 * noise,
            "drift": drift(curve),
            "precision": g.get("precision"), "recall": g.get("recall"),
            "floor_fd_teacher": (m.get("teacher_ref") or {}).get("floor_fd"),
            "train_time_s": m.get("train_time_s")}


def table_md(res):
    k = res.get("steps", 1)
    lines = [f"# DMD2 {'one-step' if k == 1 else f'{k}-step'} sweep on digits ({res['lab']} lab)",
             "", f"`{res['command']}` ({res['date']}). FD of G at K = {k} on 2000 samples "
             "against the "
             f"64-step teacher's on the same seed and protocol; curve: FD on {CURVE_SAMPLES} "
             f"samples every 500 iterations; noise: sd of that FD over {NOISE_SETS} sample sets; "
             "settled: the last three points within 2 noise; drift: mean of the last 5 points "
             "minus the 5 before, 95% interval (a flat curve has it across 0).", "",
             "| setting | flags | seed | FD | teacher | ratio | FD vs teacher (floor) | precision / "
             "recall | curve | noise | settled | drift |", "|" + "---|" * 12]
    for r in res["rows"]:
        curve = " ".join(f"{fd:.3g}" for _, fd in r["curve"])
        ft = (f"{r['fd_teacher']:.3g} ({r['floor_fd_teacher']:.3g})"
              if r["fd_teacher"] is not None and r["floor_fd_teacher"] is not None else "–")
        d = drift(r["curve"])
        d = f"{d[0]:+.3f} ± {d[1]:.3f}" if d else "–"
        lines.append(f"| {r['setting']} | `{' '.join(SETTINGS.get(r['setting'], [])) or '(defaults)'}` | "
                     f"{r['seed']} | {r['fd']:.4f} | {r['teacher']:.4f} | {r['ratio']:.2f} | {ft} | "
                     f"{r['precision']:.2f} / {r['recall']:.2f} | {curve} | {r['noise']:.3f} | "
                     f"{'yes' if r['settled'] else 'no'} | {d} |")
    return "\n".join(lines)


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for r in res["rows"]:
        its, fds = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(its, fds, marker="o", ms=3, label=f"{r['setting']} s{r['seed']}")
    teachers = [r["teacher"] for r in res["rows"]]
    if teachers:
        # the teacher's FD is the final evaluation's (more samples: FD's upward bias is smaller)
        ax.axhline(statistics.fmean(teachers), color="k", ls="--", lw=1,
                   label="teacher, 64 steps (final evaluation's n)")
    ax.set(yscale="log", xlabel="iteration", ylabel=f"FD ({CURVE_SAMPLES} samples)",
           title=f"DMD2, {res.get('steps', 1)} step(s), digits")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv=None):
    t0 = time.time()
    cfg = H.parse_config(Config, argv)
    settings = R.subset(cfg.settings, SETTINGS, "--settings")
    command = "python bench/dmd2_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    cfg.runs_dir, cfg.out = os.path.abspath(cfg.runs_dir), os.path.abspath(cfg.out)
    name = ("dmd2_sweep" + ("" if cfg.lab == "uncond" else "-cond")
            + ("" if cfg.steps == 1 else f"-K{cfg.steps}"))
    path = os.path.join(cfg.out, name + ".json")
    # a run folder made with other flags (an older recipe, another default) is not this setting
    runs = {run_name(cfg, setting, seed): (setting, seed) for seed in cfg.seeds for setting in settings}
    stale = R.stale_runs(cfg, runs, lambda cfg, name, spec: argv_of(cfg, *spec))
    if stale:
        H.fail(f"{len(stale)} runs in {cfg.runs_dir} were made with other flags ({stale[0]}"
               f"{', ...' if len(stale) > 1 else ''}): move them away or give another --runs-dir")
    fresh, failed = {}, []
    for seed in cfg.seeds:
        for setting in settings:
            d = os.path.join(cfg.runs_dir, run_name(cfg, setting, seed))
            if cfg.run and not os.path.isfile(os.path.join(d, "metrics.json")):
                os.makedirs(d, exist_ok=True)
                t1 = time.time()
                with open(os.path.join(d, "stdout.log"), "w") as fh:
                    rc = subprocess.run(argv_of(cfg, setting, seed), cwd=ROOT, stdout=fh,
                                        stderr=subprocess.STDOUT).returncode
                print(f"{run_name(cfg, setting, seed)}: exit {rc}, {time.time() - t1:.0f} s",
                      flush=True)
                if rc:
                    failed.append(run_name(cfg, setting, seed))
            if os.path.isfile(os.path.join(d, "metrics.json")):
                fresh[(setting, seed)] = row(cfg, setting, seed)
    # a fresh checkout has the committed rows but not their runs: keep those rows. Read after the
    # runs, so that sweeps of other seeds running beside this one keep theirs too.
    kept = {(r["setting"], r["seed"]): r for r in (R.read_json(path)["rows"]
                                                   if os.path.isfile(path) else [])}
    kept.update(fresh)
    order = list(SETTINGS)
    rows = [kept[k] for k in sorted(kept, key=lambda k: (order.index(k[0]) if k[0] in order
                                                        else len(order), k[1]))]
    res = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "lab": cfg.lab, "steps": cfg.steps, "iters": cfg.iters,
           "settings": {s: SETTINGS[s] for s in SETTINGS},
           "rows": rows, "failed": failed, "wall_s": time.time() - t0}
    os.makedirs(cfg.out, exist_ok=True)
    H.write_json(res, path)
    with open(os.path.join(cfg.out, name + ".md"), "w") as fh:
        fh.write(table_md(res) + "\n")
    plot(res, os.path.join(cfg.out, name + ".png"))
    print(table_md(res), flush=True)
    if failed:
        H.fail(f"{len(failed)} runs failed ({', '.join(failed)}): see their stdout.log")
    return res


if __name__ == "__main__":
    main()
