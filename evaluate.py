"""Measure samples honestly: FD / KID / precision-recall / class entropy, and covariate shift.

digits: features from a small CNN classifier that this file trains deterministically (fixed seed,
fixed split) and caches under runs/eval-cache/; its held-out accuracy is reported.
cifar10 / imagenet64 / mnist: Inception features through torch-fidelity (optional dependency), so
FD is the usual FID when run with 50k samples against the train split, as the published numbers.

    python evaluate.py runs/teacher-digits/ckpt.pt --steps 1 2 4 8 16 64 --noise-floor
    torchrun --nproc_per_node=8 evaluate.py runs/lcm_ddil-cifar10/ckpt.pt --steps 1 2 --num-samples 50000

Metrics (real set vs generated set, features phi):
    FD   = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r^1/2 S_g S_r^1/2)^1/2)      Frechet distance
    KID  = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018): all pairs up
           to 5000 points a side, else the mean over 100 random subsets of 1000
    precision = share of generated points inside some real point's k-NN ball, recall the converse
                (Kynkaanniemi et al. 2019, k = 3)
    entropy   = entropy (nats) of the feature classifier's class histogram of the samples
                (digits only; uniform over 10 classes = ln 10 = 2.303)
Digits features are divided by their RMS on real data, so FD is in units where a real feature
vector has mean squared entry 1. `--noise-floor` says which differences are larger than chance.
"""
import dataclasses
import hashlib
import inspect
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common as C
import harness as H
from teacher import load_net

CACHE_DIR = os.path.join("runs", "eval-cache")


# ----------------------------------------------------------------------------------------------
# metrics on feature sets [N, D]
# ----------------------------------------------------------------------------------------------

def _sqrt_psd(S):
    """Square root of a symmetric PSD matrix by eigen-decomposition; tiny negative eigenvalues
    (rounding on near-singular covariances) are clipped to 0, so no NaN and nothing complex."""
    lam, U = torch.linalg.eigh(S)
    return (U * lam.clamp(min=0).sqrt()) @ U.T


def gaussian_stats(feats):
    f = torch.as_tensor(feats).double().flatten(1)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets, in float64.

    tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2): the inner matrix is symmetric PSD, so one
    symmetric eigen-decomposition gives the trace without scipy's complex sqrtm.
    """
    (mu_a, S_a), (mu_b, S_b) = gaussian_stats(a), gaussian_stats(b)
    r = _sqrt_psd(S_a)
    M = r @ S_b @ r
    tr_sqrt = torch.linalg.eigvalsh((M + M.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)  # rounding can leave -1e-12 for identical sets


def kid(a, b, num_subsets=100, subset_size=1000, max_full=5000, seed=0):
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3.

    Sets of up to max_full points use every pair once (the digits case: exact, lower variance,
    cheaper than 100 subsets); larger sets average num_subsets random subsets of subset_size."""
    a, b = torch.as_tensor(a).double().flatten(1), torch.as_tensor(b).double().flatten(1)
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3

    def mmd2(x, y):  # leave out the diagonal k(x_i, x_i) of the within-set terms: unbiased
        n, m = len(x), len(y)
        k_xx, k_yy = k(x, x), k(y, y)
        return float((k_xx.sum() - k_xx.trace()) / (n * (n - 1))
                     + (k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k(x, y).mean())
    if max(len(a), len(b)) <= max_full:
        return mmd2(a, b)
    m, g = min(len(a), len(b), subset_size), torch.Generator().manual_seed(seed)
    return sum(mmd2(a[torch.randperm(len(a), generator=g)[:m].to(a.device)],
                    b[torch.randperm(len(b), generator=g)[:m].to(b.device)])
               for _ in range(num_subsets)) / num_subsets


def _kth_nn_radius(x, k, chunk=4096):
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def _covered(points, centres, radii, chunk=4096):
    """For each point: is it inside at least one ball (centre, radius)?"""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1)
                      for i in range(0, len(points), chunk)])


PR_K = 3  # precision / recall's neighbourhood: each sample's 3rd nearest neighbour (Kynkaanniemi et al.)
MIN_SAMPLES = PR_K + 1


def check_feature_extractor(dataset, device="cpu", inception_weights=""):
    """Before any training: the feature network that a run's evaluations will need loads, or one
    line says how to get it (Inception FID beyond digits: torch-fidelity and its weights). A run
    must not find this out after days of training."""
    if dataset != "digits" and H.is_main():
        inception_extractor(device, inception_weights)


def check_sample_counts(cfg):
    """One-line error for a sample count the metrics cannot use: each of cfg's eval_samples,
    stage_eval_samples, eval_every_samples and ref_samples (0: off) needs PR_K + 1 samples."""
    for name in ("eval_samples", "stage_eval_samples", "eval_every_samples", "ref_samples"):
        n = getattr(cfg, name, MIN_SAMPLES)
        if n < MIN_SAMPLES and not (name == "ref_samples" and n == 0):
            H.fail(f"--{name.replace('_', '-')} must be at least {MIN_SAMPLES}"
                   f"{' (or 0: off)' if name == 'ref_samples' else ''}: precision and recall use "
                   f"each sample's {PR_K}rd nearest neighbour; got {n}")


def precision_recall(real, fake, k=PR_K):
    """Kynkaanniemi et al. 2019: the real manifold is the union of balls around real points with
    radius = distance to the k-th nearest real neighbour; precision = share of fake points on it.
    Recall swaps the roles."""
    real, fake = torch.as_tensor(real).double().flatten(1), torch.as_tensor(fake).double().flatten(1)
    precision = _covered(fake, real, _kth_nn_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_nn_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def entropy(labels, num_classes):
    """Entropy in nats of the class histogram; ln(num_classes) when every class is equally common."""
    p = torch.bincount(labels.flatten().cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log()).sum()))  # not -0.0 for a single class


def compare(real_feats, fake_feats, device="cpu"):
    """FD, KID, precision and recall of one feature set against a reference set.
    The pairwise terms run on `device` (50k x 50k Inception features need a GPU)."""
    real_feats, fake_feats = real_feats.to(device), fake_feats.to(device)
    precision, recall = precision_recall(real_feats, fake_feats)
    return {"fd": frechet_distance(real_feats, fake_feats), "kid": kid(real_feats, fake_feats),
            "precision": precision, "recall": recall}


# ----------------------------------------------------------------------------------------------
# the digits feature network: a small CNN classifier, trained deterministically and cached
# ----------------------------------------------------------------------------------------------

FEAT_SEED, FEAT_HELDOUT, FEAT_EPOCHS, FEAT_BATCH, FEAT_LR = 0, 297, 20, 64, 2e-3


def digits_classifier():
    """8x8 -> 4x4 -> 2x2 conv trunk, a 64-d penultimate layer (the features), 10 logits.

    feat_scale: the RMS of the training images' features. Their raw scale is arbitrary; divided
    by it, x.y / d is ~1 as with Inception features, the regime KID's cubic kernel is made for."""
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10))
    net.register_buffer("feat_scale", torch.ones(()))
    return net


def train_digits_classifier(data_dir="data"):
    """Adam on a fixed split of the 1797 digits, fixed seed: the same weights on every run.
    Returns (network in eval mode, held-out accuracy)."""
    x, y = H.load_dataset("digits", data_dir)
    x = H.to_float(x)
    # one thread: the same summation order whatever the core count, and for a net this small
    # also the fastest (2 threads on 2 busy cores were 10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # leave the caller's RNG as it was
        torch.manual_seed(FEAT_SEED)
        perm = torch.randperm(len(x))
        test, train = perm[:FEAT_HELDOUT], perm[FEAT_HELDOUT:]
        net = digits_classifier()
        opt = torch.optim.Adam(net.parameters(), lr=FEAT_LR)
        for _ in range(FEAT_EPOCHS):
            for idx in train[torch.randperm(len(train))].split(FEAT_BATCH):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    torch.set_num_threads(threads)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        net.feat_scale.copy_(net[:-1](x[train]).square().mean().sqrt())
        acc = (net(x[test]).argmax(1) == y[test]).double().mean().item()
    return net, acc


def _code_version():
    """Hash of the code that defines the classifier: a cache from other code is retrained."""
    src = inspect.getsource(digits_classifier) + inspect.getsource(train_digits_classifier)
    src += repr((FEAT_SEED, FEAT_HELDOUT, FEAT_EPOCHS, FEAT_BATCH, FEAT_LR))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


_MEMO = {}


def digits_features_net(cache_dir=CACHE_DIR, data_dir="data"):
    """The cached digits classifier (trained on first use, ~10 s on CPU) and its held-out accuracy."""
    key = ("digits", os.path.abspath(cache_dir))
    if key in _MEMO:
        return _MEMO[key]
    path, version = os.path.join(cache_dir, "digits-classifier.pt"), _code_version()
    ck = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    net = digits_classifier()
    if ck is not None and ck.get("version") == version:
        net.load_state_dict(ck["state_dict"])
        net.eval().requires_grad_(False)
        acc = ck["heldout_acc"]
    else:
        print(f"training the digits feature classifier into {path} (once; ~10 s)", flush=True)
        net, acc = train_digits_classifier(data_dir)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # atomic: two processes may train it at once
        torch.save({"state_dict": net.state_dict(), "heldout_acc": acc, "version": version}, tmp)
        os.replace(tmp, path)
        print(f"digits feature classifier: held-out accuracy {acc:.4f}", flush=True)
    _MEMO[key] = (net, acc)
    return net, acc


def to_uint8(x):
    """Samples in [-1, 1] quantised exactly as images are stored (and as the real data is)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def digits_extractor(cache_dir=CACHE_DIR, data_dir="data"):
    """uint8 images -> (penultimate-layer features [N, 64], predicted class [N])."""
    net, _ = digits_features_net(cache_dir, data_dir)

    @torch.no_grad()
    def extract(x_uint8):
        h = net[:-1](H.to_float(x_uint8.cpu()))
        return h.double() / net.feat_scale.item(), net[-1](h).argmax(1)
    return extract


# ----------------------------------------------------------------------------------------------
# Inception features (cifar10 / imagenet64 / mnist) through torch-fidelity, imported lazily
# ----------------------------------------------------------------------------------------------

def inception_extractor(device="cpu", weights="", batch=250):
    """uint8 images -> (2048-d pool features of the TF-Inception FID network, None).

    weights: a local pt_inception-2015-12-05 file; empty = torch-fidelity's own download."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        H.fail("Inception FID needs torch-fidelity: pip install torch-fidelity")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=weights or None)
    except Exception as e:
        H.fail(f"could not load the Inception FID weights ({type(e).__name__}); offline machines: "
               f"pass --inception-weights PATH to pt_inception-2015-12-05-6726825d.pth")
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(x_uint8):
        x_uint8 = x_uint8.expand(-1, 3, -1, -1) if x_uint8.shape[1] == 1 else x_uint8
        feats = [net(x_uint8[i:i + batch].to(device))[0].double().cpu()
                 for i in range(0, len(x_uint8), batch)]
        return torch.cat(feats), None
    return extract


REF_COUNT = 50_000  # published FIDs compare 50k samples with train-split statistics


def real_features(dataset, data_dir="data", extractor=None, cache_dir=CACHE_DIR, name=""):
    """Features of the reference set: all 1797 digits, or (up to) 50k train images, cached.

    `name` keys the on-disk cache for non-digits extractors (e.g. "inception"); digits features
    are recomputed (a fraction of a second) so they always match the cached classifier."""
    key = (dataset, os.path.abspath(data_dir), os.path.abspath(cache_dir), name)
    if key in _MEMO:
        return _MEMO[key]
    path = os.path.join(cache_dir, f"{dataset}-{name}-train.pt") if name else None
    if path and os.path.isfile(path):
        feats = torch.load(path, weights_only=True)
    else:
        x, _ = H.load_dataset(dataset, data_dir)
        if len(x) > REF_COUNT:  # imagenet64: a fixed random 50k subset of the train split
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:REF_COUNT]]
        feats = extractor(x)[0]
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(feats, path)
    _MEMO[key] = feats
    return feats


# ----------------------------------------------------------------------------------------------
# the contract: metrics of samples, of a network, and the teacher's reference rows
# ----------------------------------------------------------------------------------------------

def sample_metrics(samples, dataset="digits", data_dir="data", cache_dir=CACHE_DIR, extractor=None,
                   name="", device="cpu", inception_weights="", labels=None):
    """{fd, kid, precision, recall, entropy, cond_acc} of samples [N, C, H, W] in [-1, 1] against
    real data. cond_acc (conditional samples, digits): the share of samples that the feature
    classifier reads as the label they were drawn for (None otherwise).

    extractor(x_uint8) -> (features, predicted classes or None) replaces the default feature
    network (digits classifier or Inception); `name` then names its cached real features."""
    if extractor is None:
        if dataset == "digits":
            extractor = digits_extractor(cache_dir, data_dir)
        else:
            extractor, name = inception_extractor(device, inception_weights), "inception"
    real = real_features(dataset, data_dir, extractor, cache_dir, name)
    fake, classes = extractor(to_uint8(samples))
    m = compare(real, fake, device)
    m["entropy"] = entropy(classes, H.DATASETS[dataset][2]) if classes is not None else None
    m["cond_acc"] = (float((classes.cpu() == labels.cpu()).double().mean())
                     if classes is not None and labels is not None else None)
    return m


def eval_labels(n, num_classes):
    """The conditioning protocol of every evaluation: balanced labels 0, 1, ..., C-1, 0, 1, ...
    for a class-conditional network (never the null label, which no student trains on)."""
    return torch.arange(n) % num_classes if num_classes else None


def sample(net, kind, steps, num_samples, bound="clip", seed=0, device="cpu", w=0.0, batch=500):
    """num_samples images at balanced labels (eval_labels) and guidance w (common.guided), split
    over ranks and gathered: every rank returns all of them. Seeded per (seed, rank, batch) in a
    forked RNG, so the caller's random stream is untouched."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    y = eval_labels(num_samples, C.unwrap(net).num_classes)
    per_rank = math.ceil(num_samples / world)
    out = []
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        for i, start in enumerate(range(0, per_rank, batch)):
            H.step_seed(seed, rank, i)
            n = min(batch, per_rank - start)
            lo = rank * per_rank + start
            yb = None if y is None else y[torch.arange(lo, lo + n) % num_samples].to(device)
            out.append(C.generate(net, n, steps, kind, bound=bound, y=yb, w=w, device=device))
    return H.all_gather_cat(torch.cat(out))[:num_samples]


def evaluate_net(net, kind, steps, num_samples, dataset="digits", bound="clip", seed=0,
                 device="cpu", data_dir="data", w=0.0, cache_dir=CACHE_DIR, inception_weights="",
                 cached=False):
    """(metrics, samples) of a network sampled with K = steps at balanced labels and guidance w;
    rank 0 computes the metrics and every rank returns them. cached: a frozen teacher's DDIM
    samples come from (and go to) the disk cache of teacher_samples."""
    x = (teacher_samples(net, steps, num_samples, w, bound, seed, device, cache_dir) if cached else
         sample(net, kind, steps, num_samples, bound, seed, device, w))
    m = [None]
    if H.is_main():
        m[0] = sample_metrics(x, dataset, data_dir, cache_dir, device=device,
                              inception_weights=inception_weights,
                              labels=eval_labels(num_samples, C.unwrap(net).num_classes))
    if dist.is_initialized():
        dist.broadcast_object_list(m, src=0)
    return m[0], x


def fd_during_training(net, kind, steps, num_samples, **protocol):
    """{fd, kid} of a network mid-training (put back in its mode after): the curve in log.jsonl
    behind "wall time to reach the baseline's FD". The same noise every call (seed), so the curve
    moves only with the weights; the training RNG is untouched (sample forks it)."""
    was_training = net.training
    net.eval()
    m, _ = evaluate_net(net, kind, steps, num_samples, **protocol)
    net.train(was_training)
    return {"fd": m["fd"], "kid": m["kid"]}


def feature_extractor(dataset, device="cpu", cache_dir=CACHE_DIR, data_dir="data", inception_weights=""):
    """The feature network of a data set: the digits classifier, else Inception."""
    if dataset == "digits":
        return digits_extractor(cache_dir, data_dir)
    return inception_extractor(device, inception_weights)


def weights_digest(net):
    """A hash of a network's weights: names a cache that only those weights made."""
    h = hashlib.sha256()
    for k, v in C.unwrap(net).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_samples(teacher, steps, n, w=0.0, bound="clip", seed=0, device="cpu", cache_dir=CACHE_DIR):
    """`sample` of the teacher's DDIM, cached on disk by its weights, the protocol and the world
    size (which splits the seeds): every distillation run from one teacher evaluates the same
    teacher rows, so a benchmark of many runs samples them once (bit-identical to sampling again;
    64 guided steps x 1000 digits is ~50 s on a 2-core CPU). Rank 0 reads, all ranks receive."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    key = hashlib.sha256(repr((weights_digest(teacher), steps, n, float(w), bound, seed,
                               world)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"teacher-samples-{key}.pt")
    box = [torch.load(path, weights_only=True) if H.is_main() and os.path.isfile(path) else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        return box[0].to(device)
    x = sample(teacher, "ddim", steps, n, bound, seed, device, w)
    if H.is_main():
        H.atomic_write(path, lambda fh: torch.save(x.cpu(), fh), "cached teacher samples")
    return x


def teacher_reference(teacher, n, steps, w=0.0, dataset="digits", bound="clip", seed=0, device="cpu",
                      data_dir="data", cache_dir=CACHE_DIR, inception_weights=""):
    """What distillation tries to match: features of n samples of the teacher's own `steps`-step
    DDIM (balanced labels, guidance w; seeds of their own, so no student shares their noise),
    with its noise floor, FD / KID between two such independent sets (a floor that the size of
    the real data set does not limit). Cached on disk by the teacher's weights and the protocol.
    Every rank samples; rank 0 returns {features, n, steps, floor_fd, floor_kid}, others None."""
    key = hashlib.sha256(repr((weights_digest(teacher), n, steps, float(w), bound, seed,
                               dataset)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"teacher-ref-{key}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True) if H.is_main() else None
    xa = sample(teacher, "ddim", steps, n, bound, seed + 10_000, device, w)
    xb = sample(teacher, "ddim", steps, n, bound, seed + 20_000, device, w)
    if not H.is_main():
        return None
    extract = feature_extractor(dataset, device, cache_dir, data_dir, inception_weights)
    fa, fb = extract(to_uint8(xa))[0], extract(to_uint8(xb))[0]
    floor = compare(fa, fb, device)
    ref = {"features": fa, "n": n, "steps": steps, "floor_fd": floor["fd"], "floor_kid": floor["kid"]}
    H.atomic_write(path, lambda fh: torch.save(ref, fh), "teacher reference")
    return ref


def paired_distance(a, b, fa=None, fb=None):
    """Two sample sets drawn from the same noise and labels: the mean squared pixel difference
    per sample, and (given their features fa, fb) the mean squared feature difference per dimension."""
    px = float((a.float() - b.float()).square().flatten(1).mean(1).mean())
    return {"paired_px": px, "paired_feat": None if fa is None else float((fa - fb).square().mean(1).mean())}


def final_evaluation(out, student, kind, student_ks, teacher, teacher_ks, num_samples, error_fn,
                     shift_samples, w=0.0, w_student=None, ref_samples=0, extra=None, **protocol):
    """The evaluation that ends every method script, one protocol: the student at each K in
    student_ks (sampled at w_student: its w input, or 0 for a student that distilled guidance w
    into itself), the teacher's DDIM at teacher_ks with guidance w, both at balanced labels.

    Every row has FD / KID ... against the real data; with ref_samples > 0 also fd_teacher /
    kid_teacher against the teacher's own samples at max(teacher_ks) steps (teacher_reference,
    with its noise floor in result["teacher_ref"]); rows whose sampler is a deterministic function
    of its noise (DDIM, or one step) have paired_px / paired_feat, the distance to the teacher's
    max(teacher_ks)-step sample from the same noise and label. Then the covariate shift of the
    student at its last K (error_fn(x_t, t, y) -> per-sample imitation error); samples.png and
    metrics.json in `out`, a table on stdout. Returns the metrics (rank 0; others: the rows)."""
    w_student = w if w_student is None else w_student
    students, teachers = {}, {}
    for k in student_ks:
        students[str(k)] = evaluate_net(student, kind, k, num_samples, w=w_student, **protocol)
    for k in teacher_ks:
        teachers[str(k)] = evaluate_net(teacher, "ddim", k, num_samples, w=w, cached=True, **protocol)
    ref_steps = str(max(teacher_ks))
    # one reference set per teacher and protocol, whatever the run's seed: runs of every seed are
    # measured against the same set (and it is sampled once)
    ref = (teacher_reference(teacher, ref_samples, max(teacher_ks), w, **{**protocol, "seed": 0})
           if ref_samples else None)
    result = {"student": {k: m for k, (m, _) in students.items()},
              "teacher": {k: m for k, (m, _) in teachers.items()},
              "w": w if teacher.num_classes else None, "sample_bound": protocol.get("bound", "clip")}
    if not H.is_main():
        return result
    dataset = protocol.get("dataset", "digits")  # paired feature distances: digits, or with a reference
    extract = (feature_extractor(dataset, protocol.get("device", "cpu"),
                                 data_dir=protocol.get("data_dir", "data"),
                                 inception_weights=protocol.get("inception_weights", ""))
               if ref is not None or dataset == "digits" else None)
    x_ref = teachers[ref_steps][1]
    features = (lambda x: extract(to_uint8(x))[0]) if extract else (lambda x: None)
    f_ref = features(x_ref)
    for rows, kinds in ((students, kind), (teachers, "ddim")):
        for k, (m, x) in rows.items():
            fx = features(x)  # once per row: FD against the reference and the paired distance
            if ref is not None:
                m["fd_teacher"] = frechet_distance(ref["features"], fx)
                m["kid_teacher"] = kid(ref["features"], fx)
            deterministic = kinds == "ddim" or k == "1"
            m.update(paired_distance(x, x_ref, fx, f_ref) if deterministic else
                     {"paired_px": None, "paired_feat": None})
    if ref is not None:
        result["teacher_ref"] = {k: ref[k] for k in ("n", "steps", "floor_fd", "floor_kid")}
    result["covariate_shift"] = covariate_shift(
        error_fn, *grid_states(student, kind, student_ks[-1], shift_samples, w=w_student, **protocol))
    result.update(extra or {})
    H.save_grid(students[str(student_ks[-1])][1][:64], os.path.join(out, "samples.png"), nrow=8)
    H.write_json(result, os.path.join(out, "metrics.json"))
    print(HEADER)
    for k, m in result["student"].items():
        print(fmt_row(f"student K={k}", m))
    for k, m in result["teacher"].items():
        print(fmt_row(f"teacher K={k}", m))
    if ref is not None:
        print(f"FD against {ref['n']} teacher samples at {ref['steps']} steps; its floor (two such "
              f"sets): {ref['floor_fd']:.4f}", flush=True)
    cs = result["covariate_shift"]
    print("covariate shift (t: err_own / err_data): " +
          ", ".join(f"{t:.2f}: {r:.2f}" for t, r in zip(cs["t"], cs["ratio"])), flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# covariate shift: imitation error on forward-diffused data states vs on the student's own states
# ----------------------------------------------------------------------------------------------

STATE_FD_DIMS = 256  # covariate_shift's state FD: pixels beyond this are randomly projected


@torch.no_grad()
def covariate_shift(error_fn, data_states, own_states):
    """At each student grid time t: mean imitation error on data states and on own-rollout states,
    their ratio (DAgger predicts > 1 for the baseline, ~1 with DDIL), and the FD between the two
    state sets in pixel space (one fixed random projection to STATE_FD_DIMS above that: CIFAR).
    States: {t: (x_t [n, C, H, W], y [n] or None)}; error_fn(x_t, t, y) -> errors [n]."""
    out = {"t": [], "err_data": [], "err_own": [], "ratio": [], "state_fd": []}
    dims, P = next(iter(data_states.values()))[0][0].numel(), None
    if dims > STATE_FD_DIMS:  # FD needs n >> dims; the projection keeps squared distances
        P = torch.randn(dims, STATE_FD_DIMS, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0)) / math.sqrt(STATE_FD_DIMS)
    for t in sorted(data_states, reverse=True):  # sampling order: t = 1 first
        e_data = float(error_fn(*data_states[t][:1], t, data_states[t][1]).double().mean())
        e_own = float(error_fn(*own_states[t][:1], t, own_states[t][1]).double().mean())
        out["t"].append(float(t))
        out["err_data"].append(e_data)
        out["err_own"].append(e_own)
        out["ratio"].append(e_own / e_data if e_data > 0 else float("inf"))
        a, b = data_states[t][0].flatten(1).double(), own_states[t][0].flatten(1).double()
        if P is not None:
            P = P.to(a.device)
            a, b = a @ P, b @ P
        out["state_fd"].append(frechet_distance(a, b))
    return out


@torch.no_grad()
def grid_states(net, kind, steps, n, dataset="digits", bound="clip", seed=0, device="cpu",
                data_dir="data", w=0.0, **_):
    """The two inputs of covariate_shift at the K sampling times tau_1..tau_K: forward-diffused
    real data (with its labels), and the states the network's own sampler visits (balanced labels,
    guidance w). Returns (data_states, own_states), each {t: (x_t, y or None)}."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        x, labels = H.load_dataset(dataset, data_dir)
        idx = torch.randint(0, len(x), (n,))
        x0 = H.to_float(x[idx]).to(device)
        nc = C.unwrap(net).num_classes
        y_data = labels[idx].to(device) if nc else None
        y_own = eval_labels(n, nc).to(device) if nc else None
        x1 = torch.randn_like(x0)
        ts = C.time_grid(steps)
        noises = [torch.randn_like(x0) for _ in range(steps)] if kind == "renoise" else None
        _, own = C.ddim_sample(C.guided(net, y_own, w), x1, ts, bound=bound, noises=noises,
                               return_states=True)
        data_states, own_states = {}, {}
        for t, xs in zip(ts[:-1].tolist(), own):
            data_states[t] = (C.diffuse(x0, torch.full((n,), t, device=x0.device)), y_data)
            own_states[t] = (xs, y_own)
    return data_states, own_states


# ----------------------------------------------------------------------------------------------
# noise floor and CLI
# ----------------------------------------------------------------------------------------------

def noise_floor(net, kind, steps, num_samples, dataset="digits", bound="clip", seed=0,
                device="cpu", data_dir="data", cache_dir=CACHE_DIR, w=0.0, inception_weights=""):
    """What difference is meaningful. real_halves: two random halves of the real data against each
    other; sample_sets: two independent sets of the sampler (seeds seed+1000, seed+1001) against
    each other; vs_real: each of those two sets against the real data, as a table row is (their
    difference is the seed-to-seed spread of a row)."""
    res = [None]
    xa = sample(net, kind, steps, num_samples, bound, seed + 1000, device, w)
    xb = sample(net, kind, steps, num_samples, bound, seed + 1001, device, w)
    if H.is_main():
        if dataset == "digits":
            extractor, name = digits_extractor(cache_dir, data_dir), ""
        else:
            extractor, name = inception_extractor(device, inception_weights), "inception"
        real = real_features(dataset, data_dir, extractor, cache_dir, name)
        perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
        half = len(real) // 2
        fa, fb = extractor(to_uint8(xa))[0], extractor(to_uint8(xb))[0]
        res[0] = {"real_halves": {"n": half, **compare(real[perm[:half]], real[perm[half:]], device)},
                  "sample_sets": {"n": num_samples, "steps": steps, **compare(fa, fb, device)},
                  "vs_real": [{"n": num_samples, "steps": steps, "seed": seed + 1000 + i,
                               **compare(real, f, device)} for i, f in enumerate((fa, fb))]}
    if dist.is_initialized():
        dist.broadcast_object_list(res, src=0)
    return res[0]


def checkpoint_w(net, ck, w=None):
    """(the guidance weight a checkpoint's samples stand for, the w to sample it at), from --w.
    A teacher: classifier-free guidance at --w (default 0). A guidance-distilled LCM student
    (w_embed): its w input, by default the one it was evaluated at in training ("w"). A PD / DMD2
    student distilled at a fixed guidance weight ("w" in its checkpoint) is sampled without
    guidance (it has learnt it), so only that w stands; another --w is an error."""
    if "w" not in ck:  # a teacher checkpoint
        return (w or 0.0), (w or 0.0)
    if net.config.get("w_embed"):
        w = ck["w"] if w is None else w
        return w, w
    if w is not None and w != ck["w"]:
        H.fail(f"this student was distilled at guidance weight w = {ck['w']:g} and cannot be sampled "
               f"at --w {w:g}; drop --w")
    return ck["w"], 0.0


def fmt_row(label, m):
    def f(key, spec):
        return "-" if m.get(key) is None else format(m[key], spec)
    return (f"{label:>14} {m['fd']:>10.4f} {m['kid']:>10.5f} {m['precision']:>9.3f} "
            f"{m['recall']:>7.3f} {f('entropy', '.3f'):>8} {f('cond_acc', '.3f'):>8} "
            f"{f('fd_teacher', '.4f'):>10} {f('paired_px', '.4f'):>9}")


HEADER = (f"{'':>14} {'fd':>10} {'kid':>10} {'precision':>9} {'recall':>7} {'entropy':>8} "
          f"{'cond_acc':>8} {'fd_teacher':>10} {'paired_px':>9}")


@dataclasses.dataclass
class Config:
    ckpt: str = H.flag("", "A ckpt.pt written by teacher.py or a method script.", positional=True)
    steps: list = H.flag([1, 2, 4, 8], "The sampling steps K to evaluate, one row each.")
    num_samples: int = H.flag(2000, "Samples per K (at least 10).")
    bound: str = H.flag(None, "Bound on the x0 prediction when sampling; default None: the "
                        "checkpoint's --sample-bound (clip where it has none).", choices=C.BOUNDS)
    seed: int = H.flag(0, "Seeds the sampling noise (the --noise-floor sets use seed + 1000 and "
                       "seed + 1001).")
    out: str = H.flag("", "Where eval-metrics.json and eval-K*.png go; default the checkpoint's "
                      "folder.")
    device: str = H.flag("", "The device: cpu, cuda or cuda:N; default cuda (each torchrun rank "
                         "its own GPU) where available, else cpu.")
    data_dir: str = H.flag("data", "Where the data set's files are (the real side of every "
                           "metric).")
    cache_dir: str = H.flag(CACHE_DIR, "Where the feature network and the real features are "
                            "cached.")
    inception_weights: str = H.flag("", "A local TF-Inception FID weights file; default "
                                    "torch-fidelity's own (downloaded).")
    noise_floor: bool = H.flag(False, "Also measure real-vs-real halves and two independent "
                               "sample sets: the differences that are chance.")
    floor_steps: int = H.flag(64, "The sampling steps K of the --noise-floor sample sets.")
    w: float = H.flag(None, "Guidance weight; default None: a class-conditional teacher's CFG "
                      "weight 0, an LCM student's w input the w it was evaluated at; a PD / DMD2 "
                      "student is sampled at the w it distilled.")


def main(argv=None):
    args = H.parse_config(Config, argv)
    if min(args.steps) <= 0 or args.num_samples < 10 or args.floor_steps <= 0:
        H.fail("--steps and --floor-steps must be positive and --num-samples at least 10")
    _, _, device = H.init_dist(args.device)
    net, kind, ck = load_net(args.ckpt, device)
    cfg = ck.get("config", {})
    dataset = cfg.get("dataset", "digits")
    bound = args.bound or cfg.get("sample_bound", "clip")
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    if dataset != "digits" and H.is_main():
        inception_extractor(device, args.inception_weights)  # fail now, before any sampling
    w, w_sample = checkpoint_w(net, ck, args.w)
    t0, rows = time.time(), {}
    if H.is_main():
        print(f"{args.ckpt}: {dataset}, sampler {kind}, bound {bound}, {args.num_samples} samples, "
              f"seed {args.seed}" + (f", w {w:g}" if net.num_classes else ""), flush=True)
    for K in args.steps:
        m, x = evaluate_net(net, kind, K, args.num_samples, dataset, bound, args.seed, device,
                            args.data_dir, w=w_sample, cache_dir=args.cache_dir,
                            inception_weights=args.inception_weights)
        rows[str(K)] = m
        H.save_grid(x[:64], os.path.join(out, f"eval-K{K}.png"), nrow=8)
    result = {"checkpoint": args.ckpt, "dataset": dataset, "sampler": kind, "bound": bound,
              "num_samples": args.num_samples, "seed": args.seed, "w": w if net.num_classes else None,
              "rows": rows}
    if dataset == "digits":
        result["feature_net_heldout_acc"] = digits_features_net(args.cache_dir, args.data_dir)[1] \
            if H.is_main() else None
    if args.noise_floor:
        result["noise_floor"] = noise_floor(net, kind, args.floor_steps, args.num_samples, dataset,
                                            bound, args.seed, device, args.data_dir, args.cache_dir,
                                            w_sample, args.inception_weights)
    result["time_s"] = round(time.time() - t0, 2)
    if H.is_main():
        print(HEADER)
        for K, m in rows.items():
            print(fmt_row(K, m))
        if args.noise_floor:
            nf = result["noise_floor"]
            print("noise floor:")
            print(fmt_row("real/2 x2", nf["real_halves"]))
            print(fmt_row(f"K{args.floor_steps} x2", nf["sample_sets"]))
            for m in nf["vs_real"]:
                print(fmt_row(f"K{args.floor_steps} s{m['seed']}", m))
        if dataset == "digits":
            print(f"feature classifier held-out accuracy {result['feature_net_heldout_acc']:.4f}; "
                  f"entropy of a uniform class histogram {math.log(10):.3f}")
        os.makedirs(out, exist_ok=True)
        H.write_json(result, os.path.join(out, "eval-metrics.json"))
        print(f"wrote {os.path.join(out, 'eval-metrics.json')} and eval-K*.png ({result['time_s']} s)")
    H.barrier()
    return result


if __name__ == "__main__":
    main()
