"""`sample(family, n, ...)`: generate with any family through the shared samplers.

The samplers themselves (`genkit.samplers`) are free functions over a denoiser and a sigma grid;
this module drives a family through them: it picks the sampler the family declares a capability
for, draws the initial noise, binds the family's conditions and guidance (classifier-free, or
autoguidance by another family), runs
batches under the requested precision (and torch.compile), decodes latents, and reports the NFE.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from genkit.config import SampleConfig
from genkit.errors import SamplerError
from genkit.families.base import Denoising, Family
from genkit.progress import Progress
from genkit.rng import randn
from genkit.samplers import SAMPLERS, CountingDenoiser, SamplerSpec, autocast
from genkit.samplers.adapters import clipped
from genkit.samplers.compiled import compile_mode, compiled_nets
from genkit.samplers.guidance import guided, guided_evaluations, slice_condition
from genkit.samplers.schedules import FAMILY, GridSpec


@dataclass
class SampleOutput:
    images: Tensor  # (n, C, H, W) in [-1, 1]
    nfe: int        # network evaluations per image batch (the sampler's cost)
    sampler: str
    steps: int | None
    seconds: float  # wall time of the whole call
    schedule: str | None = None  # the sigma grid's spec (`genkit.samplers.schedules.GridSpec`); None: no grid


def samplers_for(family: Family) -> list[str]:
    """Names of the samplers whose capability the family declares."""
    caps = family.capabilities()
    return [name for name, spec in SAMPLERS.items() if spec.needs in caps]


def resolve_sampler(family: Family, name: str | None) -> tuple[str, SamplerSpec]:
    """The family's default sampler, or `name` if it exists and fits the family."""
    if name is not None and name not in SAMPLERS:
        raise SamplerError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")
    fitting = samplers_for(family)
    name = name or family.default_sampler
    if name is None or name not in fitting:
        asked = f"sampler '{name}' does not fit" if name else "no sampler fits"
        fits = f"use one of: {', '.join(fitting)}" if fitting else f"it samples nothing by itself{family.sampling_hint}"
        raise SamplerError(f"{asked} family '{family.name}'; {fits}")
    return name, SAMPLERS[name]


def sampler_function(family: Family, spec: SamplerSpec) -> Callable[..., Any]:
    """The function that takes the sampler's options: the shared sampler, or the family's own method."""
    if spec.fn is not None:
        return spec.fn
    if spec.needs == "direct":
        return family.direct
    return family.autoregressive


RECIPE_OPTIONS = ("eta", "temperature", "truncation", "top_k", "top_p")  # sampler options of a recipe's `sample`


def sampler_options(family: Family, sample_cfg: SampleConfig) -> dict[str, Any]:
    """The options of a recipe's `sample` section that its sampler takes (DDIM's eta, temperature ...)."""
    _, spec = resolve_sampler(family, sample_cfg.sampler)
    params = inspect.signature(sampler_function(family, spec)).parameters
    options = {k: getattr(sample_cfg, k) for k in RECIPE_OPTIONS
               if k in params and getattr(sample_cfg, k) is not None}
    if sample_cfg.guidance != 1:
        options["guidance"] = sample_cfg.guidance  # classifier-free guidance scale (`sample`'s own argument)
    return options


def recipe_sample_defaults(family: Family, sample_cfg: SampleConfig, sampler: str | None, steps: int | None,
                           nfe: int | None, options: dict[str, Any],
                           guided: bool = False) -> tuple[str | None, int | None, dict[str, Any]]:
    """Sampler, steps and options: those given, else a run's recipe `sample:` section (the sampler a recipe
    ships was measured for it), else the family's defaults (None). The recipe's steps and options apply only
    to the recipe's own sampler, its steps only when neither steps nor nfe is given, and its guidance scale
    not when a scale is given or the sampling is `guided` otherwise."""
    if sample_cfg.sampler is None or sampler not in (None, sample_cfg.sampler):
        return sampler, steps, options
    if steps is None and nfe is None:
        steps = sample_cfg.steps
    recipe_options = sampler_options(family, sample_cfg)
    if guided:
        recipe_options.pop("guidance", None)
    return sample_cfg.sampler, steps, {**recipe_options, **options}


def _check_options(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [p for p, v in params.items()
                   if v.kind is v.KEYWORD_ONLY and p not in ("generator", "batch_size")]
        raise SamplerError(f"sampler '{name}' has no option '{unknown[0]}'; its options: "
                           f"{', '.join(allowed) or 'none'}")


def sigma_grid(family: Denoising, steps: int, schedule: GridSpec | str | None = None) -> Tensor:
    """The family's own grid (None, "family"), or a named one over its sigma range (`GridSpec`)."""
    spec = GridSpec.parse(schedule) if isinstance(schedule, str) else schedule
    if spec is None or spec.name == FAMILY:
        return family.sigmas(steps)
    sigma_min, sigma_max = family.sigma_range()
    return spec.sigmas(steps, sigma_min, sigma_max)


def resolve_grid(family: Denoising, spec: SamplerSpec, schedule: GridSpec | str | None) -> GridSpec:
    """The grid asked for, or the one the sampler recommends for the family's noise process."""
    if schedule is None:
        return spec.grids[family.noise_process]
    return GridSpec.parse(schedule) if isinstance(schedule, str) else schedule


def steps_for_nfe(name: str, spec: SamplerSpec, nfe: int, grid: GridSpec, per_call: int = 1) -> int:
    """The step count that spends exactly `nfe` network evaluations on `grid` (`per_call` network calls per
    denoiser call: 2 under autoguidance), or a one-line refusal that lists the possible values."""
    ends_at_zero = grid.end == "zero"
    for steps in range(1, nfe + 1):
        if per_call * spec.nfe(steps, ends_at_zero) == nfe:
            return steps
    possible = ", ".join(str(per_call * spec.nfe(k, ends_at_zero)) for k in range(1, 5))
    raise SamplerError(f"sampler '{name}' cannot spend exactly {nfe} evaluations on the grid '{grid}': "
                       f"its possible NFE there are {possible}, ...")


def full_range(family: Denoising, grid: GridSpec | None = None) -> Tensor:
    """[sigma_max, sigma_min, 0]: the end points an adaptive solver integrates between; the family's whole
    range, or the ends of `grid` (a log-SNR or Karras grid starts at sigma = 80 rather than a cosine
    schedule's ~2e4, where an epsilon network's field is stiff)."""
    if grid is None:
        sigma_min, sigma_max = family.sigma_range()
    else:
        positive = sigma_grid(family, 2, grid)
        positive = positive[positive > 0]
        sigma_max, sigma_min = float(positive[0]), float(positive[-1])
    return torch.tensor([sigma_max, sigma_min, 0.0], dtype=torch.float64)


@torch.inference_mode()
def sample(
    family: Family, n: int, *, sampler: str | None = None, steps: int | None = None,
    generator: torch.Generator | None = None, batch_size: int | None = None, schedule: str | None = None,
    nfe: int | None = None, noise: Tensor | None = None, labels: Tensor | Sequence[int] | None = None,
    prompts: Sequence[str] | None = None, guidance: float | None = None, guide: Family | None = None,
    precision: str = "no", compile: bool | str = False, progress: bool = False, **options: Any,
) -> SampleOutput:
    """Generate n images with a registered sampler, in batches, networks in eval mode.

    `schedule` picks the sigma grid of denoising families (`genkit.samplers.schedules.GridSpec`:
    "karras", "karras:rho=5", "logsnr:end=sigma_min", "time-uniform", "family" = the family's own,
    e.g. DDPM's discrete timesteps); None is the grid the sampler recommends for the family's noise
    process (`SamplerSpec.grids`); for the adaptive `rk45` only the grid's ends count (default: the
    family's whole range). `nfe` instead of `steps`: the step count that spends exactly that
    many network evaluations (refused when the sampler cannot). `noise` (n, *latent_shape), if given, is the initial state at the
    grid's first sigma instead of fresh N(0, I) (reflow pairs, fixed-noise comparisons).
    `labels` / `prompts` go to the family's `conditions(n, ...)`; a conditional family without them
    samples its own default (class-balanced labels, its sample prompts).
    `guidance` is the classifier-free guidance scale w (`genkit.samplers.guidance`; 1: none); with a
    `guide` (a denoising family of the same state space: a smaller or earlier model of the same data)
    it is the autoguidance scale instead: D_guide + w (D - D_guide), the guide's calls counted in the NFE.
    `precision` "bf16" / "fp16" runs the networks under autocast (faster on CPUs with bf16
    instructions and on GPUs); the sampler's own arithmetic stays float32.
    `compile=True` (or a torch.compile mode, e.g. "max-autotune") runs the networks as
    `torch.compile`d copies with frozen weights (`genkit.samplers.compiled`): a one-off
    compile (tens of seconds), then faster steps.
    `progress=True` reports the image batches done, images/s and the ETA (`genkit.progress`: a
    bar on a terminal, plain lines elsewhere) when there is more than one batch of a shared
    sampler; a family's own `direct`/`autoregressive` method batches inside itself, unreported.
    """
    if noise is not None and len(noise) != n:
        raise SamplerError(f"noise holds {len(noise)} states for n={n}")
    if n < 1:
        raise SamplerError(f"n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise SamplerError(f"steps must be >= 1, got {steps}")
    name, spec = resolve_sampler(family, sampler)
    _check_options(name, sampler_function(family, spec), options)
    _check_grid_options(name, spec, steps, schedule, nfe)
    grid = None
    if spec.needs == "denoise" and (not spec.adaptive or schedule is not None):
        grid = resolve_grid(family, spec, schedule)
    if nfe is not None:
        steps = steps_for_nfe(name, spec, nfe, grid, guided_evaluations(guidance, guide))
    steps = None if spec.adaptive or spec.needs != "denoise" else steps or family.default_steps
    batch_size = batch_size or min(n, DEFAULT_BATCH)
    if compile is not False and not family.compile_sampling:
        raise SamplerError(f"compile: family '{family.name}' samples through methods other than its networks' "
                           "forward, which torch.compile does not reach; sample without compile")
    mode = compile_mode(compile)
    nets = compiled_nets(family.nets, mode) if mode else contextlib.nullcontext()
    t0 = time.perf_counter()
    was_training = family.nets.training
    guide_training = guide is not None and guide.nets.training
    family.nets.eval()
    if guide is not None:
        guide.nets.eval()
    try:
        with autocast(family.device, precision), nets, _out_of_memory_hint(batch_size):
            if spec.needs == "denoise":
                sigmas = full_range(family, grid) if spec.adaptive else sigma_grid(family, steps, grid)
                conds = family.conditions(n, labels=labels, prompts=prompts)
                guiding = None if guide is None else (guide, _guide_condition(family, guide, n, labels, prompts))
                images, nfe = _sample_denoising(family, n, spec, sigmas, generator, batch_size, options, noise,
                                                conds, guidance, progress and n > batch_size, guiding)
            else:
                if guide is not None:
                    raise SamplerError(f"guide: sampler '{name}' is not a denoising sampler; autoguidance guides "
                                       "the denoiser of a diffusion or flow model")
                images, nfe = _sample_own(family, name, spec, n, generator, batch_size, options, noise,
                                          labels, prompts, guidance)
    finally:
        family.nets.train(was_training)
        if guide is not None:
            guide.nets.train(guide_training)
    if images.is_cuda:
        torch.cuda.synchronize()
    return SampleOutput(images.clamp(-1, 1), nfe, name, steps, time.perf_counter() - t0,
                        None if grid is None else str(grid))


DEFAULT_BATCH = 256  # images per network batch when none is given: memory bounded for any n


def _check_grid_options(name: str, spec: SamplerSpec, steps: int | None, schedule: str | None,
                        nfe: int | None = None) -> None:
    """Refuse a step count, NFE or sigma grid the sampler would ignore (rather than ignoring it silently)."""
    given = [w for w, v in (("steps", steps), ("schedule", schedule), ("nfe", nfe)) if v is not None]
    if spec.needs != "denoise" and given:
        raise SamplerError(f"sampler '{name}' takes no --{given[0]}: it is not a denoising sampler "
                           "(one network pass per batch, or one per token)")
    counts = [w for w in given if w != "schedule"]  # an adaptive sampler's grid gives only its ends
    if spec.adaptive and counts:
        raise SamplerError(f"sampler '{name}' chooses its own steps between the grid's ends: drop "
                           f"--{counts[0]} and set its tolerances (--rtol, --atol)")
    if nfe is not None and steps is not None:
        raise SamplerError("give --steps or --nfe, not both")
    if nfe is not None and nfe < 1:
        raise SamplerError(f"nfe must be >= 1, got {nfe}")


@contextlib.contextmanager
def _out_of_memory_hint(batch_size: int) -> Iterator[None]:
    """Out of memory while sampling: a one-line error that says how many images a batch held."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise SamplerError(f"out of memory with {batch_size} images per batch: lower --batch-size") from e
    except RuntimeError as e:  # CPU allocators raise RuntimeError("... can't allocate memory ...")
        if "allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        raise SamplerError(f"out of memory with {batch_size} images per batch: lower --batch-size") from e


def _sample_own(family: Family, name: str, spec: SamplerSpec, n: int, generator: torch.Generator | None,
                batch_size: int, options: dict[str, Any], noise: Tensor | None, labels: Any, prompts: Any,
                guidance: float | None) -> tuple[Tensor, int]:
    """A family's own one-pass or token-by-token method: (images, NFE)."""
    if noise is not None:
        raise SamplerError(f"sampler '{name}' does not start from given noise; use a denoising sampler")
    extra = {k: v for k, v in (("labels", labels), ("prompts", prompts), ("guidance", guidance)) if v is not None}
    fn = sampler_function(family, spec)
    _check_options(name, fn, extra)
    out = fn(n, generator=generator, batch_size=batch_size, **options, **extra)
    return out if spec.needs == "autoregressive" else (out, 1)  # (images, forward passes); direct: one pass


def _guide_condition(family: Family, guide: Family, n: int, labels: Any, prompts: Any) -> dict[str, Any]:
    """The guide's own denoiser keywords for the same labels / prompts, after checking that it can guide."""
    if not isinstance(guide, Denoising):
        raise SamplerError(f"guide: family '{guide.name}' is not a denoising family; autoguidance needs a "
                           "diffusion or flow model of the same data")
    if tuple(guide.latent_shape) != tuple(family.latent_shape):
        raise SamplerError(f"guide: its states have shape {tuple(guide.latent_shape)}, the model's "
                           f"{tuple(family.latent_shape)}: guide with a model of the same data and resolution")
    if guide.device != family.device:
        raise SamplerError(f"guide: on {guide.device}, the model on {family.device}: load both on one device")
    return guide.conditions(n, labels=labels, prompts=prompts)[0]


def sampler_denoiser(family: Family, spec: SamplerSpec, cond: dict[str, Any], uncond: dict[str, Any] | None,
                     guidance: float | None, guide: Family | None = None,
                     guide_cond: dict[str, Any] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser a shared sampler runs: the family's raw x0_hat, combined by classifier-free guidance
    (or autoguidance against `guide`'s raw x0_hat), then clamped to the family's `clip_x0` by the samplers
    that clip (ddim, ancestral), as GLIDE and diffusers do. The ODE solvers get the unclipped field."""
    D = guided(family.denoise, cond, uncond, guidance, None if guide is None else guide.denoise, guide_cond)
    bound = family.clip_x0 if spec.clips else None
    return D if bound is None else clipped(D, bound)


def _sample_denoising(family: Family, n: int, spec: SamplerSpec, sigmas: Tensor,
                      generator: torch.Generator | None, batch_size: int, options: dict[str, Any],
                      noise: Tensor | None, conds: tuple[dict, dict | None], guidance: float | None,
                      progress: bool = False, guiding: tuple[Family, dict] | None = None) -> tuple[Tensor, int]:
    """The images of a shared sampler, batch by batch, through `sampler_denoiser`; NFE counts network calls
    (a guide's too)."""
    device = family.device
    cond, uncond = conds
    guide, guide_cond = guiding or (None, {})
    chunks, nfe = [], 0
    with Progress(n, "sample", "image", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            if noise is None:
                z = randn((b, *family.latent_shape), generator, device)
            else:
                z = noise[start:start + b].to(device)
            D = CountingDenoiser(sampler_denoiser(family, spec, slice_condition(cond, start, start + b),
                                                  None if uncond is None else slice_condition(uncond, start, start + b),
                                                  guidance, guide, slice_condition(guide_cond, start, start + b)))
            x = spec.fn(D, z, sigmas, generator=generator, **options)
            chunks.append(family.decode_latents(x).float())
            nfe = D.nfe * guided_evaluations(guidance, guide)
            bar.update(b)
    return torch.cat(chunks), nfe
