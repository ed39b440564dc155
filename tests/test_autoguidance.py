"""Autoguidance (Karras et al. 2024): D_w = D_bad + w (D_good - D_bad), sharing classifier-free guidance's code."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_cli
from test_min_snr import Identity

import genkit
from genkit.errors import RunError, SamplerError
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.ldm import LDM, LDMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.sampling import sample, sampler_denoiser
from genkit.nn.cond_unet import CondUNetConfig
from genkit.nn.text import TextConfig
from genkit.nn.unet import UNetConfig
from genkit.samplers import SAMPLERS
from genkit.samplers.guidance import combine, guided

TINY = UNetConfig(channels=[8, 16], attention=[False, False], layers_per_block=1, norm_groups=4)


def seeded(build, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def ddpm(seed, **cfg):
    return seeded(lambda: DDPM(DDPMConfig(unet=TINY, timesteps=100, **cfg), (1, 8, 8), num_classes=10), seed)


def rf(seed):
    return seeded(lambda: RectifiedFlow(RectifiedFlowConfig(unet=TINY), (1, 8, 8)), seed)


def ldm(seed):
    cfg = LDMConfig(scale_factor=1.0, timesteps=100, unet=CondUNetConfig(channels=[16, 32],
                    cross_attention=[False, True], head_dim=16),
                    text=TextConfig(width=16, heads=2, layers=1, context_length=8))
    return seeded(lambda: LDM(cfg, shape=(1, 8, 8), first_stage=Identity()), seed)


class Calls:
    """A denoiser that records the batch size of each call."""

    def __init__(self, D):
        self.D, self.batches = D, []

    def __call__(self, z, sigma, **cond):
        self.batches.append(z.shape[0])
        return self.D(z, sigma, **cond)


def test_combination_is_the_papers_formula_and_exact_at_one():
    g = torch.Generator().manual_seed(0)
    good, bad = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert torch.equal(combine(good, bad, 1.0), good)
    torch.testing.assert_close(combine(good, bad, 0.0), bad)
    torch.testing.assert_close(combine(good, bad, 2.5), bad + 2.5 * (good - bad))


def test_autoguided_denoiser_calls_each_model_once_per_step_and_skips_the_guide_at_one():
    good, bad = Calls(lambda z, s, **c: z * 2), Calls(lambda z, s, **c: z * 0.5)
    z, sigma = torch.randn(5, 1, 2, 2), torch.ones(5)
    torch.testing.assert_close(guided(good, {}, None, 3.0, bad, {})(z, sigma), 0.5 * z + 3 * (1.5 * z))
    assert good.batches == [5] and bad.batches == [5]   # two networks: one call each on the batch
    assert torch.equal(guided(good, {}, None, 1.0, bad, {})(z, sigma), 2 * z)
    assert bad.batches == [5]                           # w = 1: the guide is not evaluated


def test_classifier_free_guidance_keeps_its_one_doubled_batch_call():
    D = Calls(lambda z, s, label=None: z * label.view(-1, 1, 1, 1))
    cond, uncond = {"label": torch.full((4,), 3.0)}, {"label": torch.ones(4)}
    z = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(guided(D, cond, uncond, 2.0)(z, torch.ones(4)), z * (3 + 1 * (3 - 1)))
    assert D.batches == [8]


def test_autoguidance_gives_each_model_its_own_condition_and_keeps_the_state_dtype():
    good = lambda z, s, label: z * label.view(-1, 1)             # noqa: E731
    guide = lambda z, s, label: (z * label.view(-1, 1)).double()  # noqa: E731  a guide in another dtype
    z = torch.randn(2, 3)
    out = guided(good, {"label": torch.tensor([2.0, 3.0])}, None, 2.5, guide, {"label": torch.tensor([1.0, 1.0])})(
        z, torch.ones(2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, z * torch.tensor([[2.0], [3.0]]) * 2.5 - 1.5 * z)
    for scale in (None, 1.0):  # unguided: the condition still reaches the model
        assert torch.equal(guided(good, {"label": torch.tensor([2.0, 3.0])}, None, scale)(z, torch.ones(2)),
                           z * torch.tensor([[2.0], [3.0]]))


def test_classifier_free_guidance_doubles_prompt_lists_and_label_tensors_in_order():
    """Text conditions are lists of prompts: the doubled batch is conditional rows, then unconditional rows."""
    seen = {}

    def D(z, s, prompt, label):
        assert torch.equal(s, torch.ones(4))
        seen.update(prompt=prompt, label=label)
        return z * torch.tensor([len(p) for p in prompt], dtype=z.dtype).view(-1, 1, 1, 1) + label.view(-1, 1, 1, 1)

    cond = {"prompt": ["a cat", "two"], "label": torch.tensor([1.0, 2.0])}
    uncond = {"prompt": ["", ""], "label": torch.tensor([0.0, 0.0])}
    z = torch.randn(2, 1, 2, 2)
    out = guided(D, cond, uncond, 3.0)(z, torch.ones(2))
    assert seen["prompt"] == ["a cat", "two", "", ""] and torch.equal(seen["label"], torch.tensor([1.0, 2, 0, 0]))
    x_c = z * torch.tensor([5.0, 3.0]).view(-1, 1, 1, 1) + torch.tensor([1.0, 2.0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x_c + 2 * (x_c - 0))
    with pytest.raises(SamplerError, match=r"^conditional keys \['label', 'prompt'\] differ from unconditional "
                                           r"\['prompt'\]$"):
        guided(D, cond, {"prompt": ["", ""]}, 3.0)
    with pytest.raises(SamplerError,
                       match=r"^guidance=3.0 needs a conditional family \(e.g. model.class_cond: true\)$"):
        guided(D, {}, None, 3.0)


@pytest.mark.parametrize("build", [ddpm, rf, ldm], ids=["ddpm", "rectified_flow", "ldm"])
def test_w_one_is_the_good_model_exactly_and_w_guides_with_both_counted(build):
    good, bad = build(0), build(1)
    noise = torch.randn(3, *good.latent_shape, generator=torch.Generator().manual_seed(0))
    plain = sample(good, 3, sampler="euler", steps=3, noise=noise)
    one = sample(good, 3, sampler="euler", steps=3, noise=noise, guide=bad, guidance=1.0)
    assert torch.equal(one.images, plain.images) and one.nfe == plain.nfe == 3
    guided_out = sample(good, 3, sampler="euler", steps=3, noise=noise, guide=bad, guidance=2.0)
    assert guided_out.nfe == 6  # the guide's evaluations count
    cond, _ = good.conditions(3)
    bad_cond, _ = bad.conditions(3)
    sigmas = good.sigmas(3)

    def D(z, sigma):
        x_good, x_bad = good.denoise(z, sigma, **cond), bad.denoise(z, sigma, **bad_cond)
        return x_bad + 2.0 * (x_good - x_bad)

    with torch.inference_mode():
        want = good.decode_latents(SAMPLERS["euler"].fn(D, noise.clone(), sigmas)).clamp(-1, 1)
    torch.testing.assert_close(guided_out.images, want, rtol=1e-5, atol=1e-5)
    assert (guided_out.images - plain.images).abs().max() > 1e-3  # the guide changes the images


def test_guidance_combines_raw_predictions_then_ddim_clips():
    """As classifier-free guidance: the raw x0_hat of both models are combined, then ddim clamps (clip_x0)."""
    good, bad = ddpm(0, clip_sample=True), ddpm(1, clip_sample=True)
    z, sigma = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3, torch.full((2,), 5.0)
    with torch.no_grad():
        x_good, x_bad = good.denoise(z, sigma), bad.denoise(z, sigma)
        want = (x_bad + 3.0 * (x_good - x_bad)).clamp(-1, 1)
        assert not torch.equal(want, (x_bad.clamp(-1, 1) + 3 * (x_good.clamp(-1, 1) - x_bad.clamp(-1, 1))).clamp(-1, 1))
        for name, clamps in (("ddim", True), ("euler", False)):
            D = sampler_denoiser(good, SAMPLERS[name], {}, None, 3.0, bad, {})
            torch.testing.assert_close(D(z, sigma), want if clamps else x_bad + 3.0 * (x_good - x_bad))


def test_class_conditional_good_and_guide_share_the_labels():
    good, bad = ddpm(0, class_cond=True), ddpm(1, class_cond=True)
    calls = []
    real = bad.denoise
    bad.denoise = lambda z, sigma, **c: calls.append(c) or real(z, sigma, **c)
    sample(good, 4, sampler="euler", steps=2, labels=[7], guide=bad, guidance=2.0)
    assert calls and all(c["label"].tolist() == [7, 7, 7, 7] for c in calls)


def test_a_guide_of_other_states_is_refused():
    with pytest.raises(SamplerError, match="shape"):
        sample(ddpm(0), 2, steps=2, guide=seeded(lambda: DDPM(DDPMConfig(unet=TINY), (1, 16, 16)), 1), guidance=2.0)


def test_cli_guides_with_an_earlier_checkpoint_of_the_same_run(ddpm_run, tmp_path):
    base = run_cli("sample", str(ddpm_run), "--n", "4", "--steps", "3", "--out", str(tmp_path / "a.png"))
    r = run_cli("sample", str(ddpm_run), "--n", "4", "--steps", "3", "--guide-with", f"{ddpm_run}:10",
                "--guidance", "2", "--out", str(tmp_path / "g.png"))
    assert base.returncode == 0 and r.returncode == 0, r.stderr
    nfe = lambda out: int(re.search(r"NFE (\d+)", out).group(1))  # noqa: E731
    assert nfe(r.stdout) == 2 * nfe(base.stdout)
    bad = run_cli("sample", str(ddpm_run), "--n", "4", "--guide-with", f"{ddpm_run}:7", "--guidance", "2",
                  "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "no checkpoint at step 7" in bad.stderr


def test_load_a_checkpoint_by_step(ddpm_run):
    early, final = genkit.load(ddpm_run, step=10), genkit.load(ddpm_run)
    a, b = early.nets.state_dict(), final.nets.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunError, match="kept: 10, 12"):
        genkit.load(ddpm_run, step=3)
