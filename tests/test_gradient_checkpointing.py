"""`train.gradient_checkpointing=true`: activations are recomputed, and training is unchanged."""

import torch
from conftest import TINY_UNET
from diffusers.models.resnet import ResnetBlock2D

import genkit
from genkit.io import load_tensors
from genkit.runs import load_recipe


def _train(tmp_path, checkpointing: bool):
    recipe = load_recipe("ddpm_digits", [
        *TINY_UNET, "data.image_size=8", "data.batch_size=8", "train.steps=3", "train.checkpoint_every=100",
        "train.sample_every=0", "train.log_every=1", "sample.n=2", "sample.steps=1", "model.timesteps=50",
        f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    run = genkit.train(recipe, out=tmp_path / f"gc-{checkpointing}")
    return load_tensors(run / "model" / "weights.safetensors")


def test_checkpointing_recomputes_blocks_and_trains_the_same_weights(tmp_path, monkeypatch):
    calls = []
    forward = ResnetBlock2D.forward
    monkeypatch.setattr(ResnetBlock2D, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    plain = _train(tmp_path, False)
    n_plain, calls[:] = len(calls), []
    checkpointed = _train(tmp_path, True)
    assert len(calls) > n_plain  # the backward pass ran the ResNet blocks again
    assert plain.keys() == checkpointed.keys()
    for k in plain:  # same arithmetic, recomputed: float32 round-off at most
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)
