"""MeanFlow: the JVP target against finite differences and an exact Gaussian average velocity,
(r, t) sampling, the adaptive loss, 1- and 2-NFE sampling, export refusal, a 2-D mixture, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_UNET as TINY_UNET_OVERRIDES
from conftest import run_cli, seeded_build
from step_handles import RecordingHandle
from test_consistency import MLP, energy_distance, mixture, train_1rf

from genkit.errors import ConfigError, SamplerError
from genkit.families.meanflow import MeanFlow, MeanFlowConfig, adaptive_loss, meanflow_target, sample_times
from genkit.families.sampling import sample
from genkit.nn.unet import UNetConfig

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
SHAPE = (1, 8, 8)


def tiny_mf(seed: int = 0, **cfg) -> MeanFlow:
    return seeded_build(lambda: MeanFlow(MeanFlowConfig(unet=TINY_UNET, **cfg), shape=SHAPE), seed)


# ---------------------------------------------------------------- the MeanFlow target


def test_jvp_target_equals_central_finite_differences_float64():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()

    def u(z, r, t):
        return net(torch.cat([z, r[:, None], t[:, None]], 1)) * (1 + t[:, None] ** 2)

    z, v = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    r = t * torch.rand(5, dtype=torch.float64)
    u_pred, u_tgt = meanflow_target(u, z, r, t, v)
    h = 1e-5  # d/dt u(z_t, r, t) along dz/dt = v: a central difference in (z + h v, t + h)
    dudt = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(u_pred, u(z, r, t))
    torch.testing.assert_close(u_tgt, v - (t - r)[:, None] * dudt, rtol=1e-8, atol=1e-9)
    assert not u_tgt.requires_grad  # stop-gradient


def test_the_exact_average_velocity_of_gaussian_data_is_a_fixed_point_of_the_target():
    """Data N(0, s^2): z_t = sig_t / sig_r z_r with sig_t = sqrt((1-t)^2 s^2 + t^2), so the average velocity is
    u = z (1 - sig_r / sig_t) / (t - r) and the marginal velocity v = z sig_t' / sig_t; the identity holds."""
    s = 0.5

    def sig(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt()

    def u_true(z, r, t):
        return z * ((1 - sig(r) / sig(t)) / (t - r))[:, None]

    z = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.95, 1.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.2, 0.0], dtype=torch.float64)
    v = z * (((t - 1) * s**2 + t) / sig(t) ** 2)[:, None]  # d sig_t / dt / sig_t
    u_pred, u_tgt = meanflow_target(u_true, z, r, t, v)
    torch.testing.assert_close(u_tgt, u_pred, rtol=1e-10, atol=1e-12)


def test_family_target_through_the_unet_matches_finite_differences():
    family = tiny_mf()
    z, v = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t, r = torch.tensor([0.6, 0.9]), torch.tensor([0.2, 0.9])
    _, u_tgt = meanflow_target(family.u, z, r, t, v)
    h = 1e-4  # the UNet sees 1000 t: d_t u is large, float32 differences need a small step
    with torch.no_grad():
        dudt = (family.u(z + h * v, r, t + h) - family.u(z - h * v, r, t - h)) / (2 * h)
    want = v - (t - r).view(-1, 1, 1, 1) * dudt
    torch.testing.assert_close(u_tgt, want, rtol=0, atol=1e-2 * float(want.abs().max()))
    assert torch.equal(u_tgt[1], v[1])  # r = t: plain flow matching


def test_time_sampling_sorted_logit_normal_with_the_ratio_r_neq_t():
    g = torch.Generator().manual_seed(0)
    n = 20000
    r, t = sample_times(torch.randn(n, generator=g), torch.randn(n, generator=g), torch.rand(n, generator=g),
                        -0.4, 1.0, 0.25)
    assert bool((r <= t).all()) and bool(((0 < r) & (t < 1)).all())
    assert float((r != t).float().mean()) == pytest.approx(0.25, abs=0.01)
    logit = torch.logit(torch.cat([t[r != t], r[r != t]]))  # the unsorted pair is N(-0.4, 1) each
    assert float(logit.mean()) == pytest.approx(-0.4, abs=0.05) and float(logit.std()) == pytest.approx(1.0, abs=0.05)


def test_adaptive_loss_value_and_gradient():
    delta = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
    loss = adaptive_loss(delta, 1.0, 1e-3)
    torch.testing.assert_close(loss, torch.tensor((25 / 25.001 + 1 / 1.001) / 2))
    loss.backward()  # sg(w): d/d delta = w * 2 delta / B
    w = torch.tensor([1 / 25.001, 1 / 1.001])[:, None]
    torch.testing.assert_close(delta.grad, w * 2 * delta.detach() / 2)
    torch.testing.assert_close(adaptive_loss(delta.detach(), 0.0, 1e-3), torch.tensor(13.0))  # p = 0: plain


# ---------------------------------------------------------------- sampling


def test_one_nfe_is_noise_minus_the_average_velocity_over_0_1():
    family = tiny_mf()
    out = sample(family, 3, generator=torch.Generator().manual_seed(0))
    assert out.sampler == "consistency" and out.nfe == 1
    e = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    family.nets.eval()
    with torch.no_grad():
        want = e - family.u(e, torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(out.images, want.clamp(-1, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(family.flow_map_sample(e, steps=1), want, rtol=0, atol=1e-6)
    two = sample(family, 3, steps=2, generator=torch.Generator().manual_seed(0))
    assert two.nfe == 2 and family.sigmas(2).tolist() == [math.inf, 1.0, 0.0]  # t = 1, 0.5, 0


def test_meanflow_shares_rectified_flows_time_and_sigma_convention():
    """sigma = t / (1 - t): the grid is uniform in t from 1 (sigma = inf) to 0, and the adaptive solvers' span
    ends at t = 1e-3, as rectified flow's."""
    from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig

    mf = tiny_mf()
    rf = RectifiedFlow(RectifiedFlowConfig(unet=TINY_UNET), shape=SHAPE)
    assert mf.sigma_range() == rf.sigma_range() == (1e-3 / (1 - 1e-3), math.inf)
    torch.testing.assert_close(mf.sigmas(4), rf.sigmas(4))


def test_meanflow_refuses_class_conditioning_and_export(tmp_path):
    from genkit.errors import ConfigError

    with pytest.raises(ConfigError, match="class_cond"):
        tiny_mf(class_cond=True)


def test_tiny_meanflow_trains_samples_and_refuses_export_through_the_cli(tmp_path):
    run = tmp_path / "mf"
    r = run_cli("train", "meanflow_digits", *TINY_UNET_OVERRIDES, "train.steps=3", "train.sample_every=0",
                "data.batch_size=8", "sample.n=4", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("sample", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "mf.png"))
    assert r.returncode == 0 and "NFE 2" in r.stdout + r.stderr, r.stdout + r.stderr
    r = run_cli("export", str(run), "--format", "diffusers", "--out", str(tmp_path / "mf_diffusers"))
    assert r.returncode == 2 and "meanflow" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- a 2-D Gaussian mixture


@pytest.mark.slow
def test_meanflow_one_step_samples_a_2d_mixture_better_than_one_euler_step_of_1rf():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    steps = 3000
    net = MLP(times=2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)

    def u(z, r, t):
        return net(z, t, t - r)

    for _ in range(steps):
        x, e = mixture(256, g), torch.randn(256, 2, generator=g)
        r, t = sample_times(torch.randn(256, generator=g), torch.randn(256, generator=g), torch.rand(256, generator=g),
                            -0.4, 1.0, 0.25)
        z = (1 - t[:, None]) * x + t[:, None] * e
        u_pred, u_tgt = meanflow_target(u, z, r, t, e - x)
        loss = adaptive_loss(u_pred - u_tgt, 1.0, 1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        e = torch.randn(2000, 2, generator=g)
        mf = e - u(e, torch.zeros(2000), torch.ones(2000))
    rf = train_1rf(steps, g)
    data = mixture(2000, g)
    d_mf, d_rf = energy_distance(mf, data), energy_distance(rf, data)
    assert d_mf < 0.15 and d_mf < d_rf / 3, (d_mf, d_rf)  # measured: 0.061 against 0.54



def test_train_step_is_the_loss_of_its_time_and_noise_draws():
    """(r, t) from two N(0, 1) draws and a U[0, 1) draw, then e ~ N(0, I): the adaptive loss of those draws
    stepped on group "model", its plain MSE logged beside it."""
    family = tiny_mf(ratio_r_neq_t=0.5, time_mean=-0.2, time_std=0.8)
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    opt = RecordingHandle(seed=3)
    logs = family.train_step({"image": x}, 0, opt)
    a, b, keep, e = opt.draws
    assert a.shape == b.shape == keep.shape == (6,) and e.shape == x.shape
    r, t = sample_times(a, b, keep, -0.2, 0.8, 0.5)
    assert bool((r < t).any()) and bool((r == t).any())
    loss, mse = family.loss(x, e, r, t)
    [(group, stepped)] = opt.steps
    assert group == "model" and torch.equal(logs["loss"], stepped.detach())
    torch.testing.assert_close(stepped, loss)
    torch.testing.assert_close(logs["mse"], mse)



def test_loss_is_the_adaptive_loss_of_u_against_its_identity_target_on_the_interpolation():
    """z_t = (1 - t) x + t e, Delta = u(z_t, r, t) - sg[v - (t - r) du/dt] with v = e - x (the target's JVP
    through the same network as `u`), loss = adaptive_loss(Delta), mse = mean Delta^2."""
    family = tiny_mf(adaptive_p=0.5, adaptive_c=0.01)
    g = torch.Generator().manual_seed(0)
    x, e = torch.rand(3, *SHAPE, generator=g) * 2 - 1, torch.randn(3, *SHAPE, generator=g)
    r, t = torch.tensor([0.1, 0.5, 0.3]), torch.tensor([0.9, 0.5, 0.35])
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    with torch.no_grad():
        _, target = meanflow_target(family.u, z, r, t, e - x)
        delta = family.u(z, r, t) - target
        loss, mse = family.loss(x, e, r, t)
    torch.testing.assert_close(loss, adaptive_loss(delta, 0.5, 0.01))
    torch.testing.assert_close(mse, delta.pow(2).mean())


def test_time_draws_are_the_sorted_logit_normals_of_the_given_normals():
    a, b = torch.tensor([0.3, -1.2, 2.0, 0.5]), torch.tensor([-0.4, 0.9, 1.0, 0.5])
    keep = torch.tensor([0.1, 0.25, 0.9, 0.0])   # r != t where keep < ratio = 0.25 (0.25 itself keeps r = t)
    r, t = sample_times(a, b, keep, -0.4, 1.3, 0.25)
    s1, s2 = torch.sigmoid(-0.4 + 1.3 * a), torch.sigmoid(-0.4 + 1.3 * b)
    torch.testing.assert_close(t, torch.maximum(s1, s2))
    torch.testing.assert_close(r, torch.stack([torch.minimum(s1, s2)[0], t[1], t[2], s1[3]]))


def test_denoiser_is_the_one_step_jump_from_any_noise_level():
    """D(z, sigma) = z_t - t u(z_t, 0, t) with t = sigma / (1 + sigma) and z_t = z sqrt(1 + sigma^2) / (1 + sigma)
    (the VP-scaled state back in flow coordinates)."""
    family = tiny_mf()
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 2.0, 9.0])
    t = sigma / (1 + sigma)
    z_t = z * ((1 + sigma**2).sqrt() / (1 + sigma)).view(-1, 1, 1, 1)
    with torch.no_grad():
        want = z_t - t.view(-1, 1, 1, 1) * family.u(z_t, torch.zeros(3), t)
        torch.testing.assert_close(family.denoise(z, sigma), want)
    with pytest.raises(SamplerError, match="^steps must be >= 1, got 0$"):
        family.sigmas(0)



def test_bad_settings_are_refused_naming_the_key():
    for kw, msg in (({"ratio_r_neq_t": -0.1}, "model.ratio_r_neq_t: must be in [0, 1], got -0.1"),
                    ({"ratio_r_neq_t": 1.1}, "model.ratio_r_neq_t: must be in [0, 1], got 1.1"),
                    ({"time_std": 0.0}, "model.time_std and model.adaptive_c must be > 0, model.adaptive_p >= 0"),
                    ({"adaptive_c": 0.0}, "model.time_std and model.adaptive_c must be > 0, model.adaptive_p >= 0"),
                    ({"adaptive_p": -0.5}, "model.time_std and model.adaptive_c must be > 0, model.adaptive_p >= 0"),
                    ({"class_cond": True}, "model.class_cond: meanflow is unconditional (its class embedding "
                                           "carries t - r)")):
        with pytest.raises(ConfigError) as e:
            tiny_mf(**kw)
        assert str(e.value) == msg
    for kw in ({"ratio_r_neq_t": 0.0}, {"ratio_r_neq_t": 1.0}, {"adaptive_p": 0.0}):
        assert tiny_mf(**kw).cfg == MeanFlowConfig(unet=TINY_UNET, **kw)
