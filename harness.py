"""Plumbing for the DDIL reference: the CLI from a dataclass, torchrun / DDP, dataset files,
checkpoints, logging and images. Nothing here is part of a method; common.py holds the science.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common as C


def fail(msg):
    """Stop with a one-line error and a non-zero exit (no traceback): bad flags, data, checkpoints."""
    raise SystemExit(f"error: {msg}")


DATASETS = {  # channels, resolution, classes
    "digits": (1, 8, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10), "imagenet64": (3, 64, 1000),
}

HEADS = ("auto", "copy", "v")  # a student's output head: see --student-head


# ----------------------------------------------------------------------------------------------
# config / CLI
# ----------------------------------------------------------------------------------------------

def flag(default, help, choices=None, **extra):
    """A Config field: its default, its --help sentence and its choices, as data. A subclass
    that only changes the default redeclares the field plainly (`lr: float = 1e-4`) and keeps
    the help and choices its base class gives (flag_info). extra: more metadata (positional)."""
    kind = "default_factory" if isinstance(default, list) else "default"
    value = (lambda: list(default)) if kind == "default_factory" else default
    return dataclasses.field(**{kind: value},
                             metadata={"help": help, "choices": choices, **extra})


def flag_info(cls, name):
    """The metadata (help, choices, ...) of field `name`: its own, or that of the nearest base
    class that declared it with flag()."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return dict(f.metadata)
    return {}


def field_default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_config(cls, argv=None, presets=None):
    """Build argparse flags from a dataclass of flag() fields (`max_steps` -> `--max-steps`),
    with each field's help, default and choices, and parse argv. The script's own flags (those
    its Config declares first) are listed before the ones it shares with other scripts.

    presets: {dataset: {field: value}} applied as defaults once --dataset is known, so
    `--dataset cifar10` switches model size, batch, lr, ... and explicit flags still win.
    """
    module = sys.modules.get(cls.__module__)  # (None for a file loaded by path, as the tests load bench/)
    doc = (getattr(module, "__doc__", None) or "").split("\n\n")[0]  # the script's first paragraph
    parser = argparse.ArgumentParser(description=" ".join(doc.split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda msg: fail(f"{msg} (see --help)")  # one line, no usage dump
    shared = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
              for f in dataclasses.fields(base)}
    own = parser.add_argument_group("this script's flags") if shared else parser
    common = parser.add_argument_group("flags shared with the other scripts") if shared else parser
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        info, default = flag_info(cls, f.name), field_default(f)
        group = common if f.name in shared else own
        text = info.get("help", "").replace("%", "%%")
        if info.get("positional"):
            group.add_argument(f.name, help=text)
        elif f.type is bool:
            group.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                               default=default, help=text)
        elif isinstance(default, (list, tuple)):
            group.add_argument("--" + f.name.replace("_", "-"), nargs="+", default=default, help=text,
                               type=type(default[0]) if default else float)
        else:
            group.add_argument("--" + f.name.replace("_", "-"), default=default, help=text,
                               type=f.type, choices=info.get("choices"))
    if presets:  # --dataset first, by a parser without -h: `--dataset cifar10 --help` shows the preset
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--dataset")
        first.error = parser.error
        dataset = first.parse_known_args(argv)[0].dataset
        if dataset in presets:
            parser.set_defaults(**presets[dataset])
    return cls(**vars(parser.parse_args(argv)))


def flags_markdown(scripts):
    """docs/flags.md: {script name: Config class} -> one table per script of its flags, each
    with its default, help and choices."""
    lines = ["# Flags", "",
                   "Generated from the Config dataclasses by `python dev/flags.py > docs/flags.md`;",
                   "a test checks that it is current. Every script also prints these with `--help`.",
                   ""]
    for script, cls in scripts.items():
        lines += [f"## {script}", "", "| flag | default | help |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            info, default = flag_info(cls, f.name), field_default(f)
            name = f.name if info.get("positional") else "--" + f.name.replace("_", "-")
            choices = info.get("choices")
            text = info.get("help", "") + (f" One of: {', '.join(map(str, choices))}." if choices else "")
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text = text.replace("|", "\\|")  # a table cell
            lines.append(f"| `{name}` | `{shown}` | {text} |")
        lines.append("")
    return "\n".join(lines)


# The flags every script shares are declared once, here; a script's Config subclasses one of
# these, adds its own knobs first and redeclares a shared flag only to change its default.

@dataclasses.dataclass
class RunConfig:
    """Flags of every training script (teacher.py and the three methods)."""
    dataset: str = flag("digits", "The data set: digits is embedded and runs on a CPU; the others "
                        "read their files from --data-dir.", choices=tuple(DATASETS))
    data_dir: str = flag("data", "Where the data set's files are (downloaded there where possible).")
    out: str = flag("", "The run's directory for config.json, ckpt.pt, log.jsonl and images; "
                    "default runs/<script>-<dataset>[-cond]. A rerun resumes from it.")
    cond: bool = flag(False, "Class-conditional: the teacher takes labels (with a null label for "
                      "classifier-free guidance); for a method, the default teacher is the "
                      "class-conditional one.")
    iters: int = flag(1000, "Training iterations in all.")
    batch_size: int = flag(64, "Batch size per process (the global batch is this times the world size).")
    grad_accum: int = flag(1, "Micro-batches per optimiser step, each of batch-size / grad-accum "
                           "(DDP reduces gradients once per step).")
    lr: float = flag(1e-4, "Adam's learning rate.")
    grad_clip: float = flag(1.0, "Gradients are clipped to this global norm.")
    seed: int = flag(0, "Seeds the initial weights, the batches and every noise draw: the same "
                     "seed gives the same run, resumed or not.")
    device: str = flag("", "cpu, cuda or cuda:N; default cuda (each torchrun rank its own GPU) "
                       "where available, else cpu.")
    ckpt_every: int = flag(500, "Iterations between checkpoints (and one at the end).")
    log_every: int = flag(25, "Iterations between lines in log.jsonl.")
    bf16: bool = flag(True, "bf16 autocast for the training forward passes on CUDA (no effect on a CPU).")
    compile: bool = flag(False, "torch.compile the training forward passes (eager, with one "
                         "warning, where compiling fails).")


TEACHER_FORMS = ("a ckpt.pt of teacher.py; diffusers:<folder or hub id> (a diffusers UNet2DModel "
                 "with its scheduler); edm-adm:<.pt> (an EDM/CD ADM network as a state dict); "
                 "edm-pkl:<.pkl> (an NVlabs EDM pickle, built with --edm-repo)")


@dataclasses.dataclass
class DistillConfig(RunConfig):
    """Flags every method script shares: the teacher, the DDIL mixture, rollouts, evaluation."""
    teacher: str = flag("", "The teacher to distil: " + TEACHER_FORMS + ". Default "
                        "runs/teacher-<dataset>[-cond]/ckpt.pt, or for digits the teacher shipped "
                        "in assets/; teacher.py trains it where neither exists.")
    edm_repo: str = flag("", "Your checkout of NVlabs' EDM code, needed for --teacher edm-pkl:.")
    student_head: str = flag("auto", "A published eps-prediction teacher's student: auto re-reads "
                             "its output as v (fitted first, --head-warmup), copy keeps the eps "
                             "head; our own teachers predict v already.",
                             choices=HEADS)
    head_warmup: int = flag(300, "Iterations that fit a re-read v head (--student-head v or auto "
                            "on an eps teacher), or a narrower student, to the teacher's v "
                            "before distillation.")
    student_width: float = flag(1.0, "The student's channel width relative to its teacher's (our "
                                "U-Net teachers). Below 1 the student cannot copy the teacher: "
                                "it starts from random weights fitted to the teacher's v on "
                                "forward-diffused data for --head-warmup iterations.")
    steps: int = flag(4, "K, the student's sampling steps.")
    beta_data: float = flag(0.5, "DDIL's prior on data states: forward-diffused training "
                            "images (the priors are normalised to sum to 1).")
    beta_teacher: float = flag(0.0, "DDIL's prior on the teacher's states: its own sampler's "
                               "rollouts from noise.")
    beta_student: float = flag(0.5, "DDIL's prior on the student's states: its own sampler's "
                               "rollouts from noise, as it is evaluated.")
    beta_ramp: float = flag(0.0, "beta-student rises linearly from 0 over this fraction of "
                            "training, the rest going to data (DAgger's schedule; 0 = fixed priors).")
    rollout_teacher_p: float = flag(0.0, "Each step of the student's rollouts is the teacher's "
                                    "own step with this probability (DAgger's mixture policy).")
    bound: str = flag("none", "Bound on the x0 prediction in training: in the teacher steps "
                      "behind every target (and DMD2's generator output).", choices=C.BOUNDS)
    sample_bound: str = flag("clip", "Bound on the x0 prediction of every sampler that stands for "
                             "a policy: the evaluated samples and the teacher's and the "
                             "student's rollouts (published samplers clip).", choices=C.BOUNDS)
    buffer_size: int = flag(1024, "States kept per rollout source (teacher, student) in its replay buffer.")
    refresh: int = flag(32, "Fresh rollouts pushed into each source's buffer at each refresh.")
    refresh_every: int = flag(8, "Iterations between refreshes of the rollout buffers.")
    eval_every: int = flag(0, "Iterations between FD measurements at K into log.jsonl (0 = none).")
    eval_every_samples: int = flag(250, "Samples of each --eval-every measurement (the same noise each time).")
    eval_samples: int = flag(2000, "Samples of the final evaluation of the student and the teacher.")
    shift_samples: int = flag(500, "States per sampling time in the final covariate-shift diagnostic.")
    reference_steps: int = flag(64, "Sampling steps of the many-step teacher row in the final evaluation.")
    ref_samples: int = flag(2000, "Teacher samples at --reference-steps that the student's samples "
                            "are also compared with (FD against the teacher; 0 = off).")
    inception_weights: str = flag("", "A local copy of the TF-Inception FID weights "
                                  "(pt_inception-2015-12-05-6726825d.pth) for machines without "
                                  "internet; default: torch-fidelity downloads them.")


def setup(cfg, script):
    """The start every script shares once its flags are checked: --out (default
    runs/<script>-<dataset>[-cond]) checked before any work; a rerun into an --out that holds a
    checkpoint checked to be the same run (check_same_run) before config.json is written there;
    torchrun; the data set. Returns (rank, world size, device, data)."""
    cond = "-cond" if getattr(cfg, "cond", False) else ""
    cfg.out = cfg.out or os.path.join("runs", f"{script}-{cfg.dataset}{cond}")
    check_out_dir(cfg.out)  # --out naming a file: one line, before any work
    if int(os.environ.get("RANK", 0)) == 0:
        claim_out_dir(cfg.out)
    check_same_run(cfg, os.path.join(cfg.out, "ckpt.pt"))
    rank, world, device = init_dist(cfg.device)
    save_config(cfg, cfg.out)
    return rank, world, device, load_dataset(cfg.dataset, cfg.data_dir)


# The flags a rerun may change and still continue its checkpoint: where things are, how often
# to log, checkpoint and evaluate, and how far to train. --iters may grow (LCM, DMD2, teacher:
# the total; PD: where to stop); --beta-ramp then ramps over the new total from where the run
# is. Every other flag changes what is trained, and a rerun with another value is refused. The
# world size may change too (the per-process --batch-size stays, so the global batch scales;
# a rank without its saved replay buffers starts them empty: load_checkpoint).
MAY_CHANGE_ON_RESUME = (
    "out", "data_dir", "edm_repo", "device", "compile", "iters", "ckpt_every", "log_every",
    "eval_every", "eval_every_samples", "eval_samples", "stage_eval_samples", "shift_samples",
    "reference_steps", "ref_samples", "sample_count", "sample_steps", "inception_weights",
)


def check_same_run(cfg, ckpt_path):
    """Stop with one line, before anything is written, when ckpt_path holds a run trained with
    another value of a flag that changes training (any flag outside MAY_CHANGE_ON_RESUME)."""
    if not os.path.isfile(ckpt_path):
        return
    try:  # mmap: only the pickle around the tensors is read
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["config"]
    except Exception as e:
        fail(f"{ckpt_path} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0][:120]}"
             f"); pass a fresh --out")
    before = before_flags(cfg)
    for name, value in dataclasses.asdict(cfg).items():
        # a flag newer than the checkpoint: it was trained as the flag's value before the flag
        was = saved.get(name, before[name])
        if name in MAY_CHANGE_ON_RESUME or was == value:
            continue
        fail(f"{ckpt_path} was trained with --{name.replace('_', '-')} {was}, not {value}: rerun "
             f"with the same flags to resume it, or pass a fresh --out for this run")


def before_flags(cfg):
    """{flag: the value a run made before the flag existed was trained with}: the flag's default,
    or the script Config's BEFORE_FLAG entry where the default changed what an older run did
    (dmd2_ddil's --noise-grid: older runs drew from the Karras grid, which auto no longer is
    under guidance). Resumes (check_same_run) and bench/results.py's stale check read it."""
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cfg)}
    return {**defaults, **getattr(cfg, "BEFORE_FLAG", {})}


def save_config(cfg, out):
    if is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=2)
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)


def check_positive(cfg, *names):
    """One-line error for the first of cfg's named fields that is not positive."""
    for name in names:
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


def check_betas(beta_data, beta_teacher, beta_student):
    """Validate DDIL mixing priors; returns them normalised to sum to 1."""
    betas = (beta_data, beta_teacher, beta_student)
    if not all(map(math.isfinite, betas)):  # NaN passes every comparison below
        fail(f"mixing priors must be finite numbers, got --beta-data {beta_data} --beta-teacher "
             f"{beta_teacher} --beta-student {beta_student}")
    if min(betas) < 0:
        fail(f"mixing priors must be >= 0, got --beta-data {beta_data} --beta-teacher "
             f"{beta_teacher} --beta-student {beta_student}")
    if sum(betas) <= 0:
        fail("mixing priors sum to 0: give at least one of --beta-data, --beta-teacher, "
             "--beta-student a positive value")
    return tuple(b / sum(betas) for b in betas)


def check_ddil(cfg):
    """The flags every method script shares (priors, their ramp, the FD curve) -> the priors."""
    if not 0 <= cfg.beta_ramp <= 1:
        fail(f"--beta-ramp is a fraction of training in [0, 1], got {cfg.beta_ramp}")
    if not 0 <= getattr(cfg, "rollout_teacher_p", 0.0) <= 1:
        fail(f"--rollout-teacher-p is a probability in [0, 1], got {cfg.rollout_teacher_p}")
    if cfg.eval_every < 0:
        fail(f"--eval-every must be >= 0 (0 = no FD curve), got {cfg.eval_every}")
    check_positive(cfg, "eval_every_samples")
    head = getattr(cfg, "student_head", "auto")
    if head == "v" and not cfg.teacher.startswith("diffusers:"):
        fail(f"--student-head {head} re-reads a published eps-prediction teacher's output "
             f"(--teacher diffusers:...); other teachers' students need no new head: use --student-head copy")
    if getattr(cfg, "head_warmup", 0) < 0:
        fail(f"--head-warmup is a number of iterations >= 0, got {cfg.head_warmup}")
    width = getattr(cfg, "student_width", 1.0)
    if not 0 < width <= 1 or (width < 1 and cfg.head_warmup == 0):
        fail(f"--student-width is in (0, 1], and below 1 needs --head-warmup > 0 (the narrower "
             f"student starts from random weights), got {width} with {cfg.head_warmup}")
    return check_betas(cfg.beta_data, cfg.beta_teacher, cfg.beta_student)


# ----------------------------------------------------------------------------------------------
# distributed: `python x.py` is world size 1; `torchrun --nproc_per_node=N x.py` is N ranks
# ----------------------------------------------------------------------------------------------

def init_dist(device=""):
    """Start torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Returns (rank, world_size, device). Idempotent, so a script can call a second script's main.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not device:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(f"--device {device} asked for, but CUDA is not available: use --device cpu")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(x):
    """Concatenate a tensor (same shape on every rank) from all ranks along dim 0."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def step_seed(seed, rank, step):
    """Seed the global RNG from (seed, rank, step): resuming at any step, on any world size,
    draws the noise of an uninterrupted run, with no RNG state to carry in checkpoints (the
    weights match exactly on 1 or 2 ranks; above that, to rounding: DDP's gradient buckets)."""
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (DMD2 needs bf16; fp16 diverged in its paper); a no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=enabled and torch.device(device).type == "cuda")


def maybe_compile(net, *example, enabled=True):
    """torch.compile(net), or net itself if compiling fails. torch.compile is lazy (errors show at
    the first call), so a trial forward on `example` inputs, without grad, runs here; a failure
    prints one warning and training goes on eagerly."""
    if not enabled:
        return net
    try:
        compiled = torch.compile(net)
        if example:
            with torch.no_grad():
                compiled(*example)
        return compiled
    except Exception as e:  # depends on the platform's compiler toolchain
        if is_main():
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                  f"running eagerly", flush=True)
        return net


def compile_trial(net, cfg, shape, labels=False, w=False):
    """maybe_compile(net) with a trial forward at the training micro-batch: batch_size / grad_accum
    states of `shape`, times, and (conditional nets) labels and guidance weights."""
    m, device = cfg.batch_size // getattr(cfg, "grad_accum", 1), next(C.unwrap(net).parameters()).device
    example = [torch.zeros(m, *shape, device=device), torch.rand(m, device=device)]
    if labels:
        example.append(torch.zeros(m, dtype=torch.long, device=device))
    if w:
        example.append(torch.ones(m, device=device))
    return maybe_compile(net, *example, enabled=cfg.compile)


def micro_batches(net, n, *tensors):
    """Gradient accumulation: split one step's batch (dim 0, divisible by n; None passes through)
    into n micro-batches and yield (sync, chunks) for each. `with sync:` around the backward skips
    DDP's all-reduce (no_sync) on all but the last one, so gradients are reduced once per
    optimiser step; scale each micro-batch's loss by 1/n. n = 1 is the plain step."""
    import contextlib
    chunks = [t.split(t.shape[0] // n) if torch.is_tensor(t) else [t] * n for t in tensors]
    for i in range(n):
        last = i == n - 1
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()
        yield sync, [c[i] for c in chunks]


# ----------------------------------------------------------------------------------------------
# data: images in [-1, 1], NCHW float; labels long
# ----------------------------------------------------------------------------------------------



def load_dataset(name, data_dir="data", train=True):
    """Return (images uint8 [N, C, H, W], labels long [N]).

    digits: scikit-learn's load_digits, shipped with the package (no download).
    cifar10: CIFAR-10's python pickles under data_dir (downloaded where online).
    mnist: torchvision's MNIST files under data_dir (downloaded where online).
    imagenet64: downsampled-ImageNet npz batches (`data` N x 12288 uint8, `labels` 1..1000)
    or an ImageFolder of images, under data_dir.
    cifar10 and imagenet64 are converted once to .npy files in data_dir and memory-mapped (see
    _cached_arrays): processes, torchrun's ranks among them, share one copy in the page cache.
    digits and mnist are small and held in memory.
    """
    if name not in DATASETS:
        fail(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.from_numpy(np.round(d.images * 255.0 / 16.0).astype(np.uint8))[:, None]
        return x, torch.from_numpy(d.target).long()
    if name == "cifar10":
        x, y = _load_cifar10(data_dir, train)
    elif name == "mnist":
        import torchvision
        split = "train" if train else "t10k"
        raw = [os.path.join(data_dir, "MNIST", "raw", f"{split}-{k}-ubyte") for k in ("images-idx3", "labels-idx1")]
        _download(lambda: torchvision.datasets.MNIST(data_dir, train=train, download=True),
                  lambda: all(map(os.path.isfile, raw)),
                  f"mnist not found under --data-dir {data_dir!r} (MNIST/raw/{split}-*-ubyte)")
        ds = torchvision.datasets.MNIST(data_dir, train=train)
        return ds.data[:, None].contiguous(), ds.targets.long()
    else:
        x, y = _load_imagenet64(data_dir, train)
    # the memory maps are copy-on-write ("c"): writable, so torch.from_numpy shares them without
    # its read-only warning, and a stray in-place write copies one page instead of crashing
    return torch.from_numpy(x), torch.from_numpy(y)


def _download(fetch, present, missing):
    """Rank 0 fetches (torchvision verifies the archive's md5) while the others wait; then every
    rank checks `present()` and stops with one line naming the directory where it is not."""
    if not present():
        if is_main():
            try:
                fetch()
            except Exception as e:  # offline, or a corrupt download
                fail(f"{missing} and could not be downloaded ({type(e).__name__}); put the files there")
        barrier()
        if not present():
            fail(f"{missing}; put the files there")


CACHE_VERSION = 2  # bump when the cache's layout changes: every old cache then rebuilds
# 2: imagenet64 labels in the published networks' sorted-WordNet-id order (1 had devkit id - 1)


def _cached_arrays(data_dir, name, files, item_shape, count, chunks):
    """(images uint8 [N, *item_shape], labels int64 [N]) as memory maps of
    <data_dir>/<name>-uint8.npy and <name>-labels.npy, converted once from `files`.

    Each rank holding its own copy of imagenet64 would be 15.7 GB per rank; a memory map of one
    file is shared through the page cache. The first process to find the cache missing or stale
    converts it (temporary files, then os.replace: a crash or a reader never sees half a file, and
    an old cache another run has open stays valid) under a file lock, <name>.lock: torchrun's
    other ranks, on any node sharing data_dir, wait at the lock and then open the new cache. A
    lock, not barrier(): load_dataset is also called by rank 0 alone (evaluate's reference
    features), where a collective would hang. <name>.json records the source files' paths, sizes
    and mtimes: when they change, the cache is rebuilt. Where data_dir cannot be written, every
    process loads the data into its own memory, as before, and says so.

    count() -> N; chunks() yields (uint8 [n, *item_shape], labels int64 [n]) in order, checking
    the sources and stopping with one line on a bad one.
    """
    import hashlib
    xp, yp, jp = (os.path.join(data_dir, name + s) for s in ("-uint8.npy", "-labels.npy", ".json"))
    h = hashlib.sha256()
    for f in files:  # a digest, so the json stays small for 1.28M ImageFolder files
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, data_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stamp = {"version": CACHE_VERSION, "files": len(files), "digest": h.hexdigest()}
    if not _cache_fresh(xp, yp, jp, stamp):
        import fcntl
        try:
            lock = open(os.path.join(data_dir, name + ".lock"), "a")
        except OSError as e:  # read-only data_dir
            lock = None
            print(f"note: cannot write in {data_dir} ({e.strerror or e}); every process loads the "
                  f"data into its own memory (make --data-dir writable to share one copy)", flush=True)
        if lock is not None:
            with lock:  # closing it releases the lock, as the kernel does if this process dies
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                except OSError:  # a filesystem without locks: converting twice is only slower
                    pass
                if not _cache_fresh(xp, yp, jp, stamp):  # not converted while we waited
                    _write_cache(xp, yp, jp, stamp, (_count(count, name, data_dir), *item_shape), chunks)
    if _cache_fresh(xp, yp, jp, stamp):
        return np.load(xp, mmap_mode="c"), np.load(yp, mmap_mode="c")
    n = _count(count, name, data_dir)
    x, y, i = np.empty((n, *item_shape), np.uint8), np.empty(n, np.int64), 0
    for xc, yc in chunks():
        x[i:i + len(xc)], y[i:i + len(xc)] = xc, yc
        i += len(xc)
    return x, y


def _count(count, name, data_dir):
    n = count()
    if n == 0:  # an empty memory map cannot be opened, and there is nothing to train on
        fail(f"the {name} files under --data-dir {data_dir!r} hold no images")
    return n


def _cache_fresh(xp, yp, jp, stamp):
    """The json names the same sources and both .npy files have the sizes it recorded."""
    try:
        with open(jp) as fh:
            j = json.load(fh)
        return j["sources"] == stamp and j["bytes"] == [os.path.getsize(xp), os.path.getsize(yp)]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_cache(xp, yp, jp, stamp, shape, chunks):
    import socket
    tag = f".tmp{socket.gethostname()}-{os.getpid()}"  # unique across nodes sharing a filesystem
    tmps = [p + tag for p in (xp, yp, jp)]
    try:
        ys, n = [], 0
        # written sequentially, not through a memory map: a full disk is then an OSError here,
        # not a SIGBUS when the kernel finds no block for a page of a sparse file
        with open(tmps[0], "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for xc, yc in chunks():
                fh.write(np.ascontiguousarray(xc, np.uint8).data)
                ys.append(np.asarray(yc, np.int64))
                n += len(xc)
            fh.flush()
            os.fsync(fh.fileno())
        if n != shape[0]:
            fail(f"the sources of {xp} changed while it was being written; run again")
        with open(tmps[1], "wb") as fh:
            np.save(fh, np.concatenate(ys) if ys else np.empty(0, np.int64))
        with open(tmps[2], "w") as fh:
            json.dump({"sources": stamp, "bytes": [os.path.getsize(t) for t in tmps[:2]]}, fh)
        for t, p in zip(tmps, (xp, yp, jp)):  # the json last: it vouches for both arrays
            os.replace(t, p)
        print(f"converted {shape[0]} images once to {xp} (memory-mapped from now on)", flush=True)
    except OSError as e:  # read-only data_dir, full disk
        print(f"note: could not write {xp} ({e.strerror or e}); every process loads the data into "
              f"its own memory instead (make --data-dir writable to share one copy)", flush=True)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)


CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


def _load_cifar10(data_dir, train):
    """CIFAR-10's python version (data_dir/cifar-10-batches-py, or data_dir itself): pickles with
    `data` N x 3072 uint8 (R, G, B planes, each 32x32 row-major) and `labels` 0..9.

    Read here rather than through torchvision.datasets.CIFAR10, which checks every file's md5
    against the release: the format is all we need, and a cluster's re-packed copy or a test's
    small fake files are as valid. torchvision still downloads (and checks) the archive.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if os.path.isfile(os.path.join(data_dir, CIFAR_FILES[train][0])):
        folder = data_dir
    paths = [os.path.join(folder, f) for f in CIFAR_FILES[train]]

    def fetch():
        import torchvision
        torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
    _download(fetch, lambda: all(map(os.path.isfile, paths)),
              f"cifar10 not found under --data-dir {data_dir!r} (cifar-10-batches-py/"
              f"{', '.join(CIFAR_FILES[train])})")
    return _cached_arrays(data_dir, f"cifar10-{'train' if train else 'test'}", paths, (3, 32, 32),
                          lambda: sum(len(_read_cifar_batch(p)[1]) for p in paths),
                          lambda: map(_read_cifar_batch, paths))


def _read_cifar_batch(path):
    """One CIFAR-10 python batch -> (uint8 [N, 3, 32, 32], int64 [N] in 0..9), read as data.

    pickle.load would run whatever a file under --data-dir asks for; this unpickler admits only
    the globals CIFAR-10's pickles name (numpy's array reconstruction, numpy 1 and 2 spellings,
    and the bytes of a protocol-2 re-pickle) and stops with one line on anything else.
    """
    import codecs
    import pickle
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):  # written by numpy 1 / numpy 2
        allowed[(mod + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(mod + ".numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5

    def latin1(s, encoding):  # Python 3 pickles bytes at protocol 2 as _codecs.encode(s, "latin1")
        if encoding != "latin1":
            fail(f"{path}: refusing to unpickle _codecs.encode(..., {encoding!r}); CIFAR-10 batches "
                 f"only need latin1: replace the file with one from the CIFAR-10 python release")
        return codecs.encode(s, "latin1")
    allowed[("_codecs", "encode")] = latin1

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                fail(f"{path}: refusing to unpickle the global {module}.{name}, which CIFAR-10 "
                     f"batches never hold: replace the file with one from the CIFAR-10 python release")
            return allowed[(module, name)]

    try:
        with open(path, "rb") as fh:
            d = Unpickler(fh, encoding="latin1").load()  # written by Python 2's cPickle
    except Exception as e:  # truncated or not a pickle: one line, no traceback
        fail(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:120] if str(e) else ''}); replace it with one from the release")
    if not isinstance(d, dict):
        fail(f"{path} holds a {type(d).__name__}, not a CIFAR-10 batch dict: replace it with one from the release")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}  # b"data" too
    for key in ("data", "labels"):
        if key not in d:
            fail(f"{path} has no {key!r} entry: not a CIFAR-10 python batch; replace it with one from the release")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"a {x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
        fail(f"{path}: `data` is {what}, expected uint8 N x 3072 (32x32 RGB planes); replace it with one from the release")
    try:
        y = np.asarray(d["labels"])
    except ValueError:  # ragged
        y = np.asarray(None)
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        fail(f"{path}: `labels` should be {len(x)} integers, one per image, got {y.dtype} of shape "
             f"{y.shape}; replace it with one from the release")
    if len(y) and (y.min() < 0 or y.max() > 9):
        fail(f"{path}: labels span {y.min()}..{y.max()}, expected 0..9; replace it with one from the release")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _npz_member(f, key):
    """One array of an npz batch, with a one-line error for a file that is not one."""
    import zipfile
    try:
        with np.load(f) as d:
            return d[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(f"{f} is not a downsampled-ImageNet npz batch with `data` and `labels` "
             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


# ImageNet-1k labels. The published class-conditional ImageNet networks (ADM/guided-diffusion,
# EDM, the consistency models) number the classes by WordNet id in sorted order, 0 = n01440764
# (tench) ... 999 = n15075141: openai/guided-diffusion guided_diffusion/image_datasets.py and
# openai/consistency_models cm/image_datasets.py index sorted(set(<wnid>_ file-name prefixes));
# NVlabs/edm dataset_tool.py indexes sorted top-level folder names (its README feeds it
# ILSVRC/Data/CLS-LOC/train, one folder per wnid).
# The downsampled-ImageNet npz batches carry the ILSVRC devkit's class ids 1..1000 instead
# (map_clsloc.txt order, 1 = n02119789 kit fox): PatrykChrabaszcz/Imagenet32_Scripts, utils.py
# get_label_dict as used by image2numpy_imagenet_{train,val}.py. IMAGENET_WNIDS lists the wnids
# in that order, from map_clsloc.txt as in arthw/imagenet_label imagenet_folder_id_class.txt and
# wisetrue95/Classification2020 data/map_clsloc.txt (the same 1000 ids); the map it gives equals
# MrChenFeng/MaskCon_CVPR2023 coarse_labels/imagenet32/imagenet32_to_fine.json.
IMAGENET_WNIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                              "imagenet_devkit_wnids.txt")
_IMAGENET_CLASSES = []  # (sorted wnids, devkit_to_sorted), read once by _imagenet_classes


def _imagenet_classes():
    """(the 1000 WordNet ids sorted: index = the published networks' label, devkit_to_sorted:
    int64 [1000], read-only, devkit_to_sorted[devkit_id - 1] = that class's label), read once
    from IMAGENET_WNIDS (devkit order, '#' lines skipped) and checked."""
    if not _IMAGENET_CLASSES:
        import re
        try:
            with open(IMAGENET_WNIDS) as fh:
                wnids = [s for s in (ln.strip() for ln in fh) if s and not s.startswith("#")]
        except OSError as e:
            fail(f"cannot read {IMAGENET_WNIDS} ({e.strerror or e}); it ships with the code")
        if len(wnids) != 1000 or len(set(wnids)) != 1000 or not all(
                re.fullmatch("n[0-9]{8}", w) for w in wnids):
            fail(f"{IMAGENET_WNIDS} is not the 1000 ImageNet WordNet ids (n########) in devkit "
                 f"order; restore it from the repository")
        ranked = sorted(wnids)
        index = {w: i for i, w in enumerate(ranked)}
        devkit_to_sorted = np.array([index[w] for w in wnids], np.int64)
        devkit_to_sorted.setflags(write=False)
        _IMAGENET_CLASSES.append((tuple(ranked), devkit_to_sorted))
    return _IMAGENET_CLASSES[0]


def imagenet_devkit_to_sorted():
    """int64 [1000], read-only: devkit_to_sorted[npz_label - 1] is the label, in the published
    networks' sorted-WordNet-id order, of a downsampled-ImageNet class id 1..1000."""
    return _imagenet_classes()[1]


def _load_imagenet64(data_dir, train):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): npz batches in data_dir or one folder
    below (the release unpacks to Imagenet64_train_part1_npz/ ...), `data` N x 12288 uint8 (R, G,
    B planes, each 64x64 row-major) and `labels` 1..1000. Otherwise an ImageFolder
    data_dir/{train,val}/<class>/<image>, box-downsampled to 64x64 where larger.

    Labels are those of the published class-conditional ImageNet networks (ADM, EDM, consistency
    models): a class's WordNet id's index among the 1000 sorted ids (0 = n01440764 tench). The
    npz batches' devkit ids go through imagenet_devkit_to_sorted (1 = kit fox -> 278); ImageFolder
    class folders named by wnids get their wnid's index, whichever folders are present. Folders
    named otherwise keep ImageFolder's indices (sorted among those present), with a note.
    """
    import glob
    split = "train" if train else "val"
    pattern = "train_data_batch_*.npz" if train else "val_data*.npz"
    files = (glob.glob(os.path.join(data_dir, pattern))
             + glob.glob(os.path.join(data_dir, "*", pattern)))
    files.sort(key=lambda f: (len(os.path.basename(f)), os.path.basename(f)))  # batch_2 before _10
    if files:
        devkit_to_sorted = imagenet_devkit_to_sorted()

        def chunks():  # one batch file at a time: peak memory is one file, not the data set
            for f in files:
                x, y = _npz_member(f, "data"), np.asarray(_npz_member(f, "labels"))
                if x.ndim != 2 or x.shape != (len(y), 3 * 64 * 64) or x.dtype != np.uint8:
                    fail(f"{f}: `data` is {x.dtype} of shape {x.shape}, expected uint8 "
                         f"({len(y)}, 12288): use the 64x64 downsampled-ImageNet npz batches")
                if len(y) and (y.min() < 1 or y.max() > 1000):
                    fail(f"{f}: labels span {y.min()}..{y.max()}, expected 1..1000 as in the "
                         f"downsampled-ImageNet release")
                yield x.reshape(-1, 3, 64, 64), devkit_to_sorted[y.astype(np.int64) - 1]
        return _cached_arrays(data_dir, f"imagenet64-{split}", files, (3, 64, 64),
                              lambda: sum(len(_npz_member(f, "labels")) for f in files), chunks)
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        fail(f"imagenet64 not found under --data-dir {data_dir!r}: put the downsampled-ImageNet "
             f"64x64 npz batches ({pattern}) or an ImageFolder ({folder}/<class>/*.png) there")
    import torchvision
    from PIL import Image
    try:
        ds = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, OSError) as e:
        fail(f"imagenet64 ImageFolder {folder!r} holds no images ({type(e).__name__}); "
             f"expected {folder}/<class>/*.png")
    if len(ds.classes) > DATASETS["imagenet64"][2]:
        fail(f"ImageFolder {folder!r} has {len(ds.classes)} classes; imagenet64 models have at "
             f"most 1000")
    index = {w: i for i, w in enumerate(_imagenet_classes()[0])}
    other = [c for c in ds.classes if c not in index]
    if not other:  # wnid folders: the published networks' labels, whichever classes are present
        to_label = np.array([index[c] for c in ds.classes], np.int64)
    else:
        to_label = np.arange(len(ds.classes), dtype=np.int64)
        if is_main():
            print(f"note: {folder}: class folder {other[0]!r}"
                  f"{f' (and {len(other) - 1} more)' if len(other) > 1 else ''} is not an "
                  f"ImageNet WordNet id; labels are the folders' sorted order, not those of the "
                  f"published ImageNet networks", flush=True)

    def chunks():
        for path, label in ds.samples:
            try:
                im = ds.loader(path)  # PIL, converted to RGB
            except OSError as e:  # not an image, truncated
                fail(f"{path}: cannot read the image ({type(e).__name__}); remove or replace it")
            hwc = np.asarray(im if im.size == (64, 64) else im.resize((64, 64), Image.BOX))
            yield hwc.transpose(2, 0, 1)[None], to_label[[label]]
    return _cached_arrays(data_dir, f"imagenet64-{split}-folder", [p for p, _ in ds.samples],
                          (3, 64, 64), lambda: len(ds.samples), chunks)


def to_float(x_uint8):
    return x_uint8.float() / 127.5 - 1.0


class Batches:
    """Infinite, seeded, rank-aware batches: epoch e is a permutation seeded by (seed, e), split
    across ranks. A pure function of the step, so a resumed run sees the same batches."""

    def __init__(self, data, batch_size, seed=0, rank=0, world=1, device="cpu"):
        self.x, self.y = data
        self.bs, self.seed, self.rank, self.world, self.device = batch_size, seed, rank, world, device
        self.per_epoch = max(1, len(self.x) // (batch_size * world))
        self._perm_epoch, self._perm = None, None

    def get(self, step):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.x), generator=g), epoch
        start = (i * self.world + self.rank) * self.bs
        idx = self._perm[start:start + self.bs]
        if len(idx) < self.bs:  # datasets smaller than one global batch: wrap around
            idx = self._perm[torch.arange(start, start + self.bs) % len(self.x)]
        # move uint8 and convert on the device: a quarter of the host-to-device bytes
        return to_float(self.x[idx].to(self.device)), self.y[idx].to(self.device)


# ----------------------------------------------------------------------------------------------
# checkpoints: atomic writes, weights_only loads, one-line shape errors
# ----------------------------------------------------------------------------------------------

def check_out_dir(out):
    """Create --out, or stop with one line when it names a file or cannot be created (call it
    before anything is written there)."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out!r} is a file, not a directory: pick another --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only filesystem
        fail(f"cannot create --out {out!r} ({e.strerror or e}): pick another --out")
    if not os.access(out, os.W_OK | os.X_OK):
        fail(f"--out {out!r} is not writable: pick another --out")


OUT_LOCK = "out.lock"  # flock()ed by the process training into an --out, while it lives
_claimed = {}  # realpath -> the open lock file: held until this process exits


def out_in_use(out):
    """Whether another process holds out's lock (claim_out_dir)."""
    import fcntl
    if os.path.realpath(out) in _claimed or not os.path.isfile(os.path.join(out, OUT_LOCK)):
        return False
    with open(os.path.join(out, OUT_LOCK), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a filesystem without locks: nothing can be told
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def claim_out_dir(out):
    """Hold out's lock file while this process lives: two runs training into one --out would
    overwrite each other's checkpoints and logs. The kernel releases it when the process ends,
    however it ends, so a killed run leaves no stale claim (as load_dataset's cache lock)."""
    import fcntl
    key = os.path.realpath(out)
    if key in _claimed:  # a second main() in this process (tests, a script calling a script)
        return
    fh = open(os.path.join(out, OUT_LOCK), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        fail(f"--out {out} is in use by another run: wait for it to end, or pass another --out")
    except OSError:  # a filesystem without locks: unguarded, as before
        pass
    _claimed[key] = fh


def check_free_space(out, nets, trained, buffer_states=0, shape=(), world=1):
    """Stop with one line, before the first iteration, when --out cannot hold what the run will
    write: two checkpoints (atomic_write keeps the old one until the new one is in place) of the
    nets' weights and Adam's two moments of the trained ones, and every rank's replay buffers
    full (buffer_states per rank: rank 0's in the checkpoint, the others' in sidecars), fp32
    states of `shape`."""
    weights = sum(t.numel() * t.element_size() for n in nets for t in n.state_dict().values())
    adam = sum(2 * 4 * p.numel() for n in trained for p in n.parameters())
    states = world * buffer_states * 4 * (math.prod(shape) + 3)
    need, free = 2 * (weights + adam + states), shutil.disk_usage(out).free
    if free < need:
        fail(f"--out {out!r} has {free / 2**30:.2f} GiB free, but this run writes about "
             f"{need / 2**30:.2f} GiB (two checkpoints and every rank's replay buffers): free "
             f"space there or pick another --out")


def atomic_write(path, write, what):
    """write(fh) to a temporary file beside path, fsync, os.replace: a crash, a full disk or a
    lost permission never leaves a half-written file, and the previous one stays. An OSError
    removes the temporary file and stops with one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as fh:  # a file object, not a path: torch.save then raises OSError
            write(fh)                # on a full disk, not a RuntimeError without an errno
            fh.flush()
            os.fsync(fh.fileno())  # NFS and delayed allocation report a full disk only here
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {what} is kept" if os.path.isfile(path) else ""
        fail(f"could not write {what} {path} ({e.strerror or e}): free space or pick another --out{kept}")
    finally:
        try:
            os.remove(tmp)
        except OSError:  # already replaced, or never created
            pass


_SAVED_STEPS = {}  # abspath -> the step this process last wrote there (no need to read it back)


def save_checkpoint(path, state, per_rank=()):
    """Write atomically (atomic_write), and never a diverged state: a NaN or inf in any floating
    tensor, on any rank, stops every rank with one line that names it and the last good
    checkpoint, which stays.

    per_rank: the keys of state that each rank holds for itself (its replay buffers). Rank 0's go
    into the checkpoint; rank r's into PATH.rank<r>.step<N> beside it, written before the
    checkpoint that vouches for them, so a resumed torchrun run gives every rank its own state
    back (load_checkpoint). Older sidecars are removed once the new checkpoint is in place."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    step = state.get("step") if isinstance(state, dict) else None
    mine = state if rank == 0 else {"step": step, **{k: state[k] for k in per_rank}}
    bad = nonfinite_key(mine)
    if world > 1:  # every rank stops, or none does
        found = [None] * world
        dist.all_gather_object(found, bad)
        bad = next((f"rank {r}'s {b}" for r, b in enumerate(found) if b is not None), None)
    if bad is not None:
        at = f" at step {step}" if step is not None else ""
        fail(f"not writing {path}: {bad} holds NaN or inf{at}; {last_checkpoint(path)}: "
             f"rerun with a lower --lr and a fresh --out")
    if rank > 0 and per_rank:
        atomic_write(f"{path}.rank{rank}.step{step}", lambda fh: torch.save(mine, fh), "checkpoint")
    barrier()
    if rank == 0:
        atomic_write(path, lambda fh: torch.save(state, fh), "checkpoint")
        if step is not None:
            _SAVED_STEPS[os.path.abspath(path)] = step
    barrier()
    if rank > 0 and per_rank:  # the checkpoint now vouches for this step's sidecar only
        import glob
        for old in glob.glob(glob.escape(f"{path}.rank{rank}.step") + "*"):
            if old != f"{path}.rank{rank}.step{step}":
                os.remove(old)


def check_finite_loss(losses, step, ckpt_path):
    """Stop with one line when a logged loss {name: value} is NaN or inf, naming the last good
    checkpoint (save_checkpoint never writes a non-finite state). A lower --lr is another run
    (check_same_run): it goes into a fresh --out."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        fail(f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}; "
             f"{last_checkpoint(ckpt_path)}: rerun with a lower --lr and a fresh --out")


def last_checkpoint(path):
    """'the last checkpoint is PATH (step N)' or 'no checkpoint was written yet': the piece of a
    one-line error that tells a diverged run where a rerun resumes from."""
    if not os.path.isfile(path):
        return "no checkpoint was written yet"
    step = _SAVED_STEPS.get(os.path.abspath(path))
    if step is None:
        try:  # mmap: the tensors are not read, only the pickle around them
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
        except Exception:
            return f"the last checkpoint is {path} (unreadable)"
    return f"the last checkpoint is {path}" + (f" (step {step})" if step is not None else "")


def nonfinite_key(obj, key=""):
    """The key path ('opt.state.3.exp_avg') of the first floating tensor in obj, through dicts,
    lists and tuples, that holds a NaN or inf; None when all are finite. A MixingBuffer state
    (a dict with `size` and `ptr`) is checked in its first `size` rows only: the rest was never
    written (new_empty) and may hold any bits."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel():
            # one reduction, no full-size temporary: a NaN or inf makes the sum non-finite; a
            # non-finite sum of finite values (overflow) is confirmed element-wise
            s = obj.detach().sum(dtype=torch.float32)
            if not torch.isfinite(s) and not torch.isfinite(obj.detach()).all():
                return key or "the state"
        return None
    if isinstance(obj, dict):
        rows = obj["size"] if "ptr" in obj and isinstance(obj.get("size"), int) else None
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        rows, items = None, enumerate(obj)
    else:
        return None
    for k, v in items:
        if rows is not None and torch.is_tensor(v) and v.dim():
            v = v[:rows]
        bad = nonfinite_key(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


def load_checkpoint(path, map_location="cpu", per_rank=()):
    """torch.load(weights_only=True) with one-line errors. per_rank: the keys that this rank
    saved for itself (save_checkpoint); rank r > 0 gets its own from PATH.rank<r>.step<N>, or,
    where there is none (a run resumed on more ranks), empty ones with a note (they refill)."""
    ck = _load(path, map_location)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank > 0 and per_rank:
        own = f"{path}.rank{rank}.step{ck.get('step')}"
        if os.path.isfile(own):
            ck.update({k: v for k, v in _load(own, map_location).items() if k in per_rank})
        else:
            print(f"note: rank {rank} has no saved {', '.join(per_rank)} for step {ck.get('step')} "
                  f"(a run resumed on more ranks?): starting them empty", flush=True)
            for k in per_rank:
                ck.pop(k, None)
    return ck


def _load(path, map_location):
    if not os.path.isfile(path):
        fail(f"checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f"could not load checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def resume(path, device, model_config, parts):
    """Continue a run whose --out holds a checkpoint: load_checkpoint (each rank its own replay
    buffers), check it holds a network of model_config's shape, and restore every part
    {checkpoint key: a module, an optimiser, or a dict of MixingBuffers}. Returns (checkpoint or
    None, step, training time so far)."""
    if not os.path.isfile(path):
        return None, 0, 0.0
    ck = load_checkpoint(path, map_location=device, per_rank=("buffers",))
    if ck.get("model_config") != model_config:
        fail(f"{path} holds a network of another shape or kind ({ck.get('model_config')}); use a "
             f"fresh --out or the --dataset / --teacher / --steps it was trained with")
    for key, part in parts.items():
        if ck.get(key) is None:
            continue
        if isinstance(part, dict):  # replay buffers, by source
            for name, sd in ck[key].items():
                part[name].load_state_dict(sd)
        elif isinstance(part, torch.nn.Module):
            load_weights(part, ck[key], f"{path} [{key}]")
        else:
            part.load_state_dict(ck[key])
    if is_main():
        print(f"resuming from {path} at step {ck['step']}", flush=True)
    return ck, ck["step"], ck.get("train_time_s", 0.0)


def load_weights(model, state_dict, what="model", strict=True):
    """load_state_dict with a one-line error that names both shapes of the first mismatch."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            fail(f"{what}: checkpoint tensor {k} has shape {tuple(v.shape)} but the model expects "
                 f"{tuple(own[k].shape)}; use a checkpoint of the same --dataset / model preset")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        fail(f"{what}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
             f"{unexpected[:3]}); use a checkpoint of the same --dataset / model preset")


# ----------------------------------------------------------------------------------------------
# logging and images
# ----------------------------------------------------------------------------------------------

class Logger:
    """A tqdm bar on rank 0 and one JSON line per log call in OUT/log.jsonl."""

    def __init__(self, out, total, initial=0, desc=None):
        self.main = is_main()
        self.path, self.t0 = os.path.join(out, "log.jsonl"), time.time()
        self.bar = None
        if self.main:
            from tqdm import tqdm
            os.makedirs(out, exist_ok=True)
            if os.path.isfile(self.path):  # resuming: drop records past the checkpoint's step
                keep = []
                with open(self.path) as fh:
                    for ln in fh:
                        try:
                            rec = json.loads(ln)
                        except ValueError:  # a line cut short by a crash or a full disk
                            continue
                        if isinstance(rec, dict) and rec.get("step", 0) <= initial:
                            keep.append(ln.rstrip("\n") + "\n")
                atomic_write(self.path, lambda fh: fh.write("".join(keep).encode()), "log")
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            disable=None, mininterval=1.0)

    def log(self, step, **metrics):
        if not self.main:
            return
        rec = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError as e:
            fail(f"could not write the log {self.path} ({e.strerror or e}): free space or pick another --out")
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def save_grid(x, path, nrow=None):
    """Save images in [-1, 1] as one PNG grid (atomically, see atomic_write)."""
    import torchvision
    if not is_main():
        return
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[-1] < 32:  # small images (digits 8x8): upscale so the grid can be looked at
        x = F.interpolate(x, scale_factor=32 // x.shape[-1], mode="nearest")
    nrow = nrow or int(math.ceil(math.sqrt(len(x))))
    atomic_write(path, lambda fh: torchvision.utils.save_image(x, fh, format="png", nrow=nrow, padding=2),
                  "image")


def write_json(obj, path):
    if is_main():
        atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()), "file")
