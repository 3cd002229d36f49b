"""Benchmark the fused reflected step: the Triton kernel against the eager torch composition and
torch.compile of that composition.

    python bench/kernel.py                 # on a GPU: a CIFAR batch up to 2^28 elements
    python bench/kernel.py --dry           # tiny sizes, torch paths on CPU (the tests run this)

One step reads x, v (and z) and writes x_s and x0_hat: those bytes, in the input dtype, are the
traffic every implementation must move at least, so GB/s = bytes / median time for all three,
and "% peak" compares the kernel with the device's HBM bandwidth (H100 SXM 3.35 TB/s, H200
4.8 TB/s). On CUDA each call is timed with CUDA events after overwriting a 256 MB buffer: the L2
starts cold (small sizes are not served from cache) and the host's launch overhead hides behind
that write, as in triton.testing.do_bench; the times are device times. Coefficients are
per-sample [B] tensors, as in training. Outputs are checked against the eager composition.
Column "rows" is an experimental variant of the kernel (a 2-D grid with no per-element division),
timed beside it to show whether common's row gather costs bandwidth.
"""
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import harness as H  # noqa: E402


@dataclass
class Config:
    sizes: list = H.flag([
        "128x3x32x32",      # a CIFAR-10 batch, 0.4M elements
        "512x3x64x64",      # an ImageNet-64 batch, 6.3M
        "2048x3x64x64",     # the CD ImageNet-64 global batch, 25M
        "1024x4x128x128",   # 67M
        "4096x4x128x128"],  # 2^28 = 268M
        "The tensor shapes to time, BxCxHxW (--dry times tiny odd ones instead).")
    dtypes: list = H.flag(["float32", "bfloat16"], "The dtypes to time, from float32, bfloat16, "
                          "float16.")
    bounds: list = H.flag(["none", "reflect"], "The x0 bounds to time, from "
                          + ", ".join(C.BOUNDS) + ".")
    reps: int = H.flag(25, "Timed calls per measurement, of which the median counts (3 with --dry).")
    warmup: int = H.flag(3, "Untimed calls before each measurement (1 with --dry).")
    compile: str = H.flag("auto", "Also time torch.compile of the eager composition: auto is on, "
                          "except on a CPU with --dry (a first CPU compile takes minutes).",
                          choices=("auto", "on", "off"))
    dry: bool = H.flag(False, "Tiny odd sizes and few reps: the whole script in seconds, on a "
                       "CPU too.")
    device: str = H.flag("", "The device: cpu, cuda or cuda:N; default cuda where available, "
                         "else cpu.")
    peak_gbps: float = H.flag(0.0, "The device's peak bandwidth in GB/s; 0 = from its name (else "
                              "its memory clock and bus width).")
    seed: int = H.flag(0, "Seeds the random inputs and coefficients.")
    out: str = H.flag("bench/kernel.json", "The JSON file for the rows and the summary; --dry "
                      "writes only where --out is given.")


DRY_SIZES = ["2x3x8x8", "3x3x5x7"]

# HBM bandwidth by device name (first match wins), GB/s
PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
             ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555)]

_flush = None

if C.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _step_rows_kernel(x_ptr, v_ptr, z_ptr, xs_ptr, x0_ptr, at_ptr, st_ptr, as_ptr, ss_ptr, per_row,
                          BOUND: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        """An experiment beside common's kernel: a 2-D grid (sample, block within the sample), so
        the coefficients are 4 scalar loads per program instead of a division and 4 gathers per
        element. The math is common._step_math."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < per_row
        offs = row.to(tl.int64) * per_row + cols
        a_t, s_t = tl.load(at_ptr + row), tl.load(st_ptr + row)
        a_s, s_s = tl.load(as_ptr + row), tl.load(ss_ptr + row)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x
        if HAS_NOISE:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs, x0 = C._step_math(x, v, z, a_t, s_t, a_s, s_s, BOUND, HAS_NOISE)
        tl.store(xs_ptr + offs, xs.to(xs_ptr.dtype.element_ty), mask=mask)
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def step_rows(x, v, alpha_t, sigma_t, alpha_s, sigma_s, noise=None, bound="reflect"):
    """The row-grid variant, called like common.reflected_step_triton (coefficients [B] tensors)."""
    x, v = x.contiguous(), v.contiguous()
    z = noise.contiguous() if noise is not None else x
    B, per_row = x.shape[0], x[0].numel()
    coef = [c.float().expand(B).contiguous() for c in (alpha_t, sigma_t, alpha_s, sigma_s)]
    xs, x0 = torch.empty_like(x), torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(per_row))
    _step_rows_kernel[(B, triton.cdiv(per_row, block))](
        x, v, z, xs, x0, *coef, per_row, BOUND=C.BOUNDS.index(bound), HAS_NOISE=noise is not None,
        BLOCK=block)
    return xs, x0


def peak_gbps(device):
    """The device's HBM bandwidth in GB/s from its name, else from its memory clock and bus."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key in name:
            return float(gbps)
    p = torch.cuda.get_device_properties(device)  # double data rate: 2 transfers per clock
    return 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8 / 1e9


def median_time(fn, reps, warmup, device):
    """Median seconds of one fn() call (CUDA events after an L2 flush on GPU, wall clock on CPU)."""
    global _flush
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        if _flush is None:
            _flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _flush.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(shape, dtype, device, seed):
    """x, v, z in the benchmarked dtype and per-sample coefficients for a step t -> s = t - 0.05."""
    g = torch.Generator(device).manual_seed(seed)
    x, v, z = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    t = torch.rand(shape[0], generator=g, device=device) * 0.9 + 0.05
    a_t, s_t = C.alpha_sigma(t)
    a_s, s_s = C.alpha_sigma(t - 0.05)
    return x, 2 * v, z, [c.to(device) for c in (a_t, s_t, a_s, s_s)]


def tolerance(dtype, ref):
    """fp32: reordered float ops; bf16/fp16: the same fp32 value rounded differently (<= 2 ulp)."""
    scale = max(1.0, max(r.float().abs().max().item() for r in ref))
    return max(2 * torch.finfo(dtype).eps, 1e-5) * scale


def main(argv=None):
    cfg = H.parse_config(Config, argv)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        H.fail(f"--device {cfg.device} asked for, but CUDA is not available: use --device cpu")
    sizes = DRY_SIZES if cfg.dry else cfg.sizes
    reps, warmup = (3, 1) if cfg.dry else (cfg.reps, cfg.warmup)
    shapes = []
    for s in sizes:
        try:
            shapes.append(tuple(int(d) for d in s.lower().split("x")))
        except ValueError:
            H.fail(f"--sizes takes shapes like 128x3x32x32, got {s!r}")
    for d in cfg.dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            H.fail(f"--dtypes takes float32, bfloat16 or float16, got {d!r}")
    for b in cfg.bounds:
        if b not in C.BOUNDS:
            H.fail(f"--bounds takes {', '.join(C.BOUNDS)}, got {b!r}")
    if cfg.reps <= 0:
        H.fail(f"--reps must be positive, got {cfg.reps}")

    # the Triton kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow)
    use_triton = C.triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and not (cfg.dry and device.type == "cpu"))
    peak = cfg.peak_gbps or peak_gbps(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'}; "
          f"torch {torch.__version__}; triton {'on' if use_triton else 'off'}; "
          f"compile {'on' if use_compile else 'off'}", flush=True)

    rows, failed = [], False
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        for bound in cfg.bounds:
            for noise in (False, True):
                impls = {"eager": C.reflected_step_torch}
                if use_compile:  # a fresh compile per variant; dynamic shapes cover every size
                    torch._dynamo.reset()
                    impls["compile"] = torch.compile(C.reflected_step_torch, dynamic=True)
                if use_triton:
                    impls["triton"] = C.reflected_step_triton
                    impls["rows"] = step_rows
                for shape in shapes:
                    n = 1
                    for d in shape:
                        n *= d
                    item = torch.finfo(dtype).bits // 8
                    traffic = n * item * (4 + noise)  # read x, v (z); write x_s, x0_hat
                    if device.type == "cuda":  # inputs, outputs and the eager fp32 temporaries
                        need = traffic + 6 * n * 4
                        if need > 0.9 * torch.cuda.mem_get_info(device)[0]:
                            print(f"skip {shape} {dtype_name}: needs ~{need / 2**30:.1f} GiB", flush=True)
                            continue
                    x, v, z, coef = inputs(shape, dtype, device, cfg.seed)
                    z = z if noise else None
                    ref = C.reflected_step_torch(x, v, *coef, noise=z, bound=bound)
                    tol = tolerance(dtype, ref)
                    row = dict(shape="x".join(map(str, shape)), numel=n, dtype=dtype_name, bound=bound,
                               noise=noise, bytes=traffic, us={}, gbps={}, err={})
                    for key, fn in list(impls.items()):
                        call = lambda: fn(x, v, *coef, noise=z, bound=bound)  # noqa: E731
                        try:
                            out = call()
                        except Exception as e:  # compile can fail on a platform: say so once, go on
                            if key != "compile":
                                raise
                            print(f"warning: torch.compile failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:100]}); timing eager and triton only")
                            use_compile = False
                            del impls[key]
                            continue
                        err = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
                        sec = median_time(call, reps, warmup, device)
                        row["us"][key], row["gbps"][key] = sec * 1e6, traffic / sec / 1e9
                        row["err"][key] = err
                        failed |= err > tol
                    row["ok"] = all(e <= tol for e in row["err"].values())
                    if "triton" in row["us"]:
                        row["frac_peak"] = row["gbps"]["triton"] / peak if peak else None
                        row["x_eager"] = row["us"]["eager"] / row["us"]["triton"]
                        if "compile" in row["us"]:
                            row["x_compile"] = row["us"]["compile"] / row["us"]["triton"]
                    rows.append(row)
                    del x, v, z, ref, out
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    rows.sort(key=lambda r: (r["numel"], cfg.dtypes.index(r["dtype"]), cfg.bounds.index(r["bound"]), r["noise"]))
    print(table(rows), flush=True)
    summary = summarise(rows)
    if summary:
        print(summary, flush=True)
    if cfg.dry and cfg.out == Config.out:
        cfg.out = ""  # a dry run never overwrites the measured bench/kernel.json
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        H.write_json({"device": name, "peak_gbps": peak, "torch": torch.__version__,
                      "triton": getattr(C.triton, "__version__", None), "config": asdict(cfg),
                      "rows": rows, "summary": summary}, cfg.out)
        print(f"wrote {cfg.out}")
    if failed:
        H.fail("an implementation disagrees with the eager reference beyond tolerance (see 'max err')")
    return rows


def elements(n):
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def table(rows):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = ["| shape | elements | dtype | bound | noise | MB moved | eager µs | compile µs | triton µs "
             "| rows µs | eager GB/s | compile GB/s | triton GB/s | rows GB/s | % peak | × eager | × compile "
             "| max err |",
             "|" + "---|" * 18]
    for r in rows:
        us, gb = r["us"], r["gbps"]
        frac = r.get("frac_peak")
        lines.append(
            f"| {r['shape']} | {elements(r['numel'])} | {r['dtype']} | {r['bound']} | "
            f"{'z' if r['noise'] else '-'} | {r['bytes'] / 1e6:.3g} | {f(us.get('eager'), '.1f')} | "
            f"{f(us.get('compile'), '.1f')} | {f(us.get('triton'), '.1f')} | {f(us.get('rows'), '.1f')} | "
            f"{f(gb.get('eager'), '.3g')} | {f(gb.get('compile'), '.3g')} | {f(gb.get('triton'), '.3g')} | "
            f"{f(gb.get('rows'), '.3g')} | "
            f"{f(None if frac is None else 100 * frac, '.0f')} | {f(r.get('x_eager'), '.1f')} | "
            f"{f(r.get('x_compile'), '.2f')} | {max(r['err'].values()):.1e}{'' if r['ok'] else ' FAIL'} |")
    return "\n".join(lines)


def summarise(rows):
    """The issue's goal at the largest size: >= 85% of peak bandwidth and >= 3x the eager step."""
    big = [r for r in rows if r["numel"] == max(x["numel"] for x in rows) and r.get("frac_peak")]
    if not big:
        return ""
    frac, speed = min(r["frac_peak"] for r in big), min(r["x_eager"] for r in big)
    met = frac >= 0.85 and speed >= 3.0
    rows = min((r["gbps"]["rows"] / r["gbps"]["triton"] * r["frac_peak"] for r in big if "rows" in r["gbps"]),
               default=None)
    return (f"largest size {big[0]['shape']}: triton at >= {100 * frac:.0f}% of peak and >= {speed:.1f}x "
            f"eager over {len(big)} variants; goal (>= 85%, >= 3x) {'met' if met else 'NOT met'}"
            + ("" if rows is None else f"; the rows variant at >= {100 * rows:.0f}% of peak"))


if __name__ == "__main__":
    main()
