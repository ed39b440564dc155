"""`sample(compile=True)` on every family: the compiled frozen copies give the eager images, and a
family whose sampling the compiled forward would not reach refuses instead of staying eager silently."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import FAMILY_RUNS, STAGES, overrides, tiny_stage

import genkit
from genkit.errors import SamplerError
from genkit.families.sampling import sample
from genkit.runs import load_recipe

NOT_FORWARD = {"nice", "glow", "autoencoder_kl"}  # sample through the inverse / decode: compile is refused


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILY_RUNS) - {"vqgan"}))  # a tokenizer does not sample
def test_compiled_sampling_gives_the_eager_images(tmp_path, family):
    stage = tiny_stage(STAGES[family], tmp_path / "stage") if family in STAGES else None
    recipe, args = overrides(family, 4, 4, stage=stage)
    run = genkit.train(load_recipe(recipe, args), out=tmp_path / "run")
    model = genkit.load(run)

    def images(**kw) -> torch.Tensor:
        return sample(model, 3, generator=torch.Generator().manual_seed(0), **kw).images

    if family in NOT_FORWARD:
        with pytest.raises(SamplerError, match=f"family '{model.name}' samples through methods other than"):
            images(compile=True)
        return
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, compiled = images(), images(compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # Dynamo really compiled a network
    assert compiled.shape == eager.shape
    assert (compiled - eager).abs().max() < 1e-3, family
