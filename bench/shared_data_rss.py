"""Memory of N processes that each load the same data set: the memory-mapped .npy cache that
harness.load_dataset builds, against loading into each process's own memory (the loader before
the cache, still its fallback where --data-dir cannot be written).

    python bench/shared_data_rss.py            # ~200 MB of fake imagenet64 npz batches, 1 and 2 processes

Each worker imports common, loads imagenet64 from fake npz batches in the release's format, reads
every byte of the images (as an epoch of Batches would), waits until all workers have, then
measures itself. The numbers:

- data PSS: the proportional set size of the data. With the memory map, the Pss of the mappings
  of the cache files (/proc/self/smaps): each page resident in k processes counts 1/k in each, so
  the sum over processes is the memory the data really takes. In memory, the growth of the
  process's Anonymous memory (/proc/self/smaps_rollup) from before the load: private pages.
- peak RSS (VmHWM): what `top` and resource.getrusage's maxrss show. It counts a shared page in
  full in every process that touched it, so it cannot tell the two apart; it is printed to show
  that, not to compare.

Library pages (torch, numpy) are shared by both modes alike and left out of the data numbers.
Linux only (/proc).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_kb(path, keys, match=None):
    """Sum of `keys` (kB) in a /proc smaps-style file; with match, only over mappings of those paths."""
    out, take = dict.fromkeys(keys, 0), match is None
    with open(path) as fh:
        for ln in fh:
            head = ln.split()
            if match is not None and "-" in head[0] and not head[0].endswith(":"):
                take = len(head) > 5 and head[5] in match  # a new mapping's header line
            elif take and head[0].rstrip(":") in out:
                out[head[0].rstrip(":")] += int(head[1])
    return out


def worker(data_dir, sync, index, count, mode):
    sys.path.insert(0, ROOT)
    import harness as H
    if mode == "memory":  # the loader's own fallback, as where --data-dir is not writable
        H._write_cache = lambda *args: None
    before = proc_kb("/proc/self/smaps_rollup", ["Anonymous", "Rss"])
    x, y = H.load_dataset("imagenet64", data_dir)
    step = 4096
    xn = x.numpy()  # numpy's buffered reduction: no int64 copy of a chunk, unlike torch's sum
    total = sum(int(xn[i:i + step].sum(dtype=np.uint64)) for i in range(0, len(xn), step))  # every byte
    open(os.path.join(sync, f"ready{index}"), "w").close()
    while sum(os.path.exists(os.path.join(sync, f"ready{i}")) for i in range(count)) < count:
        time.sleep(0.05)
    cache = {os.path.join(data_dir, "imagenet64-train" + s) for s in ("-uint8.npy", "-labels.npy")}
    mapped = proc_kb("/proc/self/smaps", ["Rss", "Pss"], match=cache)
    rollup = proc_kb("/proc/self/smaps_rollup", ["Rss", "Pss", "Anonymous"])
    hwm = proc_kb("/proc/self/status", ["VmHWM"])["VmHWM"]
    print(json.dumps({"mapped_rss_kb": mapped["Rss"], "mapped_pss_kb": mapped["Pss"],
                      "anon_growth_kb": rollup["Anonymous"] - before["Anonymous"],
                      "rss_before_kb": before["Rss"], "rss_kb": rollup["Rss"],
                      "pss_kb": rollup["Pss"], "peak_rss_kb": hwm, "checksum": total}), flush=True)
    open(os.path.join(sync, f"measured{index}"), "w").close()
    while sum(os.path.exists(os.path.join(sync, f"measured{i}")) for i in range(count)) < count:
        time.sleep(0.05)  # stay mapped until every worker has measured


def run(data_dir, count, mode):
    """`count` workers at once, loading through the memory map or into memory."""
    with tempfile.TemporaryDirectory() as sync:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", data_dir, sync, str(i), str(count), mode],
                                  stdout=subprocess.PIPE, text=True, env=env) for i in range(count)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit(f"error: a worker failed: {outs}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16384, help="fake 64x64 images (12288 bytes each)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        d, sync, i, n, mode = args.worker
        return worker(d, sync, int(i), int(n), mode)
    with tempfile.TemporaryDirectory() as data_dir:
        rng = np.random.default_rng(0)
        half = args.images // 2
        for k, n in enumerate((half, args.images - half), start=1):
            np.savez(os.path.join(data_dir, f"train_data_batch_{k}.npz"),
                     data=rng.integers(0, 256, (n, 12288), dtype=np.uint8), labels=rng.integers(1, 1001, n))
        size_mb = args.images * 12288 / 2**20
        print(f"data: {args.images} images, {size_mb:.0f} MiB of uint8; workers read every byte", flush=True)
        rows = {}
        for count in (1, 2):
            rows[("in memory", count)] = run(data_dir, count, "memory")
        sys.path.insert(0, ROOT)
        import harness as H
        t = time.time()
        H.load_dataset("imagenet64", data_dir)  # the one-time conversion
        print(f"conversion to the .npy cache: {time.time() - t:.1f} s", flush=True)
        for count in (1, 2):
            rows[("memory map", count)] = run(data_dir, count, "map")
        print(f"\n{'mode':<11} {'procs':>5} {'data PSS per process (MiB)':>28} {'data PSS total':>15} "
              f"{'peak RSS per process (before the load)':>40}")
        totals = {}
        for (mode, count), rs in rows.items():
            key = "mapped_pss_kb" if mode == "memory map" else "anon_growth_kb"
            per = [r[key] / 1024 for r in rs]
            totals[mode, count] = sum(per)
            peak = ' '.join(f"{r['peak_rss_kb'] / 1024:.0f} ({r['rss_before_kb'] / 1024:.0f})" for r in rs)
            print(f"{mode:<11} {count:>5} {' '.join(f'{v:.0f}' for v in per):>28} {sum(per):>15.0f} {peak:>40}")
        for mode in ("in memory", "memory map"):
            print(f"{mode}: data PSS of 2 processes / 1 process = "
                  f"{totals[mode, 2] / totals[mode, 1]:.2f}")
        assert len({r["checksum"] for rs in rows.values() for r in rs}) == 1  # all read the same data


if __name__ == "__main__":
    main()
