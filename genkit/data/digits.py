"""scikit-learn's handwritten digits: the embedded default dataset (no download).

`sklearn.datasets.load_digits()` ships 1797 grey 8x8 images with values 0..16 and labels
0..9 (the UCI optdigits test set). Images are scaled to [0, 1] by /16, resized to
`data.image_size` with antialiased bilinear interpolation (skipped at the native 8 px),
clamped to [0, 1] and mapped to [-1, 1]. Items carry templated captions of their label
("a handwritten digit 7", "a handwritten digit seven", ...: `genkit.data.captions`).

Fixed held-out split, in sklearn's order:
    train = images 0..1499 (1500 images)
    test  = images 1500..1796 (the last 297 images)
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from genkit.config import DataConfig
from genkit.data.base import InMemoryImageDataset, check_channels, check_request, resize_unit
from genkit.data.captions import digit_captions

N_TRAIN = 1500  # images [0, N_TRAIN) train, [N_TRAIN, 1797) test
NATIVE_SIZE = 8
CHANNELS = 1
NUM_CLASSES = 10


def split_indices(split: str) -> slice:
    """The fixed digits indices of a split: train 0..1499, test 1500..1796."""
    return slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)


def build_digits(cfg: DataConfig, split: str = "train") -> InMemoryImageDataset:
    """Build the digits dataset for `split` ("train" or "test") at `cfg.image_size`."""
    check_request(cfg, split)
    check_channels(cfg, CHANNELS, "digits")
    bunch = load_digits()
    part = split_indices(split)
    x = torch.as_tensor(bunch.data[part], dtype=torch.float32) / 16  # (N, 64) in [0, 1]
    x = x.reshape(-1, CHANNELS, NATIVE_SIZE, NATIVE_SIZE)  # (N, 1, 8, 8)
    x = resize_unit(x, cfg.image_size) * 2 - 1
    labels = torch.as_tensor(bunch.target[part], dtype=torch.int64)
    return InMemoryImageDataset(x, labels, "digits", split=split, num_classes=NUM_CLASSES,
                                captions=digit_captions(labels))
