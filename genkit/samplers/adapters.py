"""Adapters from network parametrisations to the denoiser contract x0_hat = D(z; sigma).

Notation (VP-scaled coordinates, see `genkit.samplers`):
    alpha = 1 / sqrt(1 + sigma^2)     signal scale  (sqrt(alpha_bar_t) for DDPM)
    s     = sigma * alpha             noise scale   (sqrt(1 - alpha_bar_t) for DDPM)
    z     = alpha * x0 + s * eps
A network predicts eps, x0 or v = alpha * eps - s * x0 (Salimans & Ho, 2022); each adapter
turns its output into x0_hat. alpha and s broadcast against z (shape (B, 1, 1, 1)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# D(z, sigma, **cond) -> x0_hat: the denoiser every sampler takes (sigma of shape (B,))
Denoiser = Callable[..., Tensor]


def vp_coefficients(sigma: Tensor | float) -> tuple[Tensor | float, Tensor | float]:
    """(alpha, s) = (1/sqrt(1+sigma^2), sigma/sqrt(1+sigma^2)); sigma = inf gives (0, 1)."""
    if isinstance(sigma, Tensor):
        alpha = torch.rsqrt(1 + sigma**2)
        s = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma * alpha)
        return alpha, s
    if math.isinf(sigma):
        return 0.0, 1.0
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


def from_eps(z: Tensor, eps: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """x0_hat from an epsilon prediction: (z - s eps) / alpha."""
    return (z - s * eps) / alpha


def from_x0(z: Tensor, x0: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """x0_hat from an x0 prediction (the identity, kept for a uniform table)."""
    return x0


def from_v(z: Tensor, v: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """x0_hat from a v prediction: alpha z - s v (since alpha^2 + s^2 = 1)."""
    return alpha * z - s * v


def clipped(D: Denoiser, bound: float) -> Denoiser:
    """D with x0_hat clamped to [-bound, bound] (diffusers' clip_sample), applied after any guidance."""
    return lambda z, sigma, **cond: D(z, sigma, **cond).clamp(-bound, bound)


def eps_from_x0(z: Tensor, x0: Tensor, alpha: float, s: float) -> Tensor:
    """The noise implied by x0_hat: (z - alpha x0) / s."""
    return (z - alpha * x0) / s


def training_target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """The regression target of each parametrisation (eps, x0 or v)."""
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - s * x0


TO_X0 = {"epsilon": from_eps, "x0": from_x0, "v": from_v}
