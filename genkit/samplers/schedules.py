"""Sigma grids for the shared samplers, and the arctan time of the ODE samplers.

A grid of ``n`` steps is a decreasing float64 tensor of ``n + 1`` sigmas: ``n`` intervals, one
network evaluation per interval for a one-step-one-evaluation sampler. It ends in one of two ways:

    end=zero       n positive sigmas from sigma_max to sigma_min, then 0: the last step is the
                   denoising step onto sigma = 0 (EDM, k-diffusion, diffusers' final_sigmas_type="zero")
    end=sigma_min  n + 1 positive sigmas from sigma_max to sigma_min and no final denoising call: the
                   sampler returns its state at sigma_min (DPM-Solver's default, diffusers'
                   final_sigmas_type="sigma_min"); all n evaluations go to the integration

The spacing between sigma_max and sigma_min (lambda = -log sigma is the log-SNR of the VP-scaled
state, alpha / s = 1 / sigma):

    karras        sigma_i = (sigma_max^(1/rho) + i/(m-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
                  (Karras et al. 2022, eq. 5; k-diffusion's `get_sigmas_karras`); rho configurable
    logsnr        uniform in lambda (Lu et al. 2022, DPM-Solver's "logSNR" skip type; k-diffusion's
                  `get_sigmas_exponential`)
    time-uniform  uniform in t = arctan(sigma), the angle of the VP-scaled state (alpha = cos t,
                  s = sin t): the time of `genkit.samplers.ode`, and the cosine schedule's own time;
                  sigma_max = inf (t = pi/2) is allowed
    family        the family's own grid (`Denoising.sigmas`: DDPM's timesteps, rectified flow's
                  uniform t), which ends at zero

A grid is named by a spec string ``NAME[:KEY=VALUE,...]`` with keys ``rho`` (karras) and ``end``:
``karras``, ``karras:rho=5``, ``logsnr:end=sigma_min``. `GridSpec` parses and prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from genkit.errors import SamplerError

# EDM's sigma_max: above it the data signal is ~1% of the noise for data in [-1, 1]; karras and logsnr
# grids over a cosine DDPM's full range (sigma_max ~ 2e4) or from rectified flow's inf start here.
KARRAS_SIGMA_MAX = 80.0

ENDS = ("zero", "sigma_min")


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


def _finish(sigmas: Tensor, sigma_min: float, sigma_max: float, end: str) -> Tensor:
    """Exact end points (the spacings are exact only up to rounding), then the final 0 for end=zero."""
    sigmas[0] = sigma_max
    if len(sigmas) > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if end == "zero" else sigmas


def _points(n: int, end: str) -> int:
    """Positive sigmas of an n-step grid: n (then 0) or n + 1 (ending at sigma_min)."""
    if end not in ENDS:
        raise SamplerError(f"unknown grid end '{end}'; known: {', '.join(ENDS)}")
    return n if end == "zero" else n + 1


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, end: str = "zero") -> Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): sigmas uniform in sigma^(1/rho)."""
    _check_ends(n, sigma_min, sigma_max)
    if math.isinf(sigma_max):
        raise SamplerError("the karras grid needs a finite sigma_max; use time-uniform to start at inf")
    if not rho > 0:
        raise SamplerError(f"the karras grid needs rho > 0, got {rho}")
    ramp = torch.linspace(0, 1, _points(n, end), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, sigma_min, sigma_max, end)


def logsnr_sigmas(n: int, sigma_min: float, sigma_max: float, end: str = "zero") -> Tensor:
    """Uniform in the log-SNR lambda = -log sigma (DPM-Solver's logSNR steps)."""
    _check_ends(n, sigma_min, sigma_max)
    if math.isinf(sigma_max):
        raise SamplerError("the logsnr grid needs a finite sigma_max; use time-uniform to start at inf")
    lam = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), _points(n, end), dtype=torch.float64)
    return _finish(torch.exp(-lam), sigma_min, sigma_max, end)


def time_uniform_sigmas(n: int, sigma_min: float, sigma_max: float, end: str = "zero") -> Tensor:
    """Uniform in t = arctan(sigma) from sigma_max (may be inf) to sigma_min."""
    _check_ends(n, sigma_min, sigma_max)
    t = torch.linspace(arctan_time(sigma_max), arctan_time(sigma_min), _points(n, end), dtype=torch.float64)
    sigmas = torch.tensor([sigma_at(float(ti)) for ti in t], dtype=torch.float64)
    return _finish(sigmas, sigma_min, sigma_max, end)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "karras": karras_sigmas,
    "logsnr": logsnr_sigmas,
    "time-uniform": time_uniform_sigmas,
}
CAPPED = ("karras", "logsnr")  # start at min(sigma_max, KARRAS_SIGMA_MAX): they need a finite start
FAMILY = "family"


@dataclass(frozen=True)
class GridSpec:
    """A named sigma grid: its spacing, karras' rho, and how it ends (see the module docstring)."""

    name: str = FAMILY
    rho: float = 7.0
    end: str = "zero"

    @classmethod
    def parse(cls, text: str) -> GridSpec:
        """'NAME[:KEY=VALUE,...]' -> GridSpec, e.g. 'karras:rho=5', 'logsnr:end=sigma_min'."""
        name, _, rest = text.strip().partition(":")
        if name not in (*GRIDS, FAMILY):
            raise SamplerError(f"unknown sigma grid '{name}'; known: {', '.join((*GRIDS, FAMILY))}")
        fields: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in ("rho", "end") or key in fields:
                raise SamplerError(f"grid '{text}': options are rho=FLOAT (karras) and end=zero|sigma_min, "
                                   f"got '{item}'")
            fields[key] = value
        if "rho" in fields and name != "karras":
            raise SamplerError(f"grid '{text}': rho is an option of the karras grid only")
        if name == FAMILY and fields.get("end", "zero") != "zero":
            raise SamplerError(f"grid '{text}': the family's own grid ends at zero")
        if fields.get("end", "zero") not in ENDS:
            raise SamplerError(f"grid '{text}': end must be one of {', '.join(ENDS)}, got '{fields['end']}'")
        try:
            rho = float(fields.get("rho", 7.0))
        except ValueError:
            raise SamplerError(f"grid '{text}': rho must be a number, got '{fields['rho']}'") from None
        if not (math.isfinite(rho) and rho > 0):
            raise SamplerError(f"grid '{text}': rho must be > 0, got {rho}")
        return cls(name, rho, fields.get("end", "zero"))

    def __str__(self) -> str:
        options = ([f"rho={self.rho:g}"] if self.name == "karras" and self.rho != 7.0 else []) + \
                  ([f"end={self.end}"] if self.end != "zero" else [])
        return self.name + (":" + ",".join(options) if options else "")

    def sigmas(self, steps: int, sigma_min: float, sigma_max: float) -> Tensor:
        """The `steps`-step grid over [sigma_min, sigma_max] (karras, logsnr: from at most 80)."""
        if self.name == FAMILY:
            raise SamplerError("the family grid comes from the family (`Denoising.sigmas`)")
        if self.name in CAPPED:
            sigma_max = min(sigma_max, KARRAS_SIGMA_MAX)
        options = {"rho": self.rho} if self.name == "karras" else {}
        return GRIDS[self.name](steps, sigma_min, sigma_max, end=self.end, **options)


def grid(kind: str, steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The `steps`-step grid of a spec string (see `GridSpec`) over [sigma_min, sigma_max]."""
    return GridSpec.parse(kind).sigmas(steps, sigma_min, sigma_max)
