"""Rectified flow: the t <-> sigma map, the denoiser's VP scaling, exact Gaussian flows, the loss, samplers, training."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_UNET as TINY_UNET_OVERRIDES
from diffusers import FlowMatchEulerDiscreteScheduler
from step_handles import RecordingHandle
from torch import nn

import genkit
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig, sigma_to_t, t_to_sigma
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig
from genkit.runs import load_recipe
from genkit.samplers import SAMPLERS
from genkit.samplers.adapters import vp_coefficients
from genkit.samplers.ddim import sample_ddim
from genkit.samplers.ode import sample_euler, sample_euler_arctan, sample_heun_arctan, sample_rk45

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
SHAPE = (1, 8, 8)


def tiny_rf(seed: int = 0, **cfg) -> RectifiedFlow:
    with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG left as it was
        torch.manual_seed(seed)
        return RectifiedFlow(RectifiedFlowConfig(unet=TINY_UNET, **cfg), shape=SHAPE)


class Oracle(nn.Module):
    """A stand-in UNet returning a known velocity field velocity(x_t, t) at timestep = 1000 t."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the family a device
        self.calls = []

    def forward(self, x_t, timestep):
        t = timestep.to(x_t.dtype) / 1000
        self.calls.append((x_t, t))
        return SimpleNamespace(sample=self.velocity(x_t, t.view(-1, 1, 1, 1)))


def with_oracle(velocity) -> RectifiedFlow:
    family = tiny_rf()
    family.nets["unet"] = Oracle(velocity)
    return family


# ---------------------------------------------------------------- the t <-> sigma map and the grid


def test_t_sigma_round_trip_and_sigma_inf_is_t_one():
    t = torch.linspace(1e-4, 1 - 1e-4, 999, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t)), t, rtol=1e-12, atol=1e-14)
    assert t_to_sigma(torch.tensor([1.0], dtype=torch.float64)).item() == math.inf
    assert sigma_to_t(torch.tensor([math.inf], dtype=torch.float64)).item() == 1.0
    assert sigma_to_t(torch.tensor([0.0], dtype=torch.float64)).item() == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_grid_is_uniform_in_t_from_inf_to_zero(shift):
    family = tiny_rf(shift=shift)
    for steps in (1, 2, 7, 50):
        sig = family.sigmas(steps)
        assert sig.shape == (steps + 1,) and sig.dtype == torch.float64
        assert sig[0] == math.inf and sig[-1] == 0 and (sig.diff() < 0).all()
        t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
        if shift == 1.0:
            torch.testing.assert_close(sigma_to_t(sig), t, rtol=0, atol=1e-14)
        else:  # SD3 / diffusers: t' = shift t / (1 + (shift - 1) t)
            torch.testing.assert_close(sigma_to_t(sig), shift * t / (1 + (shift - 1) * t), rtol=0, atol=1e-14)
    lo, hi = family.sigma_range()
    assert hi == math.inf and lo == pytest.approx(1e-3, rel=2e-3)


# ---------------------------------------------------------------- the denoiser's VP scaling


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.25, 0.5, 0.9, 0.999, 1.0])
def test_denoise_with_the_exact_velocity_recovers_the_data(t):
    """z = alpha x + s eps at sigma(t): the net must see x_t = (1-t) x + t eps and 1000 t; D returns x."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    family = with_oracle(lambda x_t, tt: eps - x)
    sigma = t_to_sigma(torch.full((2,), t, dtype=torch.float64))
    alpha, s = vp_coefficients(sigma.view(-1, 1, 1, 1))
    z = alpha * x + s * eps
    if t == 1.0:
        assert torch.equal(z, eps)  # sigma = inf: the state is pure noise, exactly
    x0_hat = family.denoise(z, sigma)
    torch.testing.assert_close(x0_hat, x, rtol=0, atol=1e-12)
    x_t, t_seen = family.nets["unet"].calls[-1]
    torch.testing.assert_close(x_t, (1 - t) * x + t * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_seen, torch.full((2,), t, dtype=torch.float64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------- Gaussian data: exact velocity fields

M, V = 0.3, 0.16  # data N(M, V I) per pixel


def independent_velocity(x_t, t):
    """E[eps - x | x_t] for x ~ N(M, V), eps ~ N(0, 1) independent (jointly Gaussian, affine in x_t)."""
    var = (1 - t) ** 2 * V + t ** 2          # Var(x_t)
    dev = x_t - (1 - t) * M
    return (t / var) * dev - (M + ((1 - t) * V / var) * dev)


def straight_velocity(x_t, t):
    """eps - x for the deterministic coupling x = M + sqrt(V) eps (the reflowed / OT coupling)."""
    eps = (x_t - (1 - t) * M) / ((1 - t) * math.sqrt(V) + t)
    return eps - (M + math.sqrt(V) * eps)


def gaussian_noise(n=64):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_one_step_is_exact_on_a_straight_coupling_and_not_on_the_independent_one():
    z = gaussian_noise()
    target = M + math.sqrt(V) * z  # both flows map noise to this point (1-D monotone transport)
    straight, independent = with_oracle(straight_velocity), with_oracle(independent_velocity)
    grid = straight.sigmas(1)
    assert grid.tolist() == [math.inf, 0.0]
    # DDIM on this family = the paper's Euler step: one step is exact on straight paths
    torch.testing.assert_close(sample_ddim(straight.denoise, z, grid), target, rtol=0, atol=1e-12)
    # ... but on the independent coupling one step lands on E[x] = M (all samples collapse)
    one = sample_ddim(independent.denoise, z, grid)
    torch.testing.assert_close(one, torch.full_like(z, M), rtol=0, atol=1e-12)
    # many steps converge to the same transport map at first order
    errs = [(sample_ddim(independent.denoise, z, independent.sigmas(n)) - target).abs().max().item()
            for n in (50, 100, 200)]
    assert errs[0] < 0.05 and 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3, errs
    ends = torch.tensor([math.inf, independent.sigma_range()[0], 0.0], dtype=torch.float64)  # as `full_range`
    rk = sample_rk45(independent.denoise, z, ends, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rk, target, rtol=0, atol=1e-3)  # the last 1e-3 of t is one denoising step


def test_arctan_euler_is_not_the_paper_euler():
    """`euler-arctan` integrates in arctan time: not exact in one step even on straight paths,
    but it converges to the same map; `euler` (EDM's, in sigma) is DDIM, the paper's step, exact."""
    z = gaussian_noise()
    target = M + math.sqrt(V) * z
    straight = with_oracle(straight_velocity)
    one = sample_euler_arctan(straight.denoise, z, straight.sigmas(1))
    torch.testing.assert_close(one, z + (math.pi / 2) * target, rtol=0, atol=1e-12)  # z + (pi/2) x0_hat
    torch.testing.assert_close(sample_euler(straight.denoise, z, straight.sigmas(1)), target, rtol=0, atol=1e-12)
    for fn, n, tol in ((sample_euler_arctan, 200, 2e-2), (sample_heun_arctan, 50, 2e-3)):
        out = fn(straight.denoise, z, straight.sigmas(n))
        assert (out - target).abs().max() < tol, fn.__name__


def test_straightness_is_zero_on_straight_flows_only():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s_straight = with_oracle(straight_velocity).straightness(16, g(), steps=10)
    s_indep = with_oracle(independent_velocity).straightness(16, g(), steps=10)
    assert s_straight < 1e-10 and s_indep > 1e-2, (s_straight, s_indep)


# ---------------------------------------------------------------- parity with diffusers


def test_ddim_matches_diffusers_flow_match_euler_scheduler():
    family = tiny_rf()
    family.nets.eval()
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(6)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    x = noise
    with torch.no_grad():
        for ts in sched.timesteps:
            out = family.nets["unet"](x, ts.expand(2)).sample
            x = sched.step(out, ts, x).prev_sample
        ours = sample_ddim(family.denoise, noise, t_to_sigma(sched.sigmas.double()))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the training loss


def hand_loss(family, x, t, eps):
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        out = family.nets["unet"](x_t, 1000 * t).sample
    return float(((out - (eps - x)) ** 2).mean())


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_train_step_loss_is_flow_matching_mse(time_sampling):
    family = tiny_rf(time_sampling=time_sampling, logit_mean=0.5, logit_std=0.7)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    opt = RecordingHandle()
    logs = family.train_step({"image": x}, 0, opt)
    assert len(opt.draws) == 2 and opt.draws[1].shape == x.shape
    t = opt.draws[0] if time_sampling == "uniform" else torch.sigmoid(0.5 + 0.7 * opt.draws[0])
    [(group, loss)] = opt.steps
    assert group == "model" and loss.requires_grad
    assert float(logs["loss"]) == pytest.approx(hand_loss(family, x, t, opt.draws[1]), rel=1e-5)


def test_train_step_uses_the_batch_noise_of_a_reflow_pair():
    family = tiny_rf()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(4, *SHAPE, generator=g) * 2 - 1
    noise = torch.randn(4, *SHAPE, generator=g)
    opt = RecordingHandle()
    logs = family.train_step({"image": x, "noise": noise}, 0, opt)
    assert len(opt.draws) == 1  # only t was drawn
    assert float(logs["loss"]) == pytest.approx(hand_loss(family, x, opt.draws[0], noise), rel=1e-5)


# ---------------------------------------------------------------- every denoising sampler runs


EXPECTED_NFE = {"euler": 4, "heun": 7, "ddim": 4, "ancestral": 4, "dpmpp-2m": 4, "consistency": 4, "dpmpp-3m": 4,
                "unipc": 4, "ipndm": 4, "euler-arctan": 4, "heun-arctan": 7}


@pytest.mark.parametrize("name", [n for n, spec in SAMPLERS.items() if spec.needs == "denoise"])
def test_every_denoising_sampler_runs_from_sigma_inf(name):
    from genkit.families.sampling import full_range, resolve_grid, sigma_grid

    family, spec = tiny_rf(), SAMPLERS[name]
    out = sample(family, 3, sampler=name, steps=None if SAMPLERS[name].adaptive else 4,
                 generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, *SHAPE)
    bound = family.clip_x0 if spec.clips else None  # ddim, ancestral clamp x0_hat; the ODE solvers do not
    D = family.denoise if bound is None else lambda z, sigma: family.denoise(z, sigma).clamp(-bound, bound)
    sigmas = full_range(family) if spec.adaptive else sigma_grid(family, 4, resolve_grid(family, spec, None))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sample's draws: the noise at the grid's first sigma, then the sampler's own
        raw = spec.fn(D, torch.randn((3, *SHAPE), generator=g), sigmas, generator=g)
    assert torch.isfinite(raw).all()
    torch.testing.assert_close(out.images, raw.clamp(-1, 1), rtol=0, atol=0)  # the sampler's images, in range
    if name in EXPECTED_NFE:
        assert out.nfe == EXPECTED_NFE[name]
    else:
        assert SAMPLERS[name].adaptive and out.nfe >= 2


def test_default_sampler_is_the_paper_euler_loop():
    """generate() with defaults = x_{t'} = x_t + (t' - t) v_hat on t = 1, 1 - 1/N, ..., 0."""
    family = tiny_rf()
    family.nets.eval()
    steps = 5
    images = sample(family, 2, generator=torch.Generator().manual_seed(0), steps=steps).images
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(steps):
            t, t_next = 1 - i / steps, 1 - (i + 1) / steps
            x = x + (t_next - t) * family.velocity(x, torch.full((2,), t))
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- training through the recipe


def test_short_training_run_lowers_the_loss_and_samples(tmp_path):
    overrides = [*TINY_UNET_OVERRIDES, "data.image_size=8", "data.batch_size=32", "train.steps=40",
                 "train.log_every=1", "train.warmup=0", "train.sample_every=0", "train.checkpoint_every=100",
                 "sample.n=4", "sample.steps=4"]
    run = genkit.train(load_recipe("rf_digits", overrides), out=tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    family = genkit.load(run, device="cpu")
    assert isinstance(family, RectifiedFlow)
    images = genkit.sample(family, 4, steps=3, seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    torch.testing.assert_close(images, genkit.sample(family, 4, steps=3, seed=0))
