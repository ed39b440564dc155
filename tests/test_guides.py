"""docs/architecture.md's three guides, run as written: a toy family, sampler and metric, each
registered in a few lines and taken through train, sample and eval.

The guides' code blocks are executed from the document itself, so the document cannot drift
from the code. Registries are restored after each test.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from genkit.data import build_dataset
from genkit.eval.engine import FEATURE_METRICS
from genkit.families import FAMILIES
from genkit.runs import run_recipe
from genkit.samplers import SAMPLERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def blocks(language: str) -> list[str]:
    """The fenced blocks of one language in docs/architecture.md, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@contextlib.contextmanager
def restored(*registries: dict):
    """Put every registry back as it was after the block (a guide adds to them)."""
    saved = [dict(r) for r in registries]
    try:
        yield
    finally:
        for registry, before in zip(registries, saved):
            registry.clear()
            registry.update(before)


def run_guide(index: int) -> dict:
    namespace: dict = {"__name__": "guide"}
    code = compile(blocks("python")[index], f"docs/architecture.md python block {index + 1}", "exec", dont_inherit=True)
    exec(code, namespace)  # dont_inherit: not this file's `from __future__ import annotations`
    return namespace


def test_the_document_has_the_three_guides():
    assert len(blocks("python")) == 3 and len(blocks("yaml")) == 1


def test_add_a_family_guide_trains_samples_and_evaluates(tmp_path):
    with restored(FAMILIES):
        run_guide(0)
        recipe = tmp_path / "pixel_gaussian_digits.yaml"
        recipe.write_text(blocks("yaml")[0])
        r = run_cli("train", str(recipe), "--out", "run", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        run = tmp_path / "run"
        data = build_dataset(run_recipe(run).data, "train")
        x = torch.stack([data[i]["image"] for i in range(len(data))])
        import genkit

        family = genkit.load(run, device="cpu")
        mu = family.nets["gauss"].mu
        # maximum likelihood: the fitted means are the data's per-pixel means (from zeros, RMS 0.8 away)
        assert float((x.mean(0) - mu).pow(2).mean().sqrt()) < 0.05
        r = run_cli("sample", str(run), "--n", "8", "--save-npz", "s.npz", "--out", "g.png", cwd=tmp_path)
        assert r.returncode == 0 and "sampler direct" in r.stdout, r.stderr
        with np.load(tmp_path / "s.npz") as z:
            assert z["images"].shape == (8, 1, 16, 16)
        r = run_cli("eval", "bpd", str(run), "--n", "64", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        bpd = json.loads(r.stdout)
        assert bpd["method"].startswith("exact change of variables") and 0 < bpd["bits_per_dim"] < 8
        r = run_cli("eval", "fid", "--real", "recipe:ddpm_digits:test", "--fake", str(run), "--n", "64",
                    "--features", "digits", "--json", cwd=tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout)["fd_digits"] > 0, r.stderr


def test_add_a_sampler_guide_equals_the_builtin_euler_on_a_trained_ddpm(ddpm_run, tmp_path):
    """The guide's Euler in EDM's x = z / alpha over sigma is the built-in `euler` on the same grid."""
    with restored(SAMPLERS):
        run_guide(1)
        for sampler in ("euler-sigma", "euler"):
            r = run_cli("sample", str(ddpm_run), "--sampler", sampler, "--steps", "6", "--n", "6",
                        "--schedule", "family", "--save-npz", f"{sampler}.npz", "--out", f"{sampler}.png",
                        cwd=tmp_path)
            assert r.returncode == 0 and "NFE 6" in r.stdout, r.stderr
        with np.load(tmp_path / "euler-sigma.npz") as a, np.load(tmp_path / "euler.npz") as b:
            assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1  # uint8 rounding
            assert a["images"].std() > 10  # images, not a constant


def test_add_a_metric_guide_is_zero_on_equal_sets_and_bounds_fid_from_below(ddpm_run, tmp_path, monkeypatch):
    from genkit import cli

    with restored(FEATURE_METRICS):
        run_guide(2)
        monkeypatch.setitem(cli.METRIC_HELP, "mean_distance", "the mean term of the Frechet distance")
        common = ["--features", "digits", "--n", "40", "--json"]
        same = run_cli("eval", "mean_distance", "--real", "recipe:ddpm_digits", "--fake", "recipe:ddpm_digits",
                       *common, cwd=tmp_path)
        assert same.returncode == 0, same.stderr
        assert json.loads(same.stdout)["mean_distance"] == pytest.approx(0, abs=1e-12)
        results = {}
        for metric in ("mean_distance", "fid"):
            r = run_cli("eval", metric, "--real", "recipe:ddpm_digits:test", "--fake", str(ddpm_run), *common,
                        cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            results[metric] = json.loads(r.stdout)
        assert 0 < results["mean_distance"]["value"] <= results["fid"]["value"]
        assert results["mean_distance"]["protocol"] == results["fid"]["protocol"]
