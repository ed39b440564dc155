"""Multi-stage training: a family's frozen earlier stages first, then the family itself.

A family declares the stages it is built on (`Family.stages`, e.g. latent diffusion's first
stage). For each, `resolve_stages` finds the run that `model.<key>` names; when it is unset, it
takes the stage of `model.init_from`'s run (fine-tuning keeps the base run's first stage and
scale factor), or else trains `model.<train_recipe>` on this recipe's data into RUN/<key>
(resumed if interrupted). The resolved paths are written into the recipe, so the run's
config.yaml says which stages it used, and the loaded stages go to the `Trainer`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from genkit.config import FamilyConfig, Recipe
from genkit.errors import ConfigError
from genkit.families.base import Stage
from genkit.runs import (
    INFO,
    LOCAL_DIR,
    MODEL,
    absolute_links,
    check_run_dir,
    cleanup_failed_start,
    family_class,
    holds_run,
    load_recipe,
    load_stage,
    run_recipe,
)
from genkit.training.trainer import Trainer


def is_main_process() -> bool:
    """Whether this is rank 0 of a launch (torchrun / accelerate launch set RANK), before any Accelerator."""
    return os.environ.get("RANK", "0") == "0"


def train(recipe: Recipe, run_dir: Path, resume: bool = False, changed: dict[str, list[Any]] | None = None,
          label: str = "train") -> Path:
    """Train a recipe (paths to other runs absolute) into `run_dir`, its missing stages first.

    A new start that fails before its first checkpoint removes what it wrote (`cleanup_failed_start`),
    so the same command can run again; a resume never removes anything.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))
    if is_main_process():
        check_run_dir(run_dir, resume)
    try:
        recipe, stages = resolve_stages(recipe, run_dir)
        return Trainer(recipe, run_dir, resume=resume, stages=stages, changed=changed, label=label).fit()
    except BaseException:
        if not resume and is_main_process():
            cleanup_failed_start(run_dir, created)
        raise


def resolve_stages(recipe: Recipe, run_dir: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with every declared stage's run resolved (trained when needed), and the loaded stages."""
    cls, cfg = family_class(recipe), recipe.model
    changes: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for stage in cls.stages:
        spec = getattr(cfg, stage.key)
        if spec is None and cfg.init_from is not None:
            base = _init_from_model(cfg)
            spec = getattr(base, stage.key)
            changes.update({key: getattr(base, key) for key in stage.inherit if getattr(cfg, key) is None})
        if spec is None and stage.train_recipe is not None:
            spec = str(train_stage(recipe, stage, Path(run_dir) / stage.key).resolve())
        elif spec is not None and not spec.startswith(LOCAL_DIR):
            spec = str(Path(spec).expanduser().resolve())
        changes[stage.key] = spec
        loaded[stage.key] = load_stage(spec, stage)
    return dataclasses.replace(recipe, model=dataclasses.replace(cfg, **changes)), loaded


def _init_from_model(cfg: FamilyConfig) -> FamilyConfig:
    """The model config of `model.init_from`'s run, which must be of the same family."""
    base = run_recipe(cfg.init_from).model
    if base.family != cfg.family:
        raise ConfigError(f"model.init_from: '{cfg.init_from}' is a {base.family!r} run, not a {cfg.family!r} run")
    return base


def train_stage(recipe: Recipe, stage: Stage, out: Path) -> Path:
    """Train `model.<stage.train_recipe>` on this recipe's data into `out` (resumed if interrupted).

    The stage keeps its own recipe's batch size, steps and optimizer; `STAGE.key=value` overrides
    (`first_stage.train.steps=100`, collected in `model.<stage.train_overrides>`) change them.
    """
    if (out / MODEL / INFO).is_file():
        return out
    cfg = recipe.model
    overrides = getattr(cfg, stage.train_overrides) if stage.train_overrides else []
    sub = absolute_links(load_recipe(getattr(cfg, stage.train_recipe), overrides), Path.cwd())
    data = dataclasses.replace(recipe.data, batch_size=sub.data.batch_size, hflip=sub.data.hflip)
    sub = dataclasses.replace(sub, data=data, train=dataclasses.replace(sub.train, seed=recipe.train.seed))
    resume = holds_run(out)
    if is_main_process():
        print(f"{stage.key}: {'resuming' if resume else 'training'} {sub.name} ({sub.model.family}, "
              f"{sub.train.steps} steps at batch {sub.data.batch_size}) into {out} first; change it with "
              f"{stage.key}.KEY=VALUE, e.g. {stage.key}.train.steps={sub.train.steps}", flush=True)
    return train(sub, out, resume=resume, label=stage.key)
