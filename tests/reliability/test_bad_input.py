"""Bad input: broken image files, odd modes, empty folders, NaN in npz, bad recipes and CLI
arguments each end in one clear line naming the file, key or value; a fuzz test (hypothesis)
shows that no recipe override or CLI argument list produces a raw traceback."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genkit.cli import main
from genkit.data import build_dataset
from genkit.errors import DataError, GenkitError
from genkit.eval.specs import iter_images
from genkit.runs import load_recipe


def png(path, image):
    image.save(path)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """Readable files in odd modes next to broken ones."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    good = [
        png(root / "rgb.png", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))),
        png(root / "grey16.png", Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16))),
        png(root / "palette.png", Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P")),
    ]
    cmyk = root / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="CMYK").save(cmyk)
    good.append(cmyk)
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, format="JPEG")
    bad = {
        "truncated.jpg": full.getvalue()[: len(full.getvalue()) // 3],
        "empty.png": b"",
        "text.png": b"this is not an image",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    png(root / "tiny.png", Image.new("RGB", (2, 2)))
    return root, good, [*bad, "tiny.png"]


def cfg(root, **kw):
    return load_recipe("ddpm_digits", ["data.source=folder", f"data.root={root}", "data.image_size=16",
                                       *[f"data.{k}={v}" for k, v in kw.items()]]).data


def test_each_broken_file_is_an_error_naming_it(messy_folder):
    root, good, bad = messy_folder
    data = build_dataset(cfg(root))
    names = [p.name for p in data.files]
    for name in bad:
        with pytest.raises(DataError, match=f"'{root / name}'") as info:
            data[names.index(name)]
        assert "\n" not in str(info.value)
    for path in good:  # CMYK, 16-bit and palette files are converted, not refused
        item = data[names.index(path.name)]
        assert item["image"].shape == (3, 16, 16) and item["image"].abs().max() <= 1


def test_on_error_skip_leaves_the_bad_files_out_and_counts_them(messy_folder):
    root, good, bad = messy_folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_dataset(cfg(root, on_error="skip"))
    assert sorted(p.name for p in data.files) == sorted(p.name for p in good)
    [w] = [w for w in caught if "on_error=skip" in str(w.message)]
    assert f"skipped {len(bad)} of {len(bad) + len(good)} files" in str(w.message)
    for i in range(len(data)):
        assert data[i]["image"].shape == (3, 16, 16)


def test_an_empty_folder_and_a_folder_of_only_broken_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_dataset(cfg(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 image files"):
        build_dataset(cfg(tmp_path / "broken", on_error="skip"))


def test_nan_or_inf_in_an_npz_is_refused_naming_the_file(tmp_path):
    images = np.zeros((4, 3, 8, 8), dtype=np.float32)
    images[1, 0, 0, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, images=images)
    with pytest.raises(GenkitError, match="bad.npz"):
        next(iter_images(str(path), None, 2))


@pytest.mark.parametrize("argv, needle", [
    (["sample", "RUN", "--steps", "0"], "--steps: must be >= 1"),
    (["sample", "RUN", "--n", "-3"], "--n: must be >= 1"),
    (["sample", "RUN", "--eta", "nan"], "--eta: expected a finite number"),
    (["sample", "RUN", "--sampler", "direct"], "does not fit family 'ddpm'"),
    (["sample", "RUN", "--sampler", "warp"], "unknown sampler 'warp'"),
    (["train", "ddpm_digits", "train.stepz=3"], "train.stepz"),
    (["train", "ddpm_digits", "train.steps=many"], "train.steps"),
    (["train", "no_such_recipe"], "no_such_recipe"),
    (["eval", "fid", "--real", "/nope", "--fake", "/nope2", "--features", "digits"], "/nope"),
])
def test_bad_cli_input_is_one_line(argv, needle, capsys, tiny_ddpm_run):
    argv = [str(tiny_ddpm_run) if a == "RUN" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


@pytest.fixture(scope="module")
def tiny_ddpm_run(tmp_path_factory):
    from tiny_runs import overrides

    import genkit

    name, args = overrides("ddpm", 1, 1)
    return genkit.train(load_recipe(name, args), out=tmp_path_factory.mktemp("r") / "run")


KEYS = ["data.batch_size", "data.image_size", "data.source", "data.on_error", "model.timesteps",
        "model.schedule", "model.unet.channels", "model.unet.attention", "optim.model.lr", "optim.model.name",
        "optim.model.betas", "train.steps", "train.precision", "train.clip_grad", "train.on_nan",
        "sample.sampler", "sample.steps", "eval.n", "nonsense", "train.nonsense", "model.unet"]
VALUES = st.one_of(st.integers(-10, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                   st.booleans(), st.text(max_size=12), st.lists(st.integers(-3, 64), max_size=4),
                   st.just("null"), st.just("[1, [2]]"), st.just("{a: 1}"))


def _value(v):
    return v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v).replace("'", "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_fuzzed_recipe_overrides_load_or_fail_with_a_genkit_error(pairs):
    overrides = [f"{k}={_value(v)}" for k, v in pairs]
    try:
        recipe = load_recipe("ddpm_digits", overrides)
    except GenkitError as error:
        assert "\n" not in str(error)
        return
    assert recipe.train.steps >= 0


ARGS = st.sampled_from(["--steps", "--n", "--seed", "--eta", "--sampler", "--schedule", "--batch-size",
                        "--rtol", "--guidance", "--class", "--out", "--bogus", "-x", "0", "-1", "nan", "1e9",
                        "ddim", "karras", "3", "a,b", "", "=", "--"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([["sample", "/no/run"], ["reflow", "/no/run"], ["eval", "fid"], ["eval", "bpd", "/no/run"],
                        ["eval", "straightness", "/no/run"], ["eval", "curve", "/no/run"], ["recipes"], ["bogus"]]),
       st.lists(ARGS, max_size=6))
def test_fuzzed_cli_arguments_never_give_a_traceback(capsys, head, tail):
    try:
        code = main([*head, *tail])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (0, 2), (head, tail, err)
    assert len(err) <= 1 and not any("Traceback" in line for line in err), (head, tail, err)
