"""Image SPECs for evaluation: where the images of `--real` / `--fake` come from.

A SPEC is one of
    DIR                     a folder of images (recursive; png, jpg, jpeg, bmp, webp, gif)
    FILE.npz                an array `images`: uint8 (N, C, H, W) or floats in [-1, 1]
    recipe:RECIPE[:SPLIT]   a recipe's dataset (e.g. recipe:ddpm_digits, recipe:ddpm_digits:test)
    RUN_DIR                 a genkit run folder: images are generated (sampler, steps, seed)
Statistics files (mu/sigma .npz) are handled by `genkit.eval.stats`.
Every source yields uint8 batches (B, C, H, W); generated images are quantized by rounding,
exactly as saved PNGs would be. `--n N` below the size of a folder, .npz or dataset takes N images
drawn by a seeded permutation (results record it as "subset": {"n", "of", "seed"}), never the first
N, which in a class-sorted folder are the first classes; for a run folder it is the number generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from genkit.data import build_dataset
from genkit.data.folder import EXTENSIONS, find_images, open_image
from genkit.errors import GenkitError
from genkit.eval.stats import is_stats_file, split_prefix
from genkit.families.sampling import sample
from genkit.io import to_uint8
from genkit.runs import load, load_recipe


@dataclass
class SampleSettings:
    """How to generate images when a SPEC is a run folder."""

    sampler: str | None = None
    steps: int | None = None
    seed: int = 0
    device: str | None = None
    options: dict[str, Any] | None = None


def describe(spec: str) -> str:
    """The kind of a SPEC, for messages and the JSON protocol."""
    if spec.startswith("recipe:"):
        return "recipe"
    p = Path(spec)
    if p.suffix == ".npz":
        return "npz"
    if (p / "config.yaml").exists():
        return "run"
    return "folder"


def check_exists(spec: str) -> None:
    """Refuse a SPEC naming a path that does not exist, before any network is built (a typo fails at once)."""
    if spec.startswith("recipe:"):
        return
    _, path = split_prefix(spec)
    if not Path(path).exists():
        raise GenkitError(f"'{path}' not found (a SPEC is " + SPEC_KINDS + ")")


SPEC_KINDS = "a folder of images, an .npz of images or statistics, a run folder, or recipe:NAME[:SPLIT]"


def iter_images(spec: str, n: int | None, batch_size: int, sample: SampleSettings | None = None, *,
                seed: int = 0) -> Iterator[Tensor]:
    """uint8 batches (B, C, H, W) from a SPEC: all its images, or n of them drawn at random (`subset_indices`
    with `seed`: never the first n, which in a class-sorted folder are the first classes); a run folder
    generates n."""
    if describe(spec) == "run":
        yield from _run_batches(Path(spec), n, batch_size, sample or SampleSettings())
        return
    count, read = _source(spec)
    indices = subset_indices(count, n, seed)
    chosen = range(count) if indices is None else indices
    for start in range(0, len(chosen), batch_size):
        yield read(list(chosen[start:start + batch_size]))


def subset_indices(count: int, n: int | None, seed: int) -> list[int] | None:
    """The n of `count` images --n selects, in increasing order: the first n of a permutation seeded by `seed`;
    None when all are used (n is None or n >= count)."""
    if n is None or n >= count:
        return None
    return sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def subset_record(spec: str, n: int | None, seed: int) -> dict[str, int] | None:
    """What a result records of the subset --n drew from a SPEC: {"n", "of", "seed"}; None when every image is
    used, and for a run folder (--n generates n) or a statistics file."""
    if n is None or describe(spec) == "run" or is_stats_file(spec):
        return None
    count = _npz_count(Path(spec)) if describe(spec) == "npz" else _source(spec)[0]
    return None if n >= count else {"n": n, "of": count, "seed": seed}


def _npz_count(path: Path) -> int:
    """The number of images in an .npz, from its array header: the images are not read again."""
    try:
        with np.load(path, allow_pickle=False) as z, z.zip.open("images.npy") as f:
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            return int(read[np.lib.format.read_magic(f)](f)[0][0])
    except (OSError, ValueError, KeyError) as e:
        raise GenkitError(f"cannot read '{path}': {e}") from None


def _source(spec: str) -> tuple[int, Callable[[list[int]], Tensor]]:
    """(number of images, read(indices) -> uint8 batch) of a folder, an .npz or a recipe's dataset."""
    kind = describe(spec)
    if kind == "recipe":
        return _recipe_source(spec[len("recipe:"):])
    if kind == "npz":
        images = _npz_images(Path(spec))
        return len(images), lambda idx: torch.from_numpy(images[idx])
    return _folder_source(Path(spec))


def _recipe_source(ref: str) -> tuple[int, Callable[[list[int]], Tensor]]:
    name, _, split = ref.partition(":")
    dataset = build_dataset(load_recipe(name).data, split or "train")
    return len(dataset), lambda idx: to_uint8(torch.stack([dataset[i]["image"] for i in idx]))


def _npz_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise GenkitError(f"'{path}' not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise GenkitError(f"'{path}' has no array 'images' (it has: {', '.join(z.files)})")
            images = z["images"]
    except (OSError, ValueError) as e:
        raise GenkitError(f"cannot read '{path}': {e}") from None
    return _as_uint8(images, path)


HALF_LEVEL = 1 / 255  # half a uint8 level in [-1, 1] units


def _as_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """Check an npz image array: (N, C, H, W) uint8, or floats in [-1, 1] quantized by rounding."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise GenkitError(f"'{path}': images must be (N, C, H, W) with C = 1 or 3, got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise GenkitError(f"'{path}': images must be uint8 or float, got {images.dtype}")
    if not np.isfinite(images).all():
        raise GenkitError(f"'{path}': images hold NaN or inf values")
    low, high = float(images.min()), float(images.max())
    if low < -1 - HALF_LEVEL or high > 1 + HALF_LEVEL:  # within half a level of [-1, 1]: rounding, kept
        raise GenkitError(f"'{path}': float images must lie in [-1, 1], got [{low:.4g}, {high:.4g}]")
    if low >= 0:  # a [0, 1] array would be read as the upper half of [-1, 1]: every image far too bright
        raise GenkitError(f"'{path}': float images are read in [-1, 1], but these lie in [{low:.4g}, {high:.4g}] "
                          "(the [0, 1] convention?): save them as uint8, or as 2 x - 1")
    return to_uint8(torch.from_numpy(images)).numpy()


def _folder_source(root: Path) -> tuple[int, Callable[[list[int]], Tensor]]:
    """Images at their own size (the feature extractor resizes); RGB unless the first is grey."""
    if not root.is_dir():
        raise GenkitError(f"'{root}' is neither an image folder, an .npz, a run folder, nor recipe:NAME")
    files = find_images(root, follow_symlinks=True)  # the folder you name is what you evaluate, links and all
    if not files:
        raise GenkitError(f"no images under '{root}' (read: {', '.join(EXTENSIONS)})")
    first = open_image(files[0])
    mode = "L" if first.mode in ("L", "1", "LA") else "RGB"
    shape = np.asarray(first.convert(mode)).shape

    def read(indices: list[int]) -> Tensor:
        arrays = []
        for path in (files[i] for i in indices):
            a = np.asarray(open_image(path).convert(mode))
            if a.shape != shape:
                raise GenkitError(f"image '{path}' is {a.shape[1]}x{a.shape[0]}, the folder's first is "
                                  f"{shape[1]}x{shape[0]}: evaluation needs one size")
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    return len(files), read


def _run_batches(run: Path, n: int | None, batch_size: int, s: SampleSettings) -> Iterator[Tensor]:
    if n is None:
        raise GenkitError(f"'{run}' is a run folder: say how many images to generate with --n")
    family = load(run, device=s.device)
    for i, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        out = sample(family, b, sampler=s.sampler, steps=s.steps, generator=torch.Generator().manual_seed(s.seed + i),
                     **(s.options or {}))
        yield to_uint8(out.images)
