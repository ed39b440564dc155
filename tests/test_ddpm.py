"""DDPM's discrete forward process, posterior, sigma table and loss, against closed forms and diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from step_handles import RecordingHandle

from genkit.errors import SamplerError
from genkit.families.ddpm import DDPM, DDPMConfig, NoiseSchedule, make_betas
from genkit.nn.unet import UNetConfig

TINY_UNET = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def tiny_ddpm(timesteps: int = 100, out_scale: float = 1.0, seed: int = 0, num_classes: int = 0, **cfg) -> DDPM:
    """A DDPM on (1, 8, 8) images with a tiny UNet; out_scale widens the untrained output."""
    with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG left as it was
        torch.manual_seed(seed)
        family = DDPM(DDPMConfig(timesteps=timesteps, unet=TINY_UNET, **cfg), shape=(1, 8, 8), num_classes=num_classes)
    with torch.no_grad():  # an untrained UNet predicts ~N(0, 0.25^2): widen it so clipping bites
        family.nets["unet"].conv_out.weight.mul_(out_scale)
        family.nets["unet"].conv_out.bias.mul_(out_scale)
    return family


# ---------------------------------------------------------------- forward process q(x_t | x_0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_matches_moment_recursion_of_forward_steps(schedule):
    """x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) eps has mean sqrt(alpha_bar_t) x0, variance 1-alpha_bar_t."""
    ns = NoiseSchedule(make_betas(schedule, 1000))
    coef, var = [], []
    c, v = 1.0, 0.0  # x_{-1} = x0: mean coefficient 1, variance 0
    for beta in ns.betas.tolist():
        c, v = math.sqrt(1 - beta) * c, (1 - beta) * v + beta
        coef.append(c)
        var.append(v)
    coef, var = torch.tensor(coef, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)
    torch.testing.assert_close(ns.alpha_bar.sqrt(), coef, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(1 - ns.alpha_bar, var, rtol=1e-10, atol=1e-14)
    # the training draw applies exactly these coefficients at every t
    t = torch.arange(ns.T)
    ones, zeros = torch.ones(ns.T, 1, dtype=torch.float64), torch.zeros(ns.T, 1, dtype=torch.float64)
    torch.testing.assert_close(ns.noised(ones, t, zeros, "epsilon")[0][:, 0], coef, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ns.noised(zeros, t, ones, "epsilon")[0][:, 0], var.sqrt(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_training_draw_matches_the_iterated_forward_process_monte_carlo(schedule):
    """Many training draws x_t (closed-form q(x_t | x0)) and the iterated chain agree in mean and variance (5 standard errors)."""
    ns = NoiseSchedule(make_betas(schedule, 1000))
    n = 30_000  # under torch's parallel grain (32768): keeps the loop fast on 2 busy cores
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    checks = {0, 9, 199, 999}
    x = x0
    for t, beta in enumerate(ns.betas.tolist()):
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
        if t not in checks:
            continue
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        xq = ns.noised(x0, torch.full((n,), t), eps, "epsilon")[0]
        v = 1 - float(ns.alpha_bar[t])
        se_mean = math.sqrt(2 * v / n)          # difference of two independent sample means
        se_var = v * math.sqrt(2 * 2 / (n - 1))  # difference of two sample variances
        assert abs(x.mean() - xq.mean()) < 5 * se_mean, t
        assert abs(x.var() - xq.var()) < 5 * se_var, t
        # and both sit on the closed form
        assert abs(xq.mean() - 0.7 * math.sqrt(float(ns.alpha_bar[t]))) < 5 * math.sqrt(v / n), t


# ---------------------------------------------------------------- betas and posterior vs diffusers


def test_betas_match_diffusers():
    for T in (50, 1000):
        cos = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
        torch.testing.assert_close(make_betas("cosine", T).float(), cos, rtol=1e-6, atol=1e-9)
        lin = DDPMScheduler(num_train_timesteps=T, beta_start=2e-4, beta_end=0.03, beta_schedule="linear").betas
        torch.testing.assert_close(make_betas("linear", T, 2e-4, 0.03).float(), lin, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_diffusers_ddpm_step(schedule):
    """Mean and variance of q(x_{t-1} | x_t, x0) equal DDPMScheduler's (x0 prediction, no clipping).

    diffusers keeps alpha_bar in float32, where 1 - alpha_bar_t cancels badly at small t (1e-3
    relative for the cosine schedule); the betas are compared in float32 in `test_betas_match_diffusers`,
    here the scheduler's formulas run in float64 on the same alpha_bar.
    """
    T = 1000
    ns = NoiseSchedule(make_betas(schedule, T))
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
                          prediction_type="sample", clip_sample=False)
    sched.alphas_cumprod, sched.one = ns.alpha_bar.clone(), torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    for t in (0, 1, 2, 37, 500, T - 1):
        mean, var = ns.posterior(x0, xt, t)
        ref_var = float(sched._get_variance(t))  # clamped to >= 1e-20 (t = 0 gives 0)
        assert var == pytest.approx(ref_var, rel=1e-10, abs=1e-19), t
        prev = sched.step(x0, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        ref_mean = prev - math.sqrt(ref_var) * noise if t > 0 else prev  # diffusers draws only for t > 0
        torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-12, msg=f"t={t}")
    # t = 0: the posterior collapses onto x0 (the last step of the chain returns x0 itself)
    mean0, var0 = ns.posterior(x0, xt, 0)
    torch.testing.assert_close(mean0, x0)
    assert var0 == 0.0


# ---------------------------------------------------------------- the sigma table and grids


@pytest.mark.parametrize("schedule,T", [("linear", 1000), ("cosine", 100)])
def test_sigma_to_t_inverts_the_table(schedule, T):
    ns = NoiseSchedule(make_betas(schedule, T))
    t = torch.arange(T, dtype=torch.float32)
    torch.testing.assert_close(ns.sigma_to_t(ns.sigma_table), t, rtol=0, atol=1e-4)
    torch.testing.assert_close(ns.sigma_to_t(ns.sigma_table.float()), t, rtol=0, atol=1e-4)
    # interpolation is linear in log-sigma: the geometric midpoint of two entries is t + 1/2
    mid = (0.5 * (ns.log_sigmas[:-1] + ns.log_sigmas[1:])).exp()
    torch.testing.assert_close(ns.sigma_to_t(mid), t[:-1] + 0.5, rtol=0, atol=1e-4)
    # monotone over a fine sweep, clamped to [0, T-1] outside the table
    lo, hi = float(ns.sigma_table[0]), float(ns.sigma_table[-1])
    sweep = torch.logspace(math.log10(lo / 3), math.log10(hi * 3), 5000, dtype=torch.float64)
    ts = ns.sigma_to_t(sweep)
    assert (ts.diff() >= 0).all()
    assert ts[0] == 0 and ts[-1] == T - 1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sigma_grid_is_decreasing_and_ends_at_zero(spacing):
    ns = NoiseSchedule(make_betas("linear", 1000))
    for steps in (1, 7, 10, 50, 333, 1000):
        sig = ns.sigmas(steps, spacing)
        assert sig.shape == (steps + 1,)
        assert sig[-1] == 0 and (sig.diff() < 0).all()
        torch.testing.assert_close(sig[:-1], ns.sigma_table[ns.timesteps(steps, spacing)], rtol=0, atol=0)
        assert sig.dtype == torch.float64
    assert torch.equal(ns.sigmas(7), ns.sigmas(7, "leading"))  # diffusers' default spacing is the default


def diffusers_timesteps(sched, steps: int) -> list[int]:
    """sched.timesteps after set_timesteps(steps), less the spurious final -1 that diffusers'
    float arange adds for some trailing counts (T=1000: steps 61, 103, 121, ...)."""
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist()
    return ts[:-1] if len(ts) == steps + 1 and ts[-1] == -1 else ts


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 50, 37])
def test_timesteps_match_diffusers(spacing, T):
    """Every step count 1..T gives diffusers' timesteps (DDIM and DDPM schedulers agree on them)."""
    ns = NoiseSchedule(make_betas("linear", T))
    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ddpm = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for steps in range(1, T + 1):
        ours = ns.timesteps(steps, spacing).tolist()
        assert len(ours) == steps and 0 <= min(ours) and max(ours) <= T - 1, f"steps={steps}"
        assert ours == diffusers_timesteps(ddim, steps), f"steps={steps}"
        if steps % 7 == 0:
            assert ours == diffusers_timesteps(ddpm, steps), f"steps={steps}"


def test_timesteps_refuse_steps_outside_the_schedule():
    ns = NoiseSchedule(make_betas("linear", 50))
    for steps in (0, -1, 51):
        with pytest.raises(SamplerError, match="between 1 and T=50"):
            ns.timesteps(steps)


# ---------------------------------------------------------------- the training loss


def test_loss_is_mse_against_the_right_target():
    """loss(x0, t, eps) = mean (unet(x_t, t) - target)^2, x_t and v from diffusers' formulas."""
    T = 100
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 1, 8, 8, generator=g).clamp(-1, 1)
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 42, T - 1])
    sched = DDPMScheduler(num_train_timesteps=T)  # linear 1e-4 .. 0.02, as DDPMConfig
    xt = sched.add_noise(x0, eps, t)
    targets = {"epsilon": eps, "x0": x0, "v": sched.get_velocity(x0, eps, t)}
    losses = {}
    for prediction, target in targets.items():
        family = tiny_ddpm(T, prediction=prediction)
        with torch.no_grad():
            out = family.nets["unet"](xt, t).sample
            losses[prediction] = float(family.loss(x0, t, eps))
        assert losses[prediction] == pytest.approx(float(((out - target) ** 2).mean()), rel=1e-5), prediction
    # the three targets really differ (same seed, same network: only the target changes)
    assert len({round(v, 4) for v in losses.values()}) == 3


def test_train_step_is_the_loss_of_its_draws_with_dropped_labels():
    """t ~ U{0..T-1} and eps ~ N(0, I) from the global-batch stream, labels replaced by the null label where
    the dropout draw falls below cond_dropout (and for unlabelled items), one step of group "model"."""
    family = tiny_ddpm(50, class_cond=True, cond_dropout=0.5, num_classes=3)
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    label = torch.tensor([0, 1, 2, -1, 1, 2])
    opt = RecordingHandle(seed=3)
    logs = family.train_step({"image": x0, "label": label}, 0, opt)
    t, eps, keep = opt.draws
    assert t.shape == (6,) and int(t.max()) < 50 and eps.shape == x0.shape and keep.shape == (6,)
    labels = torch.where((keep < 0.5) | (label < 0), 3, label)
    assert 0 < int((labels == 3).sum()) < 6   # some dropped, some kept: the test sees both
    [(group, loss)] = opt.steps
    assert group == "model" and torch.equal(logs["loss"], loss.detach())
    torch.testing.assert_close(loss, family.loss(x0, t, eps, labels))
    assert not torch.allclose(loss, family.loss(x0, t, eps, label.clamp_min(0)))
