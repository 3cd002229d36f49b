"""The covariate-shift gap: how much of a student's error on its own states can training on those
states buy? (DAgger's premise, measured rather than assumed.)

For each lab, method, K and seed, three students trained alike but for their input states:
    data-only  (1, 0, 0)     forward-diffused data: PD's and LCM's baseline
    +DDIL      (0.5, 0, 0.5)
    own-only   (0, 0, 1)     the student's own rollouts: DMD2's baseline
are measured on two fixed state sets at each sampling time tau_i < 1, the same for the three:
    data   x = alpha x0 + sigma eps (real images, their labels)
    own    the states the baseline student's own sampler visits from x1 = eps (balanced labels)
The error of a student at a state x is the distance between its sample from x (the rest of its
K-step sampler at its evaluated bound and guidance; one re-noising noise for every student) and
the teacher's 64-step DDIM sample from x down to 0 (at the lab's guidance), in pixels (mean
square) and in the digits classifier's features (mean square per dimension): one error for the
three methods, against the teacher's sample rather than a method's own training target.

    gap        = err(data-only, own) - err(own-only, own)   the most own-state training can buy
    DDIL gain  = err(data-only, own) - err(+DDIL, own)      what DDIL's mixture buys
    excess     = err(data-only, own) - err(data-only, data) the old ratio's numerator less its
                                                            denominator: own states may simply be
                                                            harder, which training cannot remove
each paired by seed with a 95% interval (bench/results.paired_ci). state_fd is the Frechet
distance of the own states from a diffused-data set drawn independently of both (pixels),
beside its floor: the data states against that same set. At t = 1 both sets are the same noise: not reported.
End to end, beside them: each arm's own final evaluation at K (FD, FD against the teacher's
samples, the pixel error to the teacher's sample from the same noise), data-only minus the arm,
paired by seed.

    python bench/shift_gap.py --lab uncond --only pd,lcm         # runs what is missing, then writes
    python bench/shift_gap.py --no-run                           # aggregate what is there
    python bench/shift_gap.py --regime k8 --ks 8 --seeds 0 1    # a regime of the search (REGIMES)

The runs are bench/results.py's (same names, budget and --runs-dir, default bench/out/full): the
data-only / +DDIL (PD, LCM) and own-only / +DDIL (DMD2) runs are its baseline and +DDIL cells, so
one benchmark feeds the other. A regime adds its flags to every run and its name to the run names;
a rollout-only regime (ROLLOUT_ONLY: own-grid) only to the arms with own states, the others
being the base regime's runs. A regime of one method's flags (karras: DMD2's noise grid before
auto) is refused for the other methods.
Outputs: bench/results/shift_gap[-<regime>].json and .md; per seed-cell measurements are cached
in <runs-dir>/shift_gap/ (recomputed when a student's weights change).
"""
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import harness as H  # noqa: E402
import results as R  # noqa: E402
import teacher as T  # noqa: E402

ARMS = {"data-only": (1.0, 0.0, 0.0), "+DDIL": (0.5, 0.0, 0.5), "own-only": (0.0, 0.0, 1.0)}
BASELINE_ARM = {"pd": "data-only", "lcm": "data-only", "dmd2": "own-only"}
LABEL_STEPS = 64  # the teacher's DDIM that labels every state
VERSION = 2  # of the measurement: a cached one of another version is measured again
# the regime search: extra flags for every run (on top of the budget's), and the run-name suffix
REGIMES = {"base": [],
           "k8": [],  # K = 8 (give --ks 8): more of the trajectory is the student's own
           "short": {"pd": ["--iters-per-stage", "25"], "lcm": ["--iters", "125"],
                     "dmd2": ["--iters", "300"]},
           # a student that cannot copy its teacher: half its channels, fitted to its v first
           "narrow": ["--student-width", "0.5", "--head-warmup", "1000"],
           # LCM's own states carried on by the teacher to every grid time: an own-only student
           # then trains the whole consistency chain (at the tau_i alone it collapses)
           "own-grid": {"lcm": ["--student-states", "grid"]},
           # DMD2 on EDM's Karras noise grid, its default under guidance before auto (the record
           # of the guided K = 4 gap made then; DMD2 only)
           "karras": {"dmd2": ["--noise-grid", "karras"]}}
ROLLOUT_ONLY = {"own-grid"}  # regimes whose flags act only on the student's own rollouts: an arm
# without them (beta_student = 0) is the same run as the base regime's, and shares it


@dataclass
class Config:
    budget: str = H.flag("full", "bench/results.py's budget of every run (smoke: the tests' check "
                         "of the plumbing).", choices=("full", "smoke"))
    seeds: list = H.flag([0, 1, 2, 3, 4], "The seeds, distinct; the arms are paired by seed.")
    only: str = H.flag("pd,lcm,dmd2", "A comma-separated subset of the methods.")
    lab: str = H.flag("uncond,cond", "A comma-separated subset of the labs.")
    ks: list = H.flag([2, 4], "The students' K.")
    regime: str = H.flag("base", "A regime of the search: extra flags for every run (REGIMES).",
                         choices=tuple(REGIMES))
    n: int = H.flag(512, "States per set and sampling time.")
    out: str = H.flag("bench/results", "Where shift_gap[-<regime>].json and .md go.")
    runs_dir: str = H.flag("", "The runs' folder; default bench/out/<budget>, bench/results.py's.")
    jobs: int = H.flag(1, "Runs at once (more than 1 shares the CPU).")
    teacher: str = H.flag("", "The uncond lab's teacher; default the scripts' own.")
    teacher_cond: str = H.flag("", "The cond lab's teacher; default the scripts' own.")
    data_dir: str = H.flag("data", "The data folder.")
    device: str = H.flag("", "The device of the runs and the measurement; default cpu here.")
    run: bool = H.flag(True, "Run the missing runs; --no-run only measures and aggregates.")


def plan(cfg):
    """{(lab, method, K, seed): {arm: run name}}, and {run name: (spec, extra flags)} in
    execution order (seed-major, as bench/results.py)."""
    methods, labs = R.subset(cfg.only, R.SCRIPTS, "--only"), R.subset(cfg.lab, R.LABS, "--lab")
    if (not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or not cfg.ks
            or any(k < 2 or LABEL_STEPS % k for k in cfg.ks)):
        H.fail(f"--seeds {cfg.seeds} --ks {cfg.ks}: give distinct seeds and each K >= 2 dividing "
               f"{LABEL_STEPS} (at K = 1 there is no own state but noise)")
    if cfg.n < 16 or cfg.jobs <= 0:
        H.fail(f"--n must be at least 16 and --jobs positive, got {cfg.n}, {cfg.jobs}")
    extra = REGIMES[cfg.regime]
    if isinstance(extra, dict) and cfg.regime not in ROLLOUT_ONLY and set(methods) - set(extra):
        H.fail(f"--regime {cfg.regime} changes only {','.join(extra)}: give --only {','.join(extra)}")
    suffix = "" if cfg.regime == "base" else f"-{cfg.regime}"
    cells, runs = {}, {}
    for seed in cfg.seeds:
        for lab in labs:
            for method in methods:
                for k in cfg.ks:
                    arms = {}
                    for arm, betas in ARMS.items():
                        spec = (lab, method, k, betas, "none", 0.0, seed)
                        flags = extra.get(method, []) if isinstance(extra, dict) else extra
                        shared = cfg.regime in ROLLOUT_ONLY and (betas[2] == 0 or not flags)
                        name = R.run_name(*spec) + ("" if shared else suffix)
                        arms[arm] = name
                        runs[name] = (spec, [] if shared else flags)
                    cells[(lab, method, k, seed)] = arms
    return cells, runs


def argv_fn(cfg, runs):
    def argv_of(_, name, spec):  # bench/results.py's argv, with the regime's flags
        return R.argv_of(cfg, name, spec) + runs[name][1]
    return argv_of


# ----------------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_from(net, x, i, K, y, w, bound, noises=None):
    """A K-step sampler's sample from states x at its i-th sampling time tau_i = 1 - i / K: the
    rest of its grid (noises[i:]: the re-noising steps of a renoise sampler)."""
    return C.ddim_sample(C.guided(net, y, w), x, C.time_grid(K)[i:], bound=bound,
                         noises=None if noises is None else noises[i:])


@torch.no_grad()
def state_sets(net, kind, K, n, seed, w, bound, data_dir="data", device="cpu"):
    """The two fixed state sets at tau_1..tau_K: forward-diffused data (its labels) and the
    network's own sampler's states from x1 = the same eps (balanced labels), with the re-noising
    noises every student then shares, and a second diffused-data set for state_fd's floor.
    Returns {"data": {i: (x, y)}, "own": {i: (x, y)}, "floor": {i: x}}, noises."""
    g = torch.Generator().manual_seed(1000 + seed)
    x, labels = H.load_dataset("digits", data_dir)
    nc = C.unwrap(net).num_classes
    idx, idx2 = (torch.randint(0, len(x), (n,), generator=g) for _ in range(2))
    x0, x0b = H.to_float(x[idx]).to(device), H.to_float(x[idx2]).to(device)
    eps, eps_b = (torch.randn(x0.shape, generator=g).to(device) for _ in range(2))
    noises = [torch.randn(x0.shape, generator=g).to(device) for _ in range(K)]
    y_data = labels[idx].to(device) if nc else None
    y_own = E.eval_labels(n, nc).to(device) if nc else None
    ts = C.time_grid(K)
    _, own = C.ddim_sample(C.guided(net, y_own, w), eps, ts, bound=bound,
                           noises=noises if kind == "renoise" else None, return_states=True)
    sets = {"data": {}, "own": {}, "floor": {}}
    for i in range(K):
        t = torch.full((n,), float(ts[i]), device=device)
        sets["data"][i] = (C.diffuse(x0, t, eps), y_data)
        sets["own"][i] = (own[i], y_own)
        sets["floor"][i] = C.diffuse(x0b, t, eps_b)
    return sets, noises


@torch.no_grad()
def errors(student, kind, K, i, x, y, w, label, bound, noises, features):
    """Per-sample (pixel, feature) error of a student's sample from states x at tau_i against the
    teacher's label samples (and their features)."""
    s = sample_from(student, x, i, K, y, w, bound, noises if kind == "renoise" else None)
    px = (s - label[0]).square().flatten(1).mean(1)
    feat = (features(s) - label[1]).square().mean(1)
    return px.double(), feat.double()


END_KEYS = ("fd", "fd_teacher", "paired_px")  # each run's own final evaluation at its K


def end_metrics(cfg, arms, K):
    """{arm: {key: value}} of the arms' final evaluations (metrics.json) at K: FD, FD against the
    teacher's samples and the paired pixel error from the same noise (end to end, from noise)."""
    out = {}
    for arm, name in arms.items():
        m = R.read_json(os.path.join(cfg.runs_dir, name, "metrics.json"))
        out[arm] = {key: R.value(m, key, K) for key in END_KEYS}
    return out


def measure(cfg, cell, arms, device):
    """One seed-cell: every arm's mean errors on both sets at each tau_i < 1, and state_fd with its
    floor. Cached under <runs-dir>/shift_gap/ by the students' weights."""
    lab, method, K, seed = cell
    nets = {arm: T.load_net(os.path.join(cfg.runs_dir, name, "ckpt.pt"), device)
            for arm, name in arms.items()}
    digests = {arm: E.weights_digest(n[0]) for arm, n in nets.items()}
    path = os.path.join(cfg.runs_dir, "shift_gap", f"{arms['data-only']}-n{cfg.n}.json")
    if os.path.isfile(path):
        cached = R.read_json(path)
        if cached.get("digests") == digests and cached.get("version") == VERSION:
            return {**cached, "end": end_metrics(cfg, arms, K)}
    teacher_path = cfg.teacher_cond if lab == "cond" else cfg.teacher
    teacher = T.load_teacher(teacher_path, "digits", device, cond=lab == "cond",
                             data_dir=cfg.data_dir)
    ws = {arm: E.checkpoint_w(net, ck) for arm, (net, _, ck) in nets.items()}
    w_teacher = ws[BASELINE_ARM[method]][0]
    bound = nets[BASELINE_ARM[method]][2]["config"]["sample_bound"]
    base, kind, _ = nets[BASELINE_ARM[method]]
    sets, noises = state_sets(base, kind, K, cfg.n, seed, ws[BASELINE_ARM[method]][1], bound,
                              cfg.data_dir, device)
    extract = E.digits_extractor(data_dir=cfg.data_dir)

    def features(x):
        return extract(E.to_uint8(x))[0]

    res = {"cell": list(cell), "digests": digests, "version": VERSION, "n": cfg.n, "t": [], "w_teacher": w_teacher,
           "err": {arm: {s: {"px": [], "feat": []} for s in ("data", "own")} for arm in arms},
           "state_fd": [], "state_fd_floor": []}
    for i in range(1, K):  # tau_1 = 1: both sets are the same noise
        res["t"].append(float(C.time_grid(K)[i]))
        for s in ("data", "own"):
            x, y = sets[s][i]
            lab_x = sample_from(teacher, x, i * LABEL_STEPS // K, LABEL_STEPS, y, w_teacher, bound)
            label = (lab_x, features(lab_x))
            for arm, (net, kind_a, _) in nets.items():
                px, feat = errors(net, kind_a, K, i, x, y, ws[arm][1], label, bound, noises,
                                  features)
                res["err"][arm][s]["px"].append(float(px.mean()))
                res["err"][arm][s]["feat"].append(float(feat.mean()))
        a, b, f = (v.flatten(1).double() for v in (sets["data"][i][0], sets["own"][i][0],
                                                    sets["floor"][i]))
        # both against the independently drawn data set f: the own states share the data
        # states' noise, which would pull their FD below any independent floor
        res["state_fd"].append(E.frechet_distance(f, b))
        res["state_fd_floor"].append(E.frechet_distance(f, a))
    m = R.read_json(os.path.join(cfg.runs_dir, arms[BASELINE_ARM[method]], "metrics.json"))
    res["old_ratio"] = (m.get("covariate_shift") or {}).get("ratio")
    H.write_json(res, path)
    return {**res, "end": end_metrics(cfg, arms, K)}


def committed(path, cfg):
    """The seed-cells an earlier run of this benchmark measured (its json's per_seed), at the same
    n and measurement version: a fresh checkout has the results but not the runs, and a rerun
    keeps them (a cell whose runs are here is measured again)."""
    if not os.path.isfile(path):
        return {}
    old = R.read_json(path)
    return {tuple(m["cell"]): m for m in old.get("per_seed", [])
            if m.get("n") == cfg.n and m.get("version") == VERSION}


# ----------------------------------------------------------------------------------------------
# aggregation and outputs
# ----------------------------------------------------------------------------------------------

def aggregate(cells, measured):
    """Rows per (lab, method, K, t): each arm's errors on each set (mean over seeds), the gap,
    DDIL's gain and the excess with paired 95% intervals, per metric (px, feat)."""
    rows = []
    groups = {}
    for (lab, method, K, seed) in cells:
        if (lab, method, K, seed) in measured:
            groups.setdefault((lab, method, K), []).append(measured[(lab, method, K, seed)])
    for (lab, method, K), ms in groups.items():
        for j, t in enumerate(ms[0]["t"]):
            row = {"lab": lab, "method": method, "K": K, "t": t, "seeds": len(ms),
                   "state_fd": R.spread([m["state_fd"][j] for m in ms]),
                   "state_fd_floor": R.spread([m["state_fd_floor"][j] for m in ms]),
                   "old_ratio": R.spread([(m["old_ratio"] or [None] * K)[j + 1] for m in ms])}
            for metric in ("px", "feat"):
                e = {(arm, s): [m["err"][arm][s][metric][j] for m in ms]
                     for arm in ARMS for s in ("data", "own")}
                row[metric] = {
                    "err": {f"{arm} on {s}": R.spread(v) for (arm, s), v in e.items()},
                    "gap": R.paired_ci(e["data-only", "own"], e["own-only", "own"]),
                    "ddil_gain": R.paired_ci(e["data-only", "own"], e["+DDIL", "own"]),
                    "excess": R.paired_ci(e["data-only", "own"], e["data-only", "data"])}
            rows.append(row)
    return rows


def end_rows(measured):
    """Per (lab, method, K) and END_KEYS: data-only's mean and the gains data-only - +DDIL and
    data-only - own-only (positive: the arm is closer), paired by seed over the seeds that have
    them."""
    groups, rows = {}, []
    for cell, m in sorted(measured.items()):
        if m.get("end"):
            groups.setdefault(tuple(cell[:3]), []).append(m["end"])
    for (lab, method, K), ends in groups.items():
        for key in END_KEYS:
            ok = [e for e in ends if all(R.finite(e[a][key]) for a in ARMS)]
            if not ok:
                continue
            base = [e["data-only"][key] for e in ok]
            rows.append({"lab": lab, "method": method, "K": K, "key": key, "seeds": len(ok),
                         "data-only": R.spread(base),
                         "ddil_gain": R.paired_ci(base, [e["+DDIL"][key] for e in ok]),
                         "own_gain": R.paired_ci(base, [e["own-only"][key] for e in ok])})
    return rows


def ci_md(c, scale):
    if not c:
        return "–"
    if c["lo"] is None:
        return f"{c['mean'] * scale:+.3g}"
    mark = "**" if c["lo"] > 0 or c["hi"] < 0 else ""
    return f"{mark}{c['mean'] * scale:+.3g} [{c['lo'] * scale:+.3g}, {c['hi'] * scale:+.3g}]{mark}"


def table_md(res):
    lines = [f"# The covariate-shift gap ({res['regime']} regime, {res['budget']} budget)", "",
             f"`{res['command']}` ({res['date']}; {res['measured']} of {res['cells']} seed-cells "
             f"measured; {res['n']} states per set and time).", "",
             "Error: the student's sample from a state vs the teacher's 64-step DDIM sample from it. "
             "gap = data-only − own-only on own states (what own-state training can buy); "
             "gain = data-only − +DDIL there; excess = data-only's own − data error. Paired by seed, "
             "mean [95% CI]; bold: the interval excludes 0.", ""]
    for metric, scale, unit in (("px", 1e3, "pixel MSE x 1e3"), ("feat", 1e3, "feature MSE x 1e3")):
        lines += [f"## {unit}", "",
                  "| lab | method | K | t | seeds | data-only on own | own-only on own | +DDIL on own "
                  "| data-only on data | gap | DDIL gain | excess |"
                  + (" state FD / floor | old ratio |" if metric == "px" else ""),
                  "|" + "---|" * (14 if metric == "px" else 12)]
        for r in res["rows"]:
            e = r[metric]["err"]

            def m(key):
                return f"{e[key]['mean'] * scale:.3g}" if e[key] else "–"
            cols = [r["lab"], r["method"], str(r["K"]), f"{r['t']:.2f}", str(r["seeds"]),
                    m("data-only on own"), m("own-only on own"), m("+DDIL on own"),
                    m("data-only on data"), ci_md(r[metric]["gap"], scale),
                    ci_md(r[metric]["ddil_gain"], scale), ci_md(r[metric]["excess"], scale)]
            if metric == "px":
                fd, fl, ratio = r["state_fd"], r["state_fd_floor"], r["old_ratio"]
                cols += [f"{fd['mean']:.3g} / {fl['mean']:.3g}" if fd and fl else "–",
                         f"{ratio['mean']:.2f}" if ratio else "–"]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    if res.get("end_rows"):
        lines += ["## End to end: each student's own samples from noise, at its K", "",
                  "Its final evaluation (metrics.json): FD against data, FD against the teacher's "
                  "samples, and the pixel MSE x 1e3 to the teacher's sample from the same noise. "
                  "Gain = data-only − the arm (positive: the arm is closer), paired by seed.", "",
                  "| lab | method | K | metric | seeds | data-only | DDIL gain | own-only gain |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["end_rows"]:
            scale = 1e3 if r["key"] == "paired_px" else 1
            lines.append(f"| {r['lab']} | {r['method']} | {r['K']} | {r['key']} | {r['seeds']} | "
                         f"{r['data-only']['mean'] * scale:.4g} | {ci_md(r['ddil_gain'], scale)} | "
                         f"{ci_md(r['own_gain'], scale)} |")
        lines.append("")
    return "\n".join(lines)


def percent_points(rows):
    """{(lab, method, K): {key: [(t, mean, lo, hi)]}} for gap, DDIL gain and excess in pixels, as
    a percentage of the data-only student's own-state error (the plot's numbers)."""
    panels = {}
    for r in rows:
        e = r["px"]["err"]["data-only on own"]["mean"]
        for key in ("gap", "ddil_gain", "excess"):
            c = r["px"][key]
            if c and c["lo"] is not None:
                panels.setdefault((r["lab"], r["method"], r["K"]), {}).setdefault(key, []).append(
                    (r["t"], 100 * c["mean"] / e, 100 * c["lo"] / e, 100 * c["hi"] / e))
    return panels


def plot(res, path):
    """One panel per (lab, method, K): percent_points against t, with their 95% intervals."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = percent_points(res["rows"])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), dpi=80, sharey=True,
                             squeeze=False)
    for ax, ((lab, method, K), series) in zip(axes[0], panels.items()):
        for j, (key, label) in enumerate((("gap", "gap"), ("ddil_gain", "DDIL gain"),
                                          ("excess", "excess"))):
            pts = series.get(key, [])
            ax.errorbar([t + (j - 1) * 0.02 for t, *_ in pts], [m for _, m, _, _ in pts],
                        yerr=[[m - lo for _, m, lo, _ in pts], [hi - m for _, m, _, hi in pts]],
                        fmt="o", ms=4, capsize=2, color=f"C{j}", label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"{lab} {method} K={K}", xlabel="t", xlim=(0, 1))
    axes[0][0].set_ylabel("% of data-only's own-state error (px)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None):
    t0 = time.time()
    cfg = H.parse_config(Config, argv)
    command = "python bench/shift_gap.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}", flush=True)
    cells, runs = plan(cfg)
    cfg.runs_dir = os.path.abspath(cfg.runs_dir or os.path.join(ROOT, "bench", "out", cfg.budget))
    cfg.out, cfg.data_dir = os.path.abspath(cfg.out), os.path.abspath(cfg.data_dir)
    for flag in ("teacher", "teacher_cond"):
        path = getattr(cfg, flag)
        if path and not os.path.isfile(path):
            H.fail(f"--{flag.replace('_', '-')} {path} does not exist")
        setattr(cfg, flag, os.path.abspath(path) if path else "")
    argv_of = argv_fn(cfg, runs)
    specs = {name: spec for name, (spec, _) in runs.items()}
    stale = R.stale_runs(cfg, specs, argv_of)
    if stale:
        H.fail(f"{len(stale)} runs in {cfg.runs_dir} were made with other flags ({stale[0]}"
               f"{', ...' if len(stale) > 1 else ''}): move them away or give another --runs-dir")
    failed, busy = R.execute(cfg, specs, argv_of) if cfg.run else ([], [])
    device = cfg.device or "cpu"
    name = "shift_gap" + ("" if cfg.regime == "base" else f"-{cfg.regime}")
    fresh = {}
    for cell, arms in cells.items():
        if all(os.path.isfile(os.path.join(cfg.runs_dir, n, "metrics.json")) for n in arms.values()):
            fresh[cell] = measure(cfg, cell, arms, device)
            print(f"measured {cell}", flush=True)
    # read after measuring, so that a run of other cells beside this one keeps its own
    measured = {**committed(os.path.join(cfg.out, name + ".json"), cfg), **fresh}
    res = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "budget": cfg.budget, "regime": cfg.regime, "regime_flags": REGIMES[cfg.regime],
           "n": cfg.n, "seeds": cfg.seeds, "cells": len(set(cells) | set(measured)),
           "measured": len(measured), "rows": aggregate(sorted(set(cells) | set(measured)), measured),
           "end_rows": end_rows(measured), "failed": failed,
           "per_seed": [measured[c] for c in sorted(measured)]}
    res["wall_s"] = time.time() - t0
    os.makedirs(cfg.out, exist_ok=True)
    H.write_json(res, os.path.join(cfg.out, name + ".json"))
    with open(os.path.join(cfg.out, name + ".md"), "w") as fh:
        fh.write(table_md(res) + "\n")
    png = plot(res, os.path.join(cfg.out, name + ".png"))
    print(f"wrote {name}.json, .md{' and .png' if png else ''} in {cfg.out}", flush=True)
    R.stop_if_unfinished(failed, busy)
    return res


if __name__ == "__main__":
    main()
