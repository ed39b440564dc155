"""Tests for genkit.data: digits, folders, torchvision sources (faked on disk), no RNG use."""

from __future__ import annotations

import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from genkit.config import DataConfig
from genkit.data import SOURCES, build_dataset, dataset_from_tensor
from genkit.errors import DataError
from genkit.io import from_uint8, to_uint8


def images_of(ds) -> torch.Tensor:
    """Stack every item's image: (N, C, H, W)."""
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


# --- digits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


def test_sources_registry():
    assert set(SOURCES) == {"digits", "folder", "cifar10", "mnist", "pairs", "photos"}


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_range_attributes(size):
    ds = build_dataset(DataConfig(image_size=size))
    item = ds[0]
    assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.int64
    x = images_of(ds)
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() == 1  # the full range is used
    assert (ds.channels, ds.image_size, ds.num_classes, ds.name) == (1, size, 10, "digits")


def test_digits_native_size_is_exact_and_splits_partition_sklearn(sk_digits):
    train = build_dataset(DataConfig(image_size=8), "train")
    test = build_dataset(DataConfig(image_size=8), "test")
    assert (len(train), len(test)) == (1500, 297)
    expected = torch.tensor(sk_digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16 * 2 - 1
    assert torch.equal(images_of(train), expected[:1500])
    assert torch.equal(images_of(test), expected[1500:])
    labels = torch.stack([train[i]["label"] for i in range(1500)] + [test[i]["label"] for i in range(297)])
    assert torch.equal(labels, torch.tensor(sk_digits.target, dtype=torch.int64))


def test_digits_resize_matches_interpolate(sk_digits):
    x = torch.tensor(sk_digits.data[:5], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    want = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
    want = want.clamp(0, 1) * 2 - 1
    ds = build_dataset(DataConfig(image_size=16))
    assert torch.allclose(images_of(ds)[:5], want, atol=1e-6)


def test_digits_dataloader_collates():
    loader = DataLoader(build_dataset(DataConfig(image_size=16)), batch_size=7)
    batch = next(iter(loader))
    assert batch["image"].shape == (7, 1, 16, 16) and batch["label"].shape == (7,)
    assert batch["label"].dtype == torch.int64


@pytest.mark.parametrize("channels", [3, 2])
def test_digits_refuses_channels_mismatch(channels):
    with pytest.raises(DataError, match="data.channels"):
        build_dataset(DataConfig(channels=channels))
    assert build_dataset(DataConfig(channels=1)).channels == 1


def test_unknown_source_suggests_closest():
    message = r"unknown source 'cifar' \(did you mean 'cifar10'\?\); known: digits"
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(source="cifar"))


@pytest.mark.parametrize("split, size", [("val", 16), ("train", 0), ("train", 2.5)])
def test_bad_split_or_image_size(split, size):
    with pytest.raises(DataError, match="split|data.image_size"):
        build_dataset(DataConfig(image_size=size), split)


# --- in-memory helpers --------------------------------------------------------------------


def test_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    f = from_uint8(x)
    assert f[0] == -1 and f[-1] == 1 and f.dtype == torch.float32
    assert torch.equal(to_uint8(f), x)
    assert torch.equal(to_uint8(torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])),
                       torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8))


def test_dataset_from_tensor():
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    ds = dataset_from_tensor(x, None, "noise")
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes, ds.name) == (5, 3, 4, 0, "noise")
    assert torch.equal(ds[2]["image"], x[2]) and ds[2]["label"] == -1
    labelled = dataset_from_tensor(x, torch.tensor([0, 3, 1, 1, 2]), "noise")
    assert labelled.num_classes == 4 and labelled[1]["label"] == 3
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        dataset_from_tensor(x * 3, None, "loud")
    with pytest.raises(DataError, match=r"\(N, C, S, S\)"):
        dataset_from_tensor(torch.zeros(5, 3, 4, 6), None, "wide")


# --- folder ---------------------------------------------------------------------------------


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """Nested folder with RGB, L, RGBA, P, JPEG, CMYK JPEG and 16-bit PNGs, plus a text file."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "a" / "rgb.png")
    Image.new("L", (9, 9), 200).save(tmp_path / "a" / "b" / "grey.PNG")
    Image.new("RGBA", (8, 8), (0, 255, 0, 128)).save(tmp_path / "rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("RGB", (16, 8), (10, 20, 30)).save(tmp_path / "a" / "photo.jpg")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpeg")
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 4 * 257)
    grey16[0, 0] = 65535
    Image.fromarray(grey16).save(tmp_path / "deep16.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def folder_cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"source": "folder", "root": str(root), "image_size": 8, **kw})


def test_folder_finds_images_sorted_recursively(image_folder):
    ds = build_dataset(folder_cfg(image_folder))
    names = [p.name for p in ds.files]
    assert len(ds) == 7 and "notes.txt" not in names and "grey.PNG" in names
    assert ds.files == sorted(ds.files)
    assert (ds.channels, ds.image_size, ds.num_classes) == (3, 8, 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_shapes_labels_collate(image_folder, channels):
    ds = build_dataset(folder_cfg(image_folder, channels=channels))
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (channels, 8, 8) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["label"] == -1 and item["label"].dtype == torch.int64
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert batch["image"].shape == (len(ds), channels, 8, 8)


def test_folder_colour_conversions(image_folder):
    ds = build_dataset(folder_cfg(image_folder))
    item = {p.name: ds[i]["image"] for i, p in enumerate(ds.files)}
    red, green, blue = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in
                        ([1, -1, -1], [-1, 1, -1], [-1, -1, 1])]
    assert torch.allclose(item["rgb.png"], red.expand(3, 8, 8))
    assert torch.allclose(item["rgba.png"], green.expand(3, 8, 8))
    assert torch.allclose(item["pal.png"], blue.expand(3, 8, 8))
    assert torch.allclose(item["grey.PNG"], from_uint8(torch.tensor(200)).expand(3, 8, 8), atol=1e-6)
    assert torch.allclose(item["cmyk.jpeg"], torch.ones(3, 8, 8), atol=2 / 255)


def test_folder_16bit_scaled_to_8bit(image_folder):
    ds = build_dataset(folder_cfg(image_folder, channels=1))
    image = ds[[p.name for p in ds.files].index("deep16.png")]["image"]
    want = torch.arange(64).reshape(1, 8, 8) * 4
    want[0, 0, 0] = 255
    assert torch.equal(to_uint8(image), want.to(torch.uint8))


def test_folder_resize_and_centre_crop(tmp_path):
    wide = np.zeros((20, 40), dtype=np.uint8)  # (H, W): left half black, right half white
    wide[:, 20:] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    exact = build_dataset(folder_cfg(tmp_path, channels=1, image_size=20))[0]["image"]
    want = torch.full((1, 20, 20), -1.0)
    want[..., 10:] = 1
    assert torch.equal(exact, want)  # no resize: pure centre crop of columns 10..29
    half = build_dataset(folder_cfg(tmp_path, channels=1, image_size=10))[0]["image"]
    assert half.shape == (1, 10, 10)
    assert torch.equal(half[..., :3], torch.full((1, 10, 3), -1.0))
    assert torch.equal(half[..., 7:], torch.ones(1, 10, 3))


def test_folder_applies_exif_orientation(tmp_path):
    wide = np.zeros((20, 40), dtype=np.uint8)  # left half black; EXIF 6: display rotated 90 deg clockwise
    wide[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    image = build_dataset(folder_cfg(tmp_path, channels=1, image_size=20))[0]["image"]
    want = torch.full((1, 20, 20), -1.0)
    want[:, 10:] = 1  # upright it is tall: black top half, white bottom half
    assert torch.equal(image, want)


def test_folder_tall_image_crops_rows(tmp_path):
    tall = np.zeros((40, 20, 3), dtype=np.uint8)  # top half black, bottom half white
    tall[20:] = 255
    Image.fromarray(tall).save(tmp_path / "tall.jpg", quality=100)
    image = build_dataset(folder_cfg(tmp_path, image_size=20))[0]["image"]
    assert (image[:, :8] < -0.95).all() and (image[:, 12:] > 0.95).all()


@pytest.mark.parametrize("content", [b"", os.urandom(300), "truncated"])
def test_folder_unreadable_file_names_path(tmp_path, content):
    if content == "truncated":
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "bad.png")
        content = (tmp_path / "bad.png").read_bytes()[:400]
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    ds = build_dataset(folder_cfg(tmp_path))
    with pytest.raises(DataError, match="cannot read image") as info:
        ds[0]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_folder_empty_or_missing_root(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found under") as info:
        build_dataset(folder_cfg(tmp_path))
    assert str(tmp_path) in str(info.value) and "png" in str(info.value) and "data.root" in str(info.value)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="data.root") as info:
        build_dataset(folder_cfg(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="data.root is not set"):
        build_dataset(DataConfig(source="folder"))


def test_folder_refuses_bad_channels_and_test_split(image_folder):
    with pytest.raises(DataError, match="data.channels"):
        build_dataset(folder_cfg(image_folder, channels=2))
    with pytest.raises(DataError, match="held-out"):
        build_dataset(folder_cfg(image_folder), "test")


# --- torchvision sources ------------------------------------------------------------------


@pytest.fixture()
def no_download(monkeypatch):
    """Fail the test if torchvision tries to download anything."""
    def refuse(*args, **kwargs):
        pytest.fail("torchvision tried to download")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)


@pytest.mark.parametrize("source, hint", [("cifar10", "cifar-10-batches-py/ from cifar-10-python.tar.gz"),
                                          ("mnist", "MNIST/raw/")])
def test_torchvision_missing_is_quick_and_says_where(tmp_path, no_download, source, hint):
    start = time.perf_counter()
    with pytest.raises(DataError, match="not found under") as info:
        build_dataset(DataConfig(source=source, root=str(tmp_path)))
    message = str(info.value)
    assert hint in message and str(tmp_path) in message and "data.download=true" in message
    assert "\n" not in message and time.perf_counter() - start < 1
    for download in (False, True):
        with pytest.raises(DataError, match="data.root is not set"):
            build_dataset(DataConfig(source=source, download=download))


@pytest.mark.parametrize("source, channels", [("cifar10", 1), ("mnist", 3)])
def test_torchvision_refuses_channels(tmp_path, source, channels):
    with pytest.raises(DataError, match="data.channels"):
        build_dataset(DataConfig(source=source, root=str(tmp_path), channels=channels))


def write_fake_cifar(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's CIFAR-10 python layout: pickled dicts with 'data' (N, 3072) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return batches


@pytest.fixture()
def fake_cifar(tmp_path, monkeypatch, no_download):
    """A 24-image fake CIFAR-10; torchvision's md5 checks (of the real files) are bypassed."""
    batches = write_fake_cifar(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    return tmp_path, batches


def test_fake_cifar10_loads(fake_cifar):
    root, batches = fake_cifar
    train = build_dataset(DataConfig(source="cifar10", root=str(root), image_size=32), "train")
    test = build_dataset(DataConfig(source="cifar10", root=str(root), image_size=32), "test")
    assert (len(train), len(test)) == (20, 4)
    assert (train.channels, train.image_size, train.num_classes, train.name) == (3, 32, 10, "cifar10")
    data = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    want = from_uint8(torch.from_numpy(data).reshape(-1, 3, 32, 32))
    assert torch.equal(images_of(train), want)
    labels = sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert [int(train[i]["label"]) for i in range(20)] == labels
    last = torch.from_numpy(batches["test_batch"][0][3]).reshape(3, 32, 32)
    assert torch.equal(test[3]["image"], from_uint8(last))


def test_fake_cifar10_resized_once(fake_cifar):
    root, batches = fake_cifar
    ds = build_dataset(DataConfig(source="cifar10", root=str(root), image_size=16), "test")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (4, 3, 16, 16)
    x = torch.from_numpy(batches["test_batch"][0]).reshape(-1, 3, 32, 32).float() / 255
    want = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).clamp(0, 1)
    assert (images_of(ds) - (want * 2 - 1)).abs().max() <= 1 / 255 + 1e-6


def test_corrupt_cifar10_is_a_data_error(tmp_path, no_download):
    write_fake_cifar(tmp_path)  # real md5 checks fail on these files
    with pytest.raises(DataError, match="cannot read CIFAR-10 under"):
        build_dataset(DataConfig(source="cifar10", root=str(tmp_path)))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format of MNIST's raw files."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's MNIST raw layout: 6 train and 3 test images (28x28) in idx files."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    parts = {}
    for prefix, n in (("train", 6), ("t10k", 3)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        parts[prefix] = (images, labels)
    return parts


def test_fake_mnist_loads(tmp_path, no_download):
    parts = write_fake_mnist(tmp_path)
    train = build_dataset(DataConfig(source="mnist", root=str(tmp_path), image_size=28))
    assert (len(train), train.channels, train.num_classes, train.name) == (6, 1, 10, "mnist")
    assert torch.equal(images_of(train), from_uint8(torch.from_numpy(parts["train"][0])).unsqueeze(1))
    assert [int(train[i]["label"]) for i in range(6)] == list(parts["train"][1])
    test = build_dataset(DataConfig(source="mnist", root=str(tmp_path), image_size=14), "test")
    assert len(test) == 3 and test[0]["image"].shape == (1, 14, 14)


# --- no randomness in datasets ----------------------------------------------------------------


def test_datasets_draw_no_random_numbers_and_ignore_hflip(image_folder, tmp_path, fake_cifar):
    """Building and indexing any dataset leaves torch's RNG untouched, even with hflip=True
    (the trainer flips whole batches itself), and hflip=True items equal hflip=False items."""
    cifar_root, _ = fake_cifar  # cifar-10-batches-py/ under tmp_path, integrity checks bypassed
    mnist_root = tmp_path / "mnist"
    write_fake_mnist(mnist_root)
    requests = [
        (DataConfig(image_size=8), "train"),
        (DataConfig(image_size=16), "test"),
        (folder_cfg(image_folder), "train"),
        (folder_cfg(image_folder, channels=1, image_size=5), "train"),
        (DataConfig(source="cifar10", root=str(cifar_root), image_size=32), "train"),
        (DataConfig(source="cifar10", root=str(cifar_root), image_size=16), "test"),
        (DataConfig(source="mnist", root=str(mnist_root), image_size=28), "train"),
        (DataConfig(source="mnist", root=str(mnist_root), image_size=14), "test"),
    ]
    for cfg, split in requests:
        items = {}
        for hflip in (False, True):
            cfg.hflip = hflip
            torch.manual_seed(0)
            state = torch.get_rng_state()
            ds = build_dataset(cfg, split)
            got = [ds[i] for i in (0, 1, len(ds) - 1, 0)]
            assert torch.equal(torch.get_rng_state(), state), (cfg.source, split, hflip)
            assert not hasattr(ds, "hflip") and "hflip" not in repr(ds)
            items[hflip] = got
        for plain, flagged in zip(items[False], items[True]):
            assert torch.equal(plain["image"], flagged["image"]), (cfg.source, split)
            assert torch.equal(plain["label"], flagged["label"])
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    state = torch.get_rng_state()
    ds = dataset_from_tensor(x, torch.arange(6), "noise")
    assert torch.equal(torch.stack([ds[i]["image"] for i in range(6)]), x)
    assert torch.equal(torch.get_rng_state(), state) and not hasattr(ds, "hflip")
    with pytest.raises(TypeError):
        dataset_from_tensor(x, None, "noise", hflip=True)
