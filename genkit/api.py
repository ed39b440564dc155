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
from genkit.io import load_tensors
from genkit.io import save_grid as _save_grid
from genkit.training import phema
from genkit.training import train as train_run
from genkit.training.checkpoint import verify_checkpoint


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


def load(run: str | Path, device: str | torch.device | None = None, step: int | None = None) -> Family:
    """Load a trained family from a run folder (EMA weights when trained with EMA), in eval mode.

    Args:
        run: the run folder written by `genkit.train` (or `genkit.interop.import_diffusers`), or a
            diffusers pipeline folder (unet/ + scheduler/; see `genkit.interop`).
        device: where to put the networks; default CUDA when available, else CPU.
        step: load checkpoints/step-N (its EMA weights when trained with EMA) instead of the final
            weights: an earlier model of the same run, e.g. an autoguidance guide.
    """
    run = Path(run)
    if step is None and is_diffusers_folder(run):
        return load_diffusers(run, device)
    if not (run / runs.CONFIG).exists():
        raise RunError(f"'{run}' is not a genkit run folder (no {runs.CONFIG}) nor a diffusers folder")
    if step is not None:
        return _load_checkpoint(run, step, device)
    return runs.load(run, device)


def _load_checkpoint(run: Path, step: int, device: str | torch.device | None) -> Family:
    """The family of checkpoints/step-N (verified), with its EMA weights on top when it has them."""
    path = run / runs.CHECKPOINTS / f"step-{step}"
    if not path.is_dir():
        kept = ", ".join(p.name.removeprefix("step-") for p in runs.list_checkpoints(run / runs.CHECKPOINTS))
        raise RunError(f"'{run}' has no checkpoint at step {step} (kept: {kept or 'none'})")
    state = verify_checkpoint(path)
    weights = load_tensors(path / runs.CKPT_NETS)
    if (path / runs.CKPT_EMA).exists():
        weights.update(load_tensors(path / runs.CKPT_EMA))
    return runs.build_loaded(runs.run_recipe(run), tuple(state["shape"]), state.get("num_classes", 0), weights, device)


def sample_with_info(family: Family, n: int, *, sampler: str | None = None, steps: int | None = None,
                     seed: int = 0, batch_size: int | None = None, schedule: str | None = None,
                     nfe: int | None = None,
                     labels: Sequence[int] | torch.Tensor | None = None, guidance: float | None = None,
                     prompts: Sequence[str] | str | None = None, guide: Family | None = None,
                     **options: Any) -> SampleOutput:
    """Like `sample`, but also returns the sampler's NFE and the resolved sampler/steps."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return sample_family(family, n, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed),
                         batch_size=batch_size, schedule=schedule, nfe=nfe, labels=labels, prompts=prompts,
                         guidance=guidance, guide=guide, **options)


def sample(family: Family, n: int, *, sampler: str | None = None, steps: int | None = None,
           seed: int = 0, batch_size: int | None = None, schedule: str | None = None,
           nfe: int | None = None, labels: Sequence[int] | torch.Tensor | None = None, guidance: float | None = None,
           prompts: Sequence[str] | str | None = None, guide: Family | None = None, **options: Any) -> torch.Tensor:
    """Generate n images in [-1, 1], shape (n, C, H, W), with a shared sampler.

    Args:
        family: a loaded family (`genkit.load`).
        n: number of images.
        sampler: a name from `genkit.samplers.SAMPLERS`; default the family's.
        steps: sampler steps; default the family's.
        nfe: instead of `steps`, the network evaluations to spend: the step count that spends exactly
            that many for the sampler and grid (a one-line error names the possible values when none does).
        seed: seeds the initial noise and any injected noise (same images on any device).
        batch_size: images per network batch (default 256: memory bounded for any n).
        schedule: sigma grid (`genkit.samplers.schedules.GridSpec`): "family" (the family's own), "karras"
            ("karras:rho=5"), "logsnr" or "time-uniform", each optionally ending at sigma_min without the
            final denoising evaluation (":end=sigma_min"); default None, the grid the sampler recommends
            for the family's noise process.
        labels: class labels of a class-conditional run (one for all, or n); default
            class-balanced (0, 1, ..., C-1, 0, ...).
        guidance: classifier-free guidance scale w: 1 conditional (default), 0 unconditional,
            > 1 guided (two network evaluations per step on a doubled batch). With `guide`, the
            autoguidance scale instead.
        prompts: text prompts of a text-conditioned run (latent diffusion): one for all n, or
            several used in turn; default the run's `model.sample_prompts`.
        guide: autoguidance (Karras et al. 2024): a worse model of the same data (smaller, or an
            earlier checkpoint: ``genkit.load(run, step=N)``); the images follow
            D_guide + guidance (D - D_guide). Each step evaluates both models (the NFE counts both).
        **options: sampler options, e.g. ``eta=0.5`` for DDIM, ``rtol``/``atol`` for rk45;
            ``precision="bf16"`` (or "fp16") runs the networks under autocast; ``compile=True``
            runs them as torch.compile'd copies with frozen weights (a one-off compile, then
            faster steps; docs/benchmarks.md).
    """
    return sample_with_info(family, n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                            schedule=schedule, nfe=nfe, labels=labels, guidance=guidance, prompts=prompts,
                            guide=guide, **options).images


def posthoc_ema(run: str | Path, sigma_rel: float, out: str | Path | None = None, step: int | None = None) -> Path:
    """Reconstruct the run's EMA of length `sigma_rel` from its post-hoc EMA snapshots into a new run folder.

    Args:
        run: a run trained with ``train.posthoc_ema`` (snapshots in RUN/phema/).
        sigma_rel: the EMA length, the profile's standard deviation relative to the training time (EDM2:
            0.05 to 0.15 typical).
        out: the new run folder; default ``RUN-ema<sigma_rel>`` next to the run.
        step: reconstruct the EMA as it stood at this step (default: the last snapshot's).
    """
    run = Path(run)
    out = Path(out) if out is not None else run.parent / f"{run.name}-ema{sigma_rel:g}"
    weights = phema.reconstruct(run / phema.PHEMA, sigma_rel, step)
    last = max(s for s in phema.snapshots(run / phema.PHEMA) if step is None or s <= step)
    return phema.write_run(run, out, weights, {"sigma_rel": sigma_rel, "step": last})


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] as a PNG grid (written atomically)."""
    return _save_grid(images, path, nrow)
