"""Data loaders on small fake data written in the real on-disk formats, and the Batches sampler.

The writers below (write_cifar10, write_imagenet64_npz, write_image_folder) are also used by
tests/test_scale.py to run the cifar10 / imagenet64 presets without the real data sets.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern(n, ch, res, seed=0):
    """Images whose every pixel says where it is: value = 7 n + 50 c + 3 h + w (mod 256), plus a
    per-set offset. Rows and columns step differently, so a transposed or channel-swapped load
    gives other values."""
    j, c, h, w = np.meshgrid(np.arange(n), np.arange(ch), np.arange(res), np.arange(res), indexing="ij")
    return ((7 * j + 50 * c + 3 * h + w + seed) % 256).astype(np.uint8)  # [n, C, H, W]


def flat_planes(img):
    """The CIFAR / downsampled-ImageNet row layout written out index by index:
    row[c * H * W + h * W + w] = img[c, h, w] (R plane, G plane, B plane, each row-major)."""
    n, ch, res, _ = img.shape
    flat = np.empty((n, ch * res * res), np.uint8)
    for c in range(ch):
        for h in range(res):
            for w in range(res):
                flat[:, c * res * res + h * res + w] = img[:, c, h, w]
    return flat


def write_cifar10(root, n_per_batch=6):
    """cifar-10-batches-py/ as the python release has it: data_batch_1..5, test_batch (dicts with
    batch_label, labels, data N x 3072 uint8, filenames) and batches.meta. Returns the images
    [N, 3, 32, 32] and labels of the train and test splits."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    imgs, labels = {}, {}
    for k, name in enumerate(names):
        img = pattern(n_per_batch, 3, 32, seed=11 * k)
        lab = [(k + i) % 10 for i in range(n_per_batch)]
        entry = {"batch_label": f"fake batch {k}", "labels": lab, "data": flat_planes(img),
                 "filenames": [f"img_{k}_{i}.png" for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        imgs[name], labels[name] = img, lab
    meta = {"num_cases_per_batch": n_per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"]}
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    train = (np.concatenate([imgs[n] for n in names[:5]]), sum((labels[n] for n in names[:5]), []))
    return train, (imgs["test_batch"], labels["test_batch"])


def write_imagenet64_npz(root, sizes=(3, 2), subdir=""):
    """train_data_batch_1..k.npz (`data` N x 12288 uint8, `labels` 1..1000 as a list, `mean`)
    and val_data.npz. Returns the train images [N, 3, 64, 64] and labels (1..1000) in batch order."""
    folder = os.path.join(root, subdir)
    os.makedirs(folder, exist_ok=True)
    imgs, labs = [], []
    for k, n in enumerate(sizes, start=1):
        img = pattern(n, 3, 64, seed=5 * k)
        lab = [1000 if i == 0 else (37 * k + i) % 1000 + 1 for i in range(n)]
        flat = flat_planes(img)
        np.savez(os.path.join(folder, f"train_data_batch_{k}.npz"), data=flat, labels=lab,
                 mean=flat.mean(0))
        imgs.append(img), labs.extend(lab)
    val = pattern(2, 3, 64, seed=99)
    np.savez(os.path.join(folder, "val_data.npz"), data=flat_planes(val), labels=[1, 2])
    return np.concatenate(imgs), labs


def write_image_folder(root, classes=("n01440764", "n01443537"), per_class=2, split="train"):
    """root/<split>/<wnid>/<i>.png, 64x64 RGB. Returns {path: (HWC array, class index)}."""
    from PIL import Image
    out = {}
    for ci, wnid in enumerate(sorted(classes)):
        os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
        for i in range(per_class):
            hwc = pattern(1, 3, 64, seed=13 * ci + i)[0].transpose(1, 2, 0)
            path = os.path.join(root, split, wnid, f"{i}.png")
            Image.fromarray(np.ascontiguousarray(hwc)).save(path)
            out[path] = (hwc, ci)
    return out


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------

def test_cifar10_pickles(tmp_path, monkeypatch):
    (train_x, train_y), (test_x, test_y) = write_cifar10(tmp_path)
    x, y = C.load_dataset("cifar10", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32) and y.dtype == torch.long
    assert torch.equal(x, torch.from_numpy(train_x)) and y.tolist() == train_y
    # one pixel by hand: image 8 (batch 2, image 2), green, row 5, column 9
    assert x[8, 1, 5, 9].item() == (7 * 2 + 50 * 1 + 3 * 5 + 9 + 11) % 256
    assert x[8, 1, 5, 9] != x[8, 1, 9, 5] and x[8, 1, 5, 9] != x[8, 0, 5, 9]
    xt, yt = C.load_dataset("cifar10", str(tmp_path), train=False)
    assert torch.equal(xt, torch.from_numpy(test_x)) and yt.tolist() == test_y
    # the folder itself works as --data-dir too
    assert torch.equal(C.load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"))[0], x)

    # the same files through torchvision's reader (its md5 check switched off): same images
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    tv = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(tv.data)) and tv.targets == y.tolist()
    assert tv.classes[0] == "airplane"


def test_cifar10_missing_names_directory(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)  # never download in tests
    with pytest.raises(SystemExit) as e:
        C.load_dataset("cifar10", str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "could not be downloaded" in msg


# ----------------------------------------------------------------------------------------------
# ImageNet 64x64: npz batches and ImageFolder
# ----------------------------------------------------------------------------------------------

def reference_imagenet64(flat):
    """The release's own loader (Chrabaszcz et al., util.load_databatch): stack the three planes
    along a last axis, reshape to N x 64 x 64 x 3 (HWC)."""
    s = 64 * 64
    x = np.dstack((flat[:, :s], flat[:, s:2 * s], flat[:, 2 * s:]))
    return x.reshape((x.shape[0], 64, 64, 3))


@pytest.mark.parametrize("subdir", ["", "Imagenet64_train_part1_npz"])
def test_imagenet64_npz(tmp_path, subdir):
    sizes = (3, 2, 1, 1, 1, 1, 1, 1, 1, 2)  # ten batches: batch_10 must come after batch_9
    img, lab = write_imagenet64_npz(tmp_path, sizes, subdir)
    x, y = C.load_dataset("imagenet64", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (sum(sizes), 3, 64, 64) and y.dtype == torch.long
    assert torch.equal(x, torch.from_numpy(img))
    assert y.tolist() == [v - 1 for v in lab] and y.min() >= 0 and y.max() == 999
    flat = np.load(os.path.join(tmp_path, subdir, "train_data_batch_1.npz"))["data"]
    assert torch.equal(x[:3].permute(0, 2, 3, 1), torch.from_numpy(reference_imagenet64(flat)))
    assert x[1, 2, 10, 3].item() == (7 * 1 + 50 * 2 + 3 * 10 + 3 + 5) % 256  # blue, row 10, col 3
    xv, yv = C.load_dataset("imagenet64", str(tmp_path), train=False)
    assert xv.shape == (2, 3, 64, 64) and yv.tolist() == [0, 1]


def test_imagenet64_npz_bad_labels(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 1])
    with pytest.raises(SystemExit, match="1..1000"):
        C.load_dataset("imagenet64", str(tmp_path))
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8), labels=[1, 2])
    with pytest.raises(SystemExit, match="12288"):
        C.load_dataset("imagenet64", str(tmp_path))


def test_imagenet64_image_folder(tmp_path):
    from PIL import Image
    files = write_image_folder(tmp_path)
    # a larger image is box-downsampled: 2x2 blocks of one colour become that colour
    big = np.repeat(np.repeat(pattern(1, 3, 64, seed=3)[0].transpose(1, 2, 0), 2, 0), 2, 1)
    path = os.path.join(tmp_path, "train", "n01443537", "big.png")
    Image.fromarray(big).save(path)
    files[path] = (big[::2, ::2], 1)
    x, y = C.load_dataset("imagenet64", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 64, 64) and y.dtype == torch.long
    by_path = sorted(files)  # ImageFolder order: class folder, then file name
    for i, p in enumerate(by_path):
        hwc, ci = files[p]
        assert torch.equal(x[i], torch.from_numpy(hwc).permute(2, 0, 1)) and y[i] == ci, p
    assert y.tolist() == [0, 0, 1, 1, 1]


def test_imagenet64_missing_exits_with_one_line(tmp_path):
    """As a user sees it: a non-zero exit and one line that names the directory, no traceback."""
    missing = str(tmp_path / "no_imagenet")
    r = subprocess.run([sys.executable, "-c", f"import common; common.load_dataset('imagenet64', {missing!r})"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0], r.stderr


def test_mnist_missing_names_directory(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(SystemExit, match="nowhere"):
        C.load_dataset("mnist", str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# Batches: infinite, seeded, rank-aware, a pure function of the step
# ----------------------------------------------------------------------------------------------

def ids(batch):
    """The dataset indices of a batch (image value = label = index)."""
    x, y = batch
    assert torch.equal(((x + 1) * 127.5).round().long().flatten(), y)  # images stay with labels
    return y.tolist()


def make(n):
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None], torch.arange(n)


def test_batches_rank_disjoint_within_epoch():
    data, bs, world = make(50), 4, 3
    ranks = [C.Batches(data, bs, seed=1, rank=r, world=world) for r in range(world)]
    per_epoch = 50 // (bs * world)
    for epoch in range(2):
        seen = [i for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                for b in ranks for i in ids(b.get(step))]
        assert len(seen) == per_epoch * bs * world == len(set(seen))  # no index twice in an epoch
    e0 = [ids(ranks[0].get(s)) for s in range(per_epoch)]
    e1 = [ids(ranks[0].get(s)) for s in range(per_epoch, 2 * per_epoch)]
    assert e0 != e1  # a fresh permutation each epoch


def test_batches_deterministic_by_step():
    data = make(40)
    a = C.Batches(data, 5, seed=3, rank=1, world=2)
    seq = [ids(a.get(s)) for s in range(12)]
    b = C.Batches(data, 5, seed=3, rank=1, world=2)  # a resumed run: fresh object, any order
    assert [ids(b.get(s)) for s in (11, 2, 7, 0)] == [seq[s] for s in (11, 2, 7, 0)]
    assert seq != [ids(C.Batches(data, 5, seed=4, rank=1, world=2).get(s)) for s in range(12)]
    x, _ = C.Batches((torch.tensor([0, 255], dtype=torch.uint8)[:, None], torch.zeros(2)), 2).get(0)
    assert sorted(x.flatten().tolist()) == [-1.0, 1.0]


def test_batches_smaller_than_global_batch():
    data = make(5)
    got = [ids(C.Batches(data, 4, seed=0, rank=r, world=2).get(0)) for r in range(2)]
    assert all(len(g) == 4 for g in got) and set(got[0] + got[1]) == set(range(5))
