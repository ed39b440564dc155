"""CMMD: Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation".

    CMMD = scale * MMD^2(X, Y),   MMD^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j),
    k(x, y) = exp(-||x - y||^2 / (2 sigma^2)),   sigma = 10,   scale = 1000,

over CLIP ViT-L/14@336px image embeddings, L2-normalised (`--features cmmd`, genkit.eval.features). The
estimator is the minimum-variance (biased) one of Gretton et al. 2012, eq. 5: every mean runs over all
pairs, the diagonals included, as the reference's `mmd` computes it (google-research/google-research,
cmmd/distance.py; there in float32 JAX, here in float64, over row blocks so that no N x N matrix is held).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from genkit.errors import GenkitError

SIGMA = 10.0    # the Gaussian kernel's bandwidth (the paper's and the reference's _SIGMA)
SCALE = 1000.0  # makes the values human-readable (the reference's _SCALE)
_BLOCK_ELEMENTS = 2**24  # kernel entries per block: 128 MiB of float64


class MetricSettings(Protocol):
    """What `cmmd_values` reads of genkit.eval.engine.EvalSettings (the engine imports this module)."""

    features: str


def mean_rbf_kernel(x: Tensor, y: Tensor, sigma: float = SIGMA) -> Tensor:
    """mean_ij exp(-||x_i - y_j||^2 / (2 sigma^2)) over all pairs; ||x - y||^2 = |x|^2 + |y|^2 - 2 x.y."""
    gamma = 1.0 / (2.0 * sigma**2)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)                        # (n,), (m,)
    step = max(1, _BLOCK_ELEMENTS // max(y.shape[0], 1))
    total = x.new_zeros(())
    for start in range(0, x.shape[0], step):
        stop = start + step
        d2 = x_sq[start:stop, None] + y_sq[None, :] - 2.0 * (x[start:stop] @ y.T)   # (b, m)
        total = total + torch.exp(-gamma * d2).sum()
    return total / (x.shape[0] * y.shape[0])


def cmmd(real: Tensor, fake: Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale * MMD^2 of two embedding sets (N, d), (M, d), Gaussian RBF kernel, biased estimator, float64."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1] or min(len(real), len(fake)) < 1:
        raise GenkitError(f"CMMD needs embeddings (N, d) and (M, d) with the same d, N, M >= 1; got real "
                          f"{tuple(real.shape)}, fake {tuple(fake.shape)}")
    x, y = real.detach().double(), fake.detach().double()
    k_xx, k_yy, k_xy = mean_rbf_kernel(x, x, sigma), mean_rbf_kernel(y, y, sigma), mean_rbf_kernel(x, y, sigma)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))


def cmmd_values(real: Tensor, fake: Tensor, s: MetricSettings) -> dict[str, float]:
    """CMMD (Jayasumana et al. 2024) of the features of --real and --fake; only on `--features cmmd`."""
    if s.features != "cmmd":
        raise GenkitError(f"CMMD is defined on L2-normalised CLIP ViT-L/14@336px embeddings: use --features cmmd "
                          f"(got --features {s.features})")
    value = cmmd(real, fake)
    return {"cmmd": value, "value": value, "sigma": SIGMA, "scale": SCALE}
