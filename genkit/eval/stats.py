"""Reference statistics files: Gaussian feature statistics tagged with the protocol behind them.

genkit writes `.npz` with `mu`, `sigma` (float64), `n`, `protocol` (JSON: feature extractor,
protocol, weights SHA-256, resize, dim) and `genkit_version`. Files from other tools
(pytorch-fid, clean-fid) hold only `mu` and `sigma`: the user names their protocol as a prefix,
e.g. `pytorch-fid:ref.npz`. Statistics of different protocols are never compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genkit.errors import GenkitError
from genkit.io import atomic_write
from genkit.version import __version__

# Foreign protocols a user may name for a statistics file without metadata.
FOREIGN = {
    "pytorch-fid": {"features": "inception", "protocol": "pytorch-fid"},
    "tf": {"features": "inception", "protocol": "tf"},
    "torch-fidelity": {"features": "inception", "protocol": "tf"},
    "clean-fid": {"features": "inception", "protocol": "clean-fid"},
}
# What must agree between two sets of statistics for their FD to mean anything.
PROTOCOL_KEYS = ("features", "protocol", "weights_sha256", "resize", "dim")


@dataclass
class RefStats:
    mu: np.ndarray     # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    n: int
    protocol: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def save_stats(path: str | Path, stats: RefStats) -> Path:
    """Atomically write statistics with their protocol and genkit's version."""
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
              "n": np.asarray(stats.n), "protocol": np.asarray(json.dumps(stats.protocol, sort_keys=True)),
              "genkit_version": np.asarray(__version__)}

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def split_prefix(spec: str) -> tuple[str | None, str]:
    """`pytorch-fid:ref.npz` -> ("pytorch-fid", "ref.npz"); a plain path -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and head in FOREIGN:
        return head, tail
    return None, spec


def is_stats_file(spec: str) -> bool:
    """Whether a SPEC names a statistics .npz (mu/sigma) rather than images."""
    prefix, path = split_prefix(spec)
    if prefix is not None:
        return True
    p = Path(path)
    if p.suffix != ".npz" or not p.is_file():
        return False
    with np.load(p, allow_pickle=False) as z:
        return "mu" in z.files and "sigma" in z.files


def load_stats(spec: str) -> RefStats:
    """Read genkit, pytorch-fid or clean-fid statistics; foreign files need a protocol prefix."""
    prefix, path = split_prefix(spec)
    if not Path(path).is_file():
        raise GenkitError(f"statistics file '{path}' not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not {"mu", "sigma"} <= files:
                raise GenkitError(f"'{path}' is not a statistics file: it has no 'mu' and 'sigma'")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in files else 0
            protocol = json.loads(str(z["protocol"])) if "protocol" in files else None
    except (OSError, ValueError) as e:
        raise GenkitError(f"cannot read statistics file '{path}': {e}") from None
    if protocol is None:
        if prefix is None:
            raise GenkitError(f"statistics file '{path}' carries no protocol: name it, e.g. "
                              f"pytorch-fid:{path} or clean-fid:{path} (known: {', '.join(FOREIGN)})")
        protocol = dict(FOREIGN[prefix], dim=int(mu.shape[0]), foreign=prefix)
    _check_finite(path, mu, sigma)
    return RefStats(mu, sigma, n, protocol, source=spec)


def _check_finite(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise GenkitError(f"statistics file '{path}': mu {mu.shape} and sigma {sigma.shape} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise GenkitError(f"statistics file '{path}' holds NaN or inf values")


def check_same_protocol(a: dict[str, Any], b: dict[str, Any], what: str = "statistics") -> None:
    """Refuse to compare statistics computed under different protocols."""
    for key in PROTOCOL_KEYS:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:  # a foreign file does not know the weights' hash
            continue
        if va != vb:
            raise GenkitError(f"{what} were computed under different protocols: {key} "
                              f"{va!r} vs {vb!r}; recompute one side with the other's protocol")
