"""Sigma grids for the shared samplers, and the arctan time of the ODE samplers.

A grid of ``n`` steps is ``n`` decreasing positive sigmas from ``sigma_max`` to ``sigma_min``
followed by a final 0 (the convention of `genkit.samplers`), in float64.

    karras   sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
             (Karras et al. 2022, eq. 5; k-diffusion's `get_sigmas_karras`)
    uniform  t_i uniform between arctan(sigma_max) and arctan(sigma_min), sigma_i = tan(t_i):
             equal steps in the time of `genkit.samplers.ode`; sigma_max = inf (t = pi/2) is allowed
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from genkit.errors import SamplerError


def arctan_time(sigma: float) -> float:
    """t = arctan(sigma) in [0, pi/2]: alpha = cos t, s = sin t; sigma = inf is t = pi/2."""
    return math.atan(sigma)


def sigma_at(t: float) -> float:
    """The inverse of `arctan_time`: tan t, exactly inf at t = pi/2 (where tan gives ~1.6e16)."""
    return math.inf if t >= math.pi / 2 else math.tan(t)


def _check_ends(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise SamplerError(f"a sigma grid needs n >= 1 steps, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise SamplerError(f"a sigma grid needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): n sigmas uniform in sigma^(1/rho), then 0."""
    _check_ends(n, sigma_min, sigma_max)
    if math.isinf(sigma_max):
        raise SamplerError("the karras grid needs a finite sigma_max; use the uniform grid to start at inf")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas uniform in t = arctan(sigma) from sigma_max (may be inf) to sigma_min, then 0."""
    _check_ends(n, sigma_min, sigma_max)
    t = torch.linspace(arctan_time(sigma_max), arctan_time(sigma_min), n, dtype=torch.float64)
    sigmas = torch.tensor([sigma_at(float(ti)) for ti in t], dtype=torch.float64)
    sigmas[-1] = sigma_min if n > 1 else sigma_max  # exact ends: tan(arctan(x)) is x up to rounding
    sigmas[0] = sigma_max
    return torch.cat([sigmas, sigmas.new_zeros(1)])


GRIDS: dict[str, Callable[[int, float, float], Tensor]] = {
    "karras": karras_sigmas,
    "uniform": uniform_sigmas,
}


def grid(kind: str, steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The `steps`-step grid of the named kind (see GRIDS), decreasing, with a final 0."""
    if kind not in GRIDS:
        raise SamplerError(f"unknown sigma grid '{kind}'; known: {', '.join(GRIDS)}")
    return GRIDS[kind](steps, sigma_min, sigma_max)
