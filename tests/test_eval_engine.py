"""The evaluation engine: SPECs, statistics files with protocols, FD through every path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET
from PIL import Image
from torch import nn

import genkit
from genkit.errors import GenkitError
from genkit.eval import engine
from genkit.eval.features import FeatureExtractor
from genkit.eval.frechet import frechet_distance
from genkit.eval.specs import iter_images
from genkit.eval.stats import RefStats, load_stats, save_stats
from genkit.runs import load_recipe


class PixelProjection(FeatureExtractor):
    """A fixed random projection of resized pixels: a cheap, deterministic feature extractor."""

    name, protocol, resize, weights_sha256 = "pixels", "test", "bilinear 8x8", None

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(3 * 64, dim, generator=g, dtype=torch.float64), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        x = images.double().expand(-1, 3, -1, -1) / 255
        x = nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        return x.flatten(1) @ self.proj


@pytest.fixture
def pixels(monkeypatch):
    extractor = PixelProjection()
    monkeypatch.setattr(engine, "build_extractor", lambda s: extractor)
    return extractor


def random_images(n: int, seed: int, channels: int = 3, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_folder(root, images: np.ndarray) -> None:
    root.mkdir(parents=True)
    for i, im in enumerate(images):
        arr = im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)
        sub = root / f"sub{i % 2}"  # nested: folders are read recursively
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i:04d}.png")


def write_npz(path, images) -> str:
    np.savez(path, images=images)
    return str(path)


def test_folder_and_npz_of_the_same_images_have_zero_fd(tmp_path, pixels):
    images = random_images(50, 0)
    write_folder(tmp_path / "imgs", images)
    s = engine.EvalSettings(batch_size=7)
    out = engine.compute_fid(str(tmp_path / "imgs"), write_npz(tmp_path / "a.npz", images), s)
    assert abs(out["value"]) < 1e-9 and out["n_real"] == out["n_fake"] == 50
    other = engine.compute_fid(str(tmp_path / "imgs"), write_npz(tmp_path / "b.npz", random_images(50, 1)), s)
    assert other["value"] > 1e-3
    assert other["protocol"]["features"] == "pixels" and other["genkit_version"] == genkit.__version__


def test_float_npz_is_quantized_like_saved_pngs(tmp_path):
    images = random_images(4, 2)
    floats = images.astype(np.float32) / 127.5 - 1 + 0.001  # off-grid by less than half a level
    got = next(iter_images(write_npz(tmp_path / "f.npz", floats), None, 10))
    assert torch.equal(got, torch.from_numpy(images))


def test_bad_npz_inputs_are_one_line_errors(tmp_path):
    bad = np.full((2, 3, 4, 4), np.nan, np.float32)
    with pytest.raises(GenkitError, match="NaN or inf"):
        list(iter_images(write_npz(tmp_path / "nan.npz", bad), None, 10))
    np.savez(tmp_path / "x.npz", other=np.zeros(3))
    with pytest.raises(GenkitError, match="no array 'images'"):
        list(iter_images(str(tmp_path / "x.npz"), None, 10))
    with pytest.raises(GenkitError, match=r"\(N, C, H, W\)"):
        list(iter_images(write_npz(tmp_path / "s.npz", np.zeros((2, 4, 4), np.uint8)), None, 10))


def test_folder_errors_name_the_file(tmp_path):
    write_folder(tmp_path / "imgs", random_images(3, 0))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(GenkitError, match="broken.png"):
        list(iter_images(str(tmp_path / "imgs"), None, 10))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenkitError, match="no images under"):
        list(iter_images(str(tmp_path / "empty"), None, 10))


def test_saved_statistics_give_the_same_fd_as_images(tmp_path, pixels):
    real, fake = random_images(60, 3), random_images(40, 4)
    s = engine.EvalSettings(batch_size=16)
    direct = engine.compute_fid(write_npz(tmp_path / "r.npz", real), write_npz(tmp_path / "f.npz", fake), s)
    engine.write_stats(str(tmp_path / "r.npz"), tmp_path / "ref.npz", s)
    stats = load_stats(str(tmp_path / "ref.npz"))
    assert stats.n == 60 and stats.protocol["features"] == "pixels"
    via_stats = engine.compute_fid(str(tmp_path / "ref.npz"), str(tmp_path / "f.npz"), s)
    assert via_stats["value"] == pytest.approx(direct["value"], rel=1e-12)


def test_foreign_statistics_need_a_named_protocol_and_mismatches_are_refused(tmp_path, pixels):
    mu, sigma = np.zeros(16), np.eye(16)
    np.savez(tmp_path / "foreign.npz", mu=mu, sigma=sigma)
    with pytest.raises(GenkitError, match="carries no protocol.*pytorch-fid:"):
        load_stats(str(tmp_path / "foreign.npz"))
    foreign = load_stats(f"pytorch-fid:{tmp_path / 'foreign.npz'}")
    assert foreign.protocol["protocol"] == "pytorch-fid"
    s = engine.EvalSettings()
    write_npz(tmp_path / "f.npz", random_images(20, 5))
    with pytest.raises(GenkitError, match="different protocols"):
        engine.compute_fid(f"pytorch-fid:{tmp_path / 'foreign.npz'}", str(tmp_path / "f.npz"), s)


def test_statistics_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 5))
    stats = RefStats(a.mean(0), np.cov(a, rowvar=False), 30, {"features": "x", "dim": 5})
    back = load_stats(str(save_stats(tmp_path / "s.npz", stats)))
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert back.protocol == stats.protocol and back.n == 30
    assert frechet_distance(back.mu, back.sigma, stats.mu, stats.sigma) == pytest.approx(0, abs=1e-10)


def test_kid_and_prdc_need_images_not_statistics(tmp_path, pixels):
    engine.write_stats(write_npz(tmp_path / "r.npz", random_images(20, 0)), tmp_path / "ref.npz",
                       engine.EvalSettings())
    with pytest.raises(GenkitError, match="holds only statistics"):
        engine.compute_metric("kid", str(tmp_path / "ref.npz"), str(tmp_path / "r.npz"), engine.EvalSettings())


def test_kid_prdc_and_is_plumbing(tmp_path, pixels):
    from genkit.eval.metrics import kid

    real, fake = random_images(40, 0), random_images(30, 1)
    path, other = write_npz(tmp_path / "r.npz", real), write_npz(tmp_path / "f.npz", fake)
    s = engine.EvalSettings(seed=4, batch_size=9)
    want = kid(pixels(torch.from_numpy(real)), pixels(torch.from_numpy(fake)), seed=4)
    got = engine.compute_metric("kid", path, other, s)
    assert (got["kid"], got["kid_std"]) == pytest.approx(want, rel=1e-9)
    assert got["n_real"] == 40 and got["n_fake"] == 30
    assert got["kid_subset_size"] == 15 and got["kid_subsets"] == 100  # n // 2 of the smaller set
    out = engine.compute_metric("prdc", path, path, s)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    with pytest.raises(GenkitError, match="no classifier head"):
        engine.compute_is(path, s)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    overrides = [*TINY_UNET, "data.image_size=8", "data.batch_size=8", "train.steps=2", "sample.n=4",
                 "sample.steps=2", "model.timesteps=50"]
    return genkit.train(load_recipe("ddpm_digits", overrides), out=tmp_path_factory.mktemp("r") / "run")


def test_a_run_folder_is_sampled_with_the_given_sampler(tiny_run, tmp_path, pixels):
    s = engine.EvalSettings(n=12, batch_size=5)
    s.sample.sampler, s.sample.steps = "ddim", 3
    out = engine.compute_fid("recipe:ddpm_digits", str(tiny_run), s)
    assert out["n_fake"] == 12 and out["n_real"] == 12
    assert out["sampling"] == {"sampler": "ddim", "steps": 3}
    again = engine.compute_fid("recipe:ddpm_digits", str(tiny_run), s)
    assert again["value"] == out["value"]  # seeded generation
    with pytest.raises(GenkitError, match="--n"):
        engine.compute_fid("recipe:ddpm_digits", str(tiny_run), engine.EvalSettings())


def test_recipe_spec_reads_the_held_out_split(pixels):
    train = torch.cat(list(iter_images("recipe:ddpm_digits", None, 500)))
    test = torch.cat(list(iter_images("recipe:ddpm_digits:test", None, 500)))
    assert train.shape == (1500, 1, 16, 16) and test.shape == (297, 1, 16, 16)
    assert train.dtype == torch.uint8


def test_eval_result_json_is_complete(tmp_path, pixels):
    path = write_npz(tmp_path / "r.npz", random_images(20, 0))
    out = engine.compute_fid(path, path, engine.EvalSettings(seed=3))
    json.dumps(out)
    assert {"metric", "value", "protocol", "n_real", "n_fake", "genkit_version", "seed", "real", "fake"} <= out.keys()
    assert {"features", "protocol", "weights_sha256", "resize", "dim"} <= out["protocol"].keys()


# --- subsets, IS splits and KID subsets: drawn at random, never in file order --------------------------------

class ClassOf(FeatureExtractor):
    """A perfect classifier of images filled with 20 k + 10 (class k of 10): one-hot features, confident logits."""

    name, protocol, resize, weights_sha256, dim, has_logits = "classes", "test", "none", None, 10, True

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # the engine reads the device off it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = (images.double().flatten(1).mean(1) / 20).floor().long()
        return nn.functional.one_hot(k, 10).double()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return 60 * self(images)


def class_sorted_folder(root, per_class: int = 10):
    """10 classes x per_class grey 4x4 PNGs, named so that sorted order is class order (0_00, 0_01, ... 9_09)."""
    root.mkdir()
    for k in range(10):
        for i in range(per_class):
            Image.fromarray(np.full((4, 4), 20 * k + 10, np.uint8)).save(root / f"{k}_{i:02d}.png")
    return str(root)


@pytest.fixture
def classes(monkeypatch):
    extractor = ClassOf()
    monkeypatch.setattr(engine, "build_extractor", lambda s: extractor)
    return extractor


def test_inception_score_of_a_class_sorted_folder_splits_shuffled_rows(tmp_path, classes):
    """In file order each of the 10 splits holds one class and scores 1; shuffled, as torch-fidelity does by
    default (same permutation for the same seed), the splits mix the classes."""
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    folder = class_sorted_folder(tmp_path / "sorted")
    out = engine.compute_is(folder, engine.EvalSettings(seed=3))
    assert out["inception_score"] > 5 and (out["splits"], out["shuffle_seed"]) == (10, 3), out
    logits = classes.logits(torch.cat(list(iter_images(folder, None, 100))))
    want = metric_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=3)
    assert out["inception_score"] == pytest.approx(want[metric_isc.KEY_METRIC_ISC_MEAN], rel=1e-12)
    assert out["inception_score_std"] == pytest.approx(want[metric_isc.KEY_METRIC_ISC_STD], rel=1e-9)


def test_n_below_the_folder_size_draws_a_seeded_subset_of_every_class(tmp_path, classes):
    folder = class_sorted_folder(tmp_path / "sorted")
    s = engine.EvalSettings(n=50, seed=0)
    labels = engine.all_features(folder, classes, s).argmax(1)
    assert len(labels) == 50 and set(labels.tolist()) == set(range(10))  # the first 50 files: classes 0-4
    assert torch.equal(labels, engine.all_features(folder, classes, s).argmax(1))  # seeded: the same subset
    other = engine.all_features(folder, classes, engine.EvalSettings(n=50, seed=1)).argmax(1)
    assert not torch.equal(labels, other)
    out = engine.compute_is(folder, s)
    assert out["subset"] == {"fake": {"n": 50, "of": 100, "seed": 0}} and out["n_fake"] == 50
    npz = write_npz(tmp_path / "sorted.npz", np.stack([np.full((1, 4, 4), 20 * (i // 10) + 10, np.uint8)
                                                       for i in range(100)]))
    fid = engine.compute_fid(folder, npz, s)  # the same seed draws the same indices from both
    assert abs(fid["value"]) < 1e-6 and fid["subset"]["real"] == fid["subset"]["fake"] == {"n": 50, "of": 100,
                                                                                            "seed": 0}
    assert engine.compute_fid(folder, npz, engine.EvalSettings())["subset"] == {}  # all images: no subset


def test_kid_of_200_images_has_a_spread_and_is_torch_fidelitys(tmp_path, pixels):
    """n = 200: the default subset size is n // 2 = 100, so subsets differ and the std is no longer 0; the
    subsets are drawn as torch-fidelity draws them, so its KID on the same features and seed agrees."""
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    real, fake = random_images(200, 0), random_images(200, 1)
    path, other = write_npz(tmp_path / "r.npz", real), write_npz(tmp_path / "f.npz", fake)
    out = engine.compute_metric("kid", path, other, engine.EvalSettings(seed=7, kid_subsets=30))
    assert out["kid_std"] > 0 and out["kid_subset_size"] == 100 and out["kid_subsets"] == 30, out
    fr, ff = pixels(torch.from_numpy(real)), pixels(torch.from_numpy(fake))
    want = metric_kid.kid_features_to_metric(fr, ff, kid_subsets=30, kid_subset_size=100, rng_seed=7, verbose=False)
    assert out["kid"] == pytest.approx(want[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-9)
    assert out["kid_std"] == pytest.approx(want[metric_kid.KEY_METRIC_KID_STD], rel=1e-9)
    with pytest.raises(GenkitError, match="--kid-subset-size 201 .*n_real=200, n_fake=200"):
        engine.compute_metric("kid", path, other, engine.EvalSettings(kid_subset_size=201))
