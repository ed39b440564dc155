"""Fréchet distance between Gaussians fitted to features (Heusel et al. 2017, "GANs Trained by
a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6; Dowson & Landau 1982).

    FD = ||mu_1 - mu_2||^2 + tr(Sigma_1) + tr(Sigma_2) - 2 tr((Sigma_1 Sigma_2)^{1/2})

`GaussianStats` keeps the sufficient statistics (n, sum x, sum x x^T) in float64, so batches
and processes add up exactly before `mean_cov` turns them into (mu, Sigma) once.

The trace term avoids `scipy.linalg.sqrtm` of the non-symmetric Sigma_1 Sigma_2: with
A = Sigma_1^{1/2} (symmetric), Sigma_1 Sigma_2 = A (A Sigma_2 A) A^{-1} is similar to the
symmetric PSD M = A Sigma_2 A, so tr((Sigma_1 Sigma_2)^{1/2}) = sum_i sqrt(lambda_i(M)).
Two `eigh`s in float64; they run on whatever device the inputs live on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Union

import numpy as np
import torch
from torch import Tensor

from genkit.errors import GenkitError

ArrayLike = Union[np.ndarray, Tensor]


def warn_if_few(n: int, d: int) -> None:
    """Warn when too few samples make Sigma singular: its rank is at most n - 1, below d when n <= d."""
    if n <= d:
        warnings.warn(
            f"FD with N={n} samples, not above the feature dimension d={d}: "
            "the covariance is singular and FD biased", stacklevel=2,
        )


class GaussianStats:
    """Running float64 sums n, sum x (d,) and sum x x^T (d, d) of features, for FD's (mu, Sigma)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise GenkitError(f"GaussianStats needs a feature dimension >= 1, got {dim}")
        self.n = torch.zeros((), dtype=torch.float64, device=device)           # count, ()
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)        # (d,)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (d, d)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.sum.shape[0]

    @property
    def count(self) -> int:
        """Number of feature vectors accumulated."""
        return int(self.n.item())

    def update(self, features: Tensor) -> "GaussianStats":
        """Add a batch of features (B, d), any float dtype, accumulated in float64."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise GenkitError(f"features must be (B, {self.dim}), got {tuple(features.shape)}")
        x = features.detach().to(device=self.sum.device, dtype=torch.float64)  # (B, d)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.gram += x.T @ x
        return self

    def all_reduce(self, reduce_fn: Callable[[Tensor], Tensor]) -> "GaussianStats":
        """Replace n, sum and gram by their sums over processes; `reduce_fn(t)` returns the summed t.

        Example: `stats.all_reduce(lambda t: accelerator.reduce(t, "sum"))`. It is called once
        each on n (0-dim), sum (d,) and gram (d, d); every process must call it.
        """
        self.n = reduce_fn(self.n)
        self.sum = reduce_fn(self.sum)
        self.gram = reduce_fn(self.gram)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, Sigma) in float64 numpy, Sigma unbiased (/(n-1)) like np.cov and pytorch-fid."""
        mu, sigma = self.mean_cov_torch()
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def mean_cov_torch(self) -> tuple[Tensor, Tensor]:
        """(mu, Sigma) as float64 tensors on the accumulator's device; see `mean_cov`."""
        n = self.count
        if n < 2:
            raise GenkitError(f"FD needs at least 2 samples per set, got {n}")
        warn_if_few(n, self.dim)
        mu = self.sum / n                                              # (d,)
        sigma = (self.gram - n * torch.outer(mu, mu)) / (n - 1)       # (d, d)
        return mu, (sigma + sigma.T) / 2


def _as_f64(x: ArrayLike, name: str, device: torch.device) -> Tensor:
    if not isinstance(x, (np.ndarray, Tensor)):
        raise GenkitError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    t = torch.as_tensor(x).to(device=device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise GenkitError(f"{name} holds NaN or inf")
    return t


def _check_shapes(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> None:
    for i, (mu, sigma) in enumerate(((mu1, sigma1), (mu2, sigma2)), start=1):
        if mu.dim() != 1:
            raise GenkitError(f"mu{i} must be a vector (d,), got shape {tuple(mu.shape)}")
        if tuple(sigma.shape) != (mu.shape[0], mu.shape[0]):
            raise GenkitError(f"sigma{i} must be ({mu.shape[0]}, {mu.shape[0]}) to match mu{i}, "
                              f"got {tuple(sigma.shape)}")
    if mu1.shape[0] != mu2.shape[0]:
        raise GenkitError(f"FD dimension mismatch: set 1 has d={mu1.shape[0]}, set 2 has d={mu2.shape[0]}")


def sqrtm_psd(sigma: Tensor) -> Tensor:
    """Symmetric square root V diag(sqrt(max(w, 0))) V^T of a symmetric PSD matrix, via eigh."""
    w, v = torch.linalg.eigh(sigma)                 # (d,), (d, d)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """tr((Sigma_1 Sigma_2)^{1/2}) = sum sqrt(eig(A Sigma_2 A)), A = Sigma_1^{1/2}."""
    a = sqrtm_psd(sigma1)
    m = a @ sigma2 @ a
    eig = torch.linalg.eigvalsh((m + m.T) / 2)      # symmetrise away round-off before eigvalsh
    return eig.clamp(min=0).sqrt().sum()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), float64."""
    device = next((x.device for x in (sigma1, mu1, sigma2, mu2) if isinstance(x, Tensor)),
                  torch.device("cpu"))
    mu1, sigma1 = _as_f64(mu1, "mu1", device), _as_f64(sigma1, "sigma1", device)
    mu2, sigma2 = _as_f64(mu2, "mu2", device), _as_f64(sigma2, "sigma2", device)
    _check_shapes(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(fd)


def frechet_distance_from_stats(stats1: GaussianStats, stats2: GaussianStats) -> float:
    """FD between the Gaussians fitted to two accumulators (on the first one's device)."""
    mu1, sigma1 = stats1.mean_cov_torch()
    mu2, sigma2 = stats2.mean_cov_torch()
    return frechet_distance(mu1, sigma1, mu2, sigma2)
