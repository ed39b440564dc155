"""FD, KID, IS and PRDC against closed forms, brute force and the reference implementations
(pytorch-fid, torchmetrics, torch-fidelity, prdc)."""

import math
import warnings

import numpy as np
import pytest
import torch

from genkit.errors import GenkitError
from genkit.eval import metrics
from genkit.eval.frechet import GaussianStats, frechet_distance, frechet_distance_from_stats
from genkit.eval.metrics import inception_score, kid, kid_subset_size, prdc


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_spd(d: int, g: np.random.Generator) -> np.ndarray:
    a = g.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def random_orthogonal(d: int, g: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(g.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def feature_pair(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets with different means and non-commuting covariances."""
    g = rng(seed)
    a = g.standard_normal((n, d))
    mix = np.eye(d) + 0.3 * g.standard_normal((d, d)) / math.sqrt(d)
    return a, g.standard_normal((n, d)) @ mix + 0.2


def stats_of(x: np.ndarray, batch: int | None = None) -> GaussianStats:
    stats = GaussianStats(x.shape[1])
    t = torch.from_numpy(x)
    for start in range(0, len(t), batch or len(t)):
        stats.update(t[start:start + (batch or len(t))])
    return stats


# --- Fréchet distance: closed forms ---------------------------------------------------------

def test_fd_equal_covariances_is_squared_mean_distance():
    g = rng(1)
    sigma, mu1, mu2 = random_spd(16, g), g.standard_normal(16), g.standard_normal(16)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)


@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "commuting"])
def test_fd_commuting_covariances_closed_form(rotate):
    """Sigma_i = Q diag(a_i) Q^T: FD = ||dmu||^2 + sum (sqrt a - sqrt b)^2."""
    g = rng(2)
    d = 24
    a, b = g.uniform(0.1, 3.0, d), g.uniform(0.1, 3.0, d)
    q = random_orthogonal(d, g) if rotate else np.eye(d)
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_fd_identical_stats_is_zero():
    x, _ = feature_pair(500, 64)
    mu, sigma = stats_of(x).mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fd_accepts_torch_and_numpy_alike():
    x, y = feature_pair(200, 8)
    (mu1, s1), (mu2, s2) = stats_of(x).mean_cov(), stats_of(y).mean_cov()
    as_torch = [torch.from_numpy(v).float() for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*as_torch) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_fd_rejects_bad_shapes():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(GenkitError, match="d=4.*d=3"):
        frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(GenkitError, match="sigma2"):
        frechet_distance(mu, sigma, mu, np.eye(5))
    with pytest.raises(GenkitError, match="NaN"):
        frechet_distance(mu, sigma, mu * np.nan, sigma)


# --- Fréchet distance: parity with pytorch-fid and torchmetrics -----------------------------

@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
@pytest.mark.parametrize("d", [64, 512, pytest.param(2048, marks=pytest.mark.slow)])
def test_fd_matches_pytorch_fid(d):
    """pytorch-fid goes through scipy.linalg.sqrtm; d=2048 is slow only because of sqrtm (~10 s)."""
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    x, y = feature_pair(3000, d)
    (mu1, s1), (mu2, s2) = stats_of(x).mean_cov(), stats_of(y).mean_cov()
    expected = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_gaussian_stats_match_numpy():
    x, _ = feature_pair(1000, 32)
    x = x * 3 + 5  # an offset mean exercises the gram - n mu mu^T cancellation
    mu, sigma = stats_of(x.astype(np.float32), batch=100).mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=0, atol=1e-10)
    assert mu.dtype == sigma.dtype == np.float64


class RandomProjection(torch.nn.Module):
    """A fixed extractor: uint8 images (B, 3, H, W) -> float64 features (B, d)."""

    def __init__(self, in_features: int, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        weight = torch.randn(in_features, num_features, generator=torch.Generator().manual_seed(0))
        self.register_buffer("weight", weight.double() / math.sqrt(in_features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1).double() / 255) @ self.weight


def test_fd_matches_torchmetrics_fid_with_custom_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = RandomProjection(3 * 8 * 8, 32)
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    fake = torch.randint(40, 220, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    ours = {True: GaussianStats(32), False: GaussianStats(32)}
    for images, is_real in ((real[:128], True), (fake[:50], False), (real[128:], True), (fake[50:], False)):
        fid.update(images, real=is_real)
        ours[is_real].update(extractor(images))
    expected = float(fid.compute())
    assert frechet_distance_from_stats(ours[True], ours[False]) == pytest.approx(expected, rel=1e-6)


# --- accumulation: batch size and process count ---------------------------------------------

def simulated_all_reduce(partials: list[GaussianStats]):
    """reduce_fn of len(partials) simulated processes: sums the partials' n (0-d), sum (1-d) or gram (2-d)."""
    fields = [(p.n.clone(), p.sum.clone(), p.gram.clone()) for p in partials]
    return lambda t: torch.stack([f[t.dim()] for f in fields]).sum(dim=0)


def test_fd_invariant_to_batches_and_processes():
    x, y = feature_pair(301, 16, seed=3)
    reference = stats_of(y)
    baseline = frechet_distance_from_stats(stats_of(x), reference)
    splits = {2: [0, 150, 301], 3: [0, 50, 200, 301]}
    candidates = [stats_of(x, batch) for batch in (1, 7)]
    for bounds in splits.values():
        parts = [stats_of(x[lo:hi], batch=13) for lo, hi in zip(bounds, bounds[1:])]
        reduce_fn = simulated_all_reduce(parts)
        candidates += [p.all_reduce(reduce_fn) for p in parts]
    for stats in candidates:
        assert stats.count == 301
        assert frechet_distance_from_stats(stats, reference) == pytest.approx(baseline, rel=1e-9)


def test_gaussian_stats_errors():
    x, _ = feature_pair(50, 4)
    stats = stats_of(x)
    with pytest.raises(GenkitError, match="at least 2"):
        stats_of(x[:1]).mean_cov()
    with pytest.raises(GenkitError, match=r"\(B, 4\)"):
        stats.update(torch.zeros(3, 5))


def test_fd_refuses_malformed_statistics_naming_the_argument():
    mu, sigma = np.zeros(3), np.eye(3)
    for args, msg in (((np.zeros((2, 3)), sigma, mu, sigma), r"^mu1 must be a vector \(d,\), got shape \(2, 3\)$"),
                      ((mu, sigma, [0.0, 0.0, 0.0], sigma), "^mu2 must be a numpy array or torch tensor, got list$"),
                      ((mu, sigma, mu, np.full((3, 3), np.nan)), "^sigma2 holds NaN or inf$"),
                      ((mu, sigma, mu, np.eye(2)), r"^sigma2 must be \(3, 3\) to match mu2, got \(2, 2\)$"),
                      ((mu, sigma, np.zeros(2), np.eye(2)), "^FD dimension mismatch: set 1 has d=3, set 2 has d=2$")):
        with pytest.raises(GenkitError, match=msg):
            frechet_distance(*args)


def test_fd_warns_when_the_covariance_is_singular():
    """Sigma of N samples has rank <= N - 1: singular for N <= d (N = d included), not for N = d + 1."""
    for n in (10, 16):
        x, _ = feature_pair(n, 16)
        assert np.linalg.matrix_rank(np.cov(x, rowvar=False)) < 16
        with pytest.warns(UserWarning, match=f"^FD with N={n} samples, not above the feature dimension d=16: the "
                                             "covariance is singular and FD biased$"):
            stats_of(x).mean_cov()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats_of(feature_pair(17, 16)[0]).mean_cov()


# --- KID ---------------------------------------------------------------------------------------

def mmd2_by_loops(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0,
                  gamma: float | None = None) -> float:
    """Unbiased MMD^2 of Binkowski et al. written out: i != j within sets, all pairs across."""
    m, gamma = len(x), 1.0 / x.shape[1] if gamma is None else gamma
    k = lambda a, b: (gamma * float(a @ b) + coef) ** degree  # noqa: E731
    within = sum(k(s[i], s[j]) for s in (x, y) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * across / m**2


def test_kid_whole_set_matches_loops():
    x, y = feature_pair(40, 5, seed=4)
    mean, std = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=40)
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_matches_torch_fidelity_on_the_same_subsets():
    """genkit draws its subsets as torch-fidelity does: the same seed, the same subsets, the same values."""
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    x, y = (torch.from_numpy(v) for v in feature_pair(120, 8, seed=5))
    mean, std = kid(x, y, subsets=7, subset_size=50, seed=3)
    want = metric_kid.kid_features_to_metric(x, y, kid_subsets=7, kid_subset_size=50, rng_seed=3, verbose=False)
    assert mean == pytest.approx(want[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-10)
    assert std == pytest.approx(want[metric_kid.KEY_METRIC_KID_STD], rel=1e-8) and std > 0
    x, y = x[:90], y[:100]  # unequal sets: the draws alternate real, fake, each of its own size
    want = metric_kid.kid_features_to_metric(x, y, kid_subsets=5, kid_subset_size=40, rng_seed=0, verbose=False)
    assert kid(x, y, subsets=5, subset_size=40, seed=0)[0] == pytest.approx(want[metric_kid.KEY_METRIC_KID_MEAN],
                                                                            rel=1e-10)


@pytest.mark.parametrize("n_real,n_fake,expected", [(200, 300, 100), (1000, 5000, 500), (1001, 1001, 1000),
                                                    (5000, 50000, 1000), (4, 9, 2)])
def test_kid_default_subset_size(n_real, n_fake, expected):
    """torch-fidelity's 1000 where both sets are larger; else half the smaller set, so that subsets differ."""
    assert kid_subset_size(n_real, n_fake) == expected


def test_kid_subset_size_follows_torch_fidelitys_rule():
    """torch-fidelity refuses a subset size above either set's size and accepts one equal to it: so does genkit."""
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    x, y = (torch.from_numpy(v) for v in feature_pair(30, 4, seed=2))
    y = y[:25]
    with pytest.raises(ValueError, match="KID subset size 26"):
        metric_kid.kid_features_to_metric(x, y, kid_subsets=2, kid_subset_size=26, verbose=False)
    with pytest.raises(GenkitError, match=r"^--kid-subset-size 26 is larger than the sets \(n_real=30, n_fake=25\)"):
        kid(x, y, subsets=2, subset_size=26)
    want = metric_kid.kid_features_to_metric(x, y, kid_subsets=2, kid_subset_size=25, rng_seed=1, verbose=False)
    assert kid(x, y, subsets=2, subset_size=25, seed=1)[0] == pytest.approx(want[metric_kid.KEY_METRIC_KID_MEAN],
                                                                            rel=1e-10)
    with pytest.raises(GenkitError, match="--kid-subset-size must be >= 2"):
        kid(x, y, subset_size=1)
    with pytest.raises(GenkitError, match="at least 4 images"):
        kid(x[:3], y)


def test_kid_separates_distributions():
    x, y = (torch.from_numpy(v) for v in feature_pair(400, 8, seed=6))
    same = kid(x[:200], x[200:], subsets=10, subset_size=100, seed=0)
    shifted = kid(x, y + 1, subsets=10, subset_size=100, seed=0)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 10 * abs(same[0])


def test_kid_edges_defaults_and_errors():
    """The boundaries of KID's arguments, its documented defaults, and errors that name the metric."""
    x, y = (torch.from_numpy(v) for v in feature_pair(60, 4, seed=8))
    assert kid(x, y, subsets=1, subset_size=20)[1] == 0.0                   # one subset: no spread
    assert kid(x, y, subsets=2, subset_size=20)[1] > 0                      # two differ
    assert kid(x, y, subset_size=2, subsets=3)[0] == kid(x, y, subset_size=2, subsets=3, seed=0)[0]  # 2 allowed
    assert kid(x, y) == kid(x, y, subsets=100, subset_size=30, seed=0)       # defaults: 100 subsets, seed 0
    assert kid(x, y, seed=1) != kid(x, y, seed=0)
    assert kid(x, y, degree=1, subsets=2)[0] != kid(x, y, subsets=2)[0]      # degree 1 is allowed and used
    assert kid(x, y, gamma=0.5, subsets=2)[0] != kid(x, y, subsets=2)[0]     # a given gamma is used
    want = mmd2_by_loops(x.numpy()[:20], y.numpy()[:20], gamma=0.5)
    assert kid(x[:20], y[:20], subsets=1, subset_size=20, gamma=0.5)[0] == pytest.approx(want, rel=1e-10)
    for bad in ({"subsets": 0}, {"degree": 0}):
        with pytest.raises(GenkitError, match=r"^KID needs subsets >= 1 and degree >= 1, got"):
            kid(x, y, **bad)
    with pytest.raises(GenkitError, match="KID"):
        kid(x, y[:, :3])
    assert isinstance(kid_subset_size(7, 9), int) and kid_subset_size(7, 9) == 3
    assert kid_subset_size(30, 30, 2) == 2


# --- Inception Score ---------------------------------------------------------------------------

def test_is_uniform_predictions_give_one():
    assert inception_score(torch.zeros(100, 10), splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_is_confident_balanced_predictions_give_class_count():
    labels = torch.arange(200) % 10
    logits = torch.nn.functional.one_hot(labels, 10).double() * 60  # p(y|x) one-hot up to 1e-26
    mean, std = inception_score(logits, splits=20, shuffle_seed=None)  # in order: 2 of each class per split
    assert mean == pytest.approx(10.0, rel=1e-12) and std < 1e-10


@pytest.mark.parametrize("shuffle_seed", [None, 0, 2020])
def test_is_matches_torch_fidelity(shuffle_seed):
    """In order (torch-fidelity's shuffle=False) and shuffled (its default, the same permutation for one seed)."""
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = torch.randn(1003, 12, generator=torch.Generator().manual_seed(0)) * 3
    logits[:500] += 4 * torch.eye(12)[0]  # a sorted set: the first half leans to class 0, so order matters
    shuffled = {"shuffle": False} if shuffle_seed is None else {"shuffle": True, "rng_seed": shuffle_seed}
    expected = metric_isc.isc_features_to_metric(logits, splits=7, **shuffled)
    mean, std = inception_score(logits, splits=7, shuffle_seed=shuffle_seed)
    assert mean == pytest.approx(expected[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-12)
    assert std == pytest.approx(expected[metric_isc.KEY_METRIC_ISC_STD], rel=1e-9)


def test_is_of_class_sorted_logits_shuffles_its_splits():
    """10 confident classes sorted by class, 10 splits: in order each split holds one class (IS 1), shuffled each
    holds a mix (torch-fidelity's default: 7.4 on a real class-sorted folder where genkit gave 1.05)."""
    logits = torch.nn.functional.one_hot(torch.arange(1000) // 100, 10).double() * 60
    assert inception_score(logits, splits=10, shuffle_seed=None)[0] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(logits, splits=10)[0] > 9.0


def test_is_edges_defaults_and_errors():
    logits = torch.randn(30, 5, generator=torch.Generator().manual_seed(1)) * 3
    assert inception_score(logits) == inception_score(logits, splits=10, shuffle_seed=0)  # the defaults
    assert inception_score(logits, shuffle_seed=1) != inception_score(logits)
    assert inception_score(logits, splits=1)[1] == 0.0 and inception_score(logits, splits=30)[1] > 0  # both ends
    for splits in (0, 31):
        with pytest.raises(GenkitError, match=r"^inception_score splits must be in \[1, N=30\], got"):
            inception_score(logits, splits=splits)
    with pytest.raises(GenkitError, match=r"^inception_score needs logits \(N, C\), got \(30,\)"):
        inception_score(logits[:, 0])


# --- PRDC --------------------------------------------------------------------------------------

def prdc_by_loops(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020 written out with explicit loops over sample pairs."""
    dist = lambda a, b: math.sqrt(sum((ai - bi) ** 2 for ai, bi in zip(a, b)))  # noqa: E731
    radius = lambda s, i: sorted(dist(s[i], s[j]) for j in range(len(s)) if j != i)[k - 1]  # noqa: E731
    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    inside = [[dist(real[i], fake[j]) < r_real[i] for i in range(len(real))] for j in range(len(fake))]
    recalled = [any(dist(real[i], fake[j]) < r_fake[j] for j in range(len(fake))) for i in range(len(real))]
    covered = [min(dist(real[i], f) for f in fake) < r_real[i] for i in range(len(real))]
    return {
        "precision": sum(any(row) for row in inside) / len(fake),
        "recall": sum(recalled) / len(real),
        "density": sum(sum(row) for row in inside) / (k * len(fake)),
        "coverage": sum(covered) / len(real),
    }


def gaussian_sets(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    g = rng(seed)
    return g.standard_normal((60, 3)), g.standard_normal((50, 3)) * 1.3 + 0.5


@pytest.mark.parametrize("chunk_elements", [2**24, 64], ids=["one-chunk", "many-chunks"])
def test_prdc_matches_loops(monkeypatch, chunk_elements):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_elements)
    real, fake = gaussian_sets()
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), k=5)
    expected = prdc_by_loops(real, fake, k=5)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1


def test_prdc_identical_and_disjoint_sets():
    real, _ = gaussian_sets()
    same = prdc(torch.from_numpy(real), torch.from_numpy(real), k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(torch.from_numpy(real), torch.from_numpy(real + 100), k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(GenkitError, match="k=60"):
        prdc(torch.from_numpy(real), torch.from_numpy(real), k=60)


def test_prdc_matches_prdc_package():
    package = pytest.importorskip("prdc")
    real, fake = gaussian_sets(seed=8)
    expected = package.compute_prdc(real_features=real, fake_features=fake, nearest_k=4)
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), k=4)
    assert ours == pytest.approx({key: float(v) for key, v in expected.items()}, abs=1e-12)


def test_prdc_balls_are_open_as_naeem_et_al_define_them():
    """A point exactly on a k-NN ball's surface is outside it (strict <, as the prdc package): on integer points
    with ties every one of the four values differs from the closed-ball version (0.6, 1.0, 1.0, 0.8)."""
    real = torch.tensor([[0.0], [2.0], [4.0], [6.0], [8.0]], dtype=torch.float64)
    fake = torch.tensor([[-2.0], [-1.0], [6.0], [11.0], [15.0]], dtype=torch.float64)
    assert prdc(real, fake, k=1) == {"precision": 0.4, "recall": 0.8, "density": 0.4, "coverage": 0.4}
    assert prdc(real, fake, k=1) == prdc_by_loops(real.numpy(), fake.numpy(), k=1)


def test_prdc_k_bounds_and_errors_name_the_metric():
    real, fake = (torch.from_numpy(v) for v in gaussian_sets())
    assert prdc(real, fake) == prdc(real, fake, k=5)                    # the default k
    assert prdc(real, fake, k=1) != prdc(real, fake, k=2)               # k = 1 is allowed
    with pytest.raises(GenkitError, match=r"^PRDC needs 1 <= k < min\(n_real, n_fake\) = 50, got k=0"):
        prdc(real, fake, k=0)
    with pytest.raises(GenkitError, match=r"^PRDC dimension mismatch: real has d=3, fake has d=2$"):
        prdc(real, fake[:, :2])
    for a, b in ((real[:, 0], fake), (real, fake[:, 0])):
        with pytest.raises(GenkitError, match=r"^PRDC needs features \(N, d\), got real \(\d+(, 3)?,?\), fake"):
            prdc(a, b)
    with pytest.raises(GenkitError, match=r"real \(60,\), fake \(50, 3\)"):
        prdc(real[:, 0], fake)

