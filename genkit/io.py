"""Atomic writes, safetensors weights, uint8 image conversions, image grids and sample archives.

Every file genkit writes goes to a temporary name in the same folder, is flushed to disk,
and is renamed over the target: a crash leaves the previous good file, never half a file.
Files get mode 0666 and folders 0777 minus the umask, as `open` and `mkdir` would give them.
(The run folder's layout lives in `genkit.runs`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from genkit.errors import GenkitError


def to_uint8(images: Tensor) -> Tensor:
    """Map floats in [-1, 1] to uint8 in [0, 255] (round to nearest, clamp)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """Map uint8 in [0, 255] to float32 in [-1, 1] (exact inverse of `to_uint8` on its range)."""
    return images.to(torch.float32) / 127.5 - 1


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # briefly; other threads creating files meanwhile get private modes, never open ones
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), fsync, then rename tmp over `path` (same folder, atomic on POSIX)."""
    path = Path(path)
    if path.is_dir():
        raise GenkitError(f"'{path}' is a folder: give a file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise GenkitError(f"cannot write '{path}': '{path.parent}' is a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # After the write: mkstemp makes 0600 files, and writers that replace the file they are given
        # (safetensors' save_file) make their own 0600 one. Give the usual 0666 minus the umask.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Full hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write a JSON file (indented, sorted keys off)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically save tensors as safetensors (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file (never unpickles)."""
    return load_file(str(path), device=str(device))


def save_torch(path: str | Path, obj: Any) -> Path:
    """Atomically torch.save plain containers of tensors (optimizer states, RNG states)."""
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, no arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a unique temporary name and rename it into place only if the block succeeds.

    The temporary and set-aside names are unique (mkdtemp in the same folder): two writers never share
    one, and no name can be planted in advance. Both are removed whatever happens; an older folder of
    the same name is replaced only once the new one is complete, and is put back if the swap fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
        yield tmp
        _fsync_dir(tmp)
        if path.exists():  # replace an older folder of the same name: move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # the swap failed: the previous folder goes back in place
                raise
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array."""
    from torchvision.utils import make_grid as tv_grid

    n = images.shape[0]
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    grid = tv_grid(to_uint8(images.cpu()), nrow=nrow, padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, upscale: int = 0) -> Path:
    """Save images in [-1, 1] as one PNG grid; small images are upscaled (nearest) to be seen."""
    arr = make_grid(images, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    scale = upscale or max(1, 256 // max(images.shape[-1], 1) // 2)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_npz(path: str | Path, images: Tensor, **meta: Any) -> Path:
    """Save samples as .npz: `images` uint8 (N, C, H, W) plus scalar metadata entries."""
    arrays = {"images": to_uint8(images.cpu()).numpy()}
    arrays.update({k: np.asarray(v) for k, v in meta.items()})

    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    return atomic_write(path, write)
