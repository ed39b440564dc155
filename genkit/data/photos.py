"""Patches of scikit-image's bundled colour photographs: an embedded RGB dataset (no download).

Each photograph (uint8 RGB from `skimage.data`) is downscaled by `DOWNSCALE` with antialiased
bilinear interpolation (so a patch shows objects rather than texture), then cut into
`data.image_size` x `data.image_size` patches on a regular grid with stride image_size / 2.
The patches are unlabelled (label -1). Nothing is random: the same patches in the same order.

Fixed held-out split, by photograph (no patch of a test photograph is in train):
    train = astronaut, chelsea, rocket, hubble_deep_field, immunohistochemistry
    test  = coffee
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkit.config import DataConfig
from genkit.data.base import InMemoryImageDataset, check_channels, check_request
from genkit.errors import DataError
from genkit.io import to_uint8

PHOTOS = {"train": ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"),
          "test": ("coffee",)}
DOWNSCALE = 2
CHANNELS = 3


def _photo(name: str) -> torch.Tensor:
    """One bundled photograph as float (1, 3, H, W) in [0, 1], downscaled by DOWNSCALE."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("data.source=photos needs scikit-image: pip install scikit-image") from None
    x = torch.as_tensor(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    h, w = x.shape[-2] // DOWNSCALE, x.shape[-1] // DOWNSCALE
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def patches(image: torch.Tensor, size: int) -> torch.Tensor:
    """All size x size patches of (1, C, H, W) on a grid of stride size // 2: (N, C, size, size)."""
    stride = max(1, size // 2)
    if min(image.shape[-2:]) < size:
        raise DataError(f"data.image_size={size} is larger than a photograph ({tuple(image.shape[-2:])})")
    tiles = image.unfold(2, size, stride).unfold(3, size, stride)  # (1, C, nh, nw, size, size)
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, image.shape[1], size, size)


def build_photos(cfg: DataConfig, split: str = "train") -> InMemoryImageDataset:
    """Patches of the split's photographs at `cfg.image_size`, stored as uint8."""
    check_request(cfg, split)
    check_channels(cfg, CHANNELS, "photos")
    x = torch.cat([patches(_photo(name), cfg.image_size) for name in PHOTOS[split]])
    x = to_uint8(x * 2 - 1)  # (N, 3, S, S) uint8: 4x less memory; items come back in [-1, 1]
    return InMemoryImageDataset(x, None, "photos", split=split, num_classes=0)

