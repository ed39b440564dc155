"""The run folder, in one place: its layout, its recipe and weights, and the families built from it.

    runs/<name>/
      config.yaml            the resolved recipe (what ran)
      checkpoints/step-N/    full training state (written by `genkit.training.checkpoint`):
                             nets.safetensors, ema.safetensors, optim-*.pt, sched-*.pt, rng-*.pt,
                             state.json (step, data position, SHA-256 of every file)
      model/                 final weights: weights.safetensors (EMA when trained with it, the
                             resolved recipe in its metadata) + genkit.json (shape, classes, ...)
      samples/step-N.png     sample grids during training
      metrics.jsonl          one JSON object per logged step / evaluation
      eval/, best/           in-training evaluation: reference statistics, lowest-FD weights

This module reads all of it and builds families: `load(run)` gives a trained family in eval mode.
Families declare the frozen earlier stages they are built on (`Family.stages`: an LDM's first
stage, an AR prior's tokenizer); this module resolves the run each names, loads it, and hands it
to the family's constructor, so that no family loads or trains another run itself. It also binds
the family registry to the recipe loader (`load_recipe`), which `genkit.config` does not know.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from genkit.config import Recipe, parse_recipe, read_recipe
from genkit.errors import ConfigError, RunError
from genkit.families import FAMILIES
from genkit.families.base import Autoencoder, Family, Stage, Tokenizer
from genkit.families.first_stage import DiffusersAutoencoder
from genkit.io import load_tensors

CONFIG = "config.yaml"
MODEL = "model"                  # final weights: WEIGHTS + INFO
WEIGHTS = "weights.safetensors"
INFO = "genkit.json"
CHECKPOINTS = "checkpoints"
CKPT_NETS, CKPT_EMA, CKPT_STATE = "nets.safetensors", "ema.safetensors", "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
LOCAL_DIR = "local-dir:"         # a stage given as a diffusers folder instead of a genkit run


# -- recipes ---------------------------------------------------------------------------------------
def family_configs() -> dict[str, type]:
    """`model.family` name -> its config dataclass, from the registry (read at call time)."""
    return {name: config for name, (_, config) in FAMILIES.items()}


def load_recipe(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file or shipped recipe by name, apply `key=value` overrides, validate."""
    return read_recipe(source, overrides, family_configs())


def recipe_from_dict(raw: Any, source: str = "<dict>") -> Recipe:
    """Build and validate a Recipe from plain data (errors prefixed with `source`)."""
    return parse_recipe(raw, source, family_configs())


def run_recipe(run: str | Path) -> Recipe:
    """The resolved recipe a run folder was trained with (its config.yaml)."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise RunError(f"'{run}' is not a genkit run folder (no {CONFIG})")
    return recipe_from_dict(yaml.safe_load(path.read_text()), str(path))


def family_class(recipe: Recipe) -> type[Family]:
    """The class of the recipe's `model.family`."""
    return FAMILIES[recipe.model.family][0]


# -- the folder ------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing run unless resuming; refuse to resume a missing one."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not resume:
        raise RunError(f"run folder '{run_dir}' already exists: pass --resume to continue it, "
                       f"or --out to train into another folder")
    if resume and not exists:
        raise RunError(f"cannot resume: run folder '{run_dir}' does not exist")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"run folder '{run_dir}' cannot be created: {error.strerror or error}") from error
    probe = run_dir / f".write-test-{os.getpid()}"
    try:  # a real write: catches read-only mounts, full disks and permissions (os.access lies for root)
        probe.write_bytes(b"genkit")
        probe.unlink()
    except OSError as error:
        raise RunError(f"run folder '{run_dir}' is not writable: {error.strerror or error}") from error


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a run's checkpoints/), oldest first; temporary folders are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def run_weights(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Final model/ weights and genkit.json, or else the latest checkpoint's nets with its EMA on top."""
    model = run / MODEL
    if (model / INFO).exists():
        return load_tensors(model / WEIGHTS), json.loads((model / INFO).read_text())
    ckpt = latest_checkpoint(run / CHECKPOINTS)
    if ckpt is None:
        raise RunError(f"'{run}' has neither {MODEL}/ nor a checkpoint: is it a genkit run folder?")
    weights = load_tensors(ckpt / CKPT_NETS)
    if (ckpt / CKPT_EMA).exists():
        weights.update(load_tensors(ckpt / CKPT_EMA))
    return weights, json.loads((ckpt / CKPT_STATE).read_text())


# -- families from runs ----------------------------------------------------------------------------
def load_local_autoencoder(path: Path) -> DiffusersAutoencoder:
    """A diffusers `AutoencoderKL` folder (or a pipeline folder's vae/) as a first stage."""
    from diffusers import AutoencoderKL  # heavy: only for local-dir: stages

    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.first_stage: '{path}' has no config.json (local-dir: needs a diffusers "
                          "AutoencoderKL folder, as saved by save_pretrained)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.first_stage: cannot load the autoencoder in '{path}': "
                          f"{str(e).splitlines()[0]}") from None
    return DiffusersAutoencoder(vae)


def load_stage(spec: str | None, stage: Stage) -> Autoencoder | Tokenizer:
    """The frozen stage `model.<stage.key>` names (a run folder, or local-dir:PATH), eval mode, on CPU."""
    key = f"model.{stage.key}"
    if spec is None:
        raise ConfigError(f"{key}: required: the run folder of the {stage.needs.__name__.lower()} "
                          "this model is built on")
    if stage.local_dir and spec.startswith(LOCAL_DIR):
        loaded = load_local_autoencoder(Path(spec[len(LOCAL_DIR):]).expanduser())
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            local = " or local-dir:PATH of a diffusers autoencoder" if stage.local_dir else ""
            raise ConfigError(f"{key}: run folder '{path}' does not exist (give a genkit run folder{local})")
        try:
            loaded = load(path, device="cpu")
        except RunError as e:
            raise ConfigError(f"{key}: {e}") from None
        if not isinstance(loaded, stage.needs):
            raise ConfigError(f"{key}: '{spec}' is a {loaded.name} run, not a {stage.needs.__name__.lower()} "
                              f"({', '.join(n for n, (c, _) in FAMILIES.items() if issubclass(c, stage.needs))})")
    loaded.nets.eval().requires_grad_(False)
    return loaded


def load_stages(recipe: Recipe) -> dict[str, Any]:
    """Every stage the recipe's family declares, loaded from the runs its config names."""
    return {stage.key: load_stage(getattr(recipe.model, stage.key), stage) for stage in family_class(recipe).stages}


def build_family(recipe: Recipe, shape: tuple[int, int, int], num_classes: int,
                 stages: Mapping[str, Any] | None = None) -> Family:
    """Instantiate `model.family` with the sizes only the dataset knows and its loaded stages."""
    stages = load_stages(recipe) if stages is None else stages
    return family_class(recipe)(recipe.model, shape=tuple(shape), num_classes=num_classes, **stages)


def build_loaded(recipe: Recipe, shape: tuple[int, int, int], num_classes: int, weights: Mapping[str, torch.Tensor],
                 device: str | torch.device | None = None) -> Family:
    """The recipe's family with `weights` loaded (strict), on `device`, in eval mode, without gradients."""
    family = build_family(recipe, shape, num_classes)
    family.nets.load_state_dict(dict(weights))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family.nets.to(device).eval().requires_grad_(False)
    return family


def load(run: str | Path, device: str | torch.device | None = None) -> Family:
    """A trained family from a genkit run folder (EMA weights when trained with EMA), in eval mode."""
    run = Path(run)
    recipe = run_recipe(run)
    weights, info = run_weights(run)
    return build_loaded(recipe, tuple(info["shape"]), info.get("num_classes", 0), weights, device)


def init_from_run(family: Family, run: str | Path) -> None:
    """Load a run's final (EMA) weights into `family.nets` (`model.init_from`: reflow, fine-tuning)."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"model.init_from: run folder '{run}' does not exist")
    weights, _ = run_weights(run)
    family.init_from_weights(weights, run)
