"""A paired A/B test of a flag on one cell of the benchmark: does adding it move the student?

    A  the cell's runs exactly as bench/results.py makes them (same names, budget and
       --runs-dir: a benchmark run already there is A's, and A's runs serve the benchmark)
    B  the same runs with --flags added, named <A's name>-<name>
on the same seeds. Per metric (FD, FD against the teacher's samples, precision, recall, at the
cell's K), the mean paired difference B - A with its 95% interval (bench/results.paired_ci).

    python bench/flag_ab.py --lab cond --method dmd2 --k 4 --variant +DDIL \\
        --flags "--fake-states all" --name fake-all        # mu_fake on all G's outputs (DMD2's)
    python bench/flag_ab.py --name fake-all ... --no-run  # aggregate what is there

Outputs: bench/results/ab-<name>.json and .md; a rerun resumes (finished runs are skipped, and a
run made under other flags stops it, as in bench/results.py).
"""
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import results as R  # noqa: E402

METRICS = ("fd", "fd_teacher", "precision", "recall")


@dataclass
class Config:
    flags: str = H.flag("", "B's flags on top of the cell's, as one string: \"--fake-states all\".")
    name: str = H.flag("", "B's name: its runs are <A's run name>-<name>, its results "
                       "ab-<name>.json and .md.")
    lab: str = H.flag("cond", "The cell's lab.", choices=tuple(R.LABS))
    method: str = H.flag("dmd2", "The cell's method.", choices=tuple(R.SCRIPTS))
    k: int = H.flag(4, "The cell's K.")
    variant: str = H.flag("+DDIL", "The cell's variant (bench/results.py's VARIANTS and EXTRA).")
    seeds: list = H.flag([0, 1, 2, 3, 4], "The seeds, distinct; A and B are paired by seed.")
    budget: str = H.flag("full", "bench/results.py's budget of every run.",
                         choices=("full", "smoke"))
    runs_dir: str = H.flag("", "The runs' folder; default bench/out/<budget>, bench/results.py's.")
    out: str = H.flag("bench/results", "Where ab-<name>.json and .md go.")
    jobs: int = H.flag(1, "Runs at once (more than 1 shares the CPU).")
    teacher: str = H.flag("", "The uncond lab's teacher; default the scripts' own.")
    teacher_cond: str = H.flag("", "The cond lab's teacher; default the scripts' own.")
    data_dir: str = H.flag("data", "The data folder.")
    device: str = H.flag("", "The device of the runs; default each script's own.")
    run: bool = H.flag(True, "Run the missing runs; --no-run only aggregates.")


def plan(cfg):
    """{seed: (A's name, B's name)} and {name: (spec, extra flags)}; one-line errors first."""
    table = {**R.VARIANTS, **R.EXTRA.get((cfg.method, cfg.k), {})}
    flags = shlex.split(cfg.flags)
    if not flags or not cfg.name or not cfg.name.replace("-", "").isalnum():
        H.fail(f"--flags {cfg.flags!r} --name {cfg.name!r}: give B's flags and a name of letters, "
               "digits and dashes")
    if cfg.variant not in table or (cfg.k not in R.STEPS and (cfg.method, cfg.k) not in R.EXTRA):
        H.fail(f"--method {cfg.method} --k {cfg.k} --variant {cfg.variant} is no benchmark cell: "
               f"K in {sorted({*R.STEPS, *(k for m, k in R.EXTRA if m == cfg.method)})}, "
               f"variants {', '.join(table)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or cfg.jobs <= 0:
        H.fail(f"--seeds {cfg.seeds} --jobs {cfg.jobs}: give distinct seeds and a positive --jobs")
    which, bound, p = table[cfg.variant]
    betas = R.BASELINE[cfg.method] if which == "baseline" else R.DDIL
    pairs, runs = {}, {}
    for seed in cfg.seeds:
        spec = (cfg.lab, cfg.method, cfg.k, betas, bound, p, seed)
        a = R.run_name(*spec)
        pairs[seed] = (a, f"{a}-{cfg.name}")
        runs[a], runs[f"{a}-{cfg.name}"] = (spec, []), (spec, flags)
    return pairs, runs


def measured(cfg, pairs):
    """{seed: {"a": {metric: value}, "b": {...}}} of the seeds whose A and B runs both finished."""
    done = {}
    for seed, names in pairs.items():
        paths = [os.path.join(cfg.runs_dir, n, "metrics.json") for n in names]
        if all(os.path.isfile(p) for p in paths):
            a, b = (R.read_json(p) for p in paths)
            done[str(seed)] = {arm: {key: R.value(m, key, cfg.k) for key in METRICS}
                               for arm, m in (("a", a), ("b", b))}
    return done


def rows_of(by_seed):
    """Per metric: A's and B's values (seeds where both are finite) and paired_ci(B, A)."""
    rows = {}
    for key in METRICS:
        ok = sorted((s for s, v in by_seed.items()
                     if R.finite(v["a"][key]) and R.finite(v["b"][key])), key=int)
        a, b = [by_seed[s]["a"][key] for s in ok], [by_seed[s]["b"][key] for s in ok]
        rows[key] = {"seeds": [int(s) for s in ok], "a": a, "b": b, "ci": R.paired_ci(b, a)}
    return rows


def table_md(res):
    lines = [f"# A/B: `{res['flags']}` on {res['cell']}", "",
             f"`{res['command']}` ({res['date']}). A: the benchmark's runs of the cell; "
             "B: the same "
             f"with `{res['flags']}`. Mean paired difference B - A over the seeds where both "
             "finished, with its 95% interval.", "",
             "| metric | A (mean) | B (mean) | B - A [95% CI] | seeds |", "|---|---|---|---|---|"]
    for key, r in res["rows"].items():
        ci = r["ci"]
        if ci is None:
            lines.append(f"| {key} | – | – | – | 0 |")
            continue
        diff = (f"{ci['mean']:+.4f}" + (f" [{ci['lo']:+.4f}, {ci['hi']:+.4f}]"
                                        if ci["lo"] is not None else ""))
        lines.append(f"| {key} | {sum(r['a']) / len(r['a']):.4f} | {sum(r['b']) / len(r['b']):.4f}"
                     f" | {diff} | {len(r['seeds'])} |")
    return "\n".join(lines)


def main(argv=None):
    t0 = time.time()
    cfg = H.parse_config(Config, argv)
    command = "python bench/flag_ab.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    pairs, runs = plan(cfg)
    cfg.runs_dir = os.path.abspath(cfg.runs_dir or os.path.join("bench", "out", cfg.budget))
    cfg.out, cfg.data_dir = os.path.abspath(cfg.out), os.path.abspath(cfg.data_dir)
    cfg.teacher = os.path.abspath(cfg.teacher) if cfg.teacher else ""
    cfg.teacher_cond = os.path.abspath(cfg.teacher_cond) if cfg.teacher_cond else ""

    def argv_of(_, name, spec):  # bench/results.py's command, with B's flags
        return R.argv_of(cfg, name, spec) + runs[name][1]
    specs = {name: spec for name, (spec, _) in runs.items()}
    stale = R.stale_runs(cfg, specs, argv_of)
    if stale:
        H.fail(f"{len(stale)} runs in {cfg.runs_dir} were made with other flags ({stale[0]}): "
               "move them away or give another --runs-dir")
    failed, busy = R.execute(cfg, specs, argv_of) if cfg.run else ([], [])
    path = os.path.join(cfg.out, f"ab-{cfg.name}.json")
    cell = f"{cfg.lab} {cfg.method} K={cfg.k} {cfg.variant}"
    # a fresh checkout has the committed seeds but not their runs: keep them (same cell and flags)
    old = R.read_json(path) if os.path.isfile(path) else {}
    by_seed = old.get("by_seed", {}) if (old.get("cell"), old.get("flags")) == (cell, cfg.flags) \
        else {}
    by_seed.update(measured(cfg, pairs))
    res = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "cell": cell, "flags": cfg.flags, "budget": cfg.budget,
           "runs": {s: list(p) for s, p in pairs.items()}, "by_seed": by_seed,
           "rows": rows_of(by_seed), "failed": failed, "wall_s": time.time() - t0}
    os.makedirs(cfg.out, exist_ok=True)
    H.write_json(res, path)
    with open(os.path.join(cfg.out, f"ab-{cfg.name}.md"), "w") as fh:
        fh.write(table_md(res) + "\n")
    print(table_md(res), flush=True)
    R.stop_if_unfinished(failed, busy)
    return res


if __name__ == "__main__":
    main()
