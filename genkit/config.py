"""Strict recipe loading: YAML -> dataclasses, dotted overrides.

Every key of a recipe is checked against the dataclasses below: unknown keys (with the
closest valid one), wrong types and missing fields are one-line `ConfigError`s. Nothing is
coerced. YAML follows 1.2 where 1.1 surprises: `1e-4` is a float and only true/false are
booleans, so `precision: no` is the string "no".
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from genkit.errors import ConfigError


@dataclass
class DataConfig:
    """Dataset and loader settings; sources are validated by genkit.data."""

    source: str = "digits"  # digits | folder | cifar10 | mnist | ...
    root: str | None = None
    image_size: int = 16
    batch_size: int = 64  # per-process micro-batch
    channels: int | None = None  # folder sources: 1 or 3; others use the dataset's own
    hflip: bool = False
    download: bool = False
    num_workers: int = 0
    on_error: Literal["raise", "skip"] = "raise"  # folder sources: an unreadable image is an error,
                                                  # or checked up front, skipped and counted
    follow_symlinks: bool = False  # folder sources: read symlinks leading outside data.root (else an error)


@dataclass
class OptimConfig:
    """One optimizer, for one parameter group of the family."""

    name: Literal["adam", "adamw", "radam", "rmsprop", "sgd"] = "adamw"  # radam: iCT's (Song & Dhariwal 2024)
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class PostHocEMAConfig:
    """Post-hoc EMA (Karras et al. 2024): power-function EMA profiles tracked, snapshotted for `genkit ema`."""

    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])  # the tracked profiles (the paper's)
    every: int = 100                  # steps between snapshots (doubled whenever the budget is full)
    budget_mb: float = 1024.0         # disk for RUN/phema/ snapshots: older ones are thinned to stay within it


@dataclass
class TrainConfig:
    """Trainer settings; `steps` counts optimizer steps after accumulation."""

    steps: int = 1000
    max_time: float | str | None = None  # wall-clock budget: seconds, or "90s", "20m", "2h", "1h30m"; the run ends
                                         # at it or at `steps`, whichever comes first, and the LR schedule and the
                                         # EMA warm-up follow the fraction of the budget used (genkit.training.budget)
    seed: int = 0
    grad_accum: int = 1
    precision: Literal["no", "bf16", "fp16"] = "no"
    clip_grad: float | None = 1.0
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    posthoc_ema: PostHocEMAConfig | None = None  # post-hoc EMA snapshots (genkit.training.phema; `genkit ema`)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 2
    sample_every: int = 0
    log_every: int = 10
    eval_every: int = 0
    gradient_checkpointing: bool = False
    on_nan: Literal["stop", "skip"] = "stop"  # non-finite loss/gradients: stop (last good checkpoint
                                              # kept) or skip that optimizer step and count it


@dataclass
class SampleConfig:
    """Generation settings; None means the family's default."""

    sampler: str | None = None
    steps: int | None = None
    n: int = 64
    seed: int = 0
    eta: float = 0.0  # DDIM eta
    temperature: float | None = None  # `direct` flows: prior scaled by this (Glow's 0.7); `autoregressive`: logits / this
    truncation: float | None = None   # `direct` sampling of GANs: latents resampled beyond |z| > this
    top_k: int | None = None          # `autoregressive`: sample among the k most likely tokens
    top_p: float | None = None        # `autoregressive`: nucleus sampling, smallest token set of mass >= p
    guidance: float = 1.0             # classifier-free guidance scale of conditional families (1: none)


@dataclass
class EvalConfig:
    """In-training evaluation (`train.eval_every`): FD of `n` samples vs the training data."""

    features: str = "digits"        # a name in genkit.eval.features.FEATURES
    protocol: str | None = None     # extractor protocol (inception: tf | pytorch-fid)
    weights: str | None = None      # weights file/folder (else GENKIT_WEIGHTS_DIR, hub cache)
    n: int = 1000                   # generated samples per evaluation
    batch_size: int = 250
    best: bool = False              # keep best/ (weights of the lowest FD so far)


@dataclass
class FamilyConfig:
    """What every family's config (the recipe's `model` section) has; each family's config derives
    from it and sets its own `family` default."""

    family: str = ""
    init_from: str | None = None  # a run folder whose final (EMA) weights start training (fine-tuning, reflow)


@dataclass
class Recipe:
    """A whole experiment; `model` is the config dataclass of the family `model.family`."""

    name: str
    model: FamilyConfig
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: dict[str, OptimConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# floats with an exponent but no dot (1e-4, 2E+3), or a dot and an unsigned exponent (1.0e4)
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader reading `1e-4` as a float and only true/false as booleans (YAML 1.2)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_12, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings `_Loader` would read as floats (e.g. '1e3')."""


_Dumper.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str = "") -> Any:
    """Parse YAML text with genkit's loader; syntax errors become one-line ConfigErrors."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}invalid YAML: {at}{problem}") from None


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """`str 'abc'`, `int 3`, `null`: the type and value of a config value, for errors."""
    return "null" if value is None else f"{type(value).__name__} {_short(value)}"


def _type_name(tp: Any) -> str:
    """How a field type reads in an error message."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(_short(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_SCALARS = (int, float, str, bool)


def _fail(where: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    """int, float (ints accepted), str, bool; a bool is never a number, a string never coerced."""
    if tp is float and type(value) in (int, float):
        return float(value)
    if type(value) is tp:
        return value
    raise _fail(where, tp, value)


def _convert_union(tp: Any, value: Any, where: str) -> Any:
    """`X | None` and small unions: the first member that accepts the value wins."""
    options = [a for a in get_args(tp) if a is not type(None)]
    if value is None:
        if len(options) < len(get_args(tp)):
            return None
        raise _fail(where, tp, value)
    structured = get_origin(options[0]) is not Literal and options[0] not in _SCALARS
    if len(options) == 1 and structured:
        return _convert(options[0], value, where)  # the inner error is more precise
    for option in options:
        try:
            return _convert(option, value, where)
        except ConfigError:
            pass
    raise _fail(where, tp, value)


def _convert_sequence(tp: Any, value: Any, where: str) -> Any:
    """list[X], tuple[X, ...] and fixed tuple[X, Y] from a YAML list."""
    if not isinstance(value, (list, tuple)):
        raise _fail(where, tp, value)
    origin, args = get_origin(tp) or tp, get_args(tp)
    if origin is list or not args:
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_dict(tp: Any, value: Any, where: str) -> dict:
    """dict[str, X]: free keys, each value converted to X."""
    if not isinstance(value, Mapping):
        raise _fail(where, tp, value)
    args = get_args(tp)
    value_tp = args[1] if len(args) == 2 else Any
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {_short(key)} must be a string")
        out[key] = _convert(value_tp, item, _join(where, key))
    return out


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the type `tp` and convert it; ConfigError naming `where` if not."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp in _SCALARS:
        return _convert_scalar(tp, value, where)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in get_args(tp)):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(tp, value, where)
    if origin is dict or tp is dict:
        return _convert_dict(tp, value, where)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    raise TypeError(f"{where}: unsupported config field type {tp!r}")


def _unknown_key(key: object, valid: list[str], where: str) -> ConfigError:
    path = _join(where, key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        return ConfigError(f"unknown key {path!r} (did you mean {_join(where, close[0])!r}?)")
    listed = ", ".join(valid) if valid else "none"
    return ConfigError(f"unknown key {path!r}; valid keys: {listed}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, strictly: unknown, missing, mistyped keys raise."""
    if not isinstance(data, Mapping):
        section = f"section {where!r}" if where else "recipe"
        raise ConfigError(f"{section} must be a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(key, list(fields), where)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(where, name)!r}")
    return cls(**kwargs)


def _parse_override(override: str) -> tuple[list[str], Any]:
    key, sep, text = override.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    return parts, parse_yaml(text, f"override {override!r}")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` set; values are parsed as YAML."""
    out = copy.deepcopy(raw)
    for override in overrides:
        parts, value = _parse_override(override)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"override {override!r}: {section!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _model_from_dict(raw: Any, families: Mapping[str, type]) -> Any:
    """The family's config dataclass, chosen by `model.family`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section 'model' must be a mapping, got {_describe(raw)}")
    if "family" not in raw:
        raise ConfigError("missing required key 'model.family'")
    name = raw["family"]
    if not isinstance(name, str):
        raise _fail("model.family", str, name)
    if name not in families:
        known = ", ".join(sorted(families))
        close = difflib.get_close_matches(name, list(families), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.family: unknown family {name!r}{hint}; known: {known}")
    return from_dict(families[name], raw, "model")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: float | str, key: str = "train.max_time") -> float:
    """Seconds of a duration: a number of seconds, or text such as "90s", "20m", "2h", "1h30m", "1.5h"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(?:\.\d*)?", text):
            text += "s"
        parts = _DURATION.findall(text)
        if not parts or _DURATION.sub("", text).strip():
            raise ConfigError(f"{key}: expected seconds or a duration such as 90s, 20m, 2h or 1h30m, got {value!r}")
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{key}: must be a duration > 0, got {_short(value)}")
    return seconds


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {rule}, got {_short(value)}")


def validate(recipe: Recipe) -> None:
    """Check value ranges that types cannot express; raise a ConfigError naming the key."""
    t, d, s = recipe.train, recipe.data, recipe.sample
    for key, value, low in [
        ("train.steps", t.steps, 1), ("train.grad_accum", t.grad_accum, 1),
        ("train.checkpoint_every", t.checkpoint_every, 1), ("train.keep_last", t.keep_last, 1),
        ("train.sample_every", t.sample_every, 0), ("train.log_every", t.log_every, 1),
        ("train.eval_every", t.eval_every, 0), ("train.warmup", t.warmup, 0),
        ("data.batch_size", d.batch_size, 1), ("data.image_size", d.image_size, 4),
        ("data.num_workers", d.num_workers, 0), ("sample.n", s.n, 1),
        ("eval.n", recipe.eval.n, 2), ("eval.batch_size", recipe.eval.batch_size, 1),
    ]:
        _check(value >= low, key, f">= {low}", value)
    ema, clip = t.ema_decay, t.clip_grad
    if t.max_time is not None:
        parse_duration(t.max_time)
    _check(ema is None or 0 <= ema < 1, "train.ema_decay", "in [0, 1) or null", ema)
    _check(clip is None or clip > 0, "train.clip_grad", "> 0 or null", clip)
    _check(s.steps is None or s.steps >= 1, "sample.steps", ">= 1 or null", s.steps)
    for name, o in recipe.optim.items():
        _check(o.lr > 0, f"optim.{name}.lr", "> 0", o.lr)
        betas_ok = all(0 <= b < 1 for b in o.betas)
        _check(betas_ok, f"optim.{name}.betas", "in [0, 1)", list(o.betas))
        _check(o.weight_decay >= 0, f"optim.{name}.weight_decay", ">= 0", o.weight_decay)
        _check(o.eps > 0, f"optim.{name}.eps", "> 0", o.eps)


def _recipe(raw: Any, families: Mapping[str, type]) -> Recipe:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"recipe must be a mapping, got {_describe(raw)}")
    if "model" not in raw:
        raise ConfigError("missing required key 'model' (a recipe needs at least model.family)")
    model = _model_from_dict(raw["model"], families)
    recipe = from_dict(Recipe, {**raw, "model": model})
    validate(recipe)
    return recipe


def parse_recipe(raw: Any, source: str, families: Mapping[str, type]) -> Recipe:
    """Build and validate a Recipe from plain data; errors are prefixed with `source`.

    `families` maps `model.family` names to their config dataclasses (`genkit.runs` passes the
    registry's): this module knows no family.
    """
    try:
        return _recipe(raw, families)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def shipped_recipes_dir() -> Path:
    """The folder of recipes shipped as package data (`genkit/recipes`)."""
    return Path(__file__).parent / "recipes"


def _resolve(source: str | Path) -> Path:
    """A YAML path, or the name of a shipped recipe (`ddpm_digits` or `ddpm_digits.yaml`)."""
    path = Path(source)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        stem = path.name.removesuffix(".yaml").removesuffix(".yml")
        shipped = shipped_recipes_dir() / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    names = [p.stem for p in sorted(shipped_recipes_dir().glob("*.yaml"))]
    close = difflib.get_close_matches(path.stem, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"recipe not found: {str(source)!r} ({hint}`genkit recipes` lists them)")


def read_recipe(source: str | Path, overrides: Sequence[str], families: Mapping[str, type]) -> Recipe:
    """Read a recipe file (or shipped recipe by name), apply `key=value` overrides, validate.

    An error is prefixed with the override it comes from when one set the offending key, else the file.
    """
    path = _resolve(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: recipe must be a mapping, got {_describe(raw)}")
    raw = {"name": path.stem, **raw}
    try:
        return _recipe(apply_overrides(raw, overrides), families)
    except ConfigError as e:
        if str(e).startswith("override "):  # a malformed override: its own message names it
            raise
        raise ConfigError(f"{_culprit(e, overrides) or path}: {e}") from None


_ERROR_KEY = re.compile(r"^(?:unknown key |missing required key |section |override )?'?([A-Za-z_][\w.\[\]]*)'?")


def _culprit(error: ConfigError, overrides: Sequence[str]) -> str | None:
    """'override K=V' when the error is about the key K (or below it) that an override set, else None."""
    match = _ERROR_KEY.match(str(error))
    key = match.group(1).split("[")[0] if match else ""
    for override in reversed(overrides):  # the last one to set a key wins, as when they were applied
        set_key = override.partition("=")[0].strip()
        if key and (key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + ".")):
            return f"override {override!r}"
        if set_key == "model.family" and key.startswith("model."):  # the other family's keys do not fit it
            return f"override {override!r}"
    return None


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: YAML-able plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML-able data; `recipe_from_dict` of it gives the recipe back."""
    plain = _plain(recipe)
    head = {"name": plain.pop("name"), "description": plain.pop("description")}
    return {**head, **plain}


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text, keys in schema order."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False)


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of each shipped recipe, sorted by name."""
    out = []
    for path in sorted(shipped_recipes_dir().glob("*.yaml")):
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
        description = raw.get("description", "") if isinstance(raw, Mapping) else ""
        out.append((path.stem, str(description)))
    return out
