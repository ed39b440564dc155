"""Shared samplers: one contract for every iterative family (after k-diffusion and EDM).

Convention
----------
A sampler is a plain function ``sample_<method>(D, z, sigmas, *, generator, **options)``.

* ``D(z, sigma, **cond) -> x0_hat`` is the family's denoiser; ``sigma`` has shape (B,).
* ``sigmas`` is a decreasing 1-D grid of ``steps + 1`` sigmas (`genkit.samplers.schedules`) that
  ends at 0 (the last step denoises) or at a positive sigma_min (the sampler returns its state
  there, with no final denoising evaluation: N evaluations, N intervals). It may start at
  ``inf`` (rectified flow, zero-terminal-SNR schedules) for the samplers that allow it.
* The state is kept in VP-scaled coordinates ``z = (x0 + sigma * eps) / sqrt(1 + sigma^2)``
  = ``alpha * x0 + s * eps`` with ``alpha = 1/sqrt(1 + sigma^2)``, ``s = sigma * alpha``.
  For DDPM this is exactly x_t (alpha = sqrt(alpha_bar_t)); it stays finite at
  sigma = inf, where z is pure noise. Initial noise is therefore plain N(0, I), as in
  diffusers, and the last step onto sigma = 0 returns x0.
* Latent families (latent diffusion) declare ``latent_shape``, the shape of the state, and
  ``decode_latents(z)``; samplers run unchanged on latents and the driver decodes each batch's
  final state to images.

Families reach this contract through the adapters in `genkit.samplers.adapters`
(``from_eps``, ``from_v``, ...). Each sampler declares the capability it needs from a family
(``denoise`` for iterative families; see `genkit.families.base`). The driver
`genkit.families.sampling.sample` refuses a sampler that does not fit with the list of those
that do, and reports the number of function evaluations (NFE) it spent. Each sampler declares the
grid it runs on by default for each noise process (`SamplerSpec.grids`) and its evaluations per
step (`SamplerSpec.evals`), from which the driver turns an NFE budget into a step count.

This package holds the math only: the samplers, the sigma grids (`schedules`), the adapters,
classifier-free guidance (`guidance`), compiled networks (`compiled`) and the
probability-flow likelihood (`likelihood`). It knows no family.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from genkit.errors import SamplerError
from genkit.samplers.adapters import Denoiser
from genkit.samplers.consistency import sample_consistency
from genkit.samplers.ddim import sample_ancestral, sample_ddim
from genkit.samplers.multistep import sample_dpmpp_2m, sample_dpmpp_3m, sample_ipndm, sample_unipc
from genkit.samplers.ode import sample_euler, sample_euler_arctan, sample_heun, sample_heun_arctan, sample_rk45
from genkit.samplers.schedules import KARRAS_SIGMA_MAX, GridSpec

# The noise processes of denoising families (`Denoising.noise_process`), which pick a sampler's grid
VP, VE, FLOW = "vp", "ve", "flow"


def _grids(vp: str, ve: str = "family", flow: str | None = None) -> dict[str, GridSpec]:
    return {VP: GridSpec.parse(vp), VE: GridSpec.parse(ve), FLOW: GridSpec.parse(flow or vp)}


FAMILY_GRIDS = _grids("family", "family", "family")
LOGSNR_END = "logsnr:end=sigma_min"  # uniform in log-SNR from sigma 80, no final denoising call (DPM-Solver's)


class SamplerSpec(NamedTuple):
    fn: Callable[..., Tensor] | None  # None: the family's own method of that capability (direct, autoregressive)
    needs: str              # the family capability it needs: a `capability` of genkit.families.base
    adaptive: bool = False  # chooses its own steps: integrates over the family's whole sigma range
    clips: bool = False     # clamps x0_hat to the family's `clip_x0` (diffusers' clip_sample); the ODE does not
    # the grid it runs on unless told, per noise process (vp: DDPM/LDM, ve: EDM, flow: rectified flow);
    # measured on the digits families (docs/benchmarks.md, "Few-step sampling")
    grids: dict[str, GridSpec] = FAMILY_GRIDS
    evals: tuple[int, int] = (1, 1)  # network evaluations per step, and on the step onto sigma = 0

    def nfe(self, steps: int, ends_at_zero: bool) -> int:
        """Network evaluations of `steps` steps on a grid that ends at zero or at sigma_min."""
        per, last = self.evals
        return (steps - 1) * per + last if ends_at_zero else steps * per


SAMPLERS: dict[str, SamplerSpec] = {
    # DDIM, ancestral and the multistep solvers that step with x0_hat (DPM-Solver++, UniPC, iPNDM: DDIM's
    # higher-order generalisations) clamp x0_hat when the family asks (`clip_x0`), as diffusers' DDIM/DDPM
    # clip_sample and its multistep schedulers' thresholding do (DPM-Solver++'s advice for pixel models;
    # on ddpm_digits it turns FD at 5 NFE from 21.7 into 7.8, docs/benchmarks.md). Euler and Heun in sigma
    # and rk45 integrate the unclipped probability-flow field (clamping inside it would be another ODE than
    # the model's, and its likelihood another number)
    "ancestral": SamplerSpec(sample_ancestral, "denoise", clips=True),
    "ddim": SamplerSpec(sample_ddim, "denoise", clips=True),
    # EDM's Euler and Heun in sigma (Karras et al. 2022, Alg. 1; k-diffusion's sample_euler / sample_heun)
    "euler": SamplerSpec(sample_euler, "denoise", grids=_grids("family")),
    "heun": SamplerSpec(sample_heun, "denoise", grids=_grids("karras"), evals=(2, 1)),
    # the same two methods in arctan time (`genkit.samplers.ode`): they can start at sigma = inf
    "euler-arctan": SamplerSpec(sample_euler_arctan, "denoise"),
    "heun-arctan": SamplerSpec(sample_heun_arctan, "denoise", evals=(2, 1)),
    # multistep solvers (`genkit.samplers.multistep`): one evaluation per step. Grids, from the screen of every
    # grid on ddpm_digits and rf_digits (docs/benchmarks.md, "Few-step sampling"): vp, log-SNR from sigma 80
    # (a grid from a cosine schedule's sigma ~2e4 diverges without clamping, as in latent space); flow, uniform
    # in t (the family's own grid from t = 1, or to sigma_min for UniPC), which beat log-SNR for all four
    "dpmpp-2m": SamplerSpec(sample_dpmpp_2m, "denoise", clips=True, grids=_grids(LOGSNR_END, flow="family")),
    "dpmpp-3m": SamplerSpec(sample_dpmpp_3m, "denoise", clips=True, grids=_grids(LOGSNR_END, flow="family")),
    "unipc": SamplerSpec(sample_unipc, "denoise", clips=True,
                         grids=_grids(LOGSNR_END, flow="time-uniform:end=sigma_min")),
    "ipndm": SamplerSpec(sample_ipndm, "denoise", clips=True, grids=_grids(LOGSNR_END, flow="family")),
    "rk45": SamplerSpec(sample_rk45, "denoise", adaptive=True),
    # multistep consistency sampling (`genkit.samplers.consistency`): jump to x0_hat, re-noise, one evaluation
    # per sigma; one step at sigma_max is a consistency model's (or MeanFlow's) one-step sample
    "consistency": SamplerSpec(sample_consistency, "denoise"),
    # one network pass per batch (GAN generator, flow inverse): family.direct(n, *, generator,
    # batch_size, **options) with the family's own options (truncation, temperature)
    "direct": SamplerSpec(None, "direct"),
    # token by token with a KV cache (AR prior): family.autoregressive(n, *, generator, batch_size,
    # temperature, top_k, top_p) -> (images, forward passes)
    "autoregressive": SamplerSpec(None, "autoregressive"),
}

__all__ = ["KARRAS_SIGMA_MAX", "SAMPLERS", "SamplerSpec", "CountingDenoiser", "autocast", "PRECISIONS",
           "GridSpec", "VP", "VE", "FLOW"]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (NFE)."""

    def __init__(self, D: Denoiser):
        self.D, self.nfe = D, 0

    def __call__(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        self.nfe += 1
        return self.D(z, sigma, **cond)


# `precision` of sampling: the dtype the networks run in under autocast (the sampler state stays float32)
PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` in `precision` ("no": a null context)."""
    if precision not in PRECISIONS:
        raise SamplerError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
