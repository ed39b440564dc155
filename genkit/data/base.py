"""The dataset contract shared by every source, the one in-memory dataset, and converters.

Every dataset yields `{"image": float32 (C, H, W) in [-1, 1], "label": int64 scalar}`
(label -1 when unlabelled), plus a "caption" string for captioned sources (digits,
folders with metadata.jsonl: `genkit.data.captions`), and carries `name`, `channels`, `image_size`, `num_classes`.
Datasets draw no random numbers: building and indexing them consumes no RNG. `data.hflip`
is applied by the trainer per batch (genkit/training/trainer.py, `Trainer._hflip`) from its
own per-step seeded stream, so prefetching loaders cannot break exact resume.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from genkit.config import DataConfig
from genkit.errors import DataError
from genkit.io import from_uint8

SPLITS = ("train", "test")


def resize_unit(images: Tensor, size: int) -> Tensor:
    """Resize float images in [0, 1] (N, C, H, W) to (N, C, size, size): antialiased bilinear."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.clamp(0, 1)


def unlabelled() -> Tensor:
    """The label of an item without a class: int64 scalar -1."""
    return torch.tensor(-1, dtype=torch.int64)


def check_request(cfg: DataConfig, split: str) -> None:
    """Refuse an unknown split or a non-positive `data.image_size` before any loading."""
    if split not in SPLITS:
        raise DataError(f"split: unknown split {split!r}; known: {', '.join(SPLITS)}")
    size = cfg.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"data.image_size: expected a positive integer, got {size!r}")


def check_channels(cfg: DataConfig, channels: int, source: str) -> None:
    """Refuse `data.channels` when it differs from a source's fixed channel count."""
    wanted = cfg.channels
    if wanted is not None and wanted != channels:
        raise DataError(f"data.channels: {source} images have {channels} channel(s), got {wanted}")


class ImageDataset(Dataset):
    """Base of every genkit dataset: subclasses implement `__len__` and `_load(index)`."""

    name: str
    split: str
    channels: int
    image_size: int
    num_classes: int

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        """Return one item's (image in [-1, 1] (C, H, W), int64 scalar label)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, label = self._load(index)
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"channels={self.channels}, image_size={self.image_size}, "
                f"num_classes={self.num_classes})")


class InMemoryImageDataset(ImageDataset):
    """All images in one tensor: float32 in [-1, 1], or uint8 converted per item."""

    def __init__(self, images: Tensor, labels: Tensor | None, name: str, *, split: str = "train",
                 num_classes: int | None = None, captions: list[str] | None = None) -> None:
        _check_images(images, name)
        self.images = images  # (N, C, S, S)
        self.labels = _check_labels(labels, len(images), name)  # (N,) int64
        self.name = name
        self.split = split
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[-1])
        self.num_classes = _num_classes(self.labels) if num_classes is None else num_classes
        if captions is not None and len(captions) != len(images):
            raise DataError(f"dataset '{name}': {len(captions)} captions for {len(images)} images")
        self.captions = captions  # items gain a "caption" string when given

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        return item if self.captions is None else dict(item, caption=self.captions[index])

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        image = from_uint8(image) if image.dtype == torch.uint8 else image.clone()
        return image, self.labels[index].clone()


def dataset_from_tensor(images: Tensor, labels: Tensor | None, name: str,
                        num_classes: int | None = None) -> InMemoryImageDataset:
    """Build an in-memory dataset from float images in [-1, 1] (N, C, S, S) and optional labels.

    Args:
        images: float tensor (N, C, S, S) with values in [-1, 1] (uint8 (N, C, S, S) also works).
        labels: int tensor (N,) of class indices, or None for unlabelled data (labels -1).
        name: the dataset's name, used in messages and logs.
        num_classes: number of classes; by default max(labels) + 1, or 0 when unlabelled.
    """
    return InMemoryImageDataset(images, labels, name, num_classes=num_classes)


def _check_images(images: Tensor, name: str) -> None:
    """Refuse tensors that are not (N, C, S, S) images in [-1, 1] (or uint8)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise DataError(f"dataset '{name}': images must be (N, C, S, S), got {tuple(images.shape)}")
    if images.dtype == torch.uint8 or images.numel() == 0:
        return
    if not images.is_floating_point():
        raise DataError(f"dataset '{name}': images must be float in [-1, 1] or uint8, got {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if low < -1 or high > 1:
        raise DataError(f"dataset '{name}': images must lie in [-1, 1], got [{low:.4g}, {high:.4g}]")


def _check_labels(labels: Tensor | None, n: int, name: str) -> Tensor:
    """Return int64 labels (N,); -1 everywhere when `labels` is None."""
    if labels is None:
        return torch.full((n,), -1, dtype=torch.int64)
    if labels.shape != (n,):
        raise DataError(f"dataset '{name}': labels must have shape ({n},), got {tuple(labels.shape)}")
    return labels.to(torch.int64)


def _num_classes(labels: Tensor) -> int:
    """Number of classes implied by labels: max + 1, or 0 when none are labelled."""
    return int(labels.max()) + 1 if labels.numel() and int(labels.max()) >= 0 else 0
