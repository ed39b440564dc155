"""Probability-flow ODE samplers and sigma grids: orders of accuracy on the closed-form Gaussian
flow, transport of noise to data, adaptive RK45, parity with k-diffusion's and diffusers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from test_ddpm import DIFFUSERS_PREDICTION, tiny_ddpm

from genkit.errors import SamplerError
from genkit.families.ddpm import NoiseSchedule, make_betas
from genkit.families.sampling import sample
from genkit.samplers import SAMPLERS, CountingDenoiser
from genkit.samplers.adapters import training_target
from genkit.samplers.ddim import sample_ddim
from genkit.samplers.multistep import sample_dpmpp_2m
from genkit.samplers.ode import (
    sample_euler,
    sample_euler_arctan,
    sample_heun,
    sample_heun_arctan,
    sample_rk45,
    velocity,
)
from genkit.samplers.schedules import grid, karras_sigmas
from genkit.samplers.schedules import time_uniform_sigmas as uniform_sigmas

FIXED_STEP = {"euler": sample_euler, "heun": sample_heun, "euler-arctan": sample_euler_arctan,
              "heun-arctan": sample_heun_arctan, "dpmpp-2m": sample_dpmpp_2m}
LINEAR = NoiseSchedule(make_betas("linear", 1000))

# ---------------------------------------------------------------- Gaussian data, exact denoiser

M = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
V = torch.tensor([0.04, 0.25, 2.0], dtype=torch.float64)
U = torch.tensor([-2.0, -0.5, 0.0, 1.0, 2.5], dtype=torch.float64).view(-1, 1).expand(-1, 3)


def alpha_s(sigma):
    """The VP scales written independently of the samplers' `vp_coefficients`; finite at sigma = inf."""
    return 1 / (1 + sigma**2) ** 0.5, 1 / (1 + sigma**-2) ** 0.5


def gaussian_denoiser(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | z] for x0 ~ N(M, diag V) and z = alpha x0 + s eps."""
    alpha, s = alpha_s(sigma.view(-1, 1))
    return M + alpha * V / (alpha**2 * V + s**2) * (z - alpha * M)


def flow_error(fn, sigmas: torch.Tensor, D=gaussian_denoiser, **options) -> float:
    """Max error over the fixed points U: the exact flow of this affine ODE maps
    z = alpha M + sqrt(alpha^2 V + s^2) u at sigmas[0] to x0 = M + sqrt(V) u."""
    alpha, s = alpha_s(float(sigmas[0]))
    x = fn(D, alpha * M + (alpha**2 * V + s**2).sqrt() * U, sigmas, **options)
    assert x.dtype == torch.float64
    return float((x - (M + V.sqrt() * U)).abs().max())


KARRAS = lambda n: karras_sigmas(n, 0.002, 80.0)  # noqa: E731
FROM_INF = lambda n: uniform_sigmas(n, 0.002, math.inf)  # noqa: E731
ORDER_CASES = [  # sampler, grid, steps N, 2N, 4N, band of err(N) / err(2N)
    ("euler", KARRAS, (20, 40, 80), (1.6, 2.4)),
    ("heun", KARRAS, (20, 40, 80), (3.0, 5.0)),
    ("dpmpp-2m", KARRAS, (20, 40, 80), (3.0, 5.0)),
    ("euler-arctan", KARRAS, (20, 40, 80), (1.6, 2.4)),
    ("heun-arctan", KARRAS, (20, 40, 80), (3.0, 5.0)),
    ("euler", FROM_INF, (20, 40, 80), (1.6, 2.4)),  # EDM's Euler from sigma = inf: its finite limit
    ("euler-arctan", FROM_INF, (20, 40, 80), (1.6, 2.4)),
    ("heun-arctan", FROM_INF, (20, 40, 80), (3.0, 5.0)),
    # equal arctan steps leave a long last log-SNR step (0.08 -> 0.002 at 40): asymptotic later
    ("dpmpp-2m", FROM_INF, (40, 80, 160), (3.0, 5.0)),
]


@pytest.mark.parametrize("name,make_grid,steps,band", ORDER_CASES,
                         ids=[f"{c[0]}-{'karras' if c[1] is KARRAS else 'inf'}" for c in ORDER_CASES])
def test_order_of_accuracy_on_the_gaussian_flow(name, make_grid, steps, band):
    """Halving the step divides the error by ~2 (Euler) or ~4 (Heun, DPM-Solver++(2M))."""
    err = [flow_error(FIXED_STEP[name], make_grid(n)) for n in steps]
    ratios = [err[0] / err[1], err[1] / err[2]]
    assert all(band[0] < r < band[1] for r in ratios), (err, ratios)
    assert err[2] < (0.15 if name == "euler" else 0.03), err  # Euler in sigma (DDIM) is the least accurate here


@pytest.mark.parametrize("name,steps", [("euler", 200), ("heun-arctan", 40), ("dpmpp-2m", 320), ("rk45", 10),
                                        ("unipc", 320), ("ipndm", 40), ("dpmpp-3m", 320)])
def test_samplers_transport_noise_to_the_gaussian_data(name, steps):
    """From sigma = inf, N(0, I) is the exact marginal: 20000 draws land on N(M, V)."""
    n = 20_000
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = SAMPLERS[name].fn(gaussian_denoiser, z, FROM_INF(steps))
    assert ((x.mean(0) - M).abs() < 5 * (V / n).sqrt()).all(), x.mean(0) - M
    assert ((x.var(0) / V - 1).abs() < 5 * math.sqrt(2 / (n - 1))).all(), x.var(0) / V


def test_rk45_matches_the_exact_flow_and_spends_more_with_tighter_tolerances():
    nfe = {}
    for make_grid in (KARRAS, FROM_INF):
        for tol in (1e-3, 1e-4, 1e-6):
            D = CountingDenoiser(gaussian_denoiser)
            err = flow_error(sample_rk45, make_grid(10), D=D, rtol=tol, atol=tol)
            nfe[tol] = D.nfe
        assert err < 1e-4, err  # at tol 1e-6 (measured ~4e-5); the floor ~2.5e-5 is the step from sigma_min = 0.002 to 0
        assert nfe[1e-3] < nfe[1e-4] < nfe[1e-6], nfe


def test_rk45_uses_only_the_ends_of_the_grid_and_denoises_onto_zero():
    coarse, fine = flow_error(sample_rk45, KARRAS(3)), flow_error(sample_rk45, KARRAS(50))
    assert abs(coarse - fine) < 1e-12 and coarse < 1e-3
    # nothing to integrate on a one-step grid: only the last step, D(z; sigma_min), as DDIM's
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one_step = torch.tensor([0.5, 0.0], dtype=torch.float64)
    D = CountingDenoiser(gaussian_denoiser)
    torch.testing.assert_close(sample_rk45(D, z, one_step), sample_ddim(gaussian_denoiser, z, one_step))
    assert D.nfe == 1


def test_rk45_honours_each_tolerance_and_never_evaluates_below_sigma_min():
    """rtol and atol each bound the step (the other set negligible); the end time is a step boundary
    (`step_t`), so the field is never evaluated past sigma_min."""
    def nfe_and_lowest(rtol, atol):
        seen = []
        D = CountingDenoiser(lambda z, sigma: (seen.append(float(sigma.min())), gaussian_denoiser(z, sigma))[1])
        flow_error(sample_rk45, KARRAS(10), D=D, rtol=rtol, atol=atol)
        return D.nfe, min(seen)

    assert nfe_and_lowest(1e-2, 1e-12)[0] < nfe_and_lowest(1e-8, 1e-12)[0]
    assert nfe_and_lowest(1e-12, 1e-2)[0] < nfe_and_lowest(1e-12, 1e-8)[0]
    assert nfe_and_lowest(1e-6, 1e-6)[1] >= 0.002 * (1 - 1e-9)


def test_rk45_tolerances_are_options_of_sample():
    family = tiny_ddpm(100)
    nfe = [sample(family, 2, sampler="rk45", rtol=tol, atol=tol,
                  generator=torch.Generator().manual_seed(0)).nfe for tol in (1e-2, 1e-3)]
    assert 1 < nfe[0] < nfe[1], nfe
    with pytest.raises(SamplerError, match="no option 'rtoll'; its options: rtol, atol"):
        sample(family, 1, sampler="rk45", rtoll=1e-3)
    with pytest.raises(SamplerError, match="'rk45' chooses its own steps"):  # not silently ignored
        sample(family, 1, sampler="rk45", steps=4)


def test_euler_arctan_is_not_ddim_but_meets_it_in_the_many_step_limit():
    """DDIM moves along the arc cos t x0_hat + sin t eps_hat, Euler in arctan time along its tangent:
    both first order, so their gap shrinks ~100x from 10 to 1000 steps of the DDPM grid."""

    def gap(steps):
        sigmas = LINEAR.sigmas(steps)
        alpha, s = alpha_s(float(sigmas[0]))
        z = alpha * M + (alpha**2 * V + s**2).sqrt() * U
        return float((sample_euler_arctan(gaussian_denoiser, z, sigmas) - sample_ddim(gaussian_denoiser, z, sigmas))
                     .abs().max())

    assert gap(10) > 0.05 and gap(1000) < gap(10) / 30, (gap(10), gap(1000))


def test_euler_in_sigma_is_ddim():
    """EDM's Euler step x_n = x + (sigma_n - sigma) eps_hat is DDIM's (Karras et al. 2022, Sec. 3), also
    from sigma = inf; the arctan-time Euler is not."""
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigmas in (LINEAR.sigmas(7), KARRAS(5), FROM_INF(6)):
        torch.testing.assert_close(sample_euler(gaussian_denoiser, z, sigmas), sample_ddim(gaussian_denoiser, z, sigmas),
                                   rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the pieces of the ODE


def test_velocity_is_the_v_target_and_is_finite_at_sigma_inf():
    """With an oracle denoiser, dz/dt is Salimans & Ho's v = alpha eps - s x0, also at t = pi/2."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    for sigma in (0.01, 1.0, 30.0, math.inf):
        alpha, s = alpha_s(torch.tensor(sigma, dtype=torch.float64))
        oracle = lambda z, sig: x0  # noqa: E731
        v = velocity(oracle, alpha * x0 + s * eps, math.atan(sigma))
        torch.testing.assert_close(v, training_target("v", x0, eps, alpha, s), rtol=1e-12, atol=1e-12)
    assert torch.equal(v, -x0)  # sigma = inf: alpha = 0, s = 1


def test_dpmpp_2m_reduces_to_ddim_where_it_is_first_order():
    """Its first step, the step after sigma = inf (r = inf) and the step onto 0 are DDIM steps."""
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigmas in ([5.0, 0.5, 0.0], [math.inf, 0.5, 0.0], [math.inf, 2.0, 0.5, 0.0]):
        sigmas = torch.tensor(sigmas, dtype=torch.float64)
        torch.testing.assert_close(sample_dpmpp_2m(gaussian_denoiser, z, sigmas),
                                   sample_ddim(gaussian_denoiser, z, sigmas), rtol=1e-12, atol=1e-12)
    sigmas = torch.tensor([5.0, 2.0, 0.5, 0.0], dtype=torch.float64)  # a second-order step
    gap = sample_dpmpp_2m(gaussian_denoiser, z, sigmas) - sample_ddim(gaussian_denoiser, z, sigmas)
    assert gap.abs().max() > 1e-3


def k_diffusion_dpmpp_2m(D, x, sigmas):
    """k-diffusion's `sample_dpmpp_2m`, transcribed in its variable x = z / alpha (VE)."""
    t_fn = lambda sigma: -math.log(sigma)  # noqa: E731
    old = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = D(x / (1 + sigma**2) ** 0.5, torch.full((x.shape[0],), sigma, dtype=x.dtype))
        if old is None or sigma_next == 0:
            x = denoised if sigma_next == 0 else sigma_next / sigma * x + (1 - sigma_next / sigma) * denoised
        else:
            h, h_last = t_fn(sigma_next) - t_fn(sigma), t_fn(sigma) - t_fn(float(sigmas[i - 1]))
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = sigma_next / sigma * x - math.expm1(-h) * denoised_d
        old = denoised
    return x


def test_dpmpp_2m_equals_k_diffusion():
    sigmas = KARRAS(12)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = k_diffusion_dpmpp_2m(gaussian_denoiser, z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas)
    torch.testing.assert_close(sample_dpmpp_2m(gaussian_denoiser, z, sigmas), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_dpmpp_2m_equals_diffusers_multistep_scheduler(prediction):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma 0) on the
    same UNet and noise; it steps in float32 and gets the sigmas it computed, in float32."""
    T, steps = 1000, 12
    family = tiny_ddpm(T, out_scale=4.0, prediction=prediction, clip_sample=False)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction],
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    sched.alphas_cumprod = family.schedule.alpha_bar.clone()  # float64 table: no float32 cancellation
    sched.set_timesteps(steps)
    unet = family.nets["unet"].eval()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample_dpmpp_2m(family.denoise, z, sched.sigmas.double())
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=5e-4)


# ---------------------------------------------------------------- sigma grids


def test_karras_sigmas_match_k_diffusion_and_diffusers():
    n, lo, hi, rho = 12, 0.002, 80.0, 7.0
    ramp = [i / (n - 1) for i in range(n)]  # k-diffusion's get_sigmas_karras, written out
    expected = [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp] + [0.0]
    sigmas = karras_sigmas(n, lo, hi, rho)
    torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    assert sigmas[0] == pytest.approx(hi) and sigmas[-2] == pytest.approx(lo)
    # diffusers' Euler scheduler: Karras sigmas between the ends of the DDPM linear schedule's table
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    sched.set_timesteps(n)
    table = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    ours = karras_sigmas(n, float(table[0]), float(table[-1]))
    torch.testing.assert_close(ours.float(), sched.sigmas, rtol=1e-5, atol=0)


def test_time_uniform_sigmas_are_equal_arctan_steps_and_may_start_at_inf():
    sigmas = uniform_sigmas(8, 0.01, math.inf)
    assert sigmas[0] == math.inf and sigmas[-2] == 0.01 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    t = sigmas[:-1].atan()
    torch.testing.assert_close(t.diff(), torch.full((7,), float(t[1] - t[0]), dtype=torch.float64))
    finite = uniform_sigmas(5, 0.1, 10.0)
    assert (finite[0], finite[-2]) == (10.0, 0.1) and len(finite) == 6
    assert uniform_sigmas(1, 0.1, 10.0).tolist() == [10.0, 0.0]


def test_grid_dispatches_by_kind_and_refuses_bad_requests():
    assert torch.equal(grid("karras", 6, 0.002, 80.0), karras_sigmas(6, 0.002, 80.0))
    assert torch.equal(grid("time-uniform", 6, 0.002, math.inf), uniform_sigmas(6, 0.002, math.inf))
    with pytest.raises(SamplerError, match="unknown sigma grid 'karas'; known: karras, logsnr, time-uniform, family"):
        grid("karas", 6, 0.002, 80.0)
    with pytest.raises(SamplerError, match="finite sigma_max"):
        karras_sigmas(6, 0.002, math.inf)
    with pytest.raises(SamplerError, match="0 < sigma_min < sigma_max"):
        uniform_sigmas(6, 0.0, 1.0)
    with pytest.raises(SamplerError, match="n >= 1"):
        karras_sigmas(0, 0.002, 80.0)


# ---------------------------------------------------------------- every sampler on a tiny DDPM

DENOISING = [name for name, spec in SAMPLERS.items() if spec.needs == "denoise"]
NFE = {"ancestral": lambda k: k, "ddim": lambda k: k, "euler": lambda k: k, "heun": lambda k: 2 * k - 1,
       "heun-arctan": lambda k: 2 * k - 1, "dpmpp-2m": lambda k: k, "dpmpp-3m": lambda k: k, "unipc": lambda k: k,
       "ipndm": lambda k: k, "euler-arctan": lambda k: k}


@pytest.mark.parametrize("name", DENOISING)
def test_every_denoising_sampler_runs_on_a_tiny_ddpm(name):
    from genkit.families.sampling import full_range, resolve_grid, sigma_grid

    steps, family, spec = 4, tiny_ddpm(100), SAMPLERS[name]
    out = sample(family, 3, sampler=name, steps=None if spec.adaptive else steps,
                 generator=torch.Generator().manual_seed(0), batch_size=2)
    assert out.images.shape == (3, 1, 8, 8) and out.images.std() > 0
    bound = family.clip_x0 if spec.clips else None  # ddim, ancestral clamp x0_hat; the ODE solvers do not
    D = family.denoise if bound is None else lambda z, sigma: family.denoise(z, sigma).clamp(-bound, bound)
    grid = None if spec.adaptive else resolve_grid(family, spec, None)  # the sampler's recommended grid
    sigmas = full_range(family) if spec.adaptive else sigma_grid(family, steps, grid)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sample's draws, batch by batch (2 + 1): noise, then the sampler's own
        raw = torch.cat([spec.fn(D, torch.randn((b, 1, 8, 8), generator=g), sigmas, generator=g) for b in (2, 1)])
    torch.testing.assert_close(out.images, raw.clamp(-1, 1), rtol=0, atol=0)  # the sampler's images, in range
    assert torch.isfinite(out.images).all()
    assert out.schedule == (None if spec.adaptive else str(grid))
    if name in NFE:  # one more evaluation per step on a grid that ends at sigma_min (heun: no Euler last step)
        assert out.nfe == NFE[name](steps) + (grid.end == "sigma_min" and name.startswith("heun")), out.nfe
    else:
        assert out.nfe >= 1, out.nfe


def test_named_grids_span_the_family_range_and_karras_is_capped_at_edm_sigma_max():
    from genkit.families.ddpm import DDPM, DDPMConfig
    from genkit.families.sampling import full_range, sigma_grid
    from genkit.nn.unet import UNetConfig
    from genkit.samplers import KARRAS_SIGMA_MAX

    unet = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
    family = DDPM(DDPMConfig(schedule="cosine", unet=unet), shape=(1, 8, 8))
    lo, hi = family.sigma_range()
    assert hi > 1000  # the cosine schedule's last sigma is huge
    karras = sigma_grid(family, 10, "karras")
    assert float(karras[0]) == pytest.approx(KARRAS_SIGMA_MAX) and float(karras[-2]) == pytest.approx(lo)
    uniform = sigma_grid(family, 10, "time-uniform")
    assert float(uniform[0]) == pytest.approx(hi) and float(uniform[-1]) == 0.0
    assert torch.equal(sigma_grid(family, 10), family.sigmas(10))
    assert full_range(family).tolist() == pytest.approx([hi, lo, 0.0])
