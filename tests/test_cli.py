"""The command line end to end: train on digits, sample a grid and an npz, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_UNET
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def genkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "genkit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    r = genkit("train", str(ROOT / "recipes" / "ddpm_digits.yaml"),
               *TINY_UNET, "train.steps=12", "train.checkpoint_every=5", "train.sample_every=6",
               "train.log_every=4", "sample.steps=5", "sample.n=16", "data.batch_size=16", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd, cwd / "runs" / "ddpm_digits"


def test_train_writes_the_run_folder(trained_run):
    _, run = trained_run
    assert (run / "config.yaml").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-12"]
    assert {p.name for p in (run / "model").iterdir()} == {"weights.safetensors", "genkit.json"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-12.png", "step-6.png"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all({"loss", "images_per_s", "lr"} <= r.keys() for r in records)
    assert "train.steps" not in (run / "config.yaml").read_text()  # resolved YAML, nested keys
    assert "steps: 12" in (run / "config.yaml").read_text()


def test_sample_writes_grid_and_npz(trained_run):
    cwd, run = trained_run
    r = genkit("sample", str(run), "--sampler", "ddim", "--steps", "5", "--n", "10",
               "--out", "grid.png", "--save-npz", "s.npz", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "NFE 5" in r.stdout
    assert Image.open(cwd / "grid.png").size[0] > 16
    with np.load(cwd / "s.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (10, 1, 16, 16)
        assert int(z["nfe"]) == 5 and str(z["sampler"]) == "ddim"
        first = z["images"]
    r = genkit("sample", str(run), "--sampler", "ddim", "--steps", "5", "--n", "10",
               "--out", "grid2.png", "--save-npz", "s2.npz", cwd=cwd)
    with np.load(cwd / "s2.npz") as z:
        assert np.array_equal(z["images"], first)  # same seed, same images


def test_sample_refuses_bad_arguments(trained_run):
    cwd, run = trained_run
    r = genkit("sample", str(run), "--sampler", "nope", cwd=cwd)
    assert r.returncode == 2 and "unknown sampler 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = genkit("sample", str(run), "--steps", "0", cwd=cwd)
    assert r.returncode == 2 and "must be >= 1" in r.stderr
    r = genkit("sample", str(cwd / "not-a-run"), cwd=cwd)
    assert r.returncode == 2 and "not a genkit run folder" in r.stderr


def test_existing_run_needs_resume_and_resume_extends(trained_run):
    cwd, run = trained_run
    r = genkit("train", "ddpm_digits", *TINY_UNET, cwd=cwd)
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_config_errors_are_one_line(tmp_path):
    r = genkit("train", "ddpm_digits", "train.stpes=5", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = genkit("train", "ddpm_digits", "train.steps=abc", cwd=tmp_path)
    assert r.returncode == 2 and "train.steps: expected int, got str 'abc'" in r.stderr
    r = genkit("train", "no_such_recipe", cwd=tmp_path)
    assert r.returncode == 2 and "recipe not found" in r.stderr


def test_cifar_without_data_fails_at_once_with_where_to_put_it(tmp_path):
    r = genkit("train", "ddpm_cifar", "data.root=" + str(tmp_path / "nothing"), cwd=tmp_path)
    assert r.returncode == 2
    assert "CIFAR-10 not found" in r.stderr and "data.download=true" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs" / "ddpm_cifar" / "checkpoints").exists()


def test_recipes_lists_shipped_recipes(tmp_path):
    r = genkit("recipes", cwd=tmp_path)
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert {"ddpm_digits", "ddpm_cifar"} <= set(names)


def test_help_explains_every_subcommand(tmp_path):
    for cmd in ("train", "sample", "recipes"):
        r = genkit(cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "usage: genkit " + cmd in r.stdout
    assert "--save-npz" in genkit("sample", "--help", cwd=tmp_path).stdout
