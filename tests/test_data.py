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

import harness as H

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
    and val_data.npz. Returns the train images [N, 3, 64, 64] and labels (the release's ILSVRC
    devkit ids 1..1000, loaded as published(id)) in batch order."""
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
    x, y = H.load_dataset("cifar10", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32) and y.dtype == torch.long
    assert torch.equal(x, torch.from_numpy(train_x)) and y.tolist() == train_y
    # one pixel by hand: image 8 (batch 2, image 2), green, row 5, column 9
    assert x[8, 1, 5, 9].item() == (7 * 2 + 50 * 1 + 3 * 5 + 9 + 11) % 256
    assert x[8, 1, 5, 9] != x[8, 1, 9, 5] and x[8, 1, 5, 9] != x[8, 0, 5, 9]
    xt, yt = H.load_dataset("cifar10", str(tmp_path), train=False)
    assert torch.equal(xt, torch.from_numpy(test_x)) and yt.tolist() == test_y
    # the folder itself works as --data-dir too
    assert torch.equal(H.load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"))[0], x)

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
        H.load_dataset("cifar10", str(tmp_path / "nowhere"))
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


def published(devkit_ids):
    """The labels the loader gives npz devkit ids 1..1000: the published networks' (sorted)."""
    return [int(H.imagenet_devkit_to_sorted()[v - 1]) for v in devkit_ids]


KIT_FOX, TENCH = "n02119789", "n01440764"  # devkit ids 1 and 449; sorted-wnid labels 278 and 0


@pytest.mark.parametrize("subdir", ["", "Imagenet64_train_part1_npz"])
def test_imagenet64_npz(tmp_path, subdir):
    sizes = (3, 2, 1, 1, 1, 1, 1, 1, 1, 2)  # ten batches: batch_10 must come after batch_9
    img, lab = write_imagenet64_npz(tmp_path, sizes, subdir)
    x, y = H.load_dataset("imagenet64", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (sum(sizes), 3, 64, 64) and y.dtype == torch.long
    assert torch.equal(x, torch.from_numpy(img))
    assert y.tolist() == published(lab) and y.min() >= 0 and y.max() <= 999
    assert y[0] == 543  # devkit id 1000: n03255030 dumbbell, sorted index 543
    flat = np.load(os.path.join(tmp_path, subdir, "train_data_batch_1.npz"))["data"]
    assert torch.equal(x[:3].permute(0, 2, 3, 1), torch.from_numpy(reference_imagenet64(flat)))
    assert x[1, 2, 10, 3].item() == (7 * 1 + 50 * 2 + 3 * 10 + 3 + 5) % 256  # blue, row 10, col 3
    xv, yv = H.load_dataset("imagenet64", str(tmp_path), train=False)
    assert xv.shape == (2, 3, 64, 64) and yv.tolist() == [278, 212]  # kit fox, English setter


def test_imagenet64_npz_bad_labels(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 1])
    with pytest.raises(SystemExit, match="1..1000"):
        H.load_dataset("imagenet64", str(tmp_path))
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8), labels=[1, 2])
    with pytest.raises(SystemExit, match="12288"):
        H.load_dataset("imagenet64", str(tmp_path))


def test_imagenet64_image_folder(tmp_path):
    from PIL import Image
    files = write_image_folder(tmp_path)
    # a larger image is box-downsampled: 2x2 blocks of one colour become that colour
    big = np.repeat(np.repeat(pattern(1, 3, 64, seed=3)[0].transpose(1, 2, 0), 2, 0), 2, 1)
    path = os.path.join(tmp_path, "train", "n01443537", "big.png")
    Image.fromarray(big).save(path)
    files[path] = (big[::2, ::2], 1)
    x, y = H.load_dataset("imagenet64", str(tmp_path))
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 64, 64) and y.dtype == torch.long
    by_path = sorted(files)  # ImageFolder order: class folder, then file name
    for i, p in enumerate(by_path):
        hwc, ci = files[p]
        assert torch.equal(x[i], torch.from_numpy(hwc).permute(2, 0, 1)) and y[i] == ci, p
    assert y.tolist() == [0, 0, 1, 1, 1]


def test_imagenet_devkit_wnids_asset():
    """assets/imagenet_devkit_wnids.txt: the ILSVRC devkit's 1000 wnids in class-id order
    (map_clsloc.txt), and the map from those ids to the published networks' sorted-wnid labels.
    Spot values from MrChenFeng/MaskCon_CVPR2023 coarse_labels/imagenet32/imagenet32_to_fine.json,
    a downsampled-ImageNet loader's own map."""
    with open(os.path.join(ROOT, "assets", "imagenet_devkit_wnids.txt")) as fh:
        lines = fh.read().splitlines()
    assert lines[0].startswith("#") and all(len(ln) < 100 for ln in lines)
    wnids = lines[1:]
    assert len(wnids) == len(set(wnids)) == 1000
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert wnids[:3] == [KIT_FOX, "n02100735", "n02110185"] and wnids[448] == TENCH
    assert sorted(wnids)[0] == TENCH and sorted(wnids)[-1] == "n15075141"
    m = H.imagenet_devkit_to_sorted()
    assert m.dtype == np.int64 and m.shape == (1000,) and sorted(m.tolist()) == list(range(1000))
    assert [sorted(wnids)[i] for i in m] == wnids and not m.flags.writeable
    assert m[:6].tolist() == [278, 212, 250, 193, 217, 147] and m[448] == 0 and m[449] == 1


def test_imagenet64_npz_and_image_folder_give_one_label_space(tmp_path):
    """One class, one label, whichever format it comes in: the npz batches' devkit ids 1 (kit fox)
    and 449 (tench) and ImageFolder folders named by those wnids all load as the published
    networks' labels (sorted-wnid order: kit fox 278, tench 0), not devkit id - 1 (0 and 448)."""
    npz, folder, few = (tmp_path / d for d in ("npz", "folder", "few"))
    npz.mkdir()
    np.savez(npz / "train_data_batch_1.npz", data=flat_planes(pattern(3, 3, 64)),
             labels=[1, 449, 1])
    files = write_image_folder(folder, classes=(KIT_FOX, TENCH), per_class=1)
    _, y_npz = H.load_dataset("imagenet64", str(npz))
    _, y_folder = H.load_dataset("imagenet64", str(folder))
    by_wnid = {os.path.basename(os.path.dirname(p)): int(v)
               for p, v in zip(sorted(files), y_folder)}
    assert y_npz.tolist() == [278, 0, 278] and by_wnid == {KIT_FOX: 278, TENCH: 0}
    assert by_wnid[KIT_FOX] == y_npz[0] and by_wnid[TENCH] == y_npz[1]
    # one class folder alone: its index among all 1000 wnids, not among the folders present
    write_image_folder(few, classes=(KIT_FOX,), per_class=2)
    assert H.load_dataset("imagenet64", str(few))[1].tolist() == [278, 278]


def test_imagenet64_image_folder_not_wnids_keeps_its_order(tmp_path, capsys):
    write_image_folder(tmp_path, classes=("dog", KIT_FOX, "cat"), per_class=1)
    _, y = H.load_dataset("imagenet64", str(tmp_path))
    assert y.tolist() == [0, 1, 2]  # ImageFolder's own: cat, dog, n02119789
    out = capsys.readouterr().out
    assert "'cat' (and 1 more) is not an ImageNet WordNet id" in out and "published" in out


def test_imagenet64_cache_of_an_older_version_is_rebuilt(tmp_path):
    """A cache converted before CACHE_VERSION 2 holds devkit id - 1 as labels: rebuilt."""
    import json
    _, lab = write_imagenet64_npz(tmp_path, (3, 2))
    y = H.load_dataset("imagenet64", str(tmp_path))[1].tolist()  # a list: make_old rewrites the mapped file
    xp, yp, jp = cache_files(tmp_path, "imagenet64-train")

    def make_old(version):  # the old labels, in a file of the same size, under `version`
        np.save(yp, np.array([v - 1 for v in lab], np.int64))
        with open(jp) as fh:
            j = json.load(fh)
        j["sources"]["version"] = version
        with open(jp, "w") as fh:
            json.dump(j, fh)
    make_old(H.CACHE_VERSION)  # the test's tampering is seen only through the version
    assert H.load_dataset("imagenet64", str(tmp_path))[1].tolist() == [v - 1 for v in lab]
    make_old(H.CACHE_VERSION - 1)
    mtime = os.stat(xp).st_mtime_ns
    _, y2 = H.load_dataset("imagenet64", str(tmp_path))
    assert y2.tolist() == y == published(lab) and os.stat(xp).st_mtime_ns != mtime
    with open(jp) as fh:
        assert json.load(fh)["sources"]["version"] == H.CACHE_VERSION == 2


def test_imagenet64_missing_exits_with_one_line(tmp_path):
    """As a user sees it: a non-zero exit and one line that names the directory, no traceback."""
    missing = str(tmp_path / "no_imagenet")
    r = subprocess.run([sys.executable, "-c", f"import harness; harness.load_dataset('imagenet64', {missing!r})"],
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
        H.load_dataset("mnist", str(tmp_path / "nowhere"))


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
    ranks = [H.Batches(data, bs, seed=1, rank=r, world=world) for r in range(world)]
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
    a = H.Batches(data, 5, seed=3, rank=1, world=2)
    seq = [ids(a.get(s)) for s in range(12)]
    b = H.Batches(data, 5, seed=3, rank=1, world=2)  # a resumed run: fresh object, any order
    assert [ids(b.get(s)) for s in (11, 2, 7, 0)] == [seq[s] for s in (11, 2, 7, 0)]
    assert seq != [ids(H.Batches(data, 5, seed=4, rank=1, world=2).get(s)) for s in range(12)]
    x, _ = H.Batches((torch.tensor([0, 255], dtype=torch.uint8)[:, None], torch.zeros(2)), 2).get(0)
    assert sorted(x.flatten().tolist()) == [-1.0, 1.0]


def test_batches_smaller_than_global_batch():
    data = make(5)
    got = [ids(H.Batches(data, 4, seed=0, rank=r, world=2).get(0)) for r in range(2)]
    assert all(len(g) == 4 for g in got) and set(got[0] + got[1]) == set(range(5))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 pickles are read as data: a restricted unpickler, one line for a bad file
# ----------------------------------------------------------------------------------------------

class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's cPickle wrote str (BINSTRING), as in the real CIFAR-10 release,
    instead of Python 3's protocol-2 _codecs.encode(..., 'latin1')."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)
    dispatch[bytes] = save_py2_str


def py2_batch(path, img, labels):
    """A batch as the release has it: Python 2 str keys and array bytes, numpy.core.multiarray."""
    import io
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump({b"batch_label": b"training batch 1 of 5", b"labels": labels,
                                      b"data": flat_planes(img), b"filenames": [b"a.png"] * len(labels)})
    raw = buf.getvalue()
    for mod in (b"numpy._core.multiarray", b"numpy.core.multiarray"):  # numpy 2 or 1 wrote it
        raw = raw.replace(b"c" + mod + b"\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw and pickle.BINSTRING in raw
    with open(path, "wb") as fh:
        fh.write(raw)


def test_cifar10_release_format_variants(tmp_path):
    """Python 2's pickles (the release), Python 3 ones with bytes keys, protocol 5: same images."""
    (train_x, train_y), _ = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    img1 = train_x[:6]
    py2_batch(folder / "data_batch_1", img1, train_y[:6])
    with open(folder / "data_batch_2", "rb") as fh:
        d = pickle.load(fh)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({k.encode(): v for k, v in d.items()}, fh, protocol=2)  # b"data", b"labels"
    with open(folder / "data_batch_3", "rb") as fh:
        d = pickle.load(fh)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump(d, fh, protocol=5)  # numpy._core.numeric._frombuffer
    x, y = H.load_dataset("cifar10", str(tmp_path))
    assert torch.equal(x, torch.from_numpy(train_x)) and y.tolist() == train_y


class Hostile:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("where", ["whole", "data", "label"])
@pytest.mark.parametrize("call", ["os.system", "builtins.eval"])
def test_cifar10_hostile_pickle_is_refused(tmp_path, where, call):
    write_cifar10(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    fn = os.system if call == "os.system" else eval
    arg = f"touch {sentinel}" if call == "os.system" else f"open({str(sentinel)!r}, 'w').close()"
    entry = {"batch_label": "b", "labels": [0, 1], "data": np.zeros((2, 3072), np.uint8), "filenames": []}
    if where == "whole":
        entry = Hostile(fn, arg)
    elif where == "data":
        entry["data"] = Hostile(fn, arg)
    else:
        entry["labels"] = [0, Hostile(fn, arg)]  # after numpy's allowed globals
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)
    with pytest.raises(SystemExit) as e:
        H.load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert not sentinel.exists()
    assert "\n" not in msg and str(path) in msg and "refusing" in msg
    assert ("posix.system" in msg or "os.system" in msg) if call == "os.system" else "builtin__.eval" in msg


def bad_batches():
    ok = {"batch_label": "b", "labels": [1, 2], "data": np.zeros((2, 3072), np.uint8), "filenames": ["a", "b"]}
    cases = {
        "not a dict": [ok["data"], ok["labels"]],
        "no data": {k: v for k, v in ok.items() if k != "data"},
        "no labels": {k: v for k, v in ok.items() if k != "labels"},
        "data not N x 3072": {**ok, "data": np.zeros((2, 3000), np.uint8)},
        "data 1-d": {**ok, "data": np.zeros(2 * 3072, np.uint8)},
        "data float": {**ok, "data": np.zeros((2, 3072), np.float32)},
        "data a list": {**ok, "data": [[0] * 3072] * 2},
        "label count": {**ok, "labels": [1, 2, 3]},
        "label 10": {**ok, "labels": [1, 10]},
        "label -1": {**ok, "labels": [-1, 2]},
        "label strings": {**ok, "labels": ["cat", "dog"]},
    }
    return cases


@pytest.mark.parametrize("case", list(bad_batches()) + ["truncated", "not a pickle", "empty"])
def test_cifar10_malformed_batch_is_one_line(tmp_path, case):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "not a pickle":
        path.write_text("this is a README, not a batch\n")
    elif case == "empty":
        path.write_bytes(b"")
    else:
        with open(path, "wb") as fh:
            pickle.dump(bad_batches()[case], fh, protocol=2)
    with pytest.raises(SystemExit) as e:
        H.load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg and str(path) in msg, msg
    assert not list(tmp_path.glob("*.tmp*")) and not [p for p in tmp_path.glob("cifar10-*") if p.suffix != ".lock"]


def test_cifar10_malformed_exits_without_traceback(tmp_path):
    """As a user sees it: a non-zero exit, one line on stderr, no traceback."""
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:-100])
    r = subprocess.run([sys.executable, "-c", f"import harness; harness.load_dataset('cifar10', {str(tmp_path)!r})"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], r.stderr


# ----------------------------------------------------------------------------------------------
# the one-time .npy conversion: memory-mapped, shared by ranks, rebuilt when the sources change
# ----------------------------------------------------------------------------------------------

def mapped_file(t):
    """The file a tensor's memory lies in, from /proc/self/maps (None: anonymous memory)."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as fh:
        for ln in fh:
            parts = ln.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None


def cache_files(root, name):
    return [os.path.join(root, name + s) for s in ("-uint8.npy", "-labels.npy", ".json")]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc")
def test_imagenet64_cache_is_memory_mapped_and_reused(tmp_path):
    img, lab = write_imagenet64_npz(tmp_path, (3, 2))
    x, y = H.load_dataset("imagenet64", str(tmp_path))
    xp, yp, jp = cache_files(tmp_path, "imagenet64-train")
    assert all(map(os.path.isfile, (xp, yp, jp))) and not list(tmp_path.glob("*.tmp*"))
    assert mapped_file(x) == xp and mapped_file(y) == yp  # file-backed: ranks share the pages
    assert torch.equal(x, torch.from_numpy(img)) and y.tolist() == published(lab)
    assert np.load(xp).shape == (5, 3, 64, 64)
    before = [os.stat(p).st_mtime_ns for p in (xp, yp, jp)]
    x2, y2 = H.load_dataset("imagenet64", str(tmp_path))  # fresh: opened, not converted again
    assert [os.stat(p).st_mtime_ns for p in (xp, yp, jp)] == before
    assert torch.equal(x2, x) and torch.equal(y2, y)
    x2[0, 0, 0, 0] = 1 + x2[0, 0, 0, 0]  # copy-on-write: the file (and other ranks) keep theirs
    assert torch.equal(H.load_dataset("imagenet64", str(tmp_path))[0][0], torch.from_numpy(img[0]))
    batch, _ = H.Batches((x, y), 4, seed=0).get(0)  # the sampler reads the map as before
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.float32


def test_imagenet64_cache_rebuilds_when_sources_change(tmp_path):
    write_imagenet64_npz(tmp_path, (3, 2))
    x, _ = H.load_dataset("imagenet64", str(tmp_path))
    new = pattern(4, 3, 64, seed=77)  # batch 2 replaced: other images, another count
    np.savez(tmp_path / "train_data_batch_2.npz", data=flat_planes(new), labels=[5, 6, 7, 8])
    x2, y2 = H.load_dataset("imagenet64", str(tmp_path))
    assert x2.shape == (7, 3, 64, 64) and torch.equal(x2[3:], torch.from_numpy(new))
    assert torch.equal(x2[:3], x[:3]) and y2[3:].tolist() == published([5, 6, 7, 8])
    os.utime(tmp_path / "train_data_batch_1.npz", ns=(1, 1))  # same bytes, other mtime: rebuilt
    mtime = os.stat(cache_files(tmp_path, "imagenet64-train")[0]).st_mtime_ns
    H.load_dataset("imagenet64", str(tmp_path))
    assert os.stat(cache_files(tmp_path, "imagenet64-train")[0]).st_mtime_ns != mtime
    xp = cache_files(tmp_path, "imagenet64-train")[0]
    with open(xp, "r+b") as fh:  # a cache cut short (not by us): its size no longer matches
        fh.truncate(1000)
    assert torch.equal(H.load_dataset("imagenet64", str(tmp_path))[0], x2)


def test_image_folder_cache_rebuilds_when_an_image_is_added(tmp_path):
    from PIL import Image
    write_image_folder(tmp_path)
    x, _ = H.load_dataset("imagenet64", str(tmp_path))
    assert mapped_file(x) == cache_files(tmp_path, "imagenet64-train-folder")[0]
    hwc = pattern(1, 3, 64, seed=42)[0].transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(hwc)).save(tmp_path / "train" / "n01443537" / "9.png")
    x2, y2 = H.load_dataset("imagenet64", str(tmp_path))
    assert x2.shape == (5, 3, 64, 64) and torch.equal(x2[4], torch.from_numpy(hwc).permute(2, 0, 1))
    assert y2.tolist() == [0, 0, 1, 1, 1]


def test_cifar10_cache(tmp_path):
    (train_x, _), _ = write_cifar10(tmp_path)
    x, _ = H.load_dataset("cifar10", str(tmp_path))
    assert mapped_file(x) == cache_files(tmp_path, "cifar10-train")[0]
    assert torch.equal(x, torch.from_numpy(train_x))


def test_cache_not_writable_loads_into_memory(tmp_path, monkeypatch, capsys):
    """A full disk or read-only --data-dir: a note, the data in memory, no temporary file left."""
    import errno
    img, _ = write_imagenet64_npz(tmp_path, (3, 2))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    x, _ = H.load_dataset("imagenet64", str(tmp_path))
    assert torch.equal(x, torch.from_numpy(img)) and mapped_file(x) != cache_files(tmp_path, "imagenet64-train")[0]
    assert "No space left on device" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet64-train.lock", "train_data_batch_1.npz",
                                                           "train_data_batch_2.npz", "val_data.npz"]


def test_a_conversion_in_progress_is_waited_for(tmp_path):
    """Another process converting (it holds <name>.lock): a loader waits, then opens its cache
    rather than converting beside it. No collective: rank 0 alone also calls load_dataset."""
    import fcntl
    import threading
    img, _ = write_imagenet64_npz(tmp_path, (3, 2))
    xp = cache_files(tmp_path, "imagenet64-train")[0]
    lock = open(tmp_path / "imagenet64-train.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # a second open file: its flock conflicts even in-process
    got = []
    t = threading.Thread(target=lambda: got.append(H.load_dataset("imagenet64", str(tmp_path))))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not os.path.exists(xp)  # waiting, not converting
    lock.close()  # the other process is done (here: it converted nothing, so this one does)
    t.join(30)
    assert not t.is_alive() and torch.equal(got[0][0], torch.from_numpy(img)) and mapped_file(got[0][0]) == xp


def test_two_processes_at_once_convert_once(tmp_path):
    img, lab = write_imagenet64_npz(tmp_path, (3, 2))
    code = ("import harness, sys; x, y = harness.load_dataset('imagenet64', sys.argv[1]); "
            "print('sum', int(x.sum()), int(y.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [o.strip().splitlines() for o, _ in outs]
    assert sum("converted" in ln for ls in lines for ln in ls) == 1, outs
    want = f"sum {int(img.sum(dtype=np.int64))} {sum(published(lab))}"
    assert lines[0][-1] == lines[1][-1] == want


def test_imagenet64_npz_not_an_npz_is_one_line(tmp_path):
    write_imagenet64_npz(tmp_path, (3, 2))
    (tmp_path / "train_data_batch_2.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as e:
        H.load_dataset("imagenet64", str(tmp_path))
    assert "\n" not in str(e.value) and "train_data_batch_2.npz" in str(e.value)
    np.savez(tmp_path / "train_data_batch_2.npz", data=np.zeros((2, 12288), np.uint8))  # no labels
    with pytest.raises(SystemExit, match="train_data_batch_2.npz.*labels"):
        H.load_dataset("imagenet64", str(tmp_path))
    for k in (1, 2):  # batches with no images
        np.savez(tmp_path / f"train_data_batch_{k}.npz", data=np.zeros((0, 12288), np.uint8), labels=[])
    with pytest.raises(SystemExit, match="hold no images"):
        H.load_dataset("imagenet64", str(tmp_path))
