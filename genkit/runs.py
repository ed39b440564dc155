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
      resumes.jsonl          one JSON object per resume: time, step, the keys it changed
      eval/, best/           in-training evaluation: reference statistics, lowest-FD weights
      <stage>/               an earlier stage trained for this run (an LDM's first_stage/)

Paths to other runs (`model.init_from`, an LDM's `model.first_stage`, an AR prior's
`model.tokenizer`) are stored in config.yaml relative to the run folder that names them, so run
folders can be moved or copied together and used from any working directory; `run_recipe`
resolves them back. In a recipe you write, they are relative to the working directory.

This module reads all of it and builds families: `load(run)` gives a trained family in eval mode.
Families declare the frozen earlier stages they are built on (`Family.stages`: an LDM's first
stage, an AR prior's tokenizer); this module resolves the run each names, loads it, and hands it
to the family's constructor, so that no family loads or trains another run itself. It also binds
the family registry to the recipe loader (`load_recipe`), which `genkit.config` does not know.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from safetensors import SafetensorError

from genkit.config import Recipe, apply_overrides, parse_recipe, read_recipe, recipe_to_dict
from genkit.errors import ConfigError, RunError
from genkit.families import FAMILIES
from genkit.families.base import Autoencoder, Family, Stage, Tokenizer
from genkit.families.first_stage import DiffusersAutoencoder
from genkit.io import load_tensors

CONFIG = "config.yaml"
RESUMES = "resumes.jsonl"        # one record per resume
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


RECIPE_SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))


def _own(override: str) -> bool:
    """Whether an override is the recipe's own (a section's key, or malformed: the recipe loader says so),
    not `STAGE.key=value` for a stage's recipe."""
    key, sep, _ = override.partition("=")
    first, dot, rest = key.partition(".")
    return first.strip() in RECIPE_SECTIONS or not (sep and dot and rest and first.strip().isidentifier())


def load_recipe(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file or shipped recipe by name, apply `key=value` overrides, validate.

    An override prefixed with a trainable stage's key (`first_stage.train.steps=50` for latent
    diffusion) goes to that stage's recipe (`model.first_stage_overrides`), checked here.
    """
    own = [o for o in overrides if _own(o)]
    recipe = read_recipe(source, own, family_configs())
    staged = [o for o in overrides if o not in own]
    return with_stage_overrides(recipe, staged, str(source)) if staged else recipe


def with_stage_overrides(recipe: Recipe, overrides: Sequence[str], source: str) -> Recipe:
    """The recipe with `STAGE.key=value` overrides appended to its trainable stages' override lists."""
    stages = {s.key: s for s in family_class(recipe).stages if s.train_recipe is not None}
    extra: dict[str, list[str]] = {}
    for override in overrides:
        prefix, _, rest = override.partition(".")
        prefix = prefix.strip()
        if prefix not in stages or "=" not in rest:
            key = override.partition("=")[0]
            close = difflib.get_close_matches(prefix, [*RECIPE_SECTIONS, *stages], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join([*RECIPE_SECTIONS, *stages])}"
            raise ConfigError(f"{source}: override {override!r}: unknown key {key!r} ({hint})")
        extra.setdefault(prefix, []).append(rest)
    changes = {}
    for key, items in extra.items():
        stage = stages[key]
        listed = [*getattr(recipe.model, stage.train_overrides), *items]
        read_recipe(getattr(recipe.model, stage.train_recipe), listed, family_configs())  # check them now
        changes[stage.train_overrides] = listed
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **changes))


def recipe_from_dict(raw: Any, source: str = "<dict>") -> Recipe:
    """Build and validate a Recipe from plain data (errors prefixed with `source`)."""
    return parse_recipe(raw, source, family_configs())


def family_class(recipe: Recipe) -> type[Family]:
    """The class of the recipe's `model.family`."""
    return FAMILIES[recipe.model.family][0]


def link_keys(recipe: Recipe) -> list[str]:
    """The `model` keys that name other runs: `init_from` and every declared stage."""
    return ["init_from", *(stage.key for stage in family_class(recipe).stages)]


def _link(value: str | None, convert: Any) -> str | None:
    if value is None:
        return None
    if value.startswith(LOCAL_DIR):
        return LOCAL_DIR + convert(value[len(LOCAL_DIR):])
    return convert(value)


def absolute_links(recipe: Recipe, base: Path) -> Recipe:
    """The recipe with relative paths to other runs resolved against `base` (a run folder, or the cwd)."""
    def absolute(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve())

    model = recipe.model
    changes = {k: _link(getattr(model, k), absolute) for k in link_keys(recipe)}
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **changes))


def relative_links(recipe: Recipe, run_dir: Path) -> Recipe:
    """The recipe with absolute paths to other runs made relative to `run_dir` (as config.yaml stores them)."""
    def relative(path: str) -> str:
        return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())

    model = recipe.model
    changes = {k: _link(getattr(model, k), relative) for k in link_keys(recipe)}
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **changes))


def run_recipe(run: str | Path) -> Recipe:
    """The resolved recipe a run folder was trained with (its config.yaml), links made absolute."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise RunError(f"'{run}' is not a genkit run folder (no {CONFIG})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f"'{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    return absolute_links(recipe_from_dict(raw, str(path)), Path(run))


# -- resume ---------------------------------------------------------------------------------------
# Recipe keys a resumed run may change: how long (steps, time budget), how often to log, sample, evaluate and
# checkpoint, what to sample and evaluate. Anything else (model, data, optimizer, schedule, precision, seed) would
# make the resumed run something other than what its checkpoints hold, so a change is refused. How a step's
# samples are split (data.batch_size per process, train.grad_accum) may change with the number of processes of
# a resume on another cluster; the data position is in samples (genkit.data.position) and the trainer warns
# when the samples per step change.
RESUME_SAFE = ("name", "description", "train.steps", "train.max_time", "train.checkpoint_every", "train.keep_last",
               "train.sample_every", "train.log_every", "train.eval_every", "train.on_nan", "data.num_workers",
               "data.batch_size", "train.grad_accum", "sample.", "eval.")


def flat(recipe: Recipe) -> dict[str, Any]:
    """The recipe as {dotted key: value}; lists and tuples stay values."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = node
    walk("", recipe_to_dict(recipe))
    return out


def resume_safe(key: str) -> bool:
    """Whether a resumed run may change `key` (RESUME_SAFE)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE)


def resume_recipe(run_dir: Path, recipe: Recipe | None) -> tuple[Recipe, dict[str, list[Any]]]:
    """The recipe a resume of `run_dir` trains: its config.yaml with the safe changes of `recipe` (a recipe
    given on the command line, links already absolute), and those changes as {key: [old, new]}.

    A key the given recipe leaves null keeps the run's value: null asks genkit to decide, and the run
    decided (an LDM's first stage and scale factor). Any other difference outside RESUME_SAFE is refused,
    listing every differing key with its old and new value.
    """
    saved = run_recipe(run_dir)
    if recipe is None:
        return saved, {}
    old, new = flat(saved), flat(recipe)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and new.get(k) is not None}
    refused = {k: v for k, v in changed.items() if not resume_safe(k)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        safe = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_SAFE)
        raise RunError(f"cannot resume '{run_dir}' with a different recipe: {listed} (a resume may change only "
                       f"{safe}; train into a new --out to change the rest)")
    merged = recipe_to_dict(saved)
    for key, (_, value) in changed.items():
        *sections, leaf = key.split(".")
        node = merged
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return recipe_from_dict(merged, str(run_dir / CONFIG)), changed


def run_start(recipe: str | Path | Recipe | None, overrides: Sequence[str], run_dir: Path | None,
              resume: bool) -> tuple[Recipe, Path, dict[str, list[Any]]]:
    """What a `genkit train` call trains, where, and (resuming) which safe keys it changes.

    A new run: the recipe (file, shipped name or Recipe) with the overrides, paths to other runs
    taken relative to the working directory. A resume: the run's own config.yaml, compared with the
    recipe and overrides when any are given (`resume_recipe`); `run_dir` defaults to runs/<name>.
    """
    cwd = Path.cwd()
    if isinstance(recipe, Recipe):
        if overrides:
            raise RunError("overrides apply to recipe files; edit the Recipe object instead")
        given = recipe
    elif recipe is not None:
        given = load_recipe(recipe, overrides)
    elif not resume:
        raise RunError("give a recipe to train (a YAML path or a shipped name; `genkit recipes` lists them)")
    else:
        given = None
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is None:
        if given is None:
            raise RunError("give the run folder to resume: genkit train --resume RUN")
        run_dir = Path("runs") / given.name
    if not resume:
        return absolute_links(given, cwd), run_dir, {}
    if not (run_dir / CONFIG).is_file():
        what = "does not exist" if not run_dir.exists() else f"holds no run (no {CONFIG})"
        raise RunError(f"cannot resume: run folder '{run_dir}' {what}")
    if given is None and overrides:
        given = override(run_recipe(run_dir), overrides, str(run_dir / CONFIG))
    recipe, changed = resume_recipe(run_dir, None if given is None else absolute_links(given, cwd))
    return recipe, run_dir, changed


def override(recipe: Recipe, overrides: Sequence[str], source: str) -> Recipe:
    """A recipe with `key=value` overrides applied, checked like a recipe file's."""
    own = [o for o in overrides if _own(o)]
    out = recipe_from_dict(apply_overrides(recipe_to_dict(recipe), own), source)
    staged = [o for o in overrides if o not in own]
    return with_stage_overrides(out, staged, source) if staged else out


def record_resume(run_dir: Path, step: int, changed: Mapping[str, list[Any]]) -> None:
    """Append one record to RUN/resumes.jsonl: when, from which step, which keys changed (old, new)."""
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "step": step, "changed": dict(changed)}
    with open(run_dir / RESUMES, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


# -- the folder ------------------------------------------------------------------------------------
def holds_run(run_dir: Path) -> bool:
    """Whether a folder holds a genkit run: its config.yaml, final weights or a checkpoint.

    A folder with only an earlier stage (an LDM's first_stage/) or other files does not: a start that
    failed before its first checkpoint leaves nothing that blocks the same command (`cleanup_failed_start`).
    """
    return (run_dir / CONFIG).exists() or (run_dir / MODEL).exists() or bool(list_checkpoints(run_dir / CHECKPOINTS))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an existing run unless resuming; refuse to resume a missing one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run folder '{run_dir}' is a file: choose another --out")
    exists = run_dir.is_dir() and holds_run(run_dir)
    if exists and not resume:
        raise RunError(f"run folder '{run_dir}' already holds a run: continue it with `genkit train --resume "
                       f"{run_dir}`, or train into another --out")
    if resume and not exists:
        raise RunError(f"cannot resume: run folder '{run_dir}' holds no run")
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


# what a training start writes into its run folder before its first checkpoint
START_FILES = (CONFIG, "metrics.jsonl", RESUMES, "tensorboard", "samples", "eval", "best", CHECKPOINTS, MODEL, "phema")


def cleanup_failed_start(run_dir: Path, created: bool) -> None:
    """Remove what a start that failed before its first checkpoint wrote, so the same command can run again.

    Earlier stages it trained (RUN/first_stage) stay and are reused; `created`: the folder did not exist
    (or was empty) before, so an empty folder is removed too.
    """
    if list_checkpoints(run_dir / CHECKPOINTS):
        return
    for name in START_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(path)
    except (SafetensorError, OSError) as e:  # truncated, foreign or unreadable
        raise RunError(f"'{path}' is not a readable safetensors file ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else 'damaged'})") from None


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"'{path}' is not readable JSON ({e})") from None
    shape = info.get("shape") if isinstance(info, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise RunError(f"'{path}' has no valid \"shape\" [C, H, W]: it is damaged or not genkit's")
    return info


def run_weights(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Final model/ weights and genkit.json, or else the latest checkpoint's nets with its EMA on top."""
    model = run / MODEL
    if (model / INFO).exists():
        return _read_tensors(model / WEIGHTS), _read_info(model / INFO)
    ckpt = latest_checkpoint(run / CHECKPOINTS)
    if ckpt is None:
        raise RunError(f"'{run}' has neither {MODEL}/ nor a checkpoint: is it a genkit run folder?")
    weights = _read_tensors(ckpt / CKPT_NETS)
    if (ckpt / CKPT_EMA).exists():
        weights.update(_read_tensors(ckpt / CKPT_EMA))
    return weights, _read_info(ckpt / CKPT_STATE)


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
            needs = stage.needs.__name__.lower()
            article = "an" if needs[0] in "aeiou" else "a"
            raise ConfigError(f"{key}: '{spec}' is a {loaded.name} run, not {article} {needs} "
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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`--device`: CUDA when available by default; a device that is not on this machine is a one-line error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RunError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if resolved.type == "cuda" and (not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise RunError(f"--device {device!r}: this machine has {have}; use --device cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device {device!r}: genkit runs on cpu, cuda or mps")
    return resolved


def build_loaded(recipe: Recipe, shape: tuple[int, int, int], num_classes: int, weights: Mapping[str, torch.Tensor],
                 device: str | torch.device | None = None) -> Family:
    """The recipe's family with `weights` loaded (strict), on `device`, in eval mode, without gradients."""
    device = resolve_device(device)
    family = build_family(recipe, shape, num_classes)
    try:
        family.nets.load_state_dict(dict(weights))
    except RuntimeError as e:  # a weights file of other networks than the recipe builds
        raise RunError(f"the weights do not fit the run's recipe: {str(e).strip().splitlines()[0]}") from None
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
