"""Few-step sampling (issue 20): log-SNR and time-uniform grids that may end at sigma_min, DPM-Solver++(3M),
UniPC, iPNDM and EDM's Euler/Heun in sigma against their references on an exact Gaussian in float64, their
orders of convergence, each sampler's recommended grid, and NFE as the unit of `sample`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from test_ddpm import tiny_ddpm
from test_ode_samplers import M, U, V, alpha_s  # the shared exact Gaussian (float64)
from test_ode_samplers import gaussian_denoiser as gaussian

from genkit.errors import SamplerError
from genkit.families.sampling import resolve_grid, sample, sigma_grid, steps_for_nfe
from genkit.samplers import FLOW, SAMPLERS, VP, CountingDenoiser
from genkit.samplers.multistep import sample_dpmpp_3m, sample_unipc
from genkit.samplers.schedules import KARRAS_SIGMA_MAX, GridSpec, karras_sigmas, logsnr_sigmas, time_uniform_sigmas


def exact_state(sigma: float) -> torch.Tensor:
    """Where the exact (affine) flow puts the fixed points U at sigma; x0 = M + sqrt(V) U at 0."""
    if sigma == 0:
        return M + V.sqrt() * U
    alpha, s = alpha_s(torch.tensor(sigma, dtype=torch.float64))
    return alpha * M + (alpha**2 * V + s**2).sqrt() * U


def flow_error(name: str, sigmas: torch.Tensor) -> float:
    out = SAMPLERS[name].fn(gaussian, exact_state(float(sigmas[0])), sigmas)
    return float((out - exact_state(float(sigmas[-1]))).abs().max())


def noise(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


KARRAS = lambda n: karras_sigmas(n, 0.002, 80.0)  # noqa: E731
LOGSNR_MIN = lambda n: logsnr_sigmas(n, 0.01, 50.0, end="sigma_min")  # noqa: E731

# ---------------------------------------------------------------- grids


def test_logsnr_grid_is_uniform_in_log_sigma_and_ends_where_asked():
    zero = logsnr_sigmas(5, 0.01, 50.0)
    assert len(zero) == 6 and zero[-1] == 0 and (zero[0], zero[-2]) == (50.0, 0.01)
    torch.testing.assert_close(zero[:-1].log().diff(), torch.full((4,), math.log(0.01 / 50) / 4, dtype=torch.float64))
    at_min = logsnr_sigmas(5, 0.01, 50.0, end="sigma_min")  # 5 intervals, no final denoising step
    assert len(at_min) == 6 and (at_min[0], at_min[-1]) == (50.0, 0.01) and (at_min > 0).all()
    torch.testing.assert_close(at_min.log().diff(), torch.full((5,), math.log(0.01 / 50) / 5, dtype=torch.float64))
    tu = time_uniform_sigmas(4, 0.01, math.inf, end="sigma_min")
    assert tu[0] == math.inf and tu[-1] == 0.01 and len(tu) == 5
    torch.testing.assert_close(tu.atan().diff(), torch.full((4,), float(tu.atan().diff()[0]), dtype=torch.float64))


def test_grid_specs_parse_print_and_refuse():
    spec = GridSpec.parse("karras:rho=5,end=sigma_min")
    assert (spec.name, spec.rho, spec.end) == ("karras", 5.0, "sigma_min") and str(spec) == "karras:rho=5,end=sigma_min"
    assert str(GridSpec.parse("logsnr")) == "logsnr" and str(GridSpec.parse("karras:rho=7")) == "karras"
    torch.testing.assert_close(spec.sigmas(4, 0.002, 1e4), karras_sigmas(4, 0.002, KARRAS_SIGMA_MAX, 5.0, "sigma_min"))
    assert GridSpec.parse("logsnr").sigmas(3, 0.01, math.inf)[0] == KARRAS_SIGMA_MAX  # capped: it needs a finite start
    for bad, msg in (("logsnr:rho=3", "rho is an option of the karras grid only"),
                     ("karras:end=one", "end must be one of zero, sigma_min"),
                     ("family:end=sigma_min", "the family's own grid ends at zero"),
                     ("karras:rho=-1", "rho must be > 0"), ("karras:rho=0", "rho must be > 0, got 0.0"),
                     ("karras:rho", "options are rho=FLOAT"), ("log-snr", "unknown sigma grid 'log-snr'"),
                     ("karras:rho=5,rho=6", "got 'rho=6'"), ("karras:rho=1=2", "rho must be a number, got '1=2'")):
        with pytest.raises(SamplerError, match=msg):
            GridSpec.parse(bad)
    assert GridSpec.parse("karras:rho=0.5").rho == 0.5
    for grid in (karras_sigmas, logsnr_sigmas, time_uniform_sigmas):  # exact ends, also on the shortest grids
        for n, end in ((1, "sigma_min"), (2, "zero"), (3, "zero"), (3, "sigma_min")):
            sigmas = grid(n, 0.0023, 71.3, end=end)
            positive = sigmas[sigmas > 0]
            assert (float(positive[0]), float(positive[-1]), len(positive)) == (71.3, 0.0023, n + (end != "zero"))
        with pytest.raises(SamplerError, match="^a sigma grid needs 0 < sigma_min < sigma_max, got 2.0 and 2.0$"):
            grid(3, 2.0, 2.0)
        with pytest.raises(SamplerError, match="^unknown grid end 'one'; known: zero, sigma_min$"):
            grid(3, 0.002, 80.0, end="one")
    with pytest.raises(SamplerError, match=r"^the family grid comes from the family \(`Denoising.sigmas`\)$"):
        GridSpec.parse("family").sigmas(4, 0.002, 80.0)
    with pytest.raises(SamplerError,
                       match="^the logsnr grid needs a finite sigma_max; use time-uniform to start at inf$"):
        logsnr_sigmas(4, 0.002, math.inf)
    # float64 through: the arctan times of a float32 linspace are off by ~1e-7 relative
    tu = time_uniform_sigmas(6, 0.01, 50.0)
    want = torch.tensor([math.tan(a) for a in torch.linspace(math.atan(50.0), math.atan(0.01), 6, dtype=torch.float64)],
                        dtype=torch.float64)
    assert tu.dtype == torch.float64
    torch.testing.assert_close(tu[1:-2], want[1:-1], rtol=1e-13, atol=0)


# ---------------------------------------------------------------- references, transcribed (default suite)


def k_diffusion_dpmpp_3m(D, x, sigmas):
    """k-diffusion's `sample_dpmpp_3m_sde` at eta = 0, transcribed in its variable x = z / alpha."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = D(x / (1 + sigma**2) ** 0.5, torch.full((x.shape[0],), sigma, dtype=x.dtype))
        if sigma_next == 0:
            x = denoised
        else:
            h = -math.log(sigma_next) + math.log(sigma)
            x = math.exp(-h) * x + (-math.expm1(-h)) * denoised
            phi_2 = math.expm1(-h) / h + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


def ipndm_reference(D, x, sigmas, max_order=4):
    """iPNDM as Zhou et al.'s diff-sampler writes it (EDM's x, slopes d = (x - D) / sigma, AB weights)."""
    buffer = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - D(x / (1 + t_cur**2) ** 0.5, torch.full((x.shape[0],), t_cur, dtype=x.dtype))) / t_cur
        order = min(max_order, i + 1)
        if order == 1:
            step = d
        elif order == 2:
            step = (3 * d - buffer[-1]) / 2
        elif order == 3:
            step = (23 * d - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            step = (55 * d - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        x = x + (t_next - t_cur) * step
        buffer.append(d)
    return x


@pytest.mark.parametrize("make_grid", [KARRAS, LOGSNR_MIN], ids=["karras", "logsnr-sigma_min"])
@pytest.mark.parametrize("name,reference", [("dpmpp-3m", k_diffusion_dpmpp_3m), ("ipndm", ipndm_reference)])
def test_multistep_solvers_equal_their_reference_transcriptions(name, reference, make_grid):
    for n in (1, 2, 3, 7):
        sigmas = make_grid(n)
        z = noise()
        alpha_end = alpha_s(float(sigmas[-1]))[0] if sigmas[-1] > 0 else 1.0
        want = alpha_end * reference(gaussian, z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas)
        torch.testing.assert_close(SAMPLERS[name].fn(gaussian, z, sigmas), want, rtol=1e-10, atol=1e-10)


def test_karras_grid_takes_any_positive_rho_and_refuses_the_rest():
    ramp = torch.linspace(0, 1, 4, dtype=torch.float64)
    for rho in (0.5, 1.0, 7.0):
        want = (80.0 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
        torch.testing.assert_close(karras_sigmas(4, 0.002, 80.0, rho=rho), torch.cat([want, torch.zeros(1).double()]))
    for rho in (0.0, -1.0):
        with pytest.raises(SamplerError, match=f"^the karras grid needs rho > 0, got {rho}$"):
            karras_sigmas(4, 0.002, 80.0, rho=rho)
    with pytest.raises(SamplerError,
                       match="^the karras grid needs a finite sigma_max; use time-uniform to start at inf$"):
        karras_sigmas(4, 0.002, math.inf)


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_of_each_max_order_equals_the_reference(max_order):
    sigmas, z = KARRAS(7), noise()
    want = ipndm_reference(gaussian, z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, max_order=max_order)
    torch.testing.assert_close(SAMPLERS["ipndm"].fn(gaussian, z, sigmas, max_order=max_order), want,
                               rtol=1e-10, atol=1e-10)
    for bad in (0, 5):
        with pytest.raises(SamplerError, match=f"^ipndm: max_order must be 1, 2, 3 or 4, got {bad}$"):
            SAMPLERS["ipndm"].fn(gaussian, z, sigmas, max_order=bad)


def _diffusers_run(sched, n: int, z0: torch.Tensor):
    """A diffusers multistep scheduler stepped with the Gaussian's epsilon; its sigmas made float64."""
    sched.set_timesteps(n)
    sched.sigmas = sched.sigmas.double()
    sigmas, z = sched.sigmas.clone(), z0.clone()
    for i, t in enumerate(sched.timesteps):
        alpha, s = alpha_s(sigmas[i])
        eps = (z - alpha * gaussian(z, sigmas[i].expand(len(z)))) / s
        z = sched.step(eps, t, z).prev_sample
    return z, sigmas


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_unipc_equals_diffusers_unipc_multistep_scheduler(order, final):
    """bh2 with its corrector UniC and diffusers' lower_order_final, in float64 to 1e-10."""
    for n in (3, 8):
        sched = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=order, final_sigmas_type=final,
                                        timestep_spacing="trailing")
        want, sigmas = _diffusers_run(sched, n, noise())
        torch.testing.assert_close(sample_unipc(gaussian, noise(), sigmas, order=order), want, rtol=1e-10, atol=1e-10)
    for bad in (0, 5):
        with pytest.raises(SamplerError, match=f"^unipc: order must be 1, 2, 3 or 4, got {bad}$"):
            sample_unipc(gaussian, noise(), KARRAS(3), order=bad)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_3m_equals_diffusers_dpmsolver_order_3(final):
    """solver_order=3, solver_type="heun", no lower_order_final; diffusers steps its sample in float32."""
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=3, solver_type="heun",
                                        lower_order_final=False, final_sigmas_type=final, timestep_spacing="trailing")
    want, sigmas = _diffusers_run(sched, 8, noise())
    torch.testing.assert_close(sample_dpmpp_3m(gaussian, noise(), sigmas), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- k-diffusion itself (where installed)


@pytest.fixture(scope="module")
def ks():
    """k_diffusion.sampling (pip install k-diffusion; not a test dependency): these tests skip without it."""
    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed (pip install k-diffusion)")
    from benchmarks.bench_fewstep import k_diffusion_sampling

    return k_diffusion_sampling()


def _kd_model(x, sigma):
    alpha, _ = alpha_s(sigma.view(-1, 1))
    return gaussian(x * alpha, sigma)


@pytest.mark.parametrize("make_grid", [KARRAS, LOGSNR_MIN], ids=["karras", "logsnr-sigma_min"])
@pytest.mark.parametrize("name,kname", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                        ("dpmpp-2m", "sample_dpmpp_2m"), ("dpmpp-3m", "sample_dpmpp_3m_sde")])
def test_samplers_equal_k_diffusion(ks, name, kname, make_grid):
    """pip install k-diffusion: genkit's samplers against k-diffusion's own functions, float64, 1e-10."""
    fn = getattr(ks, kname)
    options = {"eta": 0.0} if kname.endswith("_sde") else {}
    for n in (2, 5, 10):
        sigmas, z = make_grid(n), noise()
        want = fn(_kd_model, z * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, disable=True, **options)
        alpha_end = alpha_s(float(sigmas[-1]))[0] if sigmas[-1] > 0 else 1.0
        torch.testing.assert_close(SAMPLERS[name].fn(gaussian, z, sigmas), alpha_end * want, rtol=1e-10, atol=1e-10)


def test_logsnr_grid_is_k_diffusion_exponential(ks):
    torch.testing.assert_close(logsnr_sigmas(9, 0.002, 80.0), ks.get_sigmas_exponential(9, 0.002, 80.0).double(),
                               rtol=1e-6, atol=0)


# ---------------------------------------------------------------- orders of convergence

ORDERS = [  # sampler, grid, steps N, 2N, 4N, band of err(N) / err(2N) (measured, see the comment)
    ("euler", KARRAS, (10, 20, 40), (1.8, 2.2)),          # first order: 1.97, 1.99
    ("heun", KARRAS, (10, 20, 40), (3.8, 5.5)),           # second: 4.9, 4.4
    ("ipndm", KARRAS, (10, 20, 40), (3.8, 5.2)),          # the first-order warm-up step caps it at 2: 4.3, 4.8
    ("dpmpp-3m", LOGSNR_MIN, (10, 20, 40), (4.5, 7.0)),   # likewise, approaching 4 from above: 6.0, 5.1
    ("unipc", KARRAS, (10, 20, 40), (12.0, 20.0)),        # UniC lifts it to ~4 on this grid: 14.7, 17.1
]


@pytest.mark.parametrize("name,make_grid,steps,band", ORDERS, ids=[c[0] for c in ORDERS])
def test_order_of_convergence_on_the_gaussian_flow(name, make_grid, steps, band):
    err = [flow_error(name, make_grid(n)) for n in steps]
    ratios = [err[0] / err[1], err[1] / err[2]]
    assert all(band[0] < r < band[1] for r in ratios), (err, ratios)


def test_first_steps_from_sigma_inf_are_ddim_steps():
    """From sigma = inf every solver's first step is the finite limit z_n = s_n z + alpha_n x0_hat."""
    sigmas = torch.tensor([math.inf, 0.7], dtype=torch.float64)
    want = SAMPLERS["ddim"].fn(gaussian, noise(), sigmas)
    for name in ("euler", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm"):
        torch.testing.assert_close(SAMPLERS[name].fn(gaussian, noise(), sigmas), want, rtol=1e-12, atol=1e-12)
    grid = time_uniform_sigmas(40, 0.01, math.inf, end="sigma_min")  # errors 0.023, 0.005, 0.002
    for name in ("dpmpp-3m", "unipc", "ipndm"):
        assert flow_error(name, grid) < 0.05, name
    with pytest.raises(SamplerError, match=r"^heun integrates in sigma and cannot start at sigma = inf: use a grid "
                       r"with a finite sigma_max \(karras, logsnr\) or heun-arctan$"):
        SAMPLERS["heun"].fn(gaussian, noise(), sigmas)


# ---------------------------------------------------------------- NFE as the unit, recommended grids


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "heun-arctan", "dpmpp-3m", "unipc", "ipndm"])
def test_nfe_picks_the_steps_that_spend_exactly_that(name):
    family, spec = tiny_ddpm(100), SAMPLERS[name]
    grid = resolve_grid(family, spec, None)
    for nfe in (3, 5, 8):
        try:
            steps = steps_for_nfe(name, spec, nfe, grid)
        except SamplerError as e:  # heun on a grid that ends at 0 spends 1, 3, 5, ...: 8 is impossible
            assert name.startswith("heun") and nfe % 2 == 0 and "possible NFE there are 1, 3, 5, 7" in str(e)
            continue
        D = CountingDenoiser(family.denoise)
        with torch.no_grad():
            spec.fn(D, torch.randn(2, 1, 8, 8), sigma_grid(family, steps, grid))
        out = sample(family, 2, sampler=name, nfe=nfe, generator=torch.Generator().manual_seed(0))
        assert D.nfe == nfe and out.nfe == nfe and out.steps == steps, (D.nfe, out.nfe, steps)


def test_nfe_refusals_name_the_sampler_and_the_possible_values():
    family = tiny_ddpm(100)
    with pytest.raises(SamplerError, match=r"sampler 'heun' cannot spend exactly 4 evaluations on the grid "
                                           r"'karras': its possible NFE there are 1, 3, 5, 7"):
        sample(family, 1, sampler="heun", nfe=4)
    with pytest.raises(SamplerError, match=r"possible NFE there are 2, 4, 6, 8"):  # no final Euler step there
        sample(family, 1, sampler="heun", nfe=5, schedule="karras:end=sigma_min")
    with pytest.raises(SamplerError, match="'rk45' chooses its own steps between the grid's ends: drop --nfe"):
        sample(family, 1, sampler="rk45", nfe=10)
    with pytest.raises(SamplerError, match="'rk45' chooses its own steps between the grid's ends: drop --steps"):
        sample(family, 1, sampler="rk45", steps=10, schedule="logsnr")


def test_rk45_integrates_between_the_ends_of_a_given_grid():
    """`schedule` on rk45 moves only its ends: from the log-SNR grid's sigma = 80, not the cosine schedule's ~2e4,
    to the same sigma_min; the integration from 80 is sample_rk45 on [80, sigma_min, 0] exactly."""
    from genkit.samplers.ode import sample_rk45

    family = tiny_ddpm(1000, schedule="cosine")
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_min, sigma_max = family.sigma_range()
    assert sigma_max > 1000
    grid = sample(family, 3, sampler="rk45", schedule="logsnr", noise=noise)
    direct = sample_rk45(family.denoise, noise.clone(), torch.tensor([80.0, sigma_min, 0.0], dtype=torch.float64))
    torch.testing.assert_close(grid.images, direct.clamp(-1, 1), rtol=0, atol=1e-6)
    whole = sample(family, 3, sampler="rk45", noise=noise)
    assert (whole.images - grid.images).abs().max() > 1e-3  # the default still starts at the family's sigma_max
    with pytest.raises(SamplerError, match="give --steps or --nfe, not both"):
        sample(family, 1, sampler="ddim", nfe=10, steps=10)


def test_each_sampler_declares_a_grid_for_every_noise_process_and_sample_uses_it():
    for name, spec in SAMPLERS.items():
        if spec.needs == "denoise" and not spec.adaptive:
            assert {"vp", "ve", "flow"} <= set(spec.grids), name
    family = tiny_ddpm(100)
    out = sample(family, 2, sampler="dpmpp-3m", steps=4, generator=torch.Generator().manual_seed(0))
    assert out.schedule == str(SAMPLERS["dpmpp-3m"].grids[VP])
    told = sample(family, 2, sampler="dpmpp-3m", steps=4, schedule="family", generator=torch.Generator().manual_seed(0))
    assert told.schedule == "family" and not torch.equal(told.images, out.images)
    from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
    from genkit.nn.unet import UNetConfig

    rf = RectifiedFlow(RectifiedFlowConfig(unet=UNetConfig(channels=[8, 16], attention=[False, False],
                                                           layers_per_block=1, norm_groups=4)), (1, 8, 8))
    assert rf.noise_process == FLOW and resolve_grid(rf, SAMPLERS["unipc"], None) == SAMPLERS["unipc"].grids[FLOW]


def test_cli_sample_spends_the_nfe_asked_and_records_it(ddpm_run, tmp_path):
    import numpy as np
    from conftest import run_cli

    r = run_cli("sample", str(ddpm_run), "--sampler", "dpmpp-3m", "--nfe", "6", "--schedule", "logsnr:end=sigma_min",
                "--n", "4", "--out", "g.png", "--save-npz", "s.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps 6, NFE 6" in r.stdout
    with np.load(tmp_path / "s.npz") as z:
        assert int(z["nfe"]) == 6 and str(z["schedule"]) == "logsnr:end=sigma_min" and int(z["steps"]) == 6
    r = run_cli("sample", str(ddpm_run), "--sampler", "heun", "--nfe", "6", "--n", "2", cwd=tmp_path)
    assert r.returncode == 2 and "sampler 'heun' cannot spend exactly 6 evaluations" in r.stderr
    r = run_cli("sample", str(ddpm_run), "--schedule", "karras:rho=x", "--n", "2", cwd=tmp_path)
    assert r.returncode == 2 and "rho must be a number" in r.stderr
