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

A folder has no held-out split: asking for split "test" is refused.

Nothing outside `data.root` is read unless asked for: a symlinked file or folder that leads out of
it is an error naming it, unless `data.follow_symlinks: true` (symlinks that stay inside are fine;
a symlinked folder inside is not walked, its files being found through their own path).

A folder with a `metadata.jsonl` (the Hugging Face image-folder convention) is a captioned
dataset: one JSON object per line with `file_name` (relative to the folder) and `text`, and
optionally an integer `label` (class conditioning). The metadata lists the dataset: exactly its
files, in its order; items gain a `caption` string (collated into a list). A `file_name` must be a
relative path that stays inside the folder: absolute and `../` paths are refused.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from genkit.config import DataConfig
from genkit.data.base import ImageDataset, check_request, unlabelled
from genkit.errors import DataError
from genkit.io import from_uint8

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
              Image.DecompressionBombError)
MODES = {1: "L", 3: "RGB"}
METADATA = "metadata.jsonl"


def check_link(path: Path, real_root: Path, follow_symlinks: bool, what: str) -> None:
    """Refuse `path` when symlinks lead it outside `real_root` (the resolved data root), unless followed."""
    if follow_symlinks:
        return
    try:
        target = path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop (RuntimeError before 3.13), a NUL
        raise DataError(f"{what}: cannot resolve its path ({error})") from None
    if not target.is_relative_to(real_root):
        raise DataError(f"{what} leads through a symlink to '{target}', outside data.root '{real_root}': "
                        f"set data.follow_symlinks=true to read it")


def _walk_into(folder: Path, real_root: Path, walked: set[Path], follow_symlinks: bool) -> bool:
    """Whether the walk enters `folder`: real folders yes; symlinked ones only outside the root, if followed."""
    if not folder.is_symlink():
        return True
    target = folder.resolve()
    if target.is_relative_to(real_root) or target in walked:
        return False  # found through its own path already: walking it again would repeat files, or loop
    check_link(folder, real_root, follow_symlinks, f"folder '{folder}'")
    walked.add(target)
    return True


def find_images(root: Path, follow_symlinks: bool = False) -> list[Path]:
    """All files under `root` (recursive) with an image extension, sorted by path.

    A symlink (file or folder) leading outside `root` is a DataError unless `follow_symlinks`.
    """
    real_root = root.resolve()
    walked, found = {real_root}, []
    for folder, dirs, names in os.walk(root, followlinks=True):  # _walk_into decides which links to enter
        folder = Path(folder)
        walked.add(folder.resolve())
        dirs[:] = [d for d in sorted(dirs) if _walk_into(folder / d, real_root, walked, follow_symlinks)]
        for name in names:
            path = folder / name
            if path.suffix.lower() in EXTENSIONS and path.is_file():
                if path.is_symlink():  # the walk itself stays inside the root unless links are followed
                    check_link(path, real_root, follow_symlinks, f"image '{path}'")
                found.append(path)
    return sorted(found)


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


def check_root(root: str | None) -> Path:
    """Return `data.root` as a Path, or raise DataError when it is unset or not a folder."""
    if root is None or str(root) == "":
        raise DataError("data.root is not set: data.source=folder needs data.root=DIR, a folder of images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root: folder '{path}' does not exist")
    return path


def build_folder(cfg: DataConfig, split: str = "train") -> FolderDataset:
    """Build a dataset from the images under `cfg.root` (train split only)."""
    check_request(cfg, split)
    if split != "train":
        raise DataError(f"data.source=folder has no held-out '{split}' split; "
                        "evaluate against the training folder or another data.root")
    channels = 3 if cfg.channels is None else cfg.channels
    if channels not in MODES:
        raise DataError(f"data.channels: folder images can be read with 1 or 3 channels, got {channels!r}")
    root = check_root(cfg.root)
    if (root / METADATA).is_file():  # captioned folder (Hugging Face image-folder convention)
        return CaptionedFolderDataset(root, channels=channels, image_size=cfg.image_size,
                                      follow_symlinks=cfg.follow_symlinks)
    files = find_images(root, cfg.follow_symlinks)
    if not files:
        raise DataError(f"data.root: no images found under '{root}' "
                        f"(read recursively: {', '.join(e[1:] for e in EXTENSIONS)}, any case)")
    if cfg.on_error == "skip":
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


def metadata_file(root: Path, real_root: Path, value: str, where: str, follow_symlinks: bool) -> Path:
    """The image a metadata `file_name` names: a relative path inside `root`, else a DataError naming it."""
    parts = Path(os.path.normpath(value)).parts
    if Path(value).is_absolute() or parts[:1] == ("..",):
        raise DataError(f"{where}: file_name {value!r} is outside the data root '{root}' "
                        f"(file names are relative paths inside it)")
    file = root / value
    check_link(file, real_root, follow_symlinks, f"{where}: file_name {value!r}")
    if not file.is_file():
        raise DataError(f"{where}: image '{file}' not found")
    return file


def read_metadata(root: Path, follow_symlinks: bool = False) -> tuple[list[Path], list[str], list[int] | None]:
    """(files, captions, labels or None) from root/metadata.jsonl; DataError names the line."""
    path, real_root = root / METADATA, root.resolve()
    check_link(path, real_root, follow_symlinks, f"'{path}'")
    files, texts, labels = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{n}: needs string keys 'file_name' and 'text'")
        file = metadata_file(root, real_root, row["file_name"], f"{path}:{n}", follow_symlinks)
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise DataError(f"{path}:{n}: 'label' must be an integer >= 0, got {label!r}")
        files.append(file)
        texts.append(row["text"])
        labels.append(label)
    if not files:
        raise DataError(f"{path}: no entries")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        raise DataError(f"{path}:{given.index(False) + 1}: 'label' missing (give it on every line or none)")
    return files, texts, labels if all(given) else None


class CaptionedFolderDataset(FolderDataset):
    """The images and captions (and labels) listed in a folder's metadata.jsonl, decoded per item."""

    def __init__(self, root: Path, *, channels: int, image_size: int, follow_symlinks: bool = False) -> None:
        files, self.captions, labels = read_metadata(root, follow_symlinks)
        super().__init__(root, files, channels=channels, image_size=image_size)
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.num_classes = 0 if labels is None else max(labels) + 1

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        label = unlabelled() if self.labels is None else self.labels[index].clone()
        return decode(self.files[index], self.channels, self.image_size), label

    def __getitem__(self, index: int) -> dict:
        return dict(super().__getitem__(index), caption=self.captions[index])
