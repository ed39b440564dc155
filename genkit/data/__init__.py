"""Datasets: every source yields {"image": (C, H, W) in [-1, 1], "label": int64} items.

`SOURCES` maps `data.source` to a builder `(cfg, split) -> ImageDataset`; `split` is
"train" or "test" (the fixed held-out split: see each module's docstring).

Datasets draw no random numbers, so building and loading them consumes no RNG. `data.hflip`
is not applied here: the trainer flips whole batches (genkit/training/trainer.py,
`Trainer._hflip`) from its own per-step seeded stream, which keeps resume exact even though
the DataLoader prefetches ahead.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from genkit.config import DataConfig
from genkit.data.base import SPLITS, ImageDataset, InMemoryImageDataset, dataset_from_tensor
from genkit.data.digits import build_digits
from genkit.data.folder import FolderDataset, build_folder
from genkit.data.pairs import PairsDataset, build_pairs
from genkit.data.photos import build_photos
from genkit.data.torchvision_data import build_cifar10, build_mnist
from genkit.errors import DataError

SOURCES: dict[str, Callable[[DataConfig, str], ImageDataset]] = {
    "digits": build_digits,
    "folder": build_folder,
    "cifar10": build_cifar10,
    "mnist": build_mnist,
    "pairs": build_pairs,
    "photos": build_photos,
}


def build_dataset(cfg: DataConfig, split: str = "train") -> ImageDataset:
    """Build the dataset named by `cfg.source` for `split` ("train" or "test").

    Args:
        cfg: the recipe's data section (attributes source, root, image_size, channels,
            download; see `genkit.config.DataConfig`). `hflip` is ignored here: the trainer
            applies it per batch (`Trainer._hflip`).
        split: "train", or "test" for the source's fixed held-out split.
    """
    source = cfg.source
    if source not in SOURCES:
        raise DataError(f"data.source: unknown source {source!r}{_suggest(source)}; "
                        f"known: {', '.join(SOURCES)}")
    return SOURCES[source](cfg, split)


def _suggest(name: Any) -> str:
    """' (did you mean 'x'?)' for the closest known source, or ''."""
    close = difflib.get_close_matches(str(name), list(SOURCES), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


__all__ = ["SOURCES", "SPLITS", "FolderDataset", "ImageDataset", "InMemoryImageDataset", "PairsDataset",
           "build_dataset", "dataset_from_tensor"]
