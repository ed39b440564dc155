"""Offline weights: find a file in the usual places and check its SHA-256 before anything loads it.

Search order (the first hit wins):
    1. the explicit path (`--weights PATH`): a file, or a folder holding the file
    2. `$GENKIT_WEIGHTS_DIR/<filename>`
    3. the torch hub cache, `torch.hub.get_dir()/checkpoints/<filename>`
    4. genkit's cache, `${XDG_CACHE_HOME:-~/.cache}/genkit/<filename>`

Nothing is ever downloaded. As torch hub does, a file name may carry the first hex digits of
its SHA-256 before the extension (`pt_inception-2015-12-05-6726825d.pth`); the file found is
hashed and refused on a mismatch, before any `torch.load` can unpickle it.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from genkit.errors import GenkitError
from genkit.io import sha256_file

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torch hub's convention, 8+ hex digits
ENV = "GENKIT_WEIGHTS_DIR"


def hash_prefix(filename: str) -> str | None:
    """The SHA-256 prefix a file name carries (`name-6726825d.pth` -> '6726825d'), or None."""
    match = HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def search_dirs() -> list[tuple[str, Path | None]]:
    """The folders searched after the explicit path, as (label, folder or None when unset)."""
    env = os.environ.get(ENV)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return [(f"${ENV}", Path(env).expanduser() if env else None),
            ("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints"),
            ("genkit cache", cache / "genkit")]


def _explicit(filename: str, explicit: str | Path) -> Path:
    """The file an explicit path names: the path itself, or `filename` inside that folder."""
    path = Path(explicit).expanduser()
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise GenkitError(f"weights: '{explicit}' is neither a file nor a folder holding '{filename}'")
    return path


def find_weights(filename: str, explicit: str | Path | None = None) -> Path | None:
    """The first existing candidate for `filename` in the search order, or None."""
    if explicit is not None:
        return _explicit(filename, explicit)
    for _, folder in search_dirs():
        if folder is not None and (folder / filename).is_file():
            return folder / filename
    return None


def _missing(filename: str, prefix: str | None, url: str | None, option: str) -> GenkitError:
    places = ", ".join(f"{label} ({folder if folder else 'unset'})" for label, folder in search_dirs())
    sha = f" (SHA-256 {prefix}...)" if prefix else ""
    fetch = f"fetch it from {url} and put" if url else "put"
    return GenkitError(f"weights file '{filename}'{sha} not found in: {places}; genkit downloads nothing: "
                       f"{fetch} it in ${ENV} or pass {option}")


def check_sha256(path: Path, prefix: str) -> str:
    """Hash `path` and refuse it unless its SHA-256 starts with `prefix`; return the full hex."""
    actual = sha256_file(path)
    if not actual.startswith(prefix.lower()):
        raise GenkitError(f"weights file '{path}' has SHA-256 {actual}, expected one starting with {prefix}: "
                          f"wrong or corrupted file")
    return actual


def resolve_weights(filename: str, explicit: str | Path | None = None, sha256_prefix: str | None = None,
                    url: str | None = None, option: str = "--weights PATH") -> Path:
    """Find `filename` (explicit path, $GENKIT_WEIGHTS_DIR, torch hub cache, genkit cache) and check its hash.

    Args:
        filename: the canonical file name, e.g. 'pt_inception-2015-12-05-6726825d.pth'.
        explicit: a file or a folder given by the user; when given, it must hold the file.
        sha256_prefix: expected start of the SHA-256; None: the hex digits in `filename`, if any;
            "": no check (a file the user named, whose hash is only recorded).
        url: where the file can be downloaded by hand, quoted in the error when it is missing.
        option: how the caller's user names the file explicitly, quoted in that error.
    """
    return locate_weights(filename, explicit, sha256_prefix, url, option)[0]


def locate_weights(filename: str, explicit: str | Path | None = None, sha256_prefix: str | None = None,
                   url: str | None = None, option: str = "--weights PATH") -> tuple[Path, str]:
    """`resolve_weights`, also returning the file's full SHA-256 (hashed once)."""
    prefix = hash_prefix(filename) if sha256_prefix is None else sha256_prefix
    path = find_weights(filename, explicit)
    if path is None:
        raise _missing(filename, prefix, url, option)
    return path, check_sha256(path, prefix or "")


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """torch.load a state dict on CPU with weights_only=True (never arbitrary unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message runs over many lines: keep its first
        raise GenkitError(f"weights file '{path}' refused by weights_only loading: it holds more than tensors "
                          f"({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise GenkitError(f"weights file '{path}' does not hold a state dict (got {type(state).__name__})")
    return state
