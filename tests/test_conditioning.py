"""Class conditioning and classifier-free guidance, shared by the UNet families (DDPM, rectified flow, EDM, CM)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import TINY_UNET as TINY_UNET_OVERRIDES

import genkit
from genkit.errors import ConfigError, SamplerError
from genkit.eval.conditional import conditional_accuracy
from genkit.families.consistency import Consistency, ConsistencyConfig
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.edm import EDM, EDMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig
from genkit.runs import load_recipe
from genkit.samplers.guidance import guided

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
SHAPE = (1, 8, 8)
FAMILY_CLASSES = {"ddpm": (DDPM, DDPMConfig), "rectified_flow": (RectifiedFlow, RectifiedFlowConfig),
                  "edm": (EDM, EDMConfig), "consistency": (Consistency, ConsistencyConfig),
                  "consistency_ddpm": (Consistency, partial(ConsistencyConfig, parametrization="ddpm"))}


def conditional(name: str, classes: int = 10, seed: int = 0, **cfg):
    cls, config = FAMILY_CLASSES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        family = cls(config(unet=TINY_UNET, class_cond=True, **cfg), shape=SHAPE, num_classes=classes)
    # a freshly built class embedding is random, but give the labels a visible effect regardless
    with torch.no_grad():
        family.nets["unet"].class_embedding.weight.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    return family.nets.eval() and family


class Draws:
    """A StepHandle stand-in whose rand() returns given values."""

    def __init__(self, values):
        self.values = values

    def rand(self, n):
        return self.values[:n]


def test_guided_combination_is_affine_in_the_scale():
    D = lambda z, sigma, label: z * (label.view(-1, 1) + 1.0) + sigma.view(-1, 1)  # noqa: E731
    z, sigma = torch.randn(4, 3), torch.rand(4)
    cond, uncond = {"label": torch.tensor([1, 2, 3, 4])}, {"label": torch.zeros(4, dtype=torch.long)}
    x_c, x_u = D(z, sigma, **cond), D(z, sigma, **uncond)
    assert torch.equal(guided(D, cond, uncond, 1.0)(z, sigma), x_c)
    torch.testing.assert_close(guided(D, cond, uncond, 0.0)(z, sigma), x_u)
    torch.testing.assert_close(guided(D, cond, uncond, 3.5)(z, sigma), x_u + 3.5 * (x_c - x_u))


@pytest.mark.parametrize("name", FAMILY_CLASSES)
def test_guidance_one_is_conditional_and_zero_is_unconditional_through_the_unet(name):
    family = conditional(name)
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((4,), 2.0)
    cond, uncond = family.conditions(4, labels=[7])
    with torch.no_grad():
        x_c = family.denoise(z, sigma, label=torch.full((4,), 7))
        x_u = family.denoise(z, sigma)  # no label: the null label
        assert (x_c - x_u).abs().max() > 1e-3  # the label matters, so the checks below can fail
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 1.0)(z, sigma), x_c, rtol=0, atol=0)
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 0.0)(z, sigma), x_u,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(family.denoise, cond, uncond, 2.0)(z, sigma), 2 * x_c - x_u,
                                   rtol=1e-4, atol=1e-5)


def test_guided_sampling_costs_one_counted_call_per_step_and_depends_on_the_scale():
    family = conditional("rectified_flow")
    kw = dict(sampler="ddim", steps=3, labels=[2])
    a = sample(family, 4, generator=torch.Generator().manual_seed(0), guidance=1.0, **kw)
    b = sample(family, 4, generator=torch.Generator().manual_seed(0), guidance=3.0, **kw)
    c = sample(family, 4, generator=torch.Generator().manual_seed(0), **kw)
    assert a.nfe == b.nfe == 3
    assert torch.equal(a.images, c.images) and not torch.allclose(a.images, b.images)


def test_default_labels_cycle_through_the_classes_and_bad_labels_are_refused():
    family = conditional("ddpm", classes=3)
    cond, uncond = family.conditions(7)
    assert cond["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert uncond["label"].tolist() == [3] * 7  # the null label
    with pytest.raises(SamplerError, match="class label 3 out of range"):
        family.conditions(2, labels=[3])
    with pytest.raises(SamplerError, match="2 class labels for n=3"):
        family.conditions(3, labels=[0, 1])


def test_unconditional_families_refuse_labels_and_guidance():
    family = RectifiedFlow(RectifiedFlowConfig(unet=TINY_UNET), shape=SHAPE, num_classes=10)
    assert family.num_classes == 0  # class_cond is off: the dataset's labels are ignored
    with pytest.raises(SamplerError, match=r"^family 'rectified_flow' is unconditional \(model.class_cond: false\); "
                                           r"it takes no class labels$"):
        sample(family, 2, steps=2, labels=[1])
    with pytest.raises(SamplerError, match=r"^family 'rectified_flow' takes no text prompts \(model.family: ldm does\)$"):
        family.conditions(2, prompts=["a"])
    with pytest.raises(SamplerError, match=r"^family 'rectified_flow' is unconditional \(model.class_cond: false\); "
                                           r"it takes no class labels$"):
        family.unet(torch.zeros(2, *SHAPE), torch.zeros(2), torch.tensor([1, 2]))
    conditional = RectifiedFlow(RectifiedFlowConfig(unet=TINY_UNET, class_cond=True), shape=SHAPE, num_classes=10)
    assert conditional.nets["unet"].class_embedding.num_embeddings == 11  # the classes and the null label
    with pytest.raises(SamplerError, match="needs a conditional family"):
        sample(family, 2, steps=2, guidance=2.0)


def test_class_cond_needs_labelled_data():
    with pytest.raises(ConfigError, match="model.class_cond"):
        DDPM(DDPMConfig(unet=TINY_UNET, class_cond=True), shape=SHAPE, num_classes=0)


def test_label_dropout_uses_the_global_batch_stream_and_maps_unlabelled_to_null():
    family = conditional("ddpm", classes=10, cond_dropout=0.5)
    batch = {"label": torch.tensor([1, 2, 3, -1])}
    labels = family.train_labels(batch, Draws(torch.tensor([0.9, 0.1, 0.7, 0.9])))
    assert labels.tolist() == [1, 10, 3, 10]
    # P(u < p) = p for u ~ U[0, 1): a draw equal to p keeps its label; class 0 is a label like any other
    batch = {"label": torch.tensor([0, 0, 5, 5])}
    labels = family.train_labels(batch, Draws(torch.tensor([0.5, 0.499, 0.5, 0.0])))
    assert labels.tolist() == [0, 10, 5, 10]


@pytest.mark.slow
def test_class_conditional_rectified_flow_draws_the_requested_digit(tmp_path):
    """Trained on the 16 px digits, the shipped classifier reads back the requested class. A small UNet
    trained 150 steps (about 40 s) reaches 0.99 with guidance 2; chance is 0.1."""
    overrides = ["model.class_cond=true", "train.steps=150", "train.sample_every=0", "train.log_every=50",
                 "train.checkpoint_every=5000", "sample.n=20", "model.unet.channels=[16,32]",
                 "model.unet.attention=[false,true]", "model.unet.layers_per_block=1", "optim.model.lr=2e-3",
                 "train.warmup=50", "train.ema_decay=0.99"]
    run = genkit.train(load_recipe("rf_digits", overrides), out=tmp_path / "run")
    family = genkit.load(run, device="cpu")
    result = conditional_accuracy(family, 200, steps=20, guidance=2.0)
    assert result["accuracy"] > 0.8, result  # chance is 0.1


def test_cli_class_flag_on_an_unconditional_run_is_one_line(tmp_path, capsys):
    overrides = [*TINY_UNET_OVERRIDES, "data.image_size=8", "data.batch_size=16", "train.steps=2",
                 "train.sample_every=0", "train.checkpoint_every=100", "sample.n=2", "sample.steps=2"]
    run = genkit.train(load_recipe("rf_digits", overrides), out=tmp_path / "run")
    from genkit.cli import main

    capsys.readouterr()  # drop the training progress
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--class", "3",
                 "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unconditional" in err[0]


def test_requested_labels_are_checked_against_the_classes():
    from genkit.families.unet_family import sample_labels

    assert sample_labels(3, [0], 10).tolist() == [0, 0, 0] and sample_labels(2, [0, 9], 10).tolist() == [0, 9]
    assert sample_labels(4, None, 3).tolist() == [0, 1, 2, 0]
    for bad in (10, -1):
        with pytest.raises(SamplerError, match=f"^class label {bad} out of range: this run has classes 0..9$"):
            sample_labels(2, [1, bad], 10)
    with pytest.raises(SamplerError, match="^3 class labels for n=2 samples: give one label or n$"):
        sample_labels(2, [1, 2, 3], 10)
