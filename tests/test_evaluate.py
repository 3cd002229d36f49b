"""evaluate.py: the metrics against closed forms and constructed answers, the feature network's
determinism, the covariate-shift diagnostic, the Inception plumbing and the CLI."""
import json
import math
import os

import pytest
import torch

import common as C
import harness as H
from teacher import load_net
import evaluate as E


def exact_gaussian(n, mu, S, seed):
    """n points whose sample mean is exactly mu and sample covariance exactly S (whitened noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mu), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return mu + z @ torch.linalg.cholesky(S).T


def test_fd_closed_form_diagonal():
    # N(mu1, diag(s1^2)) vs N(mu2, diag(s2^2)): FD = |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0, -2, 0], dtype=torch.float64)
    s1, s2 = torch.tensor([1.0, 2, 0.5, 1], dtype=torch.float64), torch.tensor([2.0, 1, 0.5, 3], dtype=torch.float64)
    a, b = exact_gaussian(50, mu1, torch.diag(s1 ** 2), 0), exact_gaussian(70, mu2, torch.diag(s2 ** 2), 1)
    assert E.frechet_distance(a, b) == pytest.approx(5.0 + 6.0, abs=1e-9)


def test_fd_full_covariance_matches_scipy_sqrtm():
    import scipy.linalg  # an independent matrix square root (Schur), installed with scikit-learn
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    S1, S2 = A @ A.T + 0.1 * torch.eye(6, dtype=torch.float64), B @ B.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    tr_sqrt = scipy.linalg.sqrtm((S1 @ S2).numpy()).real.trace()
    exact = float((mu1 - mu2).square().sum() + S1.trace() + S2.trace()) - 2 * tr_sqrt
    a, b = exact_gaussian(40, mu1, S1, 4), exact_gaussian(90, mu2, S2, 5)
    assert E.frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)
    # the covariances do not commute: a diagonal shortcut (pairing sorted eigenvalues) is wrong
    shortcut = float((mu1 - mu2).square().sum() + S1.trace() + S2.trace()
                     - 2 * (torch.linalg.eigvalsh(S1) * torch.linalg.eigvalsh(S2)).sqrt().sum())
    assert abs(shortcut - exact) > 0.01 * exact


def test_fd_self_zero_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(400, 16, generator=g) + 0.5
    assert E.frechet_distance(a, a) < 1e-8
    assert E.frechet_distance(a, b) == pytest.approx(E.frechet_distance(b, a), rel=1e-8)


def test_fd_near_singular_is_finite():
    g = torch.Generator().manual_seed(0)
    # rank-3 data in 32 dims (fewer samples than dims as well): singular covariances
    a = torch.randn(20, 3, generator=g) @ torch.randn(3, 32, generator=g)
    b = torch.randn(25, 3, generator=g) @ torch.randn(3, 32, generator=g) + 1e-7 * torch.randn(25, 32, generator=g)
    for x, y in ((a, b), (a, a), (b, a), (a, torch.zeros_like(a))):
        fd = E.frechet_distance(x, y)
        assert math.isfinite(fd) and fd >= 0
    assert E.frechet_distance(a, a) < 1e-6
    assert E.frechet_distance(a, torch.zeros_like(a)) == pytest.approx(
        float(a.double().mean(0).square().sum() + torch.cov(a.double().T).trace()), rel=1e-6)


def test_kid_zero_for_same_distribution_positive_for_shifted():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)) for _ in range(20)]
    same = torch.tensor([E.kid(a, b) for a, b in pairs])
    sem = (same.std() / len(same) ** 0.5).item()
    assert abs(same.mean().item()) < 3 * sem  # unbiased: 0 on average, within its standard error

    def biased(a, b):  # the V-statistic keeps k(x_i, x_i): positive on average for equal laws
        k = lambda x, y: (x.double() @ y.double().T / 8 + 1) ** 3
        return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    assert sum(biased(a, b) for a, b in pairs) / len(pairs) > 3 * sem  # the test can tell them apart
    shifted = E.kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5)
    assert shifted > 10 * same.std().item() and shifted > 0.01
    assert E.kid(torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g) * 2) > 0.05
    # random subsets (large sets) estimate the same quantity as all pairs
    a, b = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g) + 0.5
    sub = E.kid(a, b, num_subsets=20, subset_size=300, max_full=0)
    assert sub == pytest.approx(E.kid(a, b), rel=0.15)
    assert sub != E.kid(a, b, num_subsets=20, subset_size=300, max_full=0, seed=1)  # really subsets


@pytest.mark.parametrize("name,flag", [("pd_ddil", "--stage-eval-samples"), ("lcm_ddil", "--eval-samples"),
                                       ("dmd2_ddil", "--eval-every-samples"), ("lcm_ddil", "--ref-samples")])
def test_too_few_evaluation_samples_is_a_one_line_error(name, flag, tmp_path):
    """Precision / recall need each sample's PR_K-th neighbour: the smallest count every metric can
    use is MIN_SAMPLES, and a smaller one stops each script before any work (not at its end with
    kthvalue's error)."""
    import importlib
    a = torch.randn(E.MIN_SAMPLES, 5, generator=torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in E.compare(a, a + 0.5).values())
    with pytest.raises(RuntimeError, match="kthvalue"):
        E.compare(a[1:], a[1:] + 0.5)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main([flag, str(E.MIN_SAMPLES - 1), "--out", str(tmp_path / "run"),
                                            "--teacher", str(tmp_path / "none.pt")])  # past the check: fails fast
    msg = str(e.value)
    assert msg.startswith(f"error: {flag} must be at least {E.MIN_SAMPLES}") and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()


def test_precision_recall_constructed():
    # real: 100 points on a line, spacing 1 -> 3rd-NN radius 2 inside, 3 at the two ends
    real = torch.stack([torch.arange(100.0), torch.zeros(100)], 1)
    # fake: 50 points just beside the left half of the line (covered) and 50 far away (not)
    fake = torch.cat([torch.stack([torch.arange(50.0) + 0.1, torch.zeros(50)], 1),
                      torch.stack([torch.arange(50.0), torch.full((50,), 100.0)], 1)])
    p, r = E.precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5)
    # fake balls: radius 2 inside, 3 at the end point 49.1, so reals 0..52 are covered; the far
    # points' balls cover nothing on the line
    assert r == pytest.approx(53 / 100)
    assert E.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert E.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    # a larger k means larger balls: reals up to 49.1 + 5 are covered with k = 5 (ends: radius 5)
    assert E.precision_recall(real, fake, k=5)[1] == pytest.approx(55 / 100)


def test_entropy():
    assert E.entropy(torch.arange(1000) % 10, 10) == pytest.approx(math.log(10))
    assert E.entropy(torch.zeros(50, dtype=torch.long), 10) == 0.0
    assert E.entropy(torch.tensor([0, 1]), 10) == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One trained digits classifier for the tests of this file (~10 s)."""
    d = str(tmp_path_factory.mktemp("eval-cache"))
    E.digits_features_net(d)
    return d


def test_digits_classifier_deterministic_and_cached(cache, tmp_path, monkeypatch):
    net_a, acc_a = E.digits_features_net(cache)
    with torch.no_grad():  # a second, fresh run; method scripts may call it under no_grad
        net_b, acc_b = E.digits_features_net(str(tmp_path / "b"))
    sa, sb = net_a.state_dict(), net_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert acc_a == acc_b and acc_a > 0.95
    assert 0.1 < net_a.feat_scale < 100 and net_a.feat_scale != 1.0  # features normalised
    # the cache file is read back when the code version matches, retrained when it does not
    path = tmp_path / "b" / "digits-classifier.pt"
    E._MEMO.clear()
    assert all(torch.equal(E.digits_features_net(str(tmp_path / "b"))[0].state_dict()[k], sa[k]) for k in sa)
    ck = torch.load(path, weights_only=True)
    ck["version"] = "stale"
    torch.save(ck, path)
    retrained = []
    monkeypatch.setattr(E, "train_digits_classifier", lambda data_dir: retrained.append(1) or (E.digits_classifier(), 0.5))
    E._MEMO.clear()
    assert E.digits_features_net(str(tmp_path / "b"))[1] == 0.5 and retrained == [1]
    assert torch.load(path, weights_only=True)["version"] == E._code_version()
    E._MEMO.clear()


def test_sample_metrics_on_real_and_noise(cache):
    # real digits against real digits: FD ~0, precision/recall 1, entropy ~ln 10
    x, _ = H.load_dataset("digits")
    m = E.sample_metrics(H.to_float(x), "digits", cache_dir=cache)
    assert set(m) == {"fd", "kid", "precision", "recall", "entropy", "cond_acc"} and m["cond_acc"] is None
    assert m["fd"] < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["entropy"] == pytest.approx(math.log(10), abs=0.01)
    # uniform noise images are far from digits
    noise = E.sample_metrics(torch.rand(500, 1, 8, 8) * 2 - 1, "digits", cache_dir=cache)
    assert noise["fd"] > 1.0 and noise["kid"] > 0.01 and noise["precision"] < 0.2
    # half the real set: FD small but not 0 (finite-sample noise), far below the noise images
    half = E.sample_metrics(H.to_float(x[::2]), "digits", cache_dir=cache)
    assert 0 < half["fd"] < noise["fd"] / 10


def test_covariate_shift_constructed():
    g = torch.Generator().manual_seed(0)
    data = {1.0: (torch.randn(300, 1, 4, 4, generator=g), None),
            0.5: (torch.randn(300, 1, 4, 4, generator=g), None)}
    own = {1.0: (torch.randn(300, 1, 4, 4, generator=g), None),
           0.5: (torch.randn(300, 1, 4, 4, generator=g) + 1.0, torch.zeros(300).long())}
    seen = []

    def error_fn(x, t, y):  # error = squared mean pixel: grows with the shift of the states
        seen.append((t, y is None))
        return x.flatten(1).mean(1).square() + 1.0

    cs = E.covariate_shift(error_fn, data, own)
    assert cs["t"] == [1.0, 0.5] and seen == [(1.0, True), (1.0, True), (0.5, True), (0.5, False)]
    assert set(cs) == {"t", "err_data", "err_own", "ratio", "state_fd"}
    assert cs["ratio"][0] == pytest.approx(1.0, abs=0.1)  # same distribution at t = 1
    assert cs["err_own"][1] == pytest.approx(cs["err_data"][1] + 1.0, abs=0.15)  # +1 shift -> +1
    assert cs["ratio"][1] == pytest.approx(cs["err_own"][1] / cs["err_data"][1])
    assert cs["state_fd"][1] == pytest.approx(16.0, rel=0.15) and cs["state_fd"][0] < 2.0


def test_covariate_shift_projects_wide_states():
    # 3x16x16 = 768 dims > STATE_FD_DIMS: a fixed random projection keeps the squared mean shift
    # (768 for +1 per pixel) in expectation and leaves same-distribution sets far below it
    g = torch.Generator().manual_seed(0)
    data = {0.5: (torch.randn(1000, 3, 16, 16, generator=g), None)}
    shifted = {0.5: (torch.randn(1000, 3, 16, 16, generator=g) + 1.0, None)}
    same = {0.5: (torch.randn(1000, 3, 16, 16, generator=g), None)}
    err = lambda x, t, y: x.flatten(1).mean(1).abs()  # noqa: E731
    fd_shift = E.covariate_shift(err, data, shifted)["state_fd"][0]
    fd_same = E.covariate_shift(err, data, same)["state_fd"][0]
    assert 0.7 * 768 < fd_shift < 1.4 * 768 and fd_same < 0.15 * 768
    assert E.covariate_shift(err, data, shifted)["state_fd"][0] == fd_shift  # the projection is fixed


def test_cli_samples_a_guidance_distilled_student_at_its_w(cache, tmp_path):
    net = C.build_unet("digits", num_classes=10, w_embed=True)
    with torch.no_grad():  # (the w embedding and the output are zero-initialised: make w matter)
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    assert torch.equal(C.guided(net, y, 2.0)(x, t), net(x, t, y, torch.full((4,), 2.0)))  # w is an input
    assert not torch.allclose(net(x, t, y, torch.full((4,), 2.0)), net(x, t, y, torch.full((4,), 0.0)))
    ckpt = str(tmp_path / "ckpt.pt")
    H.save_checkpoint(ckpt, {"net": net.state_dict(), "model_config": net.config, "sampler": "renoise",
                             "steps": 2, "w": 2.0, "config": {"dataset": "digits", "bound": "none",
                                                             "w_min": 1.0, "w_max": 3.0}})
    args = [ckpt, "--steps", "2", "--num-samples", "20", "--cache-dir", cache, "--out", str(tmp_path)]
    res = E.main(args)
    assert res["w"] == 2.0 and math.isfinite(res["rows"]["2"]["fd"])  # the w it was evaluated at
    assert res["bound"] == "clip"  # the sampling bound, not the training --bound
    res_w0 = E.main(args + ["--w", "0"])
    assert res_w0["w"] == 0.0 and res_w0["rows"]["2"]["fd"] != res["rows"]["2"]["fd"]


def test_inception_plumbing_with_stand_in(tmp_path, monkeypatch):
    # fake cifar10 train split, a stand-in extractor (mean colour per channel): real features are
    # computed once, cached on disk by name, and compared with the samples' features
    imgs = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    calls = []
    monkeypatch.setattr(H, "load_dataset", lambda name, data_dir="data", train=True: (imgs, torch.zeros(300).long()))

    def stand_in(x_uint8):
        assert x_uint8.dtype == torch.uint8 and x_uint8.shape[1:] == (3, 32, 32)
        calls.append(len(x_uint8))
        return x_uint8.double().mean((2, 3)), None

    E._MEMO.clear()
    same = E.sample_metrics(H.to_float(imgs), "cifar10", cache_dir=str(tmp_path), extractor=stand_in, name="standin")
    assert same["fd"] < 1e-6 and same["entropy"] is None
    assert os.path.isfile(tmp_path / "cifar10-standin-train.pt")
    E._MEMO.clear()
    dark = E.sample_metrics(H.to_float(imgs) * 0.5 - 0.5, "cifar10", cache_dir=str(tmp_path), extractor=stand_in, name="standin")
    assert calls == [300, 300, 300]  # the second call read the real features from disk
    assert dark["fd"] > 100 and dark["precision"] == 0.0


def test_inception_missing_says_what_to_do(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_fidelity(name, *a, **k):
        if name.startswith("torch_fidelity"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    with pytest.raises(SystemExit, match="pip install torch-fidelity"):
        E.inception_extractor()


def test_cli_on_tiny_teacher(tiny_teacher, cache, tmp_path):
    out = tmp_path / "eval"
    res = E.main([tiny_teacher, "--steps", "1", "2", "--num-samples", "40", "--out", str(out),
                  "--cache-dir", cache, "--noise-floor", "--floor-steps", "2"])
    on_disk = json.loads((out / "eval-metrics.json").read_text())
    assert set(on_disk["rows"]) == {"1", "2"} and on_disk["sampler"] == "ddim"
    for m in on_disk["rows"].values():
        assert set(m) == {"fd", "kid", "precision", "recall", "entropy", "cond_acc"}
        assert m["cond_acc"] is None and all(math.isfinite(m[k]) for k in set(m) - {"cond_acc"})
    assert (out / "eval-K1.png").is_file() and (out / "eval-K2.png").is_file()
    assert on_disk["noise_floor"]["real_halves"]["fd"] < on_disk["rows"]["1"]["fd"]
    assert on_disk["feature_net_heldout_acc"] > 0.95
    assert res["rows"] == on_disk["rows"]
    assert len(on_disk["noise_floor"]["vs_real"]) == 2
    # the covariate-shift inputs from a real network: grid times, shapes, own state at t = 1 is noise
    net, kind, _ = load_net(tiny_teacher)
    data_s, own_s = E.grid_states(net, kind, 2, 16, seed=1)
    assert list(data_s) == list(own_s) == C.time_grid(2)[:-1].tolist()
    assert all(x.shape == (16, 1, 8, 8) and y is None for x, y in (*data_s.values(), *own_s.values()))
    assert not torch.equal(data_s[0.5][0], own_s[0.5][0])
    cs = E.covariate_shift(lambda x, t, y: (x - own_s[t][0]).flatten(1).square().mean(1), data_s, own_s)
    assert cs["t"] == [1.0, 0.5] and cs["err_own"] == [0.0, 0.0] and cs["err_data"][1] > 0
    # sampling is seeded: the same call gives the same numbers
    m1, x1 = E.evaluate_net(net, kind, 2, 40, cache_dir=cache, seed=3)
    m2, x2 = E.evaluate_net(net, kind, 2, 40, cache_dir=cache, seed=3)
    assert torch.equal(x1, x2) and m1 == m2 and x1.shape == (40, 1, 8, 8)


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        E.main([str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="positive"):
        E.main([str(tmp_path / "missing.pt"), "--steps", "0"])


# ---- the conditional protocol ------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A conditional v-denoiser that records the labels (and w inputs) of every call."""

    def __init__(self, num_classes=10, w_embed=False):
        super().__init__()
        self.num_classes, self.calls = num_classes, []
        self.config = dict(in_ch=1, resolution=8, num_classes=num_classes, w_embed=w_embed)

    def forward(self, x, t, y=None, w=None):
        self.calls.append((y.clone(), None if w is None else w.clone()))
        return 0.1 * x + (0.0 if y is None else y.float().view(-1, 1, 1, 1) / 10)


def test_evaluation_samples_balanced_labels_never_the_null_one_at_the_given_w():
    net = Recorder()
    E.sample(net, "ddim", 2, 25, w=0.0, batch=10)
    labels = torch.cat([y for y, _ in net.calls[::2]])  # first step of each batch
    assert torch.equal(labels, torch.arange(25) % 10)  # balanced, and no null label (10)
    net.calls.clear()
    E.sample(net, "ddim", 1, 8, w=2.0)  # a teacher at w: classifier-free guidance, two passes
    (y, _), = net.calls
    assert torch.equal(y, torch.cat([torch.arange(8), torch.full((8,), 10)]))
    student = Recorder(w_embed=True)  # a w-conditioned student: w is an input, one pass
    E.sample(student, "renoise", 1, 8, w=2.0)
    (y, w), = student.calls
    assert torch.equal(y, torch.arange(8)) and torch.equal(w, torch.full((8,), 2.0))


def test_conditional_accuracy_reads_the_intended_labels(cache):
    x, y = H.load_dataset("digits")
    order = torch.cat([torch.nonzero(y == c)[:10, 0] for c in range(10)])  # 10 of each digit
    real = H.to_float(x[order]).view(10, 10, 1, 8, 8).transpose(0, 1).reshape(100, 1, 8, 8)
    labels = E.eval_labels(100, 10)  # 0..9, 0..9, ...: the real digits in that order
    m = E.sample_metrics(real, cache_dir=cache, labels=labels)
    assert m["cond_acc"] > 0.95
    assert E.sample_metrics(real, cache_dir=cache, labels=(labels + 1) % 10)["cond_acc"] < 0.1


def test_checkpoint_w_protocol():
    teacher = C.build_unet("digits", num_classes=10)
    lcm = C.build_unet("digits", num_classes=10, w_embed=True)
    assert E.checkpoint_w(teacher, {}, None) == (0.0, 0.0) and E.checkpoint_w(teacher, {}, 3.0) == (3.0, 3.0)
    assert E.checkpoint_w(lcm, {"w": 2.0}, None) == (2.0, 2.0) and E.checkpoint_w(lcm, {"w": 2.0}, 1.0) == (1.0, 1.0)
    # a PD / DMD2 student that distilled guidance 2 stands for w = 2 and is sampled plainly
    assert E.checkpoint_w(teacher, {"w": 2.0}, None) == (2.0, 0.0)
    with pytest.raises(SystemExit, match="distilled at guidance weight w = 2"):
        E.checkpoint_w(teacher, {"w": 2.0}, 1.0)


def test_teacher_samples_are_cached_by_weights_and_protocol(tmp_path, monkeypatch):
    net, cache = C.build_unet("digits", num_classes=10), str(tmp_path)
    x = E.teacher_samples(net, 2, 12, w=1.0, seed=5, cache_dir=cache)
    assert torch.equal(x, E.sample(net, "ddim", 2, 12, seed=5, w=1.0))  # the same as sampling
    real_sample = E.sample

    def no_sampling(*a, **k):
        raise AssertionError("sampled although cached")
    monkeypatch.setattr(E, "sample", no_sampling)  # a second call reads the disk
    assert torch.equal(E.teacher_samples(net, 2, 12, w=1.0, seed=5, cache_dir=cache), x)
    monkeypatch.setattr(E, "sample", real_sample)
    with torch.no_grad():  # another w, count or weights: another entry
        E.teacher_samples(net, 2, 12, w=2.0, seed=5, cache_dir=cache)
        E.teacher_samples(net, 2, 13, w=1.0, seed=5, cache_dir=cache)
        list(net.parameters())[-1].add_(0.5)  # the output bias (the last layer starts at zero)
        other = E.teacher_samples(net, 2, 12, w=1.0, seed=5, cache_dir=cache)
    assert len(list(tmp_path.glob("teacher-samples-*.pt"))) == 4 and not torch.equal(other, x)


def test_paired_distance_known_cases():
    a = torch.zeros(4, 1, 8, 8)
    b = a.clone()
    b[0] += 0.2  # one sample of four off by 0.2 everywhere: mean squared difference 0.04 / 4
    fa, fb = torch.zeros(4, 3), torch.tensor([[1.0, 1.0, 1.0]] + [[0.0] * 3] * 3)
    d = E.paired_distance(a, b, fa, fb)
    assert d["paired_px"] == pytest.approx(0.01) and d["paired_feat"] == pytest.approx(0.25)
    assert E.paired_distance(a, a) == {"paired_px": 0.0, "paired_feat": None}


def test_teacher_reference_is_one_set_whatever_the_runs_seed(cache, tmp_path):
    net = C.build_unet("digits")
    torch.manual_seed(0)
    for p in net.parameters():  # not the zero output layer of a fresh network
        p.data.add_(0.05 * torch.randn_like(p))
    protocol = dict(dataset="digits", bound="clip", device="cpu", cache_dir=cache)
    refs = [E.final_evaluation(str(tmp_path / f"s{seed}"), net, "ddim", [1], net, [1, 2], 8,
                               lambda x, t, y: x.flatten(1).square().mean(1), 4, ref_samples=8,
                               seed=seed, **protocol)
            for seed in (1, 2)]
    assert refs[0]["teacher_ref"] == refs[1]["teacher_ref"]  # the same reference set
    assert refs[0]["student"]["1"]["fd"] != refs[1]["student"]["1"]["fd"]  # the runs' own noise
    assert refs[0]["student"]["1"]["fd_teacher"] != refs[1]["student"]["1"]["fd_teacher"]
