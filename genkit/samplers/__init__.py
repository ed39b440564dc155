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
* Latent families (latent diffusion) expose ``latent_shape``, the shape of the state, and
  ``decode_latents(z)``; samplers run unchanged on latents and `sample` decodes each batch's
  final state to images.

Families reach this contract through the adapters in `genkit.samplers.adapters`
(``from_eps``, ``from_v``, ...). Each sampler declares the capability it needs from a family
(``denoise`` for iterative families); `sample` refuses a sampler that does not fit with the
list of those that do, and reports the number of function evaluations (NFE) it spent.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from genkit.errors import SamplerError
from genkit.samplers.adapters import randn
from genkit.samplers.compiled import compile_mode, compiled_nets
from genkit.samplers.guidance import guided, slice_condition
from genkit.samplers.ddim import sample_ancestral, sample_ddim
from genkit.samplers.schedules import grid
from genkit.samplers.ode import sample_dpmpp_2m, sample_euler, sample_heun, sample_rk45


class SamplerSpec(NamedTuple):
    fn: Callable[..., Tensor] | None  # None: the family's own method `needs` generates (direct, autoregressive)
    needs: str              # the family capability (method name) this sampler calls
    adaptive: bool = False  # chooses its own steps: integrates over the family's whole sigma range


SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(sample_ancestral, "denoise"),
    "ddim": SamplerSpec(sample_ddim, "denoise"),
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


@dataclass
class SampleOutput:
    images: Tensor  # (n, C, H, W) in [-1, 1]
    nfe: int        # network evaluations per image batch (the sampler's cost)
    sampler: str
    steps: int | None
    seconds: float  # wall time of the whole call


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (NFE)."""

    def __init__(self, D: Callable[..., Tensor]):
        self.D, self.nfe = D, 0

    def __call__(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        self.nfe += 1
        return self.D(z, sigma, **cond)


def samplers_for(family: Any) -> list[str]:
    """Names of the samplers whose capability the family has."""
    return [name for name, spec in SAMPLERS.items() if hasattr(family, spec.needs)]


def resolve_sampler(family: Any, name: str | None) -> tuple[str, SamplerSpec]:
    """The family's default sampler, or `name` if it exists and fits the family."""
    name = name or family.default_sampler
    fitting = samplers_for(family)
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")
    if name not in fitting:
        raise SamplerError(
            f"sampler '{name}' does not fit family '{family.name}'; use one of: {', '.join(fitting)}")
    return name, SAMPLERS[name]


RECIPE_OPTIONS = ("eta", "temperature", "truncation", "top_k", "top_p")  # sampler options a recipe's `sample` section sets


def sampler_function(family: Any, spec: SamplerSpec) -> Callable[..., Tensor]:
    """The function that takes the sampler's options: the shared sampler or the family's method."""
    return spec.fn if spec.fn is not None else getattr(family, spec.needs)


def sampler_options(family: Any, sample_cfg: Any) -> dict[str, Any]:
    """The options of a recipe's `sample` section that its sampler takes (DDIM's eta, temperature ...)."""
    _, spec = resolve_sampler(family, sample_cfg.sampler)
    params = inspect.signature(sampler_function(family, spec)).parameters
    options = {k: getattr(sample_cfg, k) for k in RECIPE_OPTIONS
               if k in params and getattr(sample_cfg, k, None) is not None}
    if getattr(sample_cfg, "guidance", 1.0) != 1:
        options["guidance"] = sample_cfg.guidance  # classifier-free guidance scale (`sample`'s own argument)
    return options


def _check_options(name: str, fn: Callable, options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [p for p, v in params.items()
                   if v.kind is v.KEYWORD_ONLY and p not in ("generator", "batch_size")]
        raise SamplerError(f"sampler '{name}' has no option '{unknown[0]}'; its options: "
                           f"{', '.join(allowed) or 'none'}")


# `precision` of `sample`: the dtype the networks run in under autocast (the sampler state stays float32)
PRECISIONS: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` in `precision` ("no": a null context)."""
    if precision not in PRECISIONS:
        raise SamplerError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def sample(
    family: Any, n: int, *, sampler: str | None = None, steps: int | None = None,
    generator: torch.Generator | None = None, batch_size: int | None = None, schedule: str | None = None,
    noise: Tensor | None = None, condition: dict[str, Any] | None = None, guidance: float | None = None,
    precision: str = "no", compile: bool | str = False, **options: Any,
) -> SampleOutput:
    """Generate n images with a registered sampler, in batches, networks in eval mode.

    `schedule` picks the sigma grid of iterative families: None is the family's own
    (DDPM: its discrete timesteps), "karras" (EDM rho=7) or "uniform" (arctan time) span
    the family's sigma range. `noise` (n, C, H, W), if given, is the initial state at the
    grid's first sigma instead of fresh N(0, I) (reflow pairs, fixed-noise comparisons).
    `condition` (e.g. ``{"labels": [3]}``) goes to the family's `conditions(n, ...)`; a
    conditional family without it samples its own default (class-balanced labels).
    `guidance` is the classifier-free guidance scale w (`genkit.samplers.guidance`; 1: none).
    `precision` "bf16" / "fp16" runs the networks under autocast (faster on CPUs with bf16
    instructions and on GPUs); the sampler's own arithmetic stays float32.
    `compile=True` (or a torch.compile mode, e.g. "max-autotune") runs the networks as
    `torch.compile`d copies with frozen weights (`genkit.samplers.compiled`): a one-off
    compile (tens of seconds), then faster steps.
    """
    if noise is not None and len(noise) != n:
        raise SamplerError(f"noise holds {len(noise)} states for n={n}")
    if n < 1:
        raise SamplerError(f"n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise SamplerError(f"steps must be >= 1, got {steps}")
    name, spec = resolve_sampler(family, sampler)
    _check_options(name, sampler_function(family, spec), options)
    steps = None if spec.adaptive or spec.needs != "denoise" else steps or family.default_steps
    batch_size = batch_size or n
    cast = autocast(family.device, precision)
    mode = compile_mode(family, compile)
    nets = compiled_nets(family, mode) if mode else contextlib.nullcontext()
    t0 = time.perf_counter()
    was_training = family.nets.training
    family.nets.eval()
    try:
        with cast, nets:
            if spec.needs == "denoise":
                sigmas = full_range(family) if spec.adaptive else sigma_grid(family, steps, schedule)
                conds = _conditions(family, n, condition)
                images, nfe = _sample_denoising(family, n, spec.fn, sigmas, generator, batch_size, options, noise,
                                                conds, guidance)
            elif noise is not None:
                raise SamplerError(f"sampler '{name}' does not start from given noise; use a denoising sampler")
            else:
                extra = dict(condition or {}, **({"guidance": guidance} if guidance is not None else {}))
                _check_options(name, sampler_function(family, spec), extra)
                out = getattr(family, spec.needs)(n, generator=generator, batch_size=batch_size, **options, **extra)
                images, nfe = out if isinstance(out, tuple) else (out, 1)  # (images, nfe) or images
    finally:
        family.nets.train(was_training)
    if images.is_cuda:
        torch.cuda.synchronize()
    return SampleOutput(images.clamp(-1, 1), nfe, name, steps, time.perf_counter() - t0)


def _sigma_range(family: Any) -> tuple[float, float]:
    if hasattr(family, "sigma_range"):
        return family.sigma_range()
    own = family.sigmas(family.default_steps)
    return float(own[own > 0].min()), float(own.max())


# EDM's sigma_max: above it the data signal is ~1% of the noise for data in [-1, 1]; a Karras grid
# over a cosine DDPM's full range (sigma_max ~ 2e4) would waste its large steps there.
KARRAS_SIGMA_MAX = 80.0


def sigma_grid(family: Any, steps: int, schedule: str | None = None) -> Tensor:
    """The family's own grid, or a named one over its sigma range (karras: capped at EDM's 80)."""
    if schedule is None:
        return family.sigmas(steps)
    sigma_min, sigma_max = _sigma_range(family)
    if schedule == "karras":
        sigma_max = min(sigma_max, KARRAS_SIGMA_MAX)
    return grid(schedule, steps, sigma_min, sigma_max)


def full_range(family: Any) -> Tensor:
    """[sigma_max, sigma_min, 0]: the end points an adaptive solver integrates between."""
    sigma_min, sigma_max = _sigma_range(family)
    return torch.tensor([sigma_max, sigma_min, 0.0], dtype=torch.float64)


def state_shape(family: Any) -> tuple[int, ...]:
    """Shape of one sampler state: `latent_shape` for latent families, else the image `sample_shape`."""
    return tuple(getattr(family, "latent_shape", family.sample_shape))


def _conditions(family: Any, n: int, condition: dict[str, Any] | None) -> tuple[dict, dict | None]:
    """(cond, uncond) keywords of the family's denoiser for n samples."""
    if hasattr(family, "conditions"):
        return family.conditions(n, **(condition or {}))
    if condition:
        raise SamplerError(f"family '{family.name}' takes no condition; got {', '.join(condition)}")
    return {}, None


def _sample_denoising(family, n, fn, sigmas, generator, batch_size, options, noise=None,
                      conds=({}, None), guidance=None) -> tuple[Tensor, int]:
    device = family.device
    cond, uncond = conds
    chunks, nfe = [], 0
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if noise is None:
            z = randn((b, *state_shape(family)), generator, device)
        else:
            z = noise[start:start + b].to(device)
        D = CountingDenoiser(guided(family.denoise, slice_condition(cond, start, start + b),
                                    None if uncond is None else slice_condition(uncond, start, start + b),
                                    guidance))
        x = fn(D, z, sigmas, generator=generator, **options)
        if hasattr(family, "decode_latents"):  # latent diffusion: the first stage decodes the final state
            x = family.decode_latents(x)
        chunks.append(x.float())
        nfe = D.nfe
    return torch.cat(chunks), nfe
