"""Bits/dim of a trained family on integer images (`genkit eval bpd`): one formula for every family.

Flows are scored by their exact change of variables, denoising families by the probability-flow
ODE (`genkit.samplers.likelihood`); both dequantize the same way and use the same bits/dim formula.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from genkit.errors import GenkitError
from genkit.families.base import Denoising, Family, Likelihood
from genkit.progress import Progress
from genkit.samplers.likelihood import bits_per_dim, dequantize, ode_log_likelihood, reduce_bits


def family_bits_per_dim(
    family: Family, images_uint8: Tensor, *, batch_size: int = 16, generator: torch.Generator | None = None,
    n_bits: int | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
    progress: bool = False, **kwargs: Any,
) -> dict[str, Any]:
    """Bits/dim of a family on integer images: dequantize, then the family's log p(x); mean, std over images and
    the mean's standard error std / sqrt(n) (with Hutchinson's divergence its noise is in the spread: the probes
    are drawn per image).

    Flows (`Likelihood` families): the exact change of variables. `images_uint8` are 8-bit;
    a flow trained on n_bits < 8 levels (Glow's n_bits_x, the family's `n_bits`) sees them
    reduced to its levels and is scored in bits per n_bits-bit dimension, as Glow reports.
    Denoising families: `ode_log_likelihood` over the family's sigma range (DDPM: the ends of its sigma
    table), images in [0, 2^n_bits) (default 8 bits); `kwargs` go to `ode_log_likelihood`
    (exact_divergence, hutchinson_samples, rtol, atol, max_batch). The field is the family's unclipped
    `denoise` (DDPM's `clip_sample` clamps x0_hat in ddim and ancestral only). `progress` reports images done.
    """
    if images_uint8.dim() != 4 or tuple(images_uint8.shape[1:]) != tuple(family.sample_shape):
        raise GenkitError(f"family_bits_per_dim: images must be (N, *{tuple(family.sample_shape)}), "
                          f"got {tuple(images_uint8.shape)}")
    if batch_size < 1:
        raise GenkitError(f"batch_size must be >= 1, got {batch_size}")
    flow = isinstance(family, Likelihood)
    if not flow and not isinstance(family, Denoising):
        raise GenkitError(f"family '{family.name}' has no likelihood: bits/dim needs a flow (nice, glow) or a "
                          "denoising family (ddpm, rectified_flow, ldm)")
    if flow:
        if kwargs or sigma_min is not None or sigma_max is not None:
            bad = next(iter(kwargs), "sigma_min" if sigma_min is not None else "sigma_max")
            raise GenkitError(f"family_bits_per_dim: '{bad}' is an ODE option; flow '{family.name}' is exact")
        if n_bits not in (None, family.n_bits):
            raise GenkitError(f"family_bits_per_dim: n_bits={n_bits}, but the flow models {family.n_bits}-bit data")
        n_bits = family.n_bits
        images_uint8 = reduce_bits(images_uint8, n_bits)
    n_bits = 8 if n_bits is None else n_bits
    x = dequantize(images_uint8, generator, n_bits)
    was_training = family.nets.training
    family.nets.eval()
    try:
        with Progress(len(x), "bits/dim", "image", disable=not progress) as bar:
            if flow:
                log_p = _flow_log_probs(family, x, batch_size, bar)
                info: dict[str, Any] = {"method": "exact change of variables (flow)"}
            else:
                log_p, info = _ode_log_probs(family, x, batch_size, generator, sigma_min, sigma_max, kwargs, bar)
    finally:
        family.nets.train(was_training)
    bpd = bits_per_dim(-log_p, x[0].numel(), n_bits)
    std = float(bpd.std()) if len(bpd) > 1 else 0.0
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_std": std, "bits_per_dim_se": std / math.sqrt(len(bpd)),
            "nats_per_dim": float(bpd.mean()) * math.log(2), "n": len(bpd), "dims": x[0].numel(),
            "n_bits": n_bits, **info}


@torch.no_grad()
def _flow_log_probs(family: Likelihood, x: Tensor, batch_size: int, bar: Progress) -> Tensor:
    """log p(x) of a flow's exact change of variables, in float64 on the CPU."""
    chunks = []
    for start in range(0, len(x), batch_size):
        chunks.append(family.log_prob(x[start:start + batch_size].to(family.device)).detach().cpu().double())
        bar.update(len(chunks[-1]))
    return torch.cat(chunks)


def _ode_log_probs(family: Denoising, x: Tensor, batch_size: int, generator: torch.Generator | None,
                   sigma_min: float | None, sigma_max: float | None, kwargs: dict,
                   bar: Progress) -> tuple[Tensor, dict]:
    """log p(x) along the probability-flow ODE over the family's sigma range, with the solver's info."""
    lo, hi = family.sigma_range()
    sigma_min = lo if sigma_min is None else sigma_min
    sigma_max = hi if sigma_max is None else sigma_max
    chunks, infos = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size].to(family.device)
        log_p, info = ode_log_likelihood(family.denoise, batch, sigma_min, sigma_max, generator=generator, **kwargs)
        chunks.append(log_p.detach().cpu().double())
        infos.append(info)
        bar.update(len(batch))
    return torch.cat(chunks), {"method": "probability-flow ODE, instantaneous change of variables (dopri5)",
                               "field": "unclipped probability-flow ODE",
                               "divergence": infos[0]["divergence"], "probes": infos[0]["probes"],
                               "nfe": sum(info["nfe"] for info in infos),
                               "sigma_min": sigma_min, "sigma_max": sigma_max}
