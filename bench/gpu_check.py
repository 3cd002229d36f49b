"""The prepared GPU check (about 8 minutes on one H100): the fused-kernel benchmark, then
iterations/s, images/s and peak memory of teacher.py and each method at the cifar10 preset on
synthetic CIFAR-10 pickles, with bf16 off/on (eager) and bf16 with torch.compile; prints one
markdown table.

    python bench/gpu_check.py              # one GPU
    python bench/gpu_check.py --dry        # CPU, tiny sizes: the whole path in about a minute

Each run calls the script's main() in this process with its cifar10 preset (per-process batch as
in the preset unless --batch-size is given) and --iters warmup + measure; it/s is timed from
log.jsonl between the end of the warmup iterations (compilation included there) and the last
one. Peak memory is torch.cuda.max_memory_allocated over the whole run (training dominates; the
tiny final evaluation is included). The methods distil a teacher trained here for 2 iterations;
their final evaluation is a stand-in (raw-pixel features, no Inception download; the state FD of
the covariate-shift diagnostic on the first 256 pixels): it checks the path, not the numbers.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import harness as H  # noqa: E402
from test_data import write_cifar10  # noqa: E402  (CIFAR-10's real pickle format)


SCRIPTS = ("teacher", "pd_ddil", "lcm_ddil", "dmd2_ddil")


@dataclass
class Config:
    dry: bool = H.flag(False, "Tiny sizes on the CPU (1 warmup and 1 timed iteration, 2 images "
                       "per batch file): the whole path in about a minute.")
    warmup: int = H.flag(5, "Iterations before timing (compilation happens here).")
    measure: int = H.flag(20, "Timed iterations after the warmup.")
    batch_size: int = H.flag(0, "Batch size per GPU; 0 = each script's cifar10 preset.")
    images: int = H.flag(256, "Synthetic images per CIFAR-10 batch file (there are 5).")
    scripts: list = H.flag(list(SCRIPTS), "The scripts to measure, from " + ", ".join(SCRIPTS)
                           + ".")
    kernel: bool = H.flag(True, "Run bench/kernel.py first (a reduced sweep).")
    out: str = H.flag("", "A JSON file for the rows; default none.")
    workdir: str = H.flag("", "Where the data, the teacher and the runs go; default a fresh "
                          "temporary folder.")


def pixel_metrics(cache_dir):
    """evaluate.sample_metrics with raw-pixel features: no Inception weights needed offline."""
    import evaluate as E
    real = E.sample_metrics

    def pixels(x_uint8):
        return x_uint8.flatten(1)[:, :256].double(), None

    def metrics(samples, dataset="digits", data_dir="data", *args, **kwargs):
        return real(samples, dataset, data_dir, cache_dir, extractor=pixels, name="pixels")
    return metrics


def last_it_per_s(log_path, warmup):
    """Iterations per second between step `warmup` and the last logged step."""
    rows = [json.loads(line) for line in open(log_path) if '"loss' in line]
    rows = [r for r in rows if "time" in r]
    first = next((r for r in rows if r["step"] >= warmup), rows[0])
    last = rows[-1]
    if last["step"] <= first["step"]:
        return float("nan")
    return (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)


def run_one(name, argv, out, warmup):
    """main(argv) of one script; returns (it/s, peak GB or None, error or '')."""
    import importlib
    mod = importlib.import_module(name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        mod.main(argv)
    except (Exception, SystemExit) as e:  # a failed combination is a row, not the end of the check
        return float("nan"), None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return last_it_per_s(os.path.join(out, "log.jsonl"), warmup), peak, ""


def main(argv=None):
    cfg = H.parse_config(Config, argv)
    bad = [s for s in cfg.scripts if s not in SCRIPTS]
    if bad or cfg.warmup < 1 or cfg.measure < 1 or cfg.batch_size < 0 or cfg.images < 1:
        H.fail(f"--scripts from {', '.join(SCRIPTS)}; --warmup, --measure, --images >= 1 "
               f"(got {bad or ''} {cfg.warmup} {cfg.measure} {cfg.images})")
    cuda = torch.cuda.is_available() and not cfg.dry
    device = "cuda" if cuda else "cpu"
    if cfg.dry:
        cfg.warmup, cfg.measure, cfg.images = 1, 1, 2
    t_start = time.time()
    print(f"gpu_check on {torch.cuda.get_device_name() if cuda else 'CPU'} "
          f"(torch {torch.__version__})", flush=True)

    if cfg.kernel:
        kflags = ["--dry"] if cfg.dry else ["--sizes", "128x3x32x32", "2048x3x64x64",
                                            "4096x4x128x128", "--reps", "10"]
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel.py"), *kflags],
                           cwd=ROOT, capture_output=True, text=True)
        print(r.stdout if r.returncode == 0 else f"kernel bench failed:\n{r.stderr[-2000:]}", flush=True)

    import evaluate as E
    tmp = cfg.workdir or tempfile.mkdtemp(prefix="gpu_check-")
    data = os.path.join(tmp, "data")
    write_cifar10(data, n_per_batch=cfg.images)
    real_metrics, real_fd, real_check = E.sample_metrics, E.frechet_distance, E.check_feature_extractor
    E.sample_metrics = pixel_metrics(os.path.join(tmp, "cache"))
    E.check_feature_extractor = lambda *a, **k: None  # the stand-in needs no Inception weights
    # the covariate-shift state FD on the first 256 pixels: a 3072-d one costs seconds of CPU
    E.frechet_distance = lambda a, b: real_fd(a[:, :256], b[:, :256])
    try:
        rows = measure(cfg, tmp, data, device, cuda)
    finally:  # leave evaluate as it was (the tests call main() in their own process)
        E.sample_metrics, E.frechet_distance = real_metrics, real_fd
        E.check_feature_extractor = real_check

    print("\n| script | batch/GPU | bf16 | compile | it/s | images/s | peak GB | wall s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "-"
        print(f"| {r['script']} | {r['batch']} | {'on' if r['bf16'] else 'off'} | "
              f"{'on' if r['compile'] else 'off'} | {r['it_per_s']:.3g} | {r['images_per_s']:.4g} | "
              f"{peak} | {r['wall_s']:.0f} | {r['error']} |")
    print(f"\ndevice: {torch.cuda.get_device_name() if cuda else 'CPU (dry: bf16 autocast is CUDA-only, so bf16 on = off here)'}; "
          f"total {time.time() - t_start:.0f} s", flush=True)
    if cfg.out:
        H.write_json({"rows": rows, "device": torch.cuda.get_device_name() if cuda else "cpu"}, cfg.out)
    return rows


def measure(cfg, tmp, data, device, cuda):
    """One row per (script, bf16, compile): it/s, images/s, peak memory."""
    iters = cfg.warmup + cfg.measure
    common = ["--dataset", "cifar10", "--data-dir", data, "--device", device, "--log-every", "1",
              "--iters", str(iters), "--ckpt-every", str(10 ** 9)]
    small = 2 if cfg.dry else 0
    n = "2" if cfg.dry else "4"  # covariate-shift states: the 38M U-Net costs ~1 s per batch on CPU
    per_script = {  # flags that keep the non-training parts (sampling, evaluation) short
        "teacher": ["--sample-count", "2", "--sample-steps", "2"],
        "pd_ddil": ["--refresh", "2" if cfg.dry else "16", "--teacher-steps", "8", "--steps", "2",
                    "--shift-samples", n],
        "lcm_ddil": ["--eval-samples", "4" if cfg.dry else "16", "--reference-steps", "2",
                     "--steps", "2", "--grid", "2" if cfg.dry else "48", "--refresh", "1",
                     "--buffer-size", "64", "--shift-samples", n],
        "dmd2_ddil": ["--eval-samples", "4" if cfg.dry else "16", "--shift-samples", n,
                      "--steps", "2", "--refresh", "1", "--buffer-size", "64",
                      "--teacher-substeps", "2", "--reference-steps", "2" if cfg.dry else "64"],
    }
    # a teacher to distil: trained here for 2 iterations at the cifar10 preset
    teacher_ckpt = os.path.join(tmp, "teacher", "ckpt.pt")
    import teacher
    teacher.main(common[:-4] + ["--iters", "2", "--out", os.path.dirname(teacher_ckpt),
                                "--batch-size", "2", *per_script["teacher"]])
    rows = []
    # (bf16, compile): each switch against the eager bf16 row; bf16 off + compile on is left out to
    # stay within 8 minutes (every compiled run pays ~1 minute of compilation). On CPU neither
    # applies (autocast is CUDA-only; a first CPU compile takes minutes): one eager row per script
    modes = [(False, False), (True, False), (True, True)] if cuda else [(True, False)]
    for name in cfg.scripts:
        preset = __import__(name).PRESETS["cifar10"]
        batch = cfg.batch_size or small or preset.get("batch_size", 0)
        for bf16, comp in modes:
            out = os.path.join(tmp, f"{name}-{int(bf16)}{int(comp)}")
            argv = common + ["--out", out, "--batch-size", str(batch),
                             "--bf16" if bf16 else "--no-bf16", "--compile" if comp else "--no-compile",
                             *per_script[name]]
            if name != "teacher":
                argv += ["--teacher", teacher_ckpt]
            if name == "pd_ddil":  # PD counts iterations per stage; --iters stops before the stage's end
                argv += ["--iters-per-stage", str(iters + 1)]
            t0 = time.time()
            ips, peak, err = run_one(name, argv, out, cfg.warmup)
            rows.append(dict(script=name, batch=batch, bf16=bf16, compile=comp, it_per_s=ips,
                             images_per_s=ips * batch, peak_gb=peak, wall_s=time.time() - t0, error=err))
            print(f"{name} bf16={bf16} compile={comp}: {ips:.3g} it/s {err}", flush=True)
    return rows


if __name__ == "__main__":
    main()
