"""Shared samplers: parity with diffusers' DDPM/DDIM schedulers, exactness on Gaussian data, the contract."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from test_ddpm import DIFFUSERS_PREDICTION, tiny_ddpm

from genkit.errors import SamplerError
from genkit.families.base import Direct, Family
from genkit.families.ddpm import NoiseSchedule, make_betas
from genkit.families.sampling import sample
from genkit.samplers import SAMPLERS, CountingDenoiser
from genkit.samplers.adapters import TO_X0, clipped, eps_from_x0, training_target, vp_coefficients
from genkit.samplers.ddim import sample_ancestral, sample_ddim

SHAPE = (2, 1, 8, 8)
# float64 checks the formulas (1e-9); float32 is what users run: roundoff over up to 50 steps
# through a UNet whose output gain `tiny_ddpm` widened 4x reaches ~1e-4
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=5e-4)}


def alpha_s(sigma):
    """The VP scales, written out here so that the sampler's own `vp_coefficients` is under test."""
    alpha = 1 / (1 + sigma**2) ** 0.5
    return alpha, sigma * alpha


def ddim_denoiser(family):
    """The denoiser `ddim` and `ancestral` run: x0_hat clamped when the family clips (genkit.families.sampling)."""
    return family.denoise if family.clip_x0 is None else clipped(family.denoise, family.clip_x0)


def initial_noise(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def in_precision(family, sched, dtype: torch.dtype):
    """The family's UNet in `dtype`; in float64 the scheduler also gets the float64 alpha_bar
    (diffusers keeps float32 tables, whose 1 - alpha_bar cancels at small t)."""
    family.nets.to(dtype).eval()
    if dtype == torch.float64:
        sched.alphas_cumprod = family.schedule.alpha_bar.clone()
        sched.one = sched.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)
    return family.nets["unet"]


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_ancestral_equals_diffusers_ddpm_scheduler(prediction, clip, dtype):
    """All T steps, one generator per loop seeded alike: genkit draws where diffusers does (t > 0)."""
    T = 50
    family = tiny_ddpm(T, out_scale=4.0, prediction=prediction, clip_sample=clip)
    sched = DDPMScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction],
                          clip_sample=clip)
    sched.set_timesteps(T)
    unet = in_precision(family, sched, dtype)
    z = initial_noise(dtype)
    with torch.no_grad():
        ours = sample_ancestral(ddim_denoiser(family), z, family.sigmas(T), generator=torch.Generator().manual_seed(1))
        x, g, x0_max = z.clone(), torch.Generator().manual_seed(1), 0.0
        for t in sched.timesteps:
            step = sched.step(unet(x, t).sample, t, x, generator=g)
            x, x0_max = step.prev_sample, max(x0_max, float(step.pred_original_sample.abs().max()))
    # the flag is exercised: clipping saturates x0_hat, and without it x0_hat leaves [-1, 1]
    assert x0_max == 1.0 if clip else x0_max > 1.0
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, x, **TOLERANCE[dtype])


DDIM_CASES = [  # prediction, clip, spacing, eta
    ("epsilon", False, "leading", 0.0),
    ("epsilon", True, "leading", 0.0),
    ("v", True, "leading", 0.0),
    ("x0", False, "leading", 0.0),
    ("epsilon", False, "trailing", 0.0),
    ("v", False, "trailing", 0.0),
    ("epsilon", False, "leading", 0.5),
    ("x0", True, "trailing", 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("prediction,clip,spacing,eta", DDIM_CASES)
def test_ddim_through_sigmas_equals_diffusers_ddim_scheduler(prediction, clip, spacing, eta, dtype):
    """10 steps over T=1000; set_alpha_to_one=True and steps_offset=0 (diffusers' defaults).

    With clipping, genkit's eps comes from the clipped x0_hat (Glide): use_clipped_model_output=True.
    With eta > 0 diffusers draws noise at every step and genkit only where its std c > 0; the last
    step (to sigma = 0) has std 0 in both, so the draws line up one for one before it.
    """
    T, steps = 1000, 10
    family = tiny_ddpm(T, out_scale=4.0, prediction=prediction, clip_sample=clip, spacing=spacing)
    sched = DDIMScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PREDICTION[prediction],
                          clip_sample=clip, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    unet = in_precision(family, sched, dtype)
    z = initial_noise(dtype)

    def reference(use_clipped: bool) -> torch.Tensor:
        x, g = z.clone(), torch.Generator().manual_seed(1)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=eta, use_clipped_model_output=use_clipped,
                           generator=g).prev_sample
        return x

    with torch.no_grad():
        ours = sample_ddim(ddim_denoiser(family), z, family.sigmas(steps), eta=eta,
                           generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours, reference(use_clipped=clip), **TOLERANCE[dtype])
        if clip:  # and the convention matters: diffusers' default (raw eps) is another sampler
            assert (ours - reference(use_clipped=False)).abs().max() > 1e-2


# ---------------------------------------------------------------- adapters


def test_adapters_invert_each_training_target():
    """z = alpha x0 + s eps; each parametrisation's target, read back through TO_X0, is x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64).view(-1, 1)
    alpha, s = vp_coefficients(sigma)
    torch.testing.assert_close(alpha, alpha_s(sigma)[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(s, alpha_s(sigma)[1], rtol=1e-14, atol=0)
    z = alpha * x0 + s * eps
    for prediction, to_x0 in TO_X0.items():
        target = training_target(prediction, x0, eps, alpha, s)
        torch.testing.assert_close(to_x0(z, target, alpha, s), x0, rtol=1e-10, atol=1e-10, msg=prediction)
        torch.testing.assert_close(eps_from_x0(z, x0, alpha, s), eps, rtol=1e-10, atol=1e-10)
    # sigma = inf is pure noise: alpha = 0, s = 1, for tensors and floats alike
    alpha, s = vp_coefficients(torch.tensor([math.inf]))
    assert (float(alpha), float(s)) == (0.0, 1.0) == vp_coefficients(math.inf)


def test_clipped_denoiser_clamps_after_the_conditional_prediction():
    D = clipped(lambda z, sigma, *, shift: z + shift, 1.5)
    z = torch.tensor([[-3.0, 0.2, 1.0]])
    torch.testing.assert_close(D(z, torch.ones(1), shift=0.4), torch.tensor([[-1.5, 0.6, 1.4]]))


@pytest.mark.parametrize("name", sorted(n for n, spec in SAMPLERS.items() if spec.fn is not None))
def test_every_sampler_passes_the_condition_to_every_evaluation(name):
    """The condition reaches D at every call: D needs `target` (no default) and returns it as x0_hat, the
    denoiser of a point mass at `target`. The path equals the one with `target` bound into D, and ends on
    the target (exactly for the samplers in sigma; the arctan-time integrators are off by their step error)."""
    target = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2)

    def point_mass(z: torch.Tensor, sigma: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
        return target.expand_as(z)

    z = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    fn = SAMPLERS[name].fn
    out = fn(point_mass, z, sigmas, generator=torch.Generator().manual_seed(1), target=target)
    bound = fn(lambda z, sigma: point_mass(z, sigma, target=target), z, sigmas,
               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, bound, rtol=0, atol=0)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-2 if name.endswith("arctan") else 1e-6)


# ---------------------------------------------------------------- Gaussian data, exact denoiser

M = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
V = torch.tensor([0.04, 0.25, 1.0], dtype=torch.float64)
LINEAR = NoiseSchedule(make_betas("linear", 1000))


def gaussian_denoiser(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | z] for x0 ~ N(M, diag V) and z = alpha x0 + s eps."""
    alpha, s = alpha_s(sigma.view(-1, 1))
    return M + alpha * V / (alpha**2 * V + s**2) * (z - alpha * M)


def exact_marginal(sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of z at noise level sigma: N(alpha M, alpha^2 V + s^2)."""
    alpha, s = alpha_s(sigma)
    eps = torch.randn(n, len(M), generator=generator, dtype=torch.float64)
    return alpha * M + (alpha**2 * V + s**2).sqrt() * eps


def ddim_pushforward(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance after DDIM (eta=0): the map is affine per dimension, z -> A z + B."""
    sigmas = LINEAR.sigmas(steps, "leading")
    probe = torch.stack([torch.zeros_like(M), torch.ones_like(M), 2 * torch.ones_like(M)])
    out = sample_ddim(gaussian_denoiser, probe, sigmas)
    A, B = out[1] - out[0], out[0]
    torch.testing.assert_close(out[2], 2 * A + B, rtol=1e-12, atol=1e-12)  # affine indeed
    alpha, s = alpha_s(float(sigmas[0]))
    return A * alpha * M + B, A**2 * (alpha**2 * V + s**2)


def test_ddim_maps_the_exact_marginal_onto_the_gaussian_data():
    """50 steps over the linear schedule's grid, from the exact marginal at sigma_max."""
    mean, var = ddim_pushforward(50)
    torch.testing.assert_close(mean, M, rtol=0, atol=1e-12)  # the mean path is followed exactly
    assert ((var / V - 1).abs() < 0.25).all(), var / V   # first-order error at 50 steps (see next test)
    n, sigmas = 20_000, LINEAR.sigmas(50, "leading")
    z = exact_marginal(float(sigmas[0]), n, torch.Generator().manual_seed(0))
    x = sample_ddim(gaussian_denoiser, z, sigmas)
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) / var - 1).abs() < 5 * math.sqrt(2 / (n - 1))).all()


def test_ddim_error_shrinks_at_first_order_with_steps():
    """|Var/V - 1| falls ~5x for each 5x more steps (exact, no Monte Carlo noise)."""
    err = {k: (ddim_pushforward(k)[1] / V - 1).abs() for k in (10, 50, 250)}
    assert (err[10] > 2.5 * err[50]).all() and (err[50] > 3.5 * err[250]).all(), err
    assert (err[250] < 0.06).all(), err[250]


def test_ddim_eta_one_over_all_steps_lands_on_the_data_distribution():
    """eta = 1 on every timestep is ancestral sampling: compare with the DDPM chain's exact moments.

    That chain (Ho et al.'s fixed-small variance beta_tilde around the exact x0_hat) keeps the mean
    exactly but is slightly under-dispersed: it leaves out Var[x0 | x_t], 0.9% of V = 1 and 3.7%
    of V = 0.04 over 1000 linear steps. So the samples are held to the chain's moments within 5
    standard errors, and the chain to N(M, V) within 5%.
    """
    sigmas = LINEAR.sigmas(1000, "leading")
    g = torch.Generator().manual_seed(0)
    # two chunks of 10000 stay under torch's parallel grain: fast on 2 busy cores
    x = torch.cat([sample_ddim(gaussian_denoiser, exact_marginal(float(sigmas[0]), 10_000, g), sigmas,
                               eta=1.0, generator=g) for _ in range(2)])
    n = len(x)
    alpha, s = alpha_s(float(sigmas[0]))
    mean, var = alpha * M, alpha**2 * V + s**2
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for t in range(LINEAR.T - 1, -1, -1):  # moments through x_{t-1} ~ q(. | x_t, x0_hat(x_t))
        ab = float(LINEAR.alpha_bar[t])
        k = math.sqrt(ab) * V / (ab * V + 1 - ab)  # x0_hat = M + k (x_t - sqrt(ab) M)
        c0 = LINEAR.posterior(one, zero, t)[0]  # posterior mean = c0 x0 + ct x_t
        ct, beta_tilde = LINEAR.posterior(zero, one, t)
        a = c0 * k + ct
        mean, var = c0 * (M + k * (mean - math.sqrt(ab) * M)) + ct * mean, a**2 * var + beta_tilde
    torch.testing.assert_close(mean, M, rtol=0, atol=1e-12)
    assert ((var / V - 1).abs() < 0.05).all(), var / V
    se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all()
    assert ((x.var(0) - var).abs() < 5 * se_var).all()


def test_consistency_sampling_is_algorithm_1_written_out():
    """Song et al. 2023, Alg. 1 in the VP-scaled state: jump to x0_hat, re-noise to the next sigma with fresh
    N(0, I) from the generator (in the state's dtype), ..., and return x0_hat on the step onto 0. The grid holds
    sigma = 1 (the re-noising there must happen) and the batch (5) differs from the channels (3)."""
    sigmas = torch.tensor([80.0, 2.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    z0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []

    def D(z, sigma):
        assert sigma.shape == (5,)
        calls.append(float(sigma[0]))
        return gaussian_denoiser(z, sigma)

    out = SAMPLERS["consistency"].fn(D, z0, sigmas, generator=torch.Generator().manual_seed(1))
    g, x0 = torch.Generator().manual_seed(1), gaussian_denoiser(z0, sigmas[:1].expand(5))
    for sigma in sigmas[1:-1]:
        alpha, s = alpha_s(float(sigma))
        z = alpha * x0 + s * torch.randn(5, 3, generator=g, dtype=torch.float64)
        x0 = gaussian_denoiser(z, sigma.expand(5))
    torch.testing.assert_close(out, x0, rtol=1e-12, atol=1e-12)
    assert calls == [80.0, 2.0, 1.0, 0.3]   # NFE = the positive sigmas before the final 0


def test_consistency_sampling_of_the_exact_denoiser_has_the_closed_form_moments():
    """x0_hat = E[x0 | z] is affine in z: from the exact marginal at sigma_0, each jump leaves N(M, W) with
    W = k^2 (alpha^2 V + s^2), k = alpha V / (alpha^2 V + s^2), and each re-noising N(alpha M, alpha^2 W + s^2)."""
    n, sigmas = 20_000, torch.tensor([80.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    z = exact_marginal(80.0, n, torch.Generator().manual_seed(0))
    x = SAMPLERS["consistency"].fn(gaussian_denoiser, z, sigmas, generator=torch.Generator().manual_seed(1))
    var = V
    for i, sigma in enumerate(sigmas[:-1].tolist()):
        alpha, s = alpha_s(sigma)
        k, marginal = alpha * V / (alpha**2 * V + s**2), (alpha**2 * (V if i == 0 else var) + s**2)
        var = k**2 * marginal
    assert ((var / V - 1).abs() > 0.02).any()   # the chain is not the data distribution: a distinct target
    assert ((x.mean(0) - M).abs() < 5 * (var / n).sqrt()).all()
    assert ((x.var(0) / var - 1).abs() < 5 * math.sqrt(2 / (n - 1))).all(), (x.var(0), var)
    one_step = SAMPLERS["consistency"].fn(gaussian_denoiser, z, sigmas[[0, -1]])
    torch.testing.assert_close(one_step, gaussian_denoiser(z, torch.full((n,), 80.0, dtype=torch.float64)))


def test_sampler_grid_tables_default_flow_to_vp():
    """`_grids(vp, ve, flow)`: ve defaults to the family's grid and flow to vp's (called at import for SAMPLERS,
    so checked directly)."""
    from genkit.samplers import FLOW, VE, VP, _grids
    from genkit.samplers.schedules import GridSpec

    assert _grids("karras") == {VP: GridSpec.parse("karras"), VE: GridSpec.parse("family"),
                                FLOW: GridSpec.parse("karras")}
    assert _grids("karras", "logsnr", "time-uniform") == {VP: GridSpec.parse("karras"), VE: GridSpec.parse("logsnr"),
                                                          FLOW: GridSpec.parse("time-uniform")}


# ---------------------------------------------------------------- the `sample` contract


@pytest.fixture(scope="module")
def family():
    return tiny_ddpm(100)


def test_sample_reports_nfe_shape_and_range(family):
    for name, steps in [("ddim", 4), ("ancestral", 3)]:
        out = sample(family, 3, sampler=name, steps=steps, generator=torch.Generator().manual_seed(0),
                     batch_size=2)
        assert out.nfe == steps and out.sampler == name and out.steps == steps
        assert out.images.shape == (3, 1, 8, 8) and out.images.dtype == torch.float32
        fn, g = {"ddim": sample_ddim, "ancestral": sample_ancestral}[name], torch.Generator().manual_seed(0)
        with torch.no_grad():  # sample's draws, batch by batch: noise, then the sampler's own
            raw = torch.cat([fn(lambda z, sigma: family.denoise(z, sigma).clamp(-family.clip_x0, family.clip_x0),
                                torch.randn((b, 1, 8, 8), generator=g), family.sigmas(steps), generator=g)
                             for b in (2, 1)])
        assert raw.abs().max() == 1  # the last step returns the clipped x0_hat: in range before any clamp
        torch.testing.assert_close(out.images, raw, rtol=0, atol=0)


def test_sample_clamps_images_to_the_data_range():
    """Without clip_sample the sampler can leave [-1, 1]; `sample` still returns images in it."""
    wide = tiny_ddpm(100, out_scale=4.0, prediction="x0", clip_sample=False)
    raw = sample_ddim(wide.denoise, initial_noise(torch.float32), wide.sigmas(3))
    assert raw.abs().max() > 1
    images = sample(wide, 2, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0)).images
    assert images.abs().max() <= 1 and (images.abs() == 1).any()


def test_sample_defaults_come_from_the_family(family, monkeypatch):
    monkeypatch.setattr(family, "default_steps", 3)
    out = sample(family, 1, generator=torch.Generator().manual_seed(0))
    assert (out.sampler, out.steps, out.nfe) == (family.default_sampler, 3, 3)


def test_same_seed_same_images_per_batch_size(family):
    def run(seed, batch_size):
        return sample(family, 3, sampler="ancestral", steps=5, generator=torch.Generator().manual_seed(seed),
                      batch_size=batch_size).images

    for batch_size in (1, 3):
        assert torch.equal(run(0, batch_size), run(0, batch_size))
        assert not torch.allclose(run(0, batch_size), run(1, batch_size))


def test_deterministic_ddim_does_not_depend_on_batch_size(family):
    """With eta = 0 the generator only draws the initial noise, which torch's CPU generator yields
    identically in one draw of n or n draws of 1; the images then agree up to float noise."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(torch.randn(3, 1, 8, 8, generator=g1),  # the premise, checked
                       torch.cat([torch.randn(1, 1, 8, 8, generator=g2) for _ in range(3)]))

    def run(batch_size):
        return sample(family, 3, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0),
                      batch_size=batch_size).images

    torch.testing.assert_close(run(1), run(3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_networks_sample_in_eval_mode_and_get_their_mode_back(family, monkeypatch, training):
    seen = []
    denoise = family.denoise

    def spy(z, sigma, **cond):
        seen.append(any(m.training for m in family.nets.modules()))
        return denoise(z, sigma, **cond)

    monkeypatch.setattr(family, "denoise", spy)
    family.nets.train(training)
    sample(family, 1, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    assert seen == [False, False]
    assert all(m.training == training for m in family.nets.modules())
    family.nets.eval()


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(SamplerError, match=match) as info:
        sample(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_sample_refuses_bad_requests_with_one_line_errors(family):
    msg = one_line_error("unknown sampler 'dpm-7'", family, 1, sampler="dpm-7")
    assert all(name in msg for name in SAMPLERS)
    msg = one_line_error("no option 'eta'", family, 1, sampler="ancestral", eta=0.3)
    assert msg.endswith("none")  # ancestral takes no options
    msg = one_line_error("no option 'etaa'", family, 1, sampler="ddim", etaa=0.3)
    assert msg.endswith("eta")  # ... and DDIM lists its one
    one_line_error("steps must be >= 1", family, 1, steps=0)
    one_line_error("n must be >= 1", family, 0)
    one_line_error("between 1 and T=100", family, 1, sampler="ddim", steps=101)  # the discrete family grid


def test_sampler_needing_a_missing_capability_is_refused():
    class OnePass(Family, Direct):  # a family without the denoising capability (a GAN, a flow)
        name, default_sampler, default_steps = "gan", "ddim", 1
        nets = torch.nn.ModuleDict()

        def train_step(self, batch, step, opt):
            return {}

        def direct(self, n, *, generator=None, batch_size=None):
            return torch.zeros(n, 1, 2, 2)

    with pytest.raises(SamplerError, match="does not fit family 'gan'"):
        sample(OnePass(), 1)


def test_counting_denoiser_counts_calls():
    D = CountingDenoiser(lambda z, sigma: torch.zeros_like(z))
    sample_ddim(D, torch.zeros(2, 3), torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    assert D.nfe == 3
    conditional = CountingDenoiser(lambda z, sigma, *, shift: z + shift)
    assert torch.equal(conditional(torch.zeros(2), torch.ones(2), shift=3.0), torch.full((2,), 3.0))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")])
def test_running_out_of_memory_is_one_line_naming_the_batch_size(error):
    """The default batch is bounded (256), and running out of memory anyway says how many images a batch held."""
    from genkit.families import sampling

    class Hungry(Family, Direct):
        name, default_sampler = "hungry", "direct"
        nets = torch.nn.ModuleDict({"x": torch.nn.Linear(1, 1)})

        def train_step(self, batch, step, opt):
            return {}

        def direct(self, n, *, generator=None, batch_size=None):
            self.batch = batch_size
            raise error

    family = Hungry()
    with pytest.raises(SamplerError, match="out of memory with 256 images per batch: lower --batch-size"):
        sample(family, 5000)
    assert family.batch == sampling.DEFAULT_BATCH == 256
    family.direct = lambda n, **kw: (_ for _ in ()).throw(RuntimeError("unrelated"))
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through untouched
        sample(family, 3)
