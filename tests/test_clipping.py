"""Clipping done as diffusers and GLIDE do it: guidance combines raw predictions and `ddim`, `ancestral` and
the multistep solvers (diffusers' thresholding) clamp the result; the ODE solvers (Euler/Heun in sigma,
arctan-time, rk45) and the likelihood follow the model's own, unclipped field."""

from __future__ import annotations

import math

import pytest
import torch
from test_ddpm import tiny_ddpm

from genkit.eval.likelihood import family_bits_per_dim
from genkit.families.base import Denoising, Family
from genkit.families.sampling import sample, sampler_denoiser
from genkit.samplers import SAMPLERS


class Fixed(Family, Denoising):
    """A conditional denoiser with fixed answers: x0_hat = 1.2 given the label, 1.5 without it."""

    name, default_sampler = "fixed", "ddim"
    nets = torch.nn.ModuleDict()

    def __init__(self, clip):
        self.clip = clip

    def train_step(self, batch, step, opt):
        return {}

    def denoise(self, z, sigma, label):
        return torch.where(label.view(-1, 1) >= 0, torch.full_like(z, 1.2), torch.full_like(z, 1.5))

    def sigmas(self, steps):
        return torch.tensor([1.0, 0.0], dtype=torch.float64)

    def sigma_range(self):
        return 0.1, 1.0

    @property
    def clip_x0(self):
        return self.clip


def test_guidance_combines_raw_predictions_and_ddim_clamps_the_result():
    """x_c = 1.2, x_u = 1.5, w = 3: the guided x0 is 1.2 + 2 (1.2 - 1.5) = 0.6. Clamping each branch first
    (the old order) gives 1 + 2 (1 - 1) = 1; clamping nothing gives 0.6 as well, so the second case
    below, 3.0 (guided 2.4, clamped to 1), separates clamped from unclamped."""
    z, sigma = torch.zeros(2, 3), torch.ones(2)
    cond, uncond = {"label": torch.tensor([3, 3])}, {"label": torch.tensor([-1, -1])}
    for name in ("ddim", "ancestral", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm"):
        D = sampler_denoiser(Fixed(1.0), SAMPLERS[name], cond, uncond, 3.0)
        torch.testing.assert_close(D(z, sigma), torch.full_like(z, 0.6))
        D = sampler_denoiser(Fixed(1.0), SAMPLERS[name], cond, uncond, -1.0)  # 1.2 - 2 (1.2 - 1.5) = 1.8
        torch.testing.assert_close(D(z, sigma), torch.ones_like(z))
    for name in ("euler", "heun", "euler-arctan", "heun-arctan", "rk45"):  # the ODE never clamps the field
        D = sampler_denoiser(Fixed(1.0), SAMPLERS[name], cond, uncond, -1.0)
        torch.testing.assert_close(D(z, sigma), torch.full_like(z, 1.8))
    D = sampler_denoiser(Fixed(None), SAMPLERS["ddim"], cond, uncond, -1.0)  # a family that does not clip
    torch.testing.assert_close(D(z, sigma), torch.full_like(z, 1.8))


def wide_ddpm(clip: bool):
    """A tiny DDPM whose x0_hat leaves [-1, 1] (output gain 4), with and without clip_sample: same weights."""
    family = tiny_ddpm(100, out_scale=4.0, seed=3, clip_sample=clip)
    family.nets.eval()
    return family


@pytest.mark.parametrize("name", ["euler", "heun", "heun-arctan", "rk45"])
def test_ode_solvers_follow_the_unclipped_field_whatever_clip_sample_says(name):
    kw = dict(sampler=name, steps=None if SAMPLERS[name].adaptive else 6)
    images = [sample(wide_ddpm(clip), 3, generator=torch.Generator().manual_seed(0), **kw).images
              for clip in (True, False)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm"])
def test_x0_steppers_clamp_x0_hat_when_the_family_clips(name):
    """...and the clamp is not a no-op here: it changes these samplers' images (so the test above can fail)."""
    images = [sample(wide_ddpm(clip), 3, sampler=name, steps=6, generator=torch.Generator().manual_seed(0)).images
              for clip in (True, False)]
    assert (images[0] - images[1]).abs().max() > 1e-3
    x0 = wide_ddpm(False).denoise(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                                  torch.full((3,), 2.0))
    assert x0.abs().max() > 1.0  # the raw prediction does leave [-1, 1]


def test_bits_per_dim_uses_the_unclipped_field():
    images = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = [family_bits_per_dim(wide_ddpm(clip), images, generator=torch.Generator().manual_seed(1),
                               rtol=1e-2, atol=1e-2) for clip in (True, False)]
    assert math.isfinite(out[0]["bits_per_dim"]) and out[0]["bits_per_dim"] == out[1]["bits_per_dim"]
