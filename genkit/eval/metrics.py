"""Feature-space sample metrics besides FD: KID, Inception Score and PRDC.

- KID: Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4; polynomial-kernel unbiased
  MMD^2 averaged over random subsets, as torch-fidelity's `kid_features_to_metric` computes it.
- IS: Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 4;
  exp(E_x KL(p(y|x) || p(y))) per split of the shuffled rows, as torch-fidelity's `isc_features_to_metric`.
- PRDC: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models";
  precision, recall, density, coverage with k-NN balls, as the `prdc` package defines them.

Everything is computed in float64 on the inputs' device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from genkit.errors import GenkitError

_CHUNK_ELEMENTS = 2**24  # distance-matrix entries per chunk: 128 MiB of float64


def _check_pair(real: Tensor, fake: Tensor, metric: str) -> None:
    if real.dim() != 2 or fake.dim() != 2:
        raise GenkitError(f"{metric} needs features (N, d), got real {tuple(real.shape)}, "
                          f"fake {tuple(fake.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise GenkitError(f"{metric} dimension mismatch: real has d={real.shape[1]}, fake has d={fake.shape[1]}")


def _std(values: Tensor) -> float:
    """Population std (ddof=0), as np.std in torch-fidelity."""
    return float(values.std(correction=0)) if values.numel() > 1 else 0.0


def polynomial_kernel(x: Tensor, y: Tensor, degree: int, gamma: float, coef: float) -> Tensor:
    """k(x, y) = (gamma <x, y> + coef)^degree, the KID kernel (Binkowski et al. 2018)."""
    return (gamma * (x @ y.T) + coef) ** degree      # (n_x, n_y)


def mmd2_unbiased(k_xx: Tensor, k_xy: Tensor, k_yy: Tensor) -> Tensor:
    """MMD^2 with the diagonals of K_xx, K_yy dropped (Binkowski et al.'s 'unbiased' estimate)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kid_subset_size(n_real: int, n_fake: int, subset_size: int | None = None) -> int:
    """The KID subset size: `subset_size` if given, else 1000 when both sets hold more, else half the smaller set.

    torch-fidelity's rule, followed exactly (`metric_kid.kid_features_to_metric`): a size larger than either set
    is refused, a size equal to it is accepted (every subset is then that whole set). Its default, 1000, would be
    the whole set for n <= 1000, every subset alike and the std 0; so below 1001 the default is n // 2.
    """
    n = min(n_real, n_fake)
    if subset_size is None:
        if n < 4:
            raise GenkitError(f"KID needs at least 4 images per side for its default subset size n // 2, got "
                              f"n_real={n_real}, n_fake={n_fake}")
        return 1000 if n > 1000 else n // 2
    if subset_size < 2:
        raise GenkitError(f"--kid-subset-size must be >= 2, got {subset_size}")
    if subset_size > n:
        raise GenkitError(f"--kid-subset-size {subset_size} is larger than the sets (n_real={n_real}, "
                          f"n_fake={n_fake}): give at most {n}")
    return subset_size


def kid(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int | None = None, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std (ddof=0) of subset MMD^2.

    Each of `subsets` draws `kid_subset_size(n_real, n_fake, subset_size)` rows of real, then of fake, without
    replacement, exactly as torch-fidelity draws them (`np.random.RandomState(seed).choice(n, m, replace=False)`):
    with its `rng_seed` = `seed` the subsets, and so the values, are torch-fidelity's. gamma defaults to 1/d.
    """
    _check_pair(real, fake, "KID")
    m = kid_subset_size(real.shape[0], fake.shape[0], subset_size)
    if subsets < 1 or degree < 1:
        raise GenkitError(f"KID needs subsets >= 1 and degree >= 1, got {subsets} and {degree}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    x_all, y_all = real.detach().double(), fake.detach().double()
    rng = np.random.RandomState(seed)
    mmds = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(x_all.shape[0], m, replace=False)).to(x_all.device)]  # (m, d)
        y = y_all[torch.from_numpy(rng.choice(y_all.shape[0], m, replace=False)).to(y_all.device)]  # (m, d)
        k_xx, k_xy, k_yy = (polynomial_kernel(a, b, degree, gamma, coef) for a, b in ((x, x), (x, y), (y, y)))
        mmds[s] = mmd2_unbiased(k_xx, k_xy, k_yy).cpu()
    return float(mmds.mean()), _std(mmds)


def inception_score(logits: Tensor, splits: int = 10, shuffle_seed: int | None = 0) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): mean and std (ddof=0) over `splits` chunks.

    The rows are first shuffled as torch-fidelity shuffles them (`np.random.RandomState(shuffle_seed)
    .permutation(N)`, its default `samples_shuffle`), so that the splits do not follow the order of the images
    (a class-sorted folder split in order scores ~1); `shuffle_seed=None` keeps the order.
    """
    if logits.dim() != 2:
        raise GenkitError(f"inception_score needs logits (N, C), got {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise GenkitError(f"inception_score splits must be in [1, N={n}], got {splits}")
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n)).to(logits.device)]
    log_p = logits.detach().double().log_softmax(dim=1)                  # (N, C) log p(y|x)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]             # (n_i, C)
        log_q = chunk.exp().mean(dim=0).log()                            # (C,) log p(y)
        kl = (chunk.exp() * (chunk - log_q)).sum(dim=1)                  # (n_i,)
        scores.append(kl.mean().exp())
    scores_t = torch.stack(scores).cpu()
    return float(scores_t.mean()), _std(scores_t)


def _row_chunks(n_rows: int, n_cols: int) -> range:
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    return range(0, n_rows, step)


def knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance of each row of x to its k-th nearest other row: the (k+1)-th smallest, self included."""
    radii, chunks = [], _row_chunks(x.shape[0], x.shape[0])
    for start in chunks:
        dist = torch.cdist(x[start:start + chunks.step], x)                # (c, n)
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def prdc(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls, float64."""
    _check_pair(real, fake, "PRDC")
    n_real, n_fake = real.shape[0], fake.shape[0]
    if not 1 <= k < min(n_real, n_fake):
        raise GenkitError(f"PRDC needs 1 <= k < min(n_real, n_fake) = {min(n_real, n_fake)}, got k={k}")
    real, fake = real.detach().double(), fake.detach().double()
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)          # (n_real,), (n_fake,)
    in_real_balls = torch.empty(n_fake, dtype=torch.float64, device=real.device)
    real_recalled = torch.zeros(n_real, dtype=torch.bool, device=real.device)
    nearest_fake = torch.full((n_real,), math.inf, dtype=torch.float64, device=real.device)
    chunks = _row_chunks(n_fake, n_real)
    for start in chunks:
        stop = start + chunks.step
        dist = torch.cdist(fake[start:stop], real)                    # (c, n_real)
        in_real_balls[start:stop] = (dist < r_real).sum(dim=1).double()
        real_recalled |= (dist < r_fake[start:stop, None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, dist.min(dim=0).values)
    return {
        "precision": float((in_real_balls > 0).double().mean()),
        "recall": float(real_recalled.double().mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float((nearest_fake < r_real).double().mean()),
    }
