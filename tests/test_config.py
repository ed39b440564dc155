"""Strict recipe loading: types, unknown keys with suggestions, overrides, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from genkit import config
from genkit.config import (
    FamilyConfig,
    OptimConfig,
    Recipe,
    apply_overrides,
    dump_recipe,
    from_dict,
    parse_recipe,
    parse_yaml,
    read_recipe,
    recipe_to_dict,
)
from genkit.errors import ConfigError


@dataclass
class FakeNet:
    channels: list[int] = field(default_factory=lambda: [8, 16])
    dropout: float = 0.0


@dataclass
class FakeConfig(FamilyConfig):
    family: str = "fake"
    timesteps: int = 100
    prediction: Literal["eps", "v"] = "eps"
    net: FakeNet = field(default_factory=FakeNet)


@dataclass
class OtherConfig(FamilyConfig):
    family: str = "other"


FAMILIES = {"fake": FakeConfig, "other": OtherConfig}  # config receives the family configs

FULL = """\
description: a tiny test recipe
model:
  family: fake
  timesteps: 50
  prediction: v
  net: {channels: [4, 8, 8], dropout: 0.1}
data: {source: digits, image_size: 8, batch_size: 4, hflip: true}
optim:
  model: {name: adam, lr: 1e-4, betas: [0.5, 0.99]}
train: {steps: 20, precision: no, clip_grad: null, ema_decay: 0.99}
sample: {sampler: ddim, steps: 10, n: 4, eta: 1}
eval: {}
"""


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str = FULL, overrides: tuple[str, ...] = ()) -> Recipe:
    return read_recipe(write(tmp_path, text), overrides, FAMILIES)


def error(tmp_path: Path, text: str = FULL, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_recipe(path, overrides, FAMILIES)
    message = str(info.value)
    assert "\n" not in message
    # an error about a key an override set names the override; any other names the file
    culprit = next((f"override {o!r}: " for o in overrides if message.startswith(f"override {o!r}: ")), None)
    assert message.startswith(culprit or f"{path}: "), message
    return message.removeprefix(culprit or f"{path}: ")


def with_section(section: str, body: str) -> str:
    """FULL with one top-level section's line(s) replaced by `section: body`."""
    raw = yaml.safe_load(FULL.replace("1e-4", "0.0001").replace(": no", ": 'no'"))
    raw[section] = parse_yaml(body)
    return yaml.safe_dump(raw, sort_keys=False)


def test_full_recipe_loads_with_types(tmp_path: Path) -> None:
    r = load(tmp_path)
    assert r.name == "tiny"  # from the file stem
    assert r.model == FakeConfig(timesteps=50, prediction="v", net=FakeNet([4, 8, 8], 0.1))
    assert r.data.image_size == 8 and r.data.hflip is True and r.data.root is None
    opt = r.optim["model"]
    assert opt == OptimConfig(name="adam", lr=1e-4, betas=(0.5, 0.99))
    assert type(opt.lr) is float and type(opt.betas) is tuple
    assert r.train.precision == "no" and r.train.clip_grad is None and r.train.steps == 20
    assert r.sample.eta == 1.0 and type(r.sample.eta) is float  # int accepted for float
    assert r.eval == config.EvalConfig()


def test_loader_reads_exponent_floats_and_only_true_false_as_bools() -> None:
    got = parse_yaml("a: 1e-4\nb: 2E-4\nc: -3e+2\nd: 1.0e4\ne: no\nf: true\ng: '1e-4'")
    assert got == {"a": 1e-4, "b": 2e-4, "c": -300.0, "d": 1e4, "e": "no", "f": True, "g": "1e-4"}
    assert yaml.safe_load("a: 1e-4")["a"] == "1e-4"  # the global SafeLoader is untouched


def test_name_in_file_wins_and_defaults_apply(tmp_path: Path) -> None:
    r = load(tmp_path, "name: mine\nmodel: {family: other}\n")
    assert r.name == "mine" and r.model == OtherConfig()
    assert r.train == config.TrainConfig() and r.optim == {}


@pytest.mark.parametrize(
    "old, new, key, closest",
    [
        ("eval: {}", "eval: {}\ntrian: {}", "trian", "train"),
        ("steps: 20", "stpes: 20", "train.stpes", "train.steps"),
        ("timesteps: 50", "timestep: 50", "model.timestep", "model.timesteps"),
        ("dropout:", "dropuot:", "model.net.dropuot", "model.net.dropout"),
        ("lr: 1e-4", "lrr: 1e-4", "optim.model.lrr", "optim.model.lr"),
    ],
)
def test_unknown_keys_suggest_the_closest(
    tmp_path: Path, old: str, new: str, key: str, closest: str
) -> None:
    expected = f"unknown key '{key}' (did you mean '{closest}'?)"
    assert error(tmp_path, FULL.replace(old, new)) == expected


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    message = error(tmp_path, FULL.replace("hflip: true", "zzz: 1"))
    assert message.startswith("unknown key 'data.zzz'; valid keys: source, root, image_size")
    message = error(tmp_path, FULL.replace("eval: {}", "eval: {zzz: 1}"))
    assert message.startswith("unknown key 'eval.zzz'; valid keys: features, protocol, weights, n")


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("steps: 20", "steps: abc", "train.steps: expected int, got str 'abc'"),
        ("steps: 20", "steps: '20'", "train.steps: expected int, got str '20'"),
        ("steps: 20", "steps: true", "train.steps: expected int, got bool True"),
        ("steps: 20", "steps: 2.5", "train.steps: expected int, got float 2.5"),
        ("lr: 1e-4", "lr: false", "optim.model.lr: expected float, got bool False"),
        ("hflip: true", "hflip: 1", "data.hflip: expected bool, got int 1"),
        ("hflip: true", "hflip: yes", "data.hflip: expected bool, got str 'yes'"),
        ("clip_grad: null", "clip_grad: x", "train.clip_grad: expected float or null, got str 'x'"),
        ("[4, 8, 8]", "[4, a]", "model.net.channels[1]: expected int, got str 'a'"),
        ("[4, 8, 8]", "4", "model.net.channels: expected a list, got int 4"),
        ("[0.5, 0.99]", "[0.5]", "optim.model.betas: expected a list of 2 items, got 1"),
        ("timesteps: 50", "timesteps: null", "model.timesteps: expected int, got null"),
    ],
)
def test_wrong_types_name_key_and_value(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert error(tmp_path, FULL.replace(old, new)) == expected


def test_literal_error_lists_the_choices(tmp_path: Path) -> None:
    message = error(tmp_path, FULL.replace("precision: no", "precision: fp32"))
    assert message == "train.precision: expected one of 'no', 'bf16', 'fp16', got 'fp32'"
    message = error(tmp_path, FULL.replace("prediction: v", "prediction: x0"))
    assert message == "model.prediction: expected one of 'eps', 'v', got 'x0'"


@pytest.mark.parametrize(
    "section, body, expected",
    [
        ("train", "5", "section 'train' must be a mapping, got int 5"),
        ("eval", "null", "section 'eval' must be a mapping, got null"),
        ("model", "[fake]", "section 'model' must be a mapping, got list ['fake']"),
        ("optim", "{model: 3}", "section 'optim.model' must be a mapping, got int 3"),
        ("model", "{timesteps: 3}", "missing required key 'model.family'"),
        ("model", "{family: 7}", "model.family: expected str, got int 7"),
    ],
)
def test_bad_sections(tmp_path: Path, section: str, body: str, expected: str) -> None:
    assert error(tmp_path, with_section(section, body)) == expected


def test_missing_model_and_non_mapping_recipe(tmp_path: Path) -> None:
    assert error(tmp_path, "train: {steps: 3}\n").startswith("missing required key 'model'")
    assert error(tmp_path, "- a\n- b\n") == "recipe must be a mapping, got list ['a', 'b']"
    assert error(tmp_path, "") == "recipe must be a mapping, got null"
    assert error(tmp_path, "model: [1\n").startswith("invalid YAML: line 2")


def test_missing_required_key_from_dict() -> None:
    with pytest.raises(ConfigError, match=r"^<dict>: missing required key 'name'$"):
        parse_recipe({"model": {"family": "other"}}, "<dict>", FAMILIES)


def test_unknown_family_suggests_and_lists_known(tmp_path: Path) -> None:
    message = error(tmp_path, FULL.replace("family: fake", "family: faek"))
    expected = "model.family: unknown family 'faek' (did you mean 'fake'?); known: fake, other"
    assert message == expected
    message = error(tmp_path, FULL.replace("family: fake", "family: zzzz"))
    assert message == "model.family: unknown family 'zzzz'; known: fake, other"


def test_overrides_change_values_and_parse_types(tmp_path: Path) -> None:
    overrides = (
        "train.steps=500", "optim.model.betas=[0.9,0.99]", "data.root=null", "data.root=/tmp/x",
        "optim.model.lr=3e-4", "model.net.channels=[2]", "train.precision=bf16", "name=other",
        "optim.disc.lr=1e-3",  # a new group is created
    )
    r = load(tmp_path, overrides=overrides)
    assert r.train.steps == 500 and r.optim["model"].betas == (0.9, 0.99)
    assert r.data.root == "/tmp/x" and r.optim["model"].lr == 3e-4
    assert r.model.net.channels == [2] and r.train.precision == "bf16" and r.name == "other"
    assert r.optim["disc"] == OptimConfig(lr=1e-3)
    assert load(tmp_path, overrides=("train.clip_grad=null",)).train.clip_grad is None


def test_override_unknown_keys_are_rejected_with_suggestion(tmp_path: Path) -> None:
    assert error(tmp_path, overrides=("train.stpes=5",)) == (
        "unknown key 'train.stpes' (did you mean 'train.steps'?)"
    )
    expected = "unknown key 'sampel' (did you mean 'sample'?)"
    assert error(tmp_path, overrides=("sampel.n=5",)) == expected
    expected = "train.steps: expected int, got str 'abc'"
    assert error(tmp_path, overrides=("train.steps=abc",)) == expected


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match=r"^override 'train.steps' must look like key.sub=value$"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["train..steps=3"])
    with pytest.raises(ConfigError, match=r"'train.steps' is not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match=r"^override 'a=\[1': invalid YAML"):
        apply_overrides({}, ["a=[1"])


def test_apply_overrides_leaves_input_untouched() -> None:
    raw = {"train": {"steps": 3}}
    out = apply_overrides(raw, ["train.steps=4", "a.b.c=x=y"])
    assert raw == {"train": {"steps": 3}}
    assert out == {"train": {"steps": 4}, "a": {"b": {"c": "x=y"}}}


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=0", "train.steps: must be >= 1, got 0"),
        ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
        ("train.keep_last=0", "train.keep_last: must be >= 1, got 0"),
        ("train.sample_every=-1", "train.sample_every: must be >= 0, got -1"),
        ("data.image_size=2", "data.image_size: must be >= 4, got 2"),
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("train.ema_decay=1", "train.ema_decay: must be in [0, 1) or null, got 1.0"),
        ("optim.model.lr=0", "optim.model.lr: must be > 0, got 0.0"),
        ("sample.n=0", "sample.n: must be >= 1, got 0"),
        ("sample.steps=0", "sample.steps: must be >= 1 or null, got 0"),
    ],
)
def test_value_checks(tmp_path: Path, override: str, key: str) -> None:
    assert error(tmp_path, overrides=(override,)) == key


def test_round_trip_through_dict_and_yaml(tmp_path: Path) -> None:
    r = load(tmp_path)
    plain = recipe_to_dict(r)
    assert list(plain)[:3] == ["name", "description", "model"]
    assert plain["optim"]["model"]["betas"] == [0.5, 0.99]  # tuples become lists
    assert parse_recipe(plain, "<dict>", FAMILIES) == r
    text = dump_recipe(r)
    assert parse_recipe(parse_yaml(text), "<dict>", FAMILIES) == r
    assert read_recipe(write(tmp_path, text, "again.yaml"), (), FAMILIES) == r
    odd = Recipe(name="1e3", model=OtherConfig(), description="no")  # strings that look typed
    assert parse_recipe(parse_yaml(dump_recipe(odd)), "<dict>", FAMILIES) == odd
    assert yaml.safe_load(dump_recipe(odd))["description"] == "no"


@dataclass
class Inner:
    x: int = 0


@dataclass
class Outer:
    pairs: tuple[int, ...] = ()
    table: dict[str, Inner] = field(default_factory=dict)
    maybe: Inner | None = None
    anything: Any = None


def test_from_dict_generic_types() -> None:
    raw = {"pairs": [1, 2, 3], "table": {"a": {"x": 2}}, "maybe": {"x": 1}, "anything": [1]}
    assert from_dict(Outer, raw) == Outer((1, 2, 3), {"a": Inner(2)}, Inner(1), [1])
    with pytest.raises(ConfigError, match=r"^unknown key 'table.a.y'; valid keys: x$"):
        from_dict(Outer, {"table": {"a": {"y": 2}}})
    with pytest.raises(ConfigError, match=r"^pairs\[2\]: expected int, got str 'c'$"):
        from_dict(Outer, {"pairs": [1, 2, "c"]})
    with pytest.raises(ConfigError, match=r"^section 'maybe' must be a mapping, got str 'x'$"):
        from_dict(Outer, {"maybe": "x"})


def test_missing_file_names_it_and_suggests_genkit_recipes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe not found: '.*nope.yaml'.*genkit recipes"):
        read_recipe(tmp_path / "nope.yaml", (), FAMILIES)


def test_shipped_recipes_resolve_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "shipped_recipes_dir", lambda: tmp_path)
    write(tmp_path, "description: b recipe\nmodel: {family: other}\n", "b_one.yaml")
    write(tmp_path, "model: {family: other}\n", "a_two.yaml")
    monkeypatch.chdir(tmp_path / "..")
    assert read_recipe("b_one", (), FAMILIES).name == "b_one"
    assert read_recipe("b_one.yaml", (), FAMILIES).description == "b recipe"
    assert config.list_recipes() == [("a_two", ""), ("b_one", "b recipe")]
    with pytest.raises(ConfigError, match=r"did you mean 'b_one'\?"):
        read_recipe("b_on", (), FAMILIES)


def test_shipped_recipes_dir_is_the_package_folder() -> None:
    assert config.shipped_recipes_dir() == Path(config.__file__).parent / "recipes"


def test_every_shipped_recipe_resolves_into_its_family_config() -> None:
    """A key misspelt in a shipped recipe (cm_cifar, ect_cifar ... never trained in the suite) fails here."""
    from genkit.runs import load_recipe

    names = [name for name, _ in config.list_recipes()]
    assert {"ddpm_digits", "ect_digits", "ect_cifar", "cm_cifar", "meanflow_cifar"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and type(recipe.model).__name__ != "dict", name
