"""CPU rehearsal of the 8-GPU path: every `torchrun --nproc_per_node=8` command of
docs/reproduce.md, in order, on this CPU with gloo ranks, through a kill and a resume.

    python bench/rehearsal.py                     # 8 ranks (OMP_NUM_THREADS=1 each), both data sets
    python bench/rehearsal.py --ranks 2 --datasets cifar10 --doc my-copy-of-reproduce.md
    python bench/rehearsal.py --dry               # each command against its script's flags: seconds

Each documented command runs as written, with only --nproc_per_node set to --ranks, the runs/...
paths of --out and --teacher moved into a scratch folder, and the documented flags in SHRINK
(below) appended: a narrow U-Net (teacher.py --ch, which the students inherit), a few iterations,
a batch of 2 per rank, small buffers and evaluations, and --data-dir pointing at synthetic data
written first in the real on-disk formats (CIFAR-10 python pickles, downsampled-ImageNet npz
batches: tests/test_data.py's writers). An appended flag that the documented command already
sets is refused (the rehearsal would no longer run the documented command).

Every command runs twice into the same --out:
  1. killed: rank 0 logs step final-1 (its last checkpoint is older) and sends SIGKILL to
     torchrun and every worker (a node lost mid-run: nothing gets to clean up);
  2. resumed: the same command again; it must say it resumes, finish, and leave ckpt.pt,
     config.json, samples.png, metrics.json (methods), log.jsonl with steps 1..final each once,
     for the methods every rank's replay-buffer sidecar ckpt.pt.rank<r>.step<final> and none
     stale, and no temporary file.
The ranks agree: after main() returns, every rank's network digest is gathered and must be one
value, equal to the checkpoint's network (the EMA for the teacher, which DDP does not
synchronise, so a rank that diverged shows). For the last method command of each data set (or
every command, --compare all) the same command also runs uninterrupted into a third --out: its
checkpoint (every tensor and count: networks, optimisers, rank 0's buffers) and every rank's
sidecar must equal the killed-and-resumed run's: bit for bit at 2 ranks; beyond 2 to float
rounding (RTOL, ATOL), because a resumed process's fresh DDP reduces its first iteration in
another bucket order, and gloo's ring sums more than 2 contributions in another order (see
compare). The result says which.

Evaluation: the Inception weights cannot be had offline, so the ranks start through this file
(`--child SCRIPT ARGS...`), which swaps a raw-pixel stand-in (the first 256 pixels of each uint8
image) for the Inception feature extractor (evaluate.inception_extractor, evaluate.sample_metrics)
and skips evaluate.check_feature_extractor, then calls the script's main(ARGS): the evaluation
path runs, its FID / KID numbers mean nothing. It says so on rank 0's output. After main() the
child gathers the ranks' digests, then passes a barrier and destroys the process group (its own
addition: a rank that destroyed its gloo group while another was still in the gather aborted,
"terminate called without an active exception", at 8 ranks).

Prints a markdown table (command, ranks, wall seconds, result) and exits 1 on any failure. The
scratch folder is removed at the end unless --workdir is given or --keep; a rehearsal of a
command first removes its --out there.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "reproduce.md")
PREFIX = "torchrun --nproc_per_node=8 "

# The documented flags appended to each documented command: everything that differs from it,
# besides --nproc_per_node, the scratch paths and --data-dir. The iteration counts, --ckpt-every
# and --log-every set the kill: checkpoints at every 2nd step, the kill after logging step
# final-1 (PD: 2 stages of 3 iterations, 8 -> 4 -> 2 steps, killed in the second stage).
SHRINK = {
    "teacher.py": ["--ch", "8", "--iters", "4", "--batch-size", "2", "--ckpt-every", "2",
                   "--log-every", "1", "--sample-count", "4", "--sample-steps", "2"],
    "pd_ddil.py": ["--teacher-steps", "8", "--steps", "2", "--iters-per-stage", "3",
                   "--batch-size", "2", "--buffer-size", "8", "--refresh", "2",
                   "--stage-eval-samples", "8", "--eval-samples", "8", "--shift-samples", "4",
                   "--reference-steps", "4", "--ckpt-every", "2", "--log-every", "1"],
    "lcm_ddil.py": ["--iters", "4", "--batch-size", "2", "--buffer-size", "8", "--refresh", "2",
                    "--eval-samples", "8", "--shift-samples", "4", "--reference-steps", "4",
                    "--ckpt-every", "2", "--log-every", "1"],
    "dmd2_ddil.py": ["--iters", "4", "--batch-size", "2", "--buffer-size", "8", "--refresh", "2",
                     "--eval-samples", "8", "--shift-samples", "4", "--reference-steps", "4",
                     "--ckpt-every", "2", "--log-every", "1"],
}
# ... and per (script, data set) where a preset needs more: LCM's imagenet64 preset takes its
# batch of 256 in 8 micro-batches, which a batch of 2 cannot be split into (2 keeps the path)
SHRINK_DATASET = {
    ("lcm_ddil.py", "imagenet64"): ["--grad-accum", "2"],
}
DATASETS = ("cifar10", "imagenet64")
PIXELS = 256  # the stand-in features: the first 256 pixel values of each uint8 image


# ----------------------------------------------------------------------------------------------
# the child: what torchrun starts on every rank
# ----------------------------------------------------------------------------------------------

def pixel_features(x_uint8):
    """The stand-in for Inception: raw pixels, (features [N, 256] float64, no classes)."""
    return x_uint8.flatten(1)[:, :PIXELS].double(), None


def install_stand_in():
    """Route every Inception use in evaluate.py to pixel_features (no weights needed offline)."""
    import evaluate as E
    import harness as H
    real_metrics = E.sample_metrics

    def sample_metrics(samples, dataset="digits", data_dir="data", cache_dir=E.CACHE_DIR,
                       extractor=None, name="", **kw):
        if extractor is None and dataset != "digits":
            extractor, name = pixel_features, "rehearsal-pixels"
        return real_metrics(samples, dataset, data_dir, cache_dir, extractor, name, **kw)

    def check_feature_extractor(dataset, device="cpu", inception_weights=""):
        if H.is_main():
            print("rehearsal: evaluation uses a raw-pixel stand-in for the Inception features "
                  "(bench/rehearsal.py); its FID / KID numbers mean nothing", flush=True)

    E.sample_metrics = sample_metrics
    E.inception_extractor = lambda device="cpu", weights="", batch=250: pixel_features
    E.check_feature_extractor = check_feature_extractor


def descendants(pid):
    """Every live descendant of pid (from /proc), children first."""
    kids = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += kids.get(p, [])
    return out


def alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all_from_rank0():
    """SIGKILL torchrun (this process's parent), every other worker, then this rank."""
    me, agent = os.getpid(), os.getppid()
    for pid in [agent] + [p for p in descendants(agent) if p != me]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(me, signal.SIGKILL)


def child(argv):
    """`--child SCRIPT ARGS`: one torchrun rank of a documented command."""
    sys.path.insert(0, ROOT)
    script, args = argv[0], argv[1:]
    if os.environ.get("REHEARSAL_PIDFILE"):
        with open(os.environ["REHEARSAL_PIDFILE"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
    install_stand_in()
    import importlib

    import torch.distributed as dist

    import harness as H
    kill_at = int(os.environ.get("REHEARSAL_KILL_AT_STEP", "0"))
    if kill_at:
        log = H.Logger.log

        def log_then_kill(self, step, **metrics):
            log(self, step, **metrics)
            if self.main and step >= kill_at:
                print(f"rehearsal: SIGKILL to torchrun and every rank after logging step {step}",
                      flush=True)
                kill_all_from_rank0()
        H.Logger.log = log_then_kill
    net = importlib.import_module(os.path.basename(script)[:-3]).main(args)
    digest = state_digest(net.state_dict())
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, digest)
        if dist.get_rank() == 0:
            print("rehearsal-ranks: " + json.dumps(found), flush=True)
        # without this barrier, a rank destroying its gloo group while another is still in the
        # gather aborts at 8 ranks ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    else:
        print("rehearsal-ranks: " + json.dumps([digest]), flush=True)
    # the run is complete and reported: skip the interpreter's teardown, where gloo's threads
    # sometimes end in "terminate called without an active exception" (seen at 2 and 8 ranks)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# digests
# ----------------------------------------------------------------------------------------------

def state_digest(obj, skip=()):
    """sha256 of every tensor (names, dtypes, shapes, values) and number in obj, through dicts,
    lists and tuples; keys in `skip` (at any depth) left out."""
    import torch
    h = hashlib.sha256()

    def walk(o, key):
        if torch.is_tensor(o):
            t = o.detach().cpu()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
        elif isinstance(o, dict):
            for k, v in o.items():
                if k not in skip:
                    walk(v, f"{key}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{key}.{i}")
        else:
            h.update(f"{key}={o!r}".encode())
    walk(obj, "")
    return h.hexdigest()[:16]


def load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# the documented commands
# ----------------------------------------------------------------------------------------------

def documented_commands(doc):
    """Every line of doc that starts (after its indentation) with `torchrun --nproc_per_node=8`."""
    with open(doc) as fh:
        return [ln.strip() for ln in fh if ln.strip().startswith(PREFIX)]


def flag_value(args, name, default=None):
    """The value of --name in args (`--name v` or `--name=v`; the last one wins, as argparse)."""
    value = default
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def plan(line, scratch):
    """(script, documented args, args as run, dataset) of one documented line: runs/... paths
    of --out and --teacher moved under scratch, SHRINK and --data-dir appended. Raises
    ValueError for a line this rehearsal cannot run as documented."""
    tokens = shlex.split(line)
    if tokens[:2] != ["torchrun", "--nproc_per_node=8"] or len(tokens) < 3:
        raise ValueError(f"not a `{PREFIX.strip()} SCRIPT ...` line")
    script, args = tokens[2], tokens[3:]
    if script not in SHRINK:
        raise ValueError(f"{script}: no SHRINK entry in bench/rehearsal.py (only "
                         f"{', '.join(SHRINK)})")
    dataset = flag_value(args, "--dataset", "digits")
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset}: the rehearsal writes data for "
                         f"{', '.join(DATASETS)} only")
    extra = SHRINK[script] + SHRINK_DATASET.get((script, dataset), [])
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    clash = sorted(given & {a for a in extra if a.startswith("--")})
    if clash:
        raise ValueError(f"the documented command sets {', '.join(clash)}, which SHRINK would "
                         f"override: shrink it another way")
    for name in ("--out", "--teacher"):  # nothing may be read or written outside the scratch
        value = flag_value(args, name, "runs/" if name == "--teacher" else None)
        if value is None or not value.startswith("runs/"):
            raise ValueError(f"{name} {value}: the rehearsal moves runs/... paths into its "
                             f"scratch folder, and needs an --out there")
    run = []
    for i, a in enumerate(args):
        if i and args[i - 1] in ("--out", "--teacher") and a.startswith("runs/"):
            a = os.path.join(scratch, a)
        for name in ("--out=", "--teacher="):
            if a.startswith(name + "runs/"):
                a = name + os.path.join(scratch, a[len(name):])
        run.append(a)
    run += extra + ["--data-dir", os.path.join(scratch, "data", dataset)]
    return script, args, run, dataset


def short(script, args):
    """A documented command shortened for the table: the --teacher path left out, the --out
    folder's name at the end."""
    keep, out, skip = [], "", False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("--teacher", "--out") and i + 1 < len(args):
            out = args[i + 1] if a == "--out" else out
            skip = True
            continue
        keep.append(a)
    return " ".join([script.replace(".py", ""), *keep]) + (f" -> {os.path.basename(out)}"
                                                           if out else "")


def final_step(script, run_args):
    """The step a finished run ends at, from the script's own flag parser and checks (a bad
    flag or value: the script's one-line error, as SystemExit)."""
    sys.path.insert(0, ROOT)
    import importlib
    import harness as H
    mod = importlib.import_module(script[:-3])
    cfg = H.parse_config(mod.Config, run_args, getattr(mod, "PRESETS", None))
    if hasattr(mod, "check"):  # a method's checks of its flags' values (pure, no files)
        mod.check(cfg)
    if script == "pd_ddil.py":
        total = len(mod.stage_steps(cfg.teacher_steps, cfg.steps)) * cfg.iters_per_stage
        return min(cfg.iters or total, total)
    return cfg.iters


# ----------------------------------------------------------------------------------------------
# running and checking
# ----------------------------------------------------------------------------------------------

class Failed(Exception):
    pass


def free_port():
    """A TCP port nobody listens on now (torchrun's --standalone costs ~1.5 s more per start)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, run_args, ranks, scratch, log_path, timeout, kill_at=0):
    """One torchrun of `--child script run_args` at `ranks` ranks, cwd scratch; returns (return
    code, output, wall seconds). Every rank it started is gone when it returns."""
    pidfile = log_path + ".pids"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", REHEARSAL_PIDFILE=pidfile,
               PYTHONUNBUFFERED="1")
    env.pop("REHEARSAL_KILL_AT_STEP", None)
    if kill_at:
        env["REHEARSAL_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__),
           "--child", script, *run_args]
    t0 = time.time()
    with open(log_path, "w") as fh:
        fh.write(" ".join(map(shlex.quote, cmd)) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid] + descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            rc = "timeout"
    wall = time.time() - t0
    left = []  # ranks that outlived their torchrun (a kill that missed one): killed here by pid
    if os.path.isfile(pidfile):
        for pid in map(int, open(pidfile).read().split()):
            deadline = time.time() + 10
            while alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if alive(pid):
                left.append(pid)
                os.kill(pid, signal.SIGKILL)
        os.remove(pidfile)
    with open(log_path) as fh:
        output = fh.read()
    if left:
        raise Failed(f"rank processes {left} outlived torchrun (killed now)")
    if rc == "timeout":
        raise Failed(f"no end after {timeout} s: {error_line(output)}")
    return rc, output, wall


def error_line(output):
    """The first one-line error (harness.fail: 'error: ...'), a rank's abort, or the last line
    of the output."""
    for ln in output.splitlines():
        m = re.search(r"(error: .*)", ln)
        if m and "ChildFailedError" not in ln:
            return m.group(1)[:300]
    if "terminate called" in output:
        done = "rehearsal-ranks: " in output
        return (f"a rank aborted ('terminate called without an active exception', gloo)"
                f"{' at exit, after main() returned' if done else ''}")
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def check_killed(rc, output, out, final):
    """The first run was killed by SIGKILL after a checkpoint older than its last steps."""
    if rc == 0:
        raise Failed("the run finished before the kill")
    if rc != -signal.SIGKILL:
        raise Failed(f"rc {rc}: {error_line(output)}")
    if "rehearsal: SIGKILL" not in output:
        raise Failed(f"killed, but not by the rehearsal: {error_line(output)}")
    ckpt = os.path.join(out, "ckpt.pt")
    if not os.path.isfile(ckpt):
        raise Failed("killed before any checkpoint")
    step = load(ckpt)["step"]
    if not 0 < step < final:
        raise Failed(f"killed with a checkpoint at step {step} of {final}")
    return step


def check_outputs(script, out, final, ranks):
    """The finished run's files: complete, one log record per step and kind, sidecars of the
    final step only; returns the checkpoint."""
    method = script != "teacher.py"
    names = ["ckpt.pt", "config.json", "log.jsonl", "samples.png"] + (["metrics.json"] if method
                                                                      else [])
    missing = [n for n in names if not os.path.isfile(os.path.join(out, n))]
    if missing:
        raise Failed(f"missing {', '.join(missing)}")
    ck = load(os.path.join(out, "ckpt.pt"))
    if ck["step"] != final:
        raise Failed(f"ckpt.pt at step {ck['step']}, not {final}")
    with open(os.path.join(out, "log.jsonl")) as fh:
        recs = [json.loads(ln) for ln in fh if ln.strip()]
    steps = [r["step"] for r in recs]
    kinds = [(r["step"], tuple(sorted(set(r) - {"step", "time", "train_s"}))) for r in recs]
    if steps != sorted(steps) or len(set(kinds)) != len(kinds) or set(steps) != set(
            range(1, final + 1)):
        raise Failed(f"log.jsonl steps {steps} (want 1..{final}, increasing, no record twice)")
    if method:
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        if not metrics.get("student"):
            raise Failed("metrics.json has no student rows")
    want = {f"ckpt.pt.rank{r}.step{final}" for r in range(1, ranks)} if method else set()
    have = {os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt.pt.rank*"))}
    if have != want:
        raise Failed(f"sidecars: missing {sorted(want - have)}, stale {sorted(have - want)}")
    tmp = [os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tmp*"))]
    if tmp:
        raise Failed(f"temporary files left: {tmp}")
    return ck


def check_ranks_agree(output, ck, script, ranks):
    m = re.search(r"^rehearsal-ranks: (.*)$", output, re.M)
    if not m:
        raise Failed("no rank digests printed")
    found = json.loads(m.group(1))
    own = state_digest(ck["ema" if script == "teacher.py" else "net"])
    if len(found) != ranks or set(found) != {own}:
        raise Failed(f"ranks disagree: {found} (checkpoint {own})")


RTOL, ATOL = 1e-6, 1e-7  # resumed vs uninterrupted beyond 2 ranks: float rounding (compare)


def run_states(out, ranks):
    """{name: state} of a finished run: its checkpoint (but the config and timings) and every
    rank's sidecar."""
    ck = load(os.path.join(out, "ckpt.pt"))
    states = {"checkpoint": {k: v for k, v in ck.items() if k not in ("config", "train_time_s")}}
    for r in range(1, ranks):
        side = os.path.join(out, f"ckpt.pt.rank{r}.step{ck['step']}")
        states[f"rank {r}'s buffers"] = load(side) if os.path.isfile(side) else None
    return states


def max_difference(a, b, key=""):
    """(largest |a - b| over the floating tensors of two states, the first thing that differs
    otherwise or beyond RTOL / ATOL, or None)."""
    import torch
    if torch.is_tensor(a) != torch.is_tensor(b):
        return 0.0, f"{key}: {type(a).__name__} vs {type(b).__name__}"
    if torch.is_tensor(a):
        if a.shape != b.shape or a.dtype != b.dtype:
            return 0.0, f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not a.is_floating_point():
            return 0.0, None if torch.equal(a, b) else f"{key} differs"
        d = (a.double() - b.double()).abs()
        worst = float(d.max()) if d.numel() else 0.0
        ok = bool((d <= ATOL + RTOL * b.double().abs()).all())
        return worst, None if ok else f"{key} (max abs diff {worst:.3g})"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return 0.0, f"{key}: keys {sorted(map(str, set(a) ^ set(b)))[:3]}"
        parts = [max_difference(a[k], b[k], f"{key}.{k}" if key else str(k)) for k in a]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        parts = [max_difference(x, y, f"{key}.{i}") for i, (x, y) in enumerate(zip(a, b))]
    else:
        return 0.0, None if a == b else f"{key}: {a!r} vs {b!r}"
    return max([p[0] for p in parts], default=0.0), next((p[1] for p in parts if p[1]), None)


def compare(out, full, ranks):
    """The killed-and-resumed run against the uninterrupted one: bit for bit, or (beyond 2
    ranks) within float rounding. A resumed process wraps its networks in a fresh DDP, whose
    first iteration reduces in the initial bucket order, not the rebuilt one: gloo's ring then
    sums each gradient element's contributions from the ranks in another order (2 commute).
    Everything must still agree to RTOL / ATOL, far below one step's change; rank 0's sampled
    states and every rank's buffers included. Returns the result text; raises Failed."""
    a, b = run_states(out, ranks), run_states(full, ranks)
    if state_digest(a) == state_digest(b):
        return "= uninterrupted run bit for bit (checkpoint, every rank's buffers)"
    worst, bad = 0.0, []
    for name in a:
        d, why = max_difference(a[name], b[name])
        worst = max(worst, d)
        if why:
            bad.append(f"{name}: {why}")
    if bad:
        raise Failed(f"resumed != uninterrupted: {'; '.join(bad)[:300]}")
    return (f"= uninterrupted run to rounding (max abs diff {worst:.1g}: a resumed DDP's first "
            f"buckets reorder gloo's sums; checkpoint, every rank's buffers)")


def rehearse(line, i, args, scratch):
    """Kill, resume, check (and compare with an uninterrupted run): returns the result text."""
    script, _, run_args, dataset = plan(line, scratch)
    try:
        final = final_step(script, run_args)
    except SystemExit as e:  # the script's own one-line error for a bad flag
        raise Failed(str(e))
    teacher = flag_value(run_args, "--teacher")
    if args.dry:
        made = set()  # the checkpoints that the teacher lines above this one write
        for above in args.lines[:i]:
            try:
                s, _, a, _ = plan(above, scratch)
            except ValueError:
                continue
            if s == "teacher.py":
                made.add(os.path.join(flag_value(a, "--out"), "ckpt.pt"))
        if teacher and teacher not in made:
            raise Failed(f"--teacher {os.path.relpath(teacher, scratch)}: no teacher command "
                         f"above writes it")
        return f"ok (dry: the flags parse, {final} iterations; not run)"
    if teacher and not os.path.isfile(teacher):
        raise Failed(f"no teacher at {os.path.relpath(teacher, scratch)} (its command failed)")
    out = flag_value(run_args, "--out")
    for old in (out, out.rstrip("/") + "-uninterrupted"):  # every rehearsal starts afresh
        shutil.rmtree(old, ignore_errors=True)
    logs = os.path.join(scratch, "logs", f"{i:02d}-{os.path.basename(out)}")
    os.makedirs(os.path.dirname(logs), exist_ok=True)
    rc, output, _ = torchrun(script, run_args, args.ranks, scratch, logs + ".1-killed.log",
                             args.timeout, kill_at=final - 1)
    at = check_killed(rc, output, out, final)
    rc, output, _ = torchrun(script, run_args, args.ranks, scratch, logs + ".2-resumed.log",
                             args.timeout)
    if rc != 0:
        raise Failed(f"resume: rc {rc}: {error_line(output)}")
    if f"resuming from {os.path.join(out, 'ckpt.pt')} at step {at}" not in output:
        raise Failed(f"the rerun did not say it resumes at step {at}")
    ck = check_outputs(script, out, final, args.ranks)
    check_ranks_agree(output, ck, script, args.ranks)
    result = f"ok: killed after step {final - 1} (checkpoint {at}), resumed to {final}; " \
             f"{args.ranks} ranks agree"
    if args.compare_this:
        full = out.rstrip("/") + "-uninterrupted"
        run_full = [full if (j and run_args[j - 1] == "--out") else a
                    for j, a in enumerate(run_args)]
        rc, output, _ = torchrun(script, run_full, args.ranks, scratch,
                                 logs + ".3-uninterrupted.log", args.timeout)
        if rc != 0:
            raise Failed(f"uninterrupted run: rc {rc}: {error_line(output)}")
        result += "; " + compare(out, full, args.ranks)
    return result


def to_compare(lines, mode):
    """Indices of the commands to compare with an uninterrupted run: every one, none, or the
    last method command of each data set."""
    if mode == "all":
        return set(range(len(lines)))
    if mode == "none":
        return set()
    last = {}
    for i, ln in enumerate(lines):
        tokens = shlex.split(ln)
        if len(tokens) > 2 and tokens[2] != "teacher.py":
            last[flag_value(tokens[3:], "--dataset", "digits")] = i
    return set(last.values())


def write_data(scratch, datasets):
    """Synthetic data sets in the real on-disk formats (tests/test_data.py's writers)."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from test_data import write_cifar10, write_imagenet64_npz
    if "cifar10" in datasets:
        write_cifar10(os.path.join(scratch, "data", "cifar10"), n_per_batch=8)
    if "imagenet64" in datasets:
        write_imagenet64_npz(os.path.join(scratch, "data", "imagenet64"), sizes=(16, 16),
                             subdir="Imagenet64_train_part1_npz")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8, help="torchrun's --nproc_per_node here.")
    p.add_argument("--doc", default=DOC, help="The page whose torchrun lines are rehearsed.")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                   help="Rehearse only the commands of these data sets.")
    p.add_argument("--compare", default="last", choices=("last", "all", "none"),
                   help="Which commands also run uninterrupted, to equal the resumed run: "
                        "the last method command of each data set, every one, or none.")
    p.add_argument("--workdir", default="", help="The scratch folder (kept); default a fresh "
                   "temporary one, removed at the end unless --keep.")
    p.add_argument("--keep", action="store_true", help="Keep the temporary scratch folder.")
    p.add_argument("--timeout", type=int, default=900, help="Seconds one torchrun may take.")
    p.add_argument("--only", nargs="+", default=[], metavar="OUT",
                   help="Rehearse only the commands with these --out folder names (in a "
                        "--workdir that holds their teacher from an earlier rehearsal).")
    p.add_argument("--dry", action="store_true", help="Only check each command against its "
                   "script's flags (and that its --teacher is written by a command above): "
                   "seconds, no torchrun.")
    args = p.parse_args(argv)
    t_start = time.time()
    scratch = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="rehearsal-"))
    os.makedirs(scratch, exist_ok=True)
    lines = args.lines = documented_commands(args.doc)
    print(f"rehearsal of {len(lines)} documented commands of {os.path.relpath(args.doc)} at "
          f"{args.ranks} gloo ranks (OMP_NUM_THREADS=1 each) in {scratch}; evaluation features: "
          f"a raw-pixel stand-in for Inception", flush=True)
    if not lines:
        print(f"no line of {args.doc} starts with `{PREFIX.strip()}`")
        return 1
    def wanted(line):
        rest = shlex.split(line)[3:]
        dataset = flag_value(rest, "--dataset", "digits")
        name = os.path.basename(os.path.normpath(flag_value(rest, "--out", "")))
        return ((dataset in args.datasets or dataset not in DATASETS)
                and (not args.only or name in args.only))
    chosen = [i for i, ln in enumerate(lines) if wanted(ln)]
    if not args.dry:
        write_data(scratch, args.datasets)
    compare = to_compare([lines[i] for i in chosen], args.compare)
    rows, failed = [], 0
    for n, i in enumerate(chosen):
        line = lines[i]
        try:
            script, doc_args, run_args, _ = plan(line, scratch)
            label = short(script, doc_args)
            shown = [os.path.relpath(a, scratch) if a.startswith(scratch) else a
                     for a in run_args]  # scratch paths relative: the torchrun's cwd
            print(f"\n[{n + 1}/{len(chosen)}] {line}\n    run as: torchrun "
                  f"--nproc_per_node={args.ranks} {script} {shlex.join(shown)}", flush=True)
        except ValueError as e:
            label = line[len(PREFIX):][:60]
            rows.append((label, args.ranks, 0.0, f"FAIL: {e}"))
            failed += 1
            print(f"\n[{n + 1}/{len(chosen)}] {line}\n    FAIL: {e}", flush=True)
            continue
        args.compare_this = n in compare
        t0 = time.time()
        try:
            result = rehearse(line, i, args, scratch)
        except Failed as e:
            result, failed = f"FAIL: {e}", failed + 1
        rows.append((label, args.ranks, time.time() - t0, result))
        print(f"    {result} ({time.time() - t0:.0f} s)", flush=True)

    print("\n| command | ranks | wall s | result |\n|---|---|---|---|")
    for label, ranks, wall, result in rows:
        print(f"| `{label}` | {ranks} | {wall:.0f} | {result.replace('|', '/')} |")
    total = time.time() - t_start
    print(f"\n{len(rows) - failed} of {len(rows)} commands ok; total wall {total:.0f} s "
          f"({os.cpu_count()} CPU cores)" + ("" if args.dry else f"; logs in {scratch}/logs" +
                                             ("" if args.workdir or args.keep else " (removed)")),
          flush=True)
    if not (args.workdir or args.keep):
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
