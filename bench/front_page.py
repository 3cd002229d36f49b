"""The picture at the top of README.md: the digits teacher at 64 steps beside each method's
student at its K, every panel from the same noise.

    python pd_ddil.py && python lcm_ddil.py && python dmd2_ddil.py   # the three default runs
    python bench/front_page.py                                      # -> assets/front.png

Each student is read from runs/<method>-digits/ckpt.pt (its default --out), the teacher is the
one those runs distilled (the shipped assets/teacher-digits.pt unless runs/teacher-digits holds
your own). The FD of each panel comes from its run's metrics.json (2000 samples); a table of them
is printed for README.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import harness as H  # noqa: E402
import teacher as T  # noqa: E402

PANELS = [("teacher", None), ("PD", "pd_ddil"), ("LCM", "lcm_ddil"), ("DMD2", "dmd2_ddil")]


def panel(x, scale=4, nrow=8, pad=2):
    """Images [n, 1, h, w] in [-1, 1] -> one uint8 grid [H, W] (upscaled, white padding)."""
    x = F.interpolate((x.clamp(-1, 1) + 1) / 2, scale_factor=scale, mode="nearest")[:, 0]
    n, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return (grid * 255).round().byte()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where the default runs are")
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "front.png"), help="the PNG")
    p.add_argument("--n", type=int, default=32, help="images per panel")
    args = p.parse_args(argv)
    from PIL import Image, ImageDraw

    teacher_path = os.path.join(args.runs, "teacher-digits", "ckpt.pt")
    if not os.path.isfile(teacher_path):
        teacher_path = T.shipped_teacher_path("digits")
    torch.manual_seed(0)
    noise = torch.randn(args.n, 1, 8, 8)
    z = [torch.randn_like(noise) for _ in range(64)]  # the re-noising samplers' fresh noise
    tiles, rows = [], []
    for name, script in PANELS:
        path = teacher_path if script is None else os.path.join(args.runs, f"{script}-digits", "ckpt.pt")
        if not os.path.isfile(path):
            H.fail(f"{path} not found: run python {script}.py first (its default --out)")
        net, kind, ck = T.load_net(path)
        steps = 64 if script is None else ck["steps"]
        x = C.ddim_sample(C.guided(net), noise, C.time_grid(steps), bound="clip",
                          noises=z[:steps] if kind == "renoise" else None)
        label = f"{name}, {steps} step{'s' if steps > 1 else ''}"
        tiles.append((label, panel(x)))
        metrics = os.path.join(os.path.dirname(path), "metrics.json")
        if script is not None and os.path.isfile(metrics):
            m = json.load(open(metrics))
            rows.append((name, steps, m["student"][str(steps)]["fd"],
                         m["teacher"][str(max(map(int, m["teacher"])))]["fd"]))
    h, w, gap, top = tiles[0][1].shape[0], tiles[0][1].shape[1], 12, 18
    canvas = Image.new("L", (len(tiles) * (w + gap) - gap, h + top), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (label, grid) in enumerate(tiles):
        canvas.paste(Image.fromarray(grid.numpy()), (i * (w + gap), top))
        draw.text((i * (w + gap) + 2, 3), label, fill=0)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")
    print("| method | K | FD (2000 samples) | teacher FD at 64 steps |\n|---|---|---|---|")
    for name, steps, fd, fd_teacher in rows:
        print(f"| {name} | {steps} | {fd:.4f} | {fd_teacher:.4f} |")


if __name__ == "__main__":
    main()
