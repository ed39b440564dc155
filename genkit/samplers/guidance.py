"""Guidance as a denoiser wrapper any sampler can use: classifier-free guidance (Ho & Salimans 2022)
and autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024).

Both extrapolate from a weaker prediction D_0 towards a better one D_1 with the same formula:

    D_w(z; sigma) = D_1 + (w - 1) (D_1 - D_0)          (= D_0 + w (D_1 - D_0))

- classifier-free: D_1 = D(z; sigma, c), D_0 = D(z; sigma, null). Both come from one network call
  on the doubled batch.
- autoguidance: D_1 = the good model D(z; sigma, c), D_0 = the guide, a smaller or less-trained
  model of the same data, D_bad(z; sigma, c), at the same condition. It helps unconditional models
  too. Two networks cannot share one call, so each step costs two: the good model on the batch, then
  the guide on it; both count in the NFE.

w = 1 is D_1 exactly (the weaker branch is then not evaluated at all), w = 0 is D_0, w > 1 guides.
Written as D_1 + (w - 1)(D_1 - D_0), w = 1 is exact in floating point too. x0, eps and v predictions
are affine in each other at fixed (z, sigma), so guiding x0_hat equals guiding any of them.

It combines the *raw* predictions: a family's clipping (`clip_x0`, applied by ddim and ancestral
through `genkit.samplers.adapters.clipped`) clamps the guided x0_hat afterwards, as GLIDE and
diffusers do. Clamping each branch first would let x_c + (w - 1)(x_c - x_u) leave [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from genkit.errors import SamplerError


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b.to(a.device)]) if isinstance(a, Tensor) else list(a) + list(b)


def slice_condition(cond: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows start:stop of every per-sample entry of a condition dict (tensors, lists of prompts)."""
    return {k: v[start:stop] for k, v in cond.items()}


def combine(x_1: Tensor, x_0: Tensor, scale: float) -> Tensor:
    """x_1 + (w - 1)(x_1 - x_0): guidance from the weaker prediction x_0 towards x_1 (exact at w = 1)."""
    return x_1 + (scale - 1) * (x_1 - x_0)


def guided(D: Callable[..., Tensor], cond: dict[str, Any], uncond: dict[str, Any] | None,
           scale: float | None, guide: Callable[..., Tensor] | None = None,
           guide_cond: dict[str, Any] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """D(z, sigma) with `cond` bound, guided by `scale` (None or 1: no guidance) against `uncond`
    (classifier-free), or, when a `guide` denoiser is given, against it at `guide_cond` (autoguidance)."""
    if scale is None or scale == 1:
        return lambda z, sigma: D(z, sigma, **cond)
    if guide is not None:
        return autoguided(D, cond, guide, guide_cond or {}, scale)
    if uncond is None:
        raise SamplerError(f"guidance={scale} needs a conditional family (e.g. model.class_cond: true)")
    if set(cond) != set(uncond):
        raise SamplerError(f"conditional keys {sorted(cond)} differ from unconditional {sorted(uncond)}")

    def D_guided(z: Tensor, sigma: Tensor) -> Tensor:
        both = D(torch.cat([z, z]), torch.cat([sigma, sigma]), **{k: _cat(cond[k], uncond[k]) for k in cond})
        x_c, x_u = both.chunk(2)
        return combine(x_c, x_u, scale)

    return D_guided


def autoguided(D: Callable[..., Tensor], cond: dict[str, Any], guide: Callable[..., Tensor],
               guide_cond: dict[str, Any], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """D_bad + w (D_good - D_bad): the good denoiser D at `cond`, guided by scale w against `guide` at
    `guide_cond` (its own embedding of the same condition): two network calls per step."""

    def D_autoguided(z: Tensor, sigma: Tensor) -> Tensor:
        return combine(D(z, sigma, **cond), guide(z, sigma, **guide_cond).to(z.dtype), scale)

    return D_autoguided


def guided_evaluations(scale: float | None, guide: object | None) -> int:
    """Network calls per denoiser call: 2 under autoguidance (the guide's call counts), else 1 (classifier-free
    guidance evaluates both branches in one call on the doubled batch)."""
    return 2 if guide is not None and scale is not None and scale != 1 else 1
