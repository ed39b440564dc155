"""The Python API: what the CLI and experiments call.

    import genkit
    run = genkit.train("ddpm_digits", overrides=["train.steps=500"], out="runs/demo")
    family = genkit.load(run)                      # EMA weights, eval mode
    images = genkit.sample(family, 64, sampler="ddim", steps=50, seed=0)   # [-1, 1]
    genkit.save_grid(images, "grid.png")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from genkit.config import Recipe, load_recipe, recipe_from_dict
from genkit.errors import RunError
from genkit.io import check_run_dir, load_tensors
from genkit.io import save_grid as _save_grid
from genkit.samplers import SampleOutput
from genkit.samplers import sample as _sample


def train(recipe: str | Path | Recipe, overrides: Sequence[str] = (), out: str | Path | None = None,
          resume: bool = False) -> Path:
    """Train a recipe (path, shipped name or Recipe) into a run folder and return its path.

    Args:
        recipe: a YAML path, the name of a shipped recipe (``"ddpm_digits"``) or a Recipe.
        overrides: dotted ``key=value`` strings, e.g. ``["train.steps=500"]``.
        out: the run folder; default ``runs/<recipe name>``.
        resume: continue from the latest checkpoint of an existing run folder.
    """
    from genkit.training import Trainer

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RunError("overrides apply to recipe files; edit the Recipe object instead")
    run_dir = Path(out) if out is not None else Path("runs") / recipe.name
    if _is_main_process():
        check_run_dir(run_dir, resume)
    return Trainer(recipe, run_dir, resume=resume).fit()


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _run_weights(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Final model/ weights, or else the latest checkpoint's nets with its EMA on top."""
    from genkit.training.checkpoint import latest_checkpoint

    model = run / "model"
    if (model / "genkit.json").exists():
        return load_tensors(model / "weights.safetensors"), json.loads((model / "genkit.json").read_text())
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise RunError(f"'{run}' has neither model/ nor a checkpoint: is it a genkit run folder?")
    weights = load_tensors(ckpt / "nets.safetensors")
    if (ckpt / "ema.safetensors").exists():
        weights.update(load_tensors(ckpt / "ema.safetensors"))
    return weights, json.loads((ckpt / "state.json").read_text())


def load(run: str | Path, device: str | torch.device | None = None) -> Any:
    """Load a trained family from a run folder (EMA weights when trained with EMA), in eval mode.

    Args:
        run: the run folder written by `genkit.train` (or `genkit.interop.import_diffusers`), or a
            diffusers pipeline folder (unet/ + scheduler/; see `genkit.interop`).
        device: where to put the networks; default CUDA when available, else CPU.
    """
    from genkit.interop import is_diffusers_folder, load_diffusers

    run = Path(run)
    if is_diffusers_folder(run):
        return load_diffusers(run, device)
    if not (run / "config.yaml").exists():
        raise RunError(f"'{run}' is not a genkit run folder (no config.yaml) nor a diffusers folder")
    recipe = recipe_from_dict(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
    weights, info = _run_weights(run)
    return build_loaded(recipe, tuple(info["shape"]), info.get("num_classes", 0), weights, device)


def build_loaded(recipe: Recipe, shape: tuple[int, int, int], num_classes: int, weights: dict[str, torch.Tensor],
                 device: str | torch.device | None = None) -> Any:
    """The recipe's family with `weights` loaded (strict), on `device`, in eval mode, without gradients."""
    from genkit.training import build_family

    family = build_family(recipe, tuple(shape), num_classes)
    family.nets.load_state_dict(weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family.nets.to(device).eval().requires_grad_(False)
    family.recipe = recipe
    return family


def sample_with_info(family: Any, n: int, *, sampler: str | None = None, steps: int | None = None,
                     seed: int = 0, batch_size: int | None = None, schedule: str | None = None,
                     labels: Sequence[int] | torch.Tensor | None = None, guidance: float | None = None,
                     prompts: Sequence[str] | str | None = None, **options: Any) -> SampleOutput:
    """Like `sample`, but also returns the sampler's NFE and the resolved sampler/steps."""
    generator = torch.Generator().manual_seed(seed)
    condition = {k: v for k, v in (("labels", labels), ("prompts", prompts)) if v is not None} or None
    return _sample(family, n, sampler=sampler, steps=steps, generator=generator, batch_size=batch_size,
                   schedule=schedule, condition=condition, guidance=guidance, **options)


def sample(family: Any, n: int, *, sampler: str | None = None, steps: int | None = None,
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
        batch_size: images per network batch (default all n at once).
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
