"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper any sampler can use.

    D_w(z; sigma) = D(z; sigma, c) + (w - 1) (D(z; sigma, c) - D(z; sigma, null))

w = 1 is the conditional prediction, w = 0 the unconditional one, w > 1 guides. This is the
usual eps_u + w (eps_c - eps_u) written so that w = 1 is exact: x0, eps and v predictions are
affine in each other at fixed (z, sigma), so guiding x0_hat equals guiding any of them. Both
predictions come from one network call on the doubled batch.

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


def guided(D: Callable[..., Tensor], cond: dict[str, Any], uncond: dict[str, Any] | None,
           scale: float | None) -> Callable[[Tensor, Tensor], Tensor]:
    """D(z, sigma) with `cond` bound, guided by `scale` against `uncond` (None or 1: no guidance)."""
    if scale is None or scale == 1:
        return lambda z, sigma: D(z, sigma, **cond)
    if uncond is None:
        raise SamplerError(f"guidance={scale} needs a conditional family (e.g. model.class_cond: true)")
    if set(cond) != set(uncond):
        raise SamplerError(f"conditional keys {sorted(cond)} differ from unconditional {sorted(uncond)}")

    def D_guided(z: Tensor, sigma: Tensor) -> Tensor:
        both = D(torch.cat([z, z]), torch.cat([sigma, sigma]), **{k: _cat(cond[k], uncond[k]) for k in cond})
        x_c, x_u = both.chunk(2)
        return x_c + (scale - 1) * (x_c - x_u)

    return D_guided
