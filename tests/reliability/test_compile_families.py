"""`sample(compile=True)` on every family: the compiled frozen copies give the eager images."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import FAMILY_RUNS, STAGES, overrides, tiny_stage

import genkit
from genkit.config import load_recipe
from genkit.samplers import sample


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILY_RUNS) - {"vqgan"}))  # a tokenizer does not sample
def test_compiled_sampling_gives_the_eager_images(tmp_path, family):
    stage = tiny_stage(STAGES[family], tmp_path / "stage") if family in STAGES else None
    recipe, args = overrides(family, 4, 4, stage=stage)
    run = genkit.train(load_recipe(recipe, args), out=tmp_path / "run")
    model = genkit.load(run)

    def images(**kw) -> torch.Tensor:
        return sample(model, 3, generator=torch.Generator().manual_seed(0), **kw).images

    eager, compiled = images(), images(compile=True)
    assert compiled.shape == eager.shape
    assert (compiled - eager).abs().max() < 1e-3, family
