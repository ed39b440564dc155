"""CIFAR-10 and MNIST through torchvision, held in memory as uint8.

`train=(split == "train")` picks torchvision's official splits (CIFAR-10: 50000 / 10000,
MNIST: 60000 / 10000). Nothing is downloaded unless `data.download=true`; without it,
missing files are reported at once with where to put them. The whole split is loaded once
into a uint8 tensor (N, C, S, S), resized once to `data.image_size` when it differs from
the native size (antialiased bilinear), and converted to float [-1, 1] per item.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from torch import Tensor

from genkit.config import DataConfig
from genkit.data.base import InMemoryImageDataset, check_channels, check_request, resize_unit
from genkit.errors import DataError
from genkit.io import to_uint8

RESIZE_CHUNK = 4096  # images resized per interpolate call: bounds the float copy's memory


@dataclass(frozen=True)
class TorchvisionSource:
    """What genkit needs to know about one torchvision dataset."""

    name: str                       # genkit's source name
    title: str                      # human name in messages
    dataset: Callable[..., Any]     # torchvision class
    files: tuple[str, ...]          # paths under root that must exist (without download)
    hint: str                       # where the files come from
    channels: int
    native_size: int
    num_classes: int = 10


CIFAR10 = TorchvisionSource(
    name="cifar10", title="CIFAR-10", dataset=torchvision.datasets.CIFAR10,
    files=tuple(f"cifar-10-batches-py/{f}" for f in
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")),
    hint="put the python version there (cifar-10-batches-py/ from cifar-10-python.tar.gz)",
    channels=3, native_size=32)

MNIST = TorchvisionSource(
    name="mnist", title="MNIST", dataset=torchvision.datasets.MNIST,
    files=tuple(f"MNIST/raw/{f}" for f in
                ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    hint="put the four unzipped idx files there under MNIST/raw/ "
         "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
         "t10k-labels-idx1-ubyte)",
    channels=1, native_size=28)


def check_files(source: TorchvisionSource, root: str | None, download: bool) -> Path:
    """Return the root folder, or raise DataError saying where the files must go."""
    if root is None or str(root) == "":
        raise DataError(f"data.root is not set: {source.title} needs data.root=DIR, a folder to "
                        f"{'download it into' if download else 'read it from'}")
    path = Path(root).expanduser()
    missing = [f for f in source.files if not (path / f).is_file()]
    if missing and not download:
        raise DataError(f"{source.title} not found under '{path}' (missing {missing[0]}): "
                        f"{source.hint}, or set data.download=true")
    return path


def load_uint8(source: TorchvisionSource, root: Path, split: str,
               download: bool) -> tuple[Tensor, Tensor]:
    """Load a split through torchvision as uint8 images (N, C, H, W) and int64 labels (N,)."""
    try:
        data = source.dataset(root=str(root), train=split == "train", download=download)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, AssertionError,
            pickle.UnpicklingError) as error:  # torchvision's checks and parsers of the files
        action = "download or read" if download else "read"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot {action} {source.title} under '{root}' ({reason}): "
                        f"{source.hint}, or set data.download=true") from error
    images = torch.as_tensor(np.asarray(data.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    labels = torch.as_tensor(np.asarray(data.targets), dtype=torch.int64)
    return images.contiguous(), labels


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize uint8 images (N, C, H, W) to (N, C, size, size), in chunks, staying uint8."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [to_uint8(resize_unit(chunk.float() / 255, size) * 2 - 1)
              for chunk in images.split(RESIZE_CHUNK)]
    return torch.cat(chunks)


def build_torchvision(source: TorchvisionSource, cfg: DataConfig, split: str) -> InMemoryImageDataset:
    """Build an in-memory dataset for one torchvision source and split."""
    check_request(cfg, split)
    check_channels(cfg, source.channels, source.name)
    download = cfg.download
    root = check_files(source, cfg.root, download)
    images, labels = load_uint8(source, root, split, download)
    images = resize_uint8(images, cfg.image_size)
    return InMemoryImageDataset(images, labels, source.name, split=split,
                                num_classes=source.num_classes)


def build_cifar10(cfg: DataConfig, split: str = "train") -> InMemoryImageDataset:
    """CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50000 train / 10000 test."""
    return build_torchvision(CIFAR10, cfg, split)


def build_mnist(cfg: DataConfig, split: str = "train") -> InMemoryImageDataset:
    """MNIST (LeCun et al. 1998): 28x28 grey, 10 classes, 60000 train / 10000 test."""
    return build_torchvision(MNIST, cfg, split)
