"""A folder of your own images (`data.source=folder data.root=DIR`), any layout.

Files are found recursively under `data.root` by extension (png, jpg, jpeg, bmp, webp,
gif; any case) and sorted by path, so the order is the same on every machine. Each image
is decoded lazily in `__getitem__`: EXIF orientation applied, 16-bit grey scaled to 8 bits,
converted to grey (`data.channels=1`) or RGB (3, the default; CMYK, palette and 16-bit files
are converted), its shorter side resized to `data.image_size` (bicubic, antialiased) and
centre-cropped square. Items are unlabelled.

A file that cannot be read (truncated, zero bytes, not an image) or is far too small (shorter
side under a quarter of `data.image_size`: it would be mostly interpolation) is an error naming
it. With `data.on_error: skip` every file is checked once when the dataset is built, the bad
ones are left out (so the dataset's length, and exact resume, stay fixed) and counted in a
warning naming the first.

A folder has no held-out split: asking for split "test" is refused. A folder with a
`metadata.jsonl` (file_name, text[, label]) is a captioned dataset: see `genkit.data.captions`.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from genkit.data.base import ImageDataset, check_request, from_uint8, unlabelled
from genkit.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
              Image.DecompressionBombError)
MODES = {1: "L", 3: "RGB"}


def find_images(root: Path) -> list[Path]:
    """All files under `root` (recursive) with an image extension, sorted by path."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased), then centre-crop size x size."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer grey ('I;16*', 'I') to 8-bit 'L' (x / 257, 65535 -> 255)."""
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image, dtype=np.float64).clip(0, 65535)
    return Image.fromarray(np.round(values / 257).astype(np.uint8), mode="L")


def open_image(path: Path) -> Image.Image:
    """Read one image file, upright (EXIF) and 8-bit; a DataError names an unreadable file."""
    try:
        with Image.open(path) as image:
            image.load()  # truncated files fail here, not at open
            return to_8bit(ImageOps.exif_transpose(image))
    except PIL_ERRORS as error:
        raise DataError(f"cannot read image '{path}': {error}") from error


def check_size(image: Image.Image, path: Path, size: int) -> None:
    """Refuse an image whose shorter side is under a quarter of the training size."""
    if min(image.size) * 4 < size:
        raise DataError(f"image '{path}' is {image.size[0]}x{image.size[1]} px, under a quarter of "
                        f"data.image_size={size}: remove it or set data.on_error=skip")


def decode(path: Path, channels: int, size: int) -> Tensor:
    """Read one image file as float32 (C, size, size) in [-1, 1]; DataError names the file."""
    image = open_image(path)
    check_size(image, path, size)
    image = image.convert(MODES[channels])
    pixels = np.asarray(resize_crop(image, size), dtype=np.uint8).reshape(size, size, channels)
    return from_uint8(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (C, S, S)


class FolderDataset(ImageDataset):
    """Unlabelled images found recursively under a folder, decoded per item."""

    def __init__(self, root: Path, files: list[Path], *, channels: int, image_size: int) -> None:
        self.root = root
        self.files = files
        self.name = f"folder:{root}"
        self.split = "train"
        self.channels = channels
        self.image_size = image_size
        self.num_classes = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        return decode(self.files[index], self.channels, self.image_size), unlabelled()


def check_root(root: Any) -> Path:
    """Return `data.root` as a Path, or raise DataError when it is unset or not a folder."""
    if root is None or str(root) == "":
        raise DataError("data.root is not set: data.source=folder needs data.root=DIR, a folder of images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root: folder '{path}' does not exist")
    return path


def build_folder(cfg: Any, split: str = "train") -> FolderDataset:
    """Build a dataset from the images under `cfg.root` (train split only)."""
    check_request(cfg, split)
    if split != "train":
        raise DataError(f"data.source=folder has no held-out '{split}' split; "
                        "evaluate against the training folder or another data.root")
    channels = 3 if getattr(cfg, "channels", None) is None else cfg.channels
    if channels not in MODES:
        raise DataError(f"data.channels: folder images can be read with 1 or 3 channels, got {channels!r}")
    root = check_root(getattr(cfg, "root", None))
    if (root / "metadata.jsonl").is_file():  # captioned folder (Hugging Face image-folder convention)
        from genkit.data.captions import CaptionedFolderDataset

        return CaptionedFolderDataset(root, channels=channels, image_size=cfg.image_size)
    files = find_images(root)
    if not files:
        raise DataError(f"data.root: no images found under '{root}' "
                        f"(read recursively: {', '.join(e[1:] for e in EXTENSIONS)}, any case)")
    if getattr(cfg, "on_error", "raise") == "skip":
        files = readable(files, root, cfg.image_size)
    return FolderDataset(root, files, channels=channels, image_size=cfg.image_size)


def readable(files: list[Path], root: Path, size: int) -> list[Path]:
    """The files that decode and are large enough; warns with the count and the first bad one."""
    good, bad = [], []
    for path in files:
        try:
            check_size(open_image(path), path, size)
            good.append(path)
        except DataError as error:
            bad.append(str(error))
    if bad:
        warnings.warn(f"data.on_error=skip: skipped {len(bad)} of {len(files)} files under '{root}' "
                      f"(first: {bad[0]})", stacklevel=2)
    if not good:
        raise DataError(f"data.root: none of the {len(files)} image files under '{root}' can be read "
                        f"(first: {bad[0]})")
    return good
