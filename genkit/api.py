"""The Python API: what the CLI and experiments call.

    import genkit
    run = genkit.train("ddpm_digits", overrides=["train.steps=500"], out="runs/demo")
    family = genkit.load(run)                      # EMA weights, eval mode
    images = genkit.sample(family, 64, sampler="ddim", steps=50, seed=0)   # [-1, 1]
    genkit.save_grid(images, "grid.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

import genkit.runs as runs
from genkit.config import Recipe
from genkit.errors import RunError
from genkit.families.base import Family
from genkit.families.sampling import SampleOutput
from genkit.families.sampling import sample as sample_family
from genkit.interop import is_diffusers_folder, load_diffusers
from genkit.io import save_grid as _save_grid
from genkit.training import train as train_run


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe (YAML path or shipped name such as ``"ddpm_digits"``) with ``key=value`` overrides applied."""
    return runs.load_recipe(recipe, overrides)


def train(recipe: str | Path | Recipe | None = None, overrides: Sequence[str] = (), out: str | Path | None = None,
          resume: bool | str | Path = False) -> Path:
    """Train a recipe (path, shipped name or Recipe) into a run folder and return its path.

    Args:
        recipe: a YAML path, the name of a shipped recipe (``"ddpm_digits"``) or a Recipe; optional
            when resuming (the run's own config.yaml is the recipe).
        overrides: dotted ``key=value`` strings, e.g. ``["train.steps=500"]``; ``STAGE.key=value``
            sets an earlier stage's recipe (``first_stage.train.steps=100`` for latent diffusion).
        out: the run folder; default ``runs/<recipe name>``.
        resume: True, or the run folder: continue it from its latest checkpoint. A recipe or overrides
            given too may change only `genkit.runs.RESUME_SAFE` keys (train.steps extends a finished
            run); any other difference is refused, listing each key's old and new value.
    """
    if resume not in (True, False):
        if out is not None and Path(out) != Path(resume):
            raise RunError(f"--out '{out}' and --resume '{resume}' name different run folders")
        out = resume
    recipe, run_dir, changed = runs.run_start(recipe, overrides, None if out is None else Path(out), bool(resume))
    return train_run(recipe, run_dir, resume=bool(resume), changed=changed)


def load(run: str | Path, device: str | torch.device | None = None) -> Family:
    """Load a trained family from a run folder (EMA weights when trained with EMA), in eval mode.

    Args:
        run: the run folder written by `genkit.train` (or `genkit.interop.import_diffusers`), or a
            diffusers pipeline folder (unet/ + scheduler/; see `genkit.interop`).
        device: where to put the networks; default CUDA when available, else CPU.
    """
    run = Path(run)
    if is_diffusers_folder(run):
        return load_diffusers(run, device)
    if not (run / runs.CONFIG).exists():
        raise RunError(f"'{run}' is not a genkit run folder (no {runs.CONFIG}) nor a diffusers folder")
    return runs.load(run, device)


def sample_with_info(family: Family, n: int, *, sampler: str | None = None, steps: int | None = None,
                     seed: int = 0, batch_size: int | None = None, schedule: str | None = None,
                     labels: Sequence[int] | torch.Tensor | None = None, guidance: float | None = None,
                     prompts: Sequence[str] | str | None = None, **options: Any) -> SampleOutput:
    """Like `sample`, but also returns the sampler's NFE and the resolved sampler/steps."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return sample_family(family, n, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed),
                         batch_size=batch_size, schedule=schedule, labels=labels, prompts=prompts,
                         guidance=guidance, **options)


def sample(family: Family, n: int, *, sampler: str | None = None, steps: int | None = None,
           seed: int = 0, batch_size: int | None = None, schedule: str | None = None,
           labels: Sequence[int] | torch.Tensor | None = None, guidance: float | None = None,
           prompts: Sequence[str] | str | None = None, **options: Any) -> torch.Tensor:
    """Generate n images in [-1, 1], shape (n, C, H, W), with a shared sampler.

    Args:
        family: a loaded family (`genkit.load`).
        n: number of images.
        sampler: a name from `genkit.samplers.SAMPLERS`; default the family's.
        steps: sampler steps; default the family's.
        seed: seeds the initial noise and any injected noise (same images on any device).
        batch_size: images per network batch (default 256: memory bounded for any n).
        schedule: sigma grid: None (the family's own), "karras" or "uniform".
        labels: class labels of a class-conditional run (one for all, or n); default
            class-balanced (0, 1, ..., C-1, 0, ...).
        guidance: classifier-free guidance scale w: 1 conditional (default), 0 unconditional,
            > 1 guided (two network evaluations per step on a doubled batch).
        prompts: text prompts of a text-conditioned run (latent diffusion): one for all n, or
            several used in turn; default the run's `model.sample_prompts`.
        **options: sampler options, e.g. ``eta=0.5`` for DDIM, ``rtol``/``atol`` for rk45;
            ``precision="bf16"`` (or "fp16") runs the networks under autocast; ``compile=True``
            runs them as torch.compile'd copies with frozen weights (a one-off compile, then
            faster steps; docs/benchmarks.md).
    """
    return sample_with_info(family, n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                            schedule=schedule, labels=labels, guidance=guidance, prompts=prompts,
                            **options).images


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] as a PNG grid (written atomically)."""
    return _save_grid(images, path, nrow)
