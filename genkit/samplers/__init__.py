"""Shared samplers: one contract for every iterative family (after k-diffusion and EDM).

Convention
----------
A sampler is a plain function ``sample_<method>(D, z, sigmas, *, generator, **options)``.

* ``D(z, sigma, **cond) -> x0_hat`` is the family's denoiser; ``sigma`` has shape (B,).
* ``sigmas`` is a decreasing 1-D grid that ends at 0. It may start at ``inf`` (rectified
  flow, zero-terminal-SNR schedules).
* The state is kept in VP-scaled coordinates ``z = (x0 + sigma * eps) / sqrt(1 + sigma^2)``
  = ``alpha * x0 + s * eps`` with ``alpha = 1/sqrt(1 + sigma^2)``, ``s = sigma * alpha``.
  For DDPM this is exactly x_t (alpha = sqrt(alpha_bar_t)); it stays finite at
  sigma = inf, where z is pure noise. Initial noise is therefore plain N(0, I), as in
  diffusers, and the last step (sigma = 0) returns x0.
* Latent families (latent diffusion) declare ``latent_shape``, the shape of the state, and
  ``decode_latents(z)``; samplers run unchanged on latents and the driver decodes each batch's
  final state to images.

Families reach this contract through the adapters in `genkit.samplers.adapters`
(``from_eps``, ``from_v``, ...). Each sampler declares the capability it needs from a family
(``denoise`` for iterative families; see `genkit.families.base`). The driver
`genkit.families.sampling.sample` refuses a sampler that does not fit with the list of those
that do, and reports the number of function evaluations (NFE) it spent.

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
from genkit.samplers.ddim import sample_ancestral, sample_ddim
from genkit.samplers.ode import sample_dpmpp_2m, sample_euler, sample_heun, sample_rk45


class SamplerSpec(NamedTuple):
    fn: Callable[..., Tensor] | None  # None: the family's own method of that capability (direct, autoregressive)
    needs: str              # the family capability it needs: a `capability` of genkit.families.base
    adaptive: bool = False  # chooses its own steps: integrates over the family's whole sigma range
    clips: bool = False     # clamps x0_hat to the family's `clip_x0` (diffusers' clip_sample); ODE solvers do not


SAMPLERS: dict[str, SamplerSpec] = {
    # DDIM and ancestral clamp x0_hat when the family asks (`clip_x0`), as diffusers' DDIM/DDPM schedulers'
    # clip_sample does; the ODE solvers below integrate the unclipped probability-flow field (clamping
    # inside it would be another ODE than the model's, and its likelihood another number)
    "ancestral": SamplerSpec(sample_ancestral, "denoise", clips=True),
    "ddim": SamplerSpec(sample_ddim, "denoise", clips=True),
    "euler": SamplerSpec(sample_euler, "denoise"),
    "heun": SamplerSpec(sample_heun, "denoise"),
    "dpmpp-2m": SamplerSpec(sample_dpmpp_2m, "denoise"),
    "rk45": SamplerSpec(sample_rk45, "denoise", adaptive=True),
    # one network pass per batch (GAN generator, flow inverse): family.direct(n, *, generator,
    # batch_size, **options) with the family's own options (truncation, temperature)
    "direct": SamplerSpec(None, "direct"),
    # token by token with a KV cache (AR prior): family.autoregressive(n, *, generator, batch_size,
    # temperature, top_k, top_p) -> (images, forward passes)
    "autoregressive": SamplerSpec(None, "autoregressive"),
}

# EDM's sigma_max: above it the data signal is ~1% of the noise for data in [-1, 1]; a Karras grid
# over a cosine DDPM's full range (sigma_max ~ 2e4) would waste its large steps there.
KARRAS_SIGMA_MAX = 80.0


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
