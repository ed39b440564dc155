"""Reflow pairs (Liu et al. 2023, "Flow Straight and Fast", sec. 2.3): `data.source=pairs`.

A pairs folder is written by `genkit reflow RUN --out PAIRS` (`genkit.reflow.generate_pairs`):

    PAIRS/manifest.json                  run, n, sampler, steps, options, seed, shard_size, sample_shape
    PAIRS/shard-00000.safetensors        noise (B, C, H, W) float32 N(0, I), image (B, C, H, W) in [-1, 1]

Items are `{"image": x (C, H, W), "noise": eps (C, H, W), "label": -1}`: the image is the
ODE's end point from that noise, so a rectified flow trained on the batch's "noise" learns
the (straighter) coupling. All shards are loaded into memory. There is no held-out split:
asking for split "test" is refused. `data.hflip` is refused too: flipping the image alone
would break the pairing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genkit.config import DataConfig
from genkit.data.base import ImageDataset, check_channels, check_request, unlabelled
from genkit.errors import DataError
from genkit.io import load_tensors

MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    """File name of shard k: shard-00000.safetensors, ..."""
    return f"shard-{k:05d}.safetensors"


def num_shards(n: int, shard_size: int) -> int:
    """Shards needed for n pairs, shard_size per shard (the last one may be short)."""
    return math.ceil(n / shard_size)


def shard_rows(k: int, n: int, shard_size: int) -> int:
    """Number of pairs in shard k."""
    return min(shard_size, n - k * shard_size)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a pairs folder; a DataError naming the file when it is missing."""
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"data.root: '{path}' not found: write pairs with `genkit reflow RUN --out {root}`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"'{path}' is not a readable pairs manifest: {e}") from None


class PairsDataset(ImageDataset):
    """Noise/image pairs in memory: items {"image", "noise", "label"}."""

    def __init__(self, images: Tensor, noise: Tensor, name: str) -> None:
        self.images, self.noise = images, noise  # (N, C, S, S) each
        self.name, self.split = name, "train"
        self.channels, self.image_size, self.num_classes = int(images.shape[1]), int(images.shape[-1]), 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index].clone(), "noise": self.noise[index].clone(), "label": unlabelled()}


def load_pairs(root: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(noise, images, manifest) of a pairs folder; every shard must be present."""
    root = Path(root)
    manifest = read_manifest(root)
    n, shard_size = int(manifest["n"]), int(manifest["shard_size"])
    noise, images = [], []
    for k in range(num_shards(n, shard_size)):
        path = root / shard_name(k)
        if not path.is_file():
            raise DataError(f"pairs shard '{path}' is missing: finish it with `genkit reflow "
                            f"{manifest.get('run', 'RUN')} --pairs {n} --out {root}`")
        shard = load_tensors(path)
        if set(shard) != {"noise", "image"} or shard["noise"].shape != shard["image"].shape \
                or len(shard["image"]) != shard_rows(k, n, shard_size):
            raise DataError(f"pairs shard '{path}' does not hold {shard_rows(k, n, shard_size)} "
                            f"noise/image pairs of one shape")
        noise.append(shard["noise"].float())
        images.append(shard["image"].float())
    return torch.cat(noise), torch.cat(images), manifest


def build_pairs(cfg: DataConfig, split: str = "train") -> PairsDataset:
    """Build the pairs dataset of `cfg.root` (train split only)."""
    check_request(cfg, split)
    if split != "train":
        raise DataError(f"data.source=pairs has no held-out '{split}' split; "
                        f"evaluate against the original data instead")
    if not cfg.root:
        raise DataError("data.root: data.source=pairs needs the folder written by `genkit reflow`")
    if cfg.hflip:
        raise DataError("data.hflip: must be false for data.source=pairs (flipping the image alone "
                        "breaks its pairing with the noise)")
    noise, images, _ = load_pairs(cfg.root)
    size = images.shape[-1]
    if images.shape[-2] != size or size != cfg.image_size:
        raise DataError(f"data.image_size: pairs in '{cfg.root}' are {images.shape[-2]}x{size}, "
                        f"got data.image_size={cfg.image_size}")
    check_channels(cfg, int(images.shape[1]), "pairs")
    return PairsDataset(images, noise, f"pairs:{Path(cfg.root).name}")
