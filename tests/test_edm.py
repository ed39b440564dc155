"""EDM (Karras et al. 2022): preconditioning, loss weighting, training and the shared samplers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET
from step_handles import RecordingHandle

import genkit
from genkit.errors import ConfigError
from genkit.families.edm import EDM, EDMConfig, loss_weight, preconditioning
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig
from genkit.runs import load_recipe
from genkit.samplers.ode import sample_heun
from genkit.samplers.schedules import karras_sigmas

TINY = UNetConfig(channels=[8, 16], attention=[False, False], layers_per_block=1, norm_groups=4)
SIGMAS = torch.tensor([0.002, 0.05, 0.3, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_unit_variance_data_gives_unit_variance_inputs_and_targets(sigma_data):
    """Table 1's point: for data of std sigma_data, c_in x and the effective target
    (y - c_skip x) / c_out have unit variance at every sigma (checked on draws)."""
    g = torch.Generator().manual_seed(0)
    for sigma in SIGMAS:
        y = sigma_data * torch.randn(200_000, generator=g, dtype=torch.float64)
        x = y + sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
        c_skip, c_out, c_in, _ = preconditioning(sigma, sigma_data)
        assert float((c_in * x).var()) == pytest.approx(1.0, rel=0.02), float(sigma)
        assert float(((y - c_skip * x) / c_out).var()) == pytest.approx(1.0, rel=0.02), float(sigma)


def test_lambda_times_c_out_squared_is_one_and_c_noise_is_log_sigma_over_4():
    c_skip, c_out, c_in, c_noise = preconditioning(SIGMAS, 0.5)
    torch.testing.assert_close(loss_weight(SIGMAS, 0.5) * c_out**2, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    torch.testing.assert_close(c_skip, 0.25 / (SIGMAS**2 + 0.25))
    torch.testing.assert_close(c_in, 1 / (SIGMAS**2 + 0.25).sqrt())


def test_loss_is_the_effective_unit_weight_regression_of_F(monkeypatch):
    """lambda ||D - y||^2 = ||F - (y - c_skip x) / c_out||^2: the loss the family computes."""
    torch.manual_seed(0)
    family = EDM(EDMConfig(unet=TINY), (1, 8, 8))
    y, n = torch.randn(4, 1, 8, 8) * 0.5, torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.4, 2.0, 50.0])
    n = n * sigma.view(-1, 1, 1, 1)
    F = torch.randn(4, 1, 8, 8)
    seen = {}

    def unet(x, t, label=None):
        seen.update(x=x, t=t)
        return F

    monkeypatch.setattr(family, "unet", unet)
    loss = family.loss(y, sigma, n)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in preconditioning(sigma, 0.5))
    x = y + n
    torch.testing.assert_close(loss, torch.mean((F - (y - c_skip * x) / c_out) ** 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["x"], c_in * x)
    torch.testing.assert_close(seen["t"], sigma.log() / 4)


def test_gaussian_data_with_the_exact_denoiser_samples_its_std():
    """For data N(0, sigma_data^2) the ideal denoiser is D(x; sigma) = c_skip x (F = 0). With F = 0 the
    family's denoiser must be exactly that in the samplers' scaled state z = x / sqrt(1 + sigma^2), and
    Heun from plain N(0, I) on EDM's grid must end at samples of std sigma_data (0.25)."""
    torch.manual_seed(0)
    family = EDM(EDMConfig(unet=TINY, sigma_data=0.25), (1, 4, 4))
    with torch.no_grad():
        family.nets["unet"].conv_out.weight.zero_()
        family.nets["unet"].conv_out.bias.zero_()

    def exact(z, sigma):
        s = sigma.view(-1, 1, 1, 1)
        return 0.0625 / (s**2 + 0.0625) * z * (1 + s**2).sqrt()

    z = torch.randn(5, 1, 4, 4)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0])
    with torch.no_grad():
        torch.testing.assert_close(family.denoise(z, sigma), exact(z, sigma))
    noise = torch.randn(600, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(family, 600, sampler="heun", steps=18, noise=noise)
    assert out.nfe == 35  # the paper's NFE for CIFAR-10
    want = sample_heun(exact, noise.clone(), family.sigmas(18)).clamp(-1, 1)  # as `sample` returns images
    torch.testing.assert_close(out.images, want, rtol=1e-4, atol=1e-5)
    fine = sample_heun(exact, noise.double(), family.sigmas(200))  # the exact denoiser, Heun's error made small
    assert float(fine.std()) == pytest.approx(0.25, rel=0.01)


def test_bad_sigmas_are_refused():
    for lo, hi in ((1.0, 0.5), (1.0, 1.0)):
        with pytest.raises(ConfigError, match=f"^model.sigma_max: must be > model.sigma_min={lo}, got {hi}$"):
            EDM(EDMConfig(unet=TINY, sigma_min=lo, sigma_max=hi), (1, 8, 8))
    for key in ("sigma_data", "p_std", "sigma_min", "rho"):
        with pytest.raises(ConfigError, match=f"^model.{key}: must be > 0, got 0.0$"):
            EDM(EDMConfig(unet=TINY, **{key: 0.0}), (1, 8, 8))


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edm") / "run"
    return genkit.train(load_recipe("edm_digits", [*TINY_UNET, "data.image_size=8", "data.batch_size=16",
                                                   "train.steps=4", "train.sample_every=0", "train.log_every=2",
                                                   "sample.n=4", "sample.steps=3"]), out=out)


def test_trains_and_samples_with_the_shared_samplers(edm_run):
    family = genkit.load(edm_run)
    assert family.name == "edm"
    losses = [r for r in (edm_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert losses and (edm_run / "samples" / "step-4.png").exists()
    for sampler, nfe in (("heun", 5), ("euler", 3), ("dpmpp-2m", 3), ("ddim", 3)):
        out = genkit.api.sample_with_info(family, 3, sampler=sampler, steps=3)
        assert out.images.shape == (3, 1, 8, 8) and torch.isfinite(out.images).all() and out.nfe == nfe
    torch.testing.assert_close(family.sigmas(3)[[0, 2, 3]], torch.tensor([80.0, 0.002, 0.0], dtype=torch.float64))


def test_train_step_is_the_loss_of_its_draws_with_dropped_labels():
    """ln sigma = P_mean + P_std N(0, 1) per image, n = sigma eps, labels dropped to the null label where the
    dropout draw falls below cond_dropout, one step of group "model"."""
    torch.manual_seed(0)
    family = EDM(EDMConfig(unet=TINY, class_cond=True, cond_dropout=0.5, p_mean=-0.7, p_std=1.3), shape=(1, 8, 8),
                 num_classes=3)
    y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    label = torch.tensor([0, 1, 2, -1, 1, 2])
    opt = RecordingHandle(seed=3)
    logs = family.train_step({"image": y, "label": label}, 0, opt)
    a, eps, keep = opt.draws
    assert a.shape == (6,) and eps.shape == y.shape
    sigma, labels = (-0.7 + 1.3 * a).exp(), torch.where((keep < 0.5) | (label < 0), 3, label)
    assert 0 < int((labels == 3).sum()) < 6
    [(group, loss)] = opt.steps
    assert group == "model" and torch.equal(logs["loss"], loss.detach())
    torch.testing.assert_close(loss, family.loss(y, sigma, eps * sigma.view(-1, 1, 1, 1), labels))
    assert not torch.allclose(loss, family.loss(y, sigma, eps * sigma.view(-1, 1, 1, 1), label.clamp_min(0)))



def test_sampling_grid_is_edms_with_the_configured_rho_and_span():
    family = EDM(EDMConfig(unet=TINY, rho=3.0, sigma_min=0.01, sigma_max=20.0), shape=(1, 8, 8))
    torch.testing.assert_close(family.sigmas(6), karras_sigmas(6, 0.01, 20.0, 3.0))
    assert family.sigma_range() == (0.01, 20.0)
