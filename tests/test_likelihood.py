"""Likelihoods: the probability-flow ODE against closed-form Gaussian marginals, Hutchinson
against the exact divergence, and the one bits/dim formula (genkit/samplers/likelihood.py,
genkit/eval/likelihood.py)."""

import math

import pytest
import torch
from torch import nn

from genkit.errors import GenkitError
from genkit.eval.likelihood import family_bits_per_dim
from genkit.families.base import Denoising, Family
from genkit.rng import rademacher
from genkit.samplers.adapters import vp_coefficients
from genkit.samplers.likelihood import bits_per_dim, dequantize, ode_log_likelihood, velocity_and_divergence

INF = math.inf


def seeded(seed):
    return torch.Generator().manual_seed(seed)


class Gaussian:
    """Data N(m, Q diag(v) Q^T) in float64, with its exact denoiser and its marginals."""

    def __init__(self, d: int, rotate: bool, seed: int = 0):
        g = seeded(seed)
        self.m = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
        self.v = 0.05 + 0.5 * torch.rand(d, generator=g, dtype=torch.float64)
        q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        self.q = q if rotate else torch.eye(d, dtype=torch.float64)

    def denoise(self, z, sigma):
        """E[x0 | z] = m + alpha Sigma (alpha^2 Sigma + s^2 I)^-1 (z - alpha m), one sigma per batch."""
        alpha, s = vp_coefficients(float(sigma[0]))
        gain = alpha * self.v / (alpha**2 * self.v + s**2)
        return self.m + (((z - alpha * self.m) @ self.q) * gain) @ self.q.T

    def log_marginal(self, x, sigma):
        """log N(x; alpha m, alpha^2 Sigma + s^2 I): the density of z at sigma."""
        alpha, s = vp_coefficients(sigma)
        cov = alpha**2 * (self.q * self.v) @ self.q.T + s**2 * torch.eye(len(self.m), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(alpha * self.m, cov).log_prob(x)

    def points(self, n, seed=1):
        g = seeded(seed)
        return 0.6 * torch.randn(n, len(self.m), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("d,rotate", [(4, False), (8, True)])
@pytest.mark.parametrize("sigma_min,sigma_max", [(1e-3, INF), (0.5, INF), (1e-3, 1e4)])
def test_ode_likelihood_matches_gaussian_marginal(d, rotate, sigma_min, sigma_max):
    data = Gaussian(d, rotate)
    x = data.points(5)
    log_p, info = ode_log_likelihood(data.denoise, x, sigma_min, sigma_max, exact_divergence=True)
    assert info["divergence"] == "exact" and info["probes"] == d and info["nfe"] > 0
    assert log_p.dtype == torch.float64 and log_p.shape == (5,)
    err = (log_p - data.log_marginal(x, sigma_min)).abs().max() / d
    # ~1e-5 at the default tolerances; at sigma_max = 1e4 the N(0, I) prior adds O(alpha_max) = 1e-4
    assert err < (1e-4 if sigma_max == INF else 1e-3), f"{err:.2e} nats/dim"


def test_field_is_never_evaluated_past_sigma_max():
    """The solver lands on t_max instead of stepping past it and interpolating back."""
    data = Gaussian(4, rotate=True)
    seen = []

    def D(z, sigma):
        seen.append(float(sigma[0]))
        return data.denoise(z, sigma)

    ode_log_likelihood(D, data.points(2), 0.05, 2.0, exact_divergence=True)
    assert 0.05 * (1 - 1e-12) <= min(seen) and max(seen) <= 2.0 * (1 + 1e-12)


def test_ode_likelihood_converges_with_tolerance():
    """Solver error is the only error at sigma_max = inf: it vanishes with the tolerance."""
    data = Gaussian(6, rotate=True)
    x = data.points(3)
    log_p, _ = ode_log_likelihood(data.denoise, x, 1e-3, INF, rtol=1e-9, atol=1e-9, exact_divergence=True)
    assert (log_p - data.log_marginal(x, 1e-3)).abs().max() / 6 < 1e-8
    # and at small sigma_min the marginal is the data density itself, to ~s_min^2 / v
    assert (log_p - data.log_marginal(x, 0.0)).abs().max() / 6 < 1e-4


def test_exact_divergence_is_the_jacobian_trace_on_a_unet():
    """The batched basis-vector trick equals the autograd Jacobian's trace sample by sample."""
    from genkit.samplers.ode import velocity

    family = tiny_ddpm()
    z = torch.randn(2, 1, 8, 8, generator=seeded(0))
    t = torch.tensor(0.6)
    with torch.no_grad():
        v_ref = velocity(family.denoise, z, t)
    traces = []
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda zb: velocity(family.denoise, zb[None], t)[0], z[b])
        traces.append(torch.trace(jac.reshape(64, 64)))
    for max_batch in (1024, 20):  # one network call, then 13 chunks of 10 basis vectors x 2 samples
        v, div = velocity_and_divergence(family.denoise, z, t, max_batch=max_batch)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(div, torch.stack(traces), rtol=1e-4, atol=1e-4)


def test_hutchinson_is_unbiased_and_noisy_at_a_point():
    data = Gaussian(6, rotate=True)
    n = 2000
    z = data.points(1).expand(n, 6)  # one point, one single-probe estimate per row
    t = torch.tensor(0.7, dtype=torch.float64)
    _, exact = velocity_and_divergence(data.denoise, z[:1], t)
    probes = rademacher((1, n, 6), seeded(0), "cpu", torch.float64)
    _, single = velocity_and_divergence(data.denoise, z, t, probes)
    std_err = single.std() / math.sqrt(n)
    assert single.std() > 0.05 * exact.abs()
    assert (single.mean() - exact).abs() < 4 * std_err


def test_hutchinson_is_exact_for_a_diagonal_jacobian():
    """Rademacher probes have p_i^2 = 1, so a diagonal Jacobian leaves no variance."""
    data = Gaussian(6, rotate=False)
    z = data.points(4)
    t = torch.tensor(0.7, dtype=torch.float64)
    probes = rademacher((3, 4, 6), seeded(0), "cpu", torch.float64)
    torch.testing.assert_close(velocity_and_divergence(data.denoise, z, t, probes)[1],
                               velocity_and_divergence(data.denoise, z, t)[1])


def test_conditions_follow_their_rows_through_the_repeated_probe_batch():
    """A class-conditional denoiser, diagonal in z with a per-class scale: Hutchinson (probes batched as K
    copies of the batch, labels repeated alike, also in chunks of max_batch rows) equals the exact trace per
    row, and the labels of one row never reach another."""
    scale = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)

    def denoise(z, sigma, labels=None):
        return scale[labels].view(-1, 1) * z / (1 + float(sigma[0]) ** 2)

    z = torch.randn(4, 5, dtype=torch.float64, generator=seeded(1))
    labels = torch.tensor([0, 2, 1, 2])
    t = torch.tensor(0.7, dtype=torch.float64)
    probes = rademacher((3, 4, 5), seeded(0), "cpu", torch.float64)
    exact = torch.stack([velocity_and_divergence(denoise, z[i:i + 1], t, labels=labels[i:i + 1])[1][0]
                         for i in range(4)])
    for max_batch in (1024, 8):
        v, div = velocity_and_divergence(denoise, z, t, probes, max_batch=max_batch, labels=labels)
        torch.testing.assert_close(div, exact)
        torch.testing.assert_close(v, velocity_and_divergence(denoise, z, t, labels=labels)[0])
    assert len(set(exact.tolist())) == 3  # the classes' divergences differ


def test_hutchinson_likelihood_agrees_with_exact():
    data = Gaussian(6, rotate=True)
    x = data.points(5)
    exact, _ = ode_log_likelihood(data.denoise, x, 1e-3, INF, exact_divergence=True)
    est, info = ode_log_likelihood(data.denoise, x, 1e-3, INF, hutchinson_samples=400, generator=seeded(0))
    assert info["divergence"] == "hutchinson" and info["probes"] == 400
    # one probe scatters the log-likelihood by ~0.6 nats here, so 400 by ~0.03: 0.2 is ~6 standard errors
    assert (est - exact).abs().max() < 0.2
    assert (est - exact).abs().max() > 0  # it is an estimate, not the exact value


def test_same_generator_same_hutchinson_estimate():
    data = Gaussian(6, rotate=True)
    x = data.points(2)
    runs = [ode_log_likelihood(data.denoise, x, 1e-2, INF, exact_divergence=False, rtol=1e-3, atol=1e-3,
                               generator=seeded(s))[0] for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("d", [4, 256])
def test_divergence_defaults_to_hutchinson_with_4_probes_at_any_size(d):
    """The exact trace costs d vector-Jacobian products per evaluation (256 for 16 px grey, where it did not
    finish in 10 minutes), so it is never the default, however few the dimensions."""
    data = Gaussian(d, rotate=False)
    log_p, info = ode_log_likelihood(data.denoise, data.points(1), 0.1, INF, rtol=1e-3, atol=1e-3,
                                     generator=seeded(0))
    assert (info["divergence"], info["probes"]) == ("hutchinson", 4) and torch.isfinite(log_p).all()


def test_runs_under_inference_mode():
    data = Gaussian(4, rotate=True)
    x = data.points(2)
    ref, _ = ode_log_likelihood(data.denoise, x, 1e-2, INF, rtol=1e-4, atol=1e-4, generator=seeded(0))
    with torch.inference_mode():
        log_p, _ = ode_log_likelihood(data.denoise, x.clone(), 1e-2, INF, rtol=1e-4, atol=1e-4, generator=seeded(0))
    torch.testing.assert_close(log_p.clone(), ref)


@pytest.mark.parametrize("args,kwargs,message", [
    ((0.0, INF), {}, r"^likelihood needs 0 < sigma_min < sigma_max, got 0.0 and inf$"),
    ((1.0, 0.5), {}, r"^likelihood needs 0 < sigma_min < sigma_max, got 1.0 and 0.5$"),
    ((0.5, 0.5), {}, r"^likelihood needs 0 < sigma_min < sigma_max, got 0.5 and 0.5$"),
    ((1e-2, INF), {"hutchinson_samples": 0}, r"^hutchinson_samples must be >= 1, got 0$"),
])
def test_ode_likelihood_refuses_bad_input(args, kwargs, message):
    data = Gaussian(4, rotate=False)
    with pytest.raises(GenkitError, match=message):
        ode_log_likelihood(data.denoise, data.points(2), *args, **kwargs)
    for x in (torch.zeros(4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)):
        with pytest.raises(GenkitError, match=r"^likelihood needs a batch of shape \(B, ...\), got \("):
            ode_log_likelihood(data.denoise, x, 1e-2, INF)


def test_ode_likelihood_batches_probes_within_max_batch_and_counts_field_evaluations():
    """K probes of a batch of B go to the network in calls of at most max_batch rows; `nfe` counts evaluations of
    the augmented field (one per solver stage), and the tolerances given reach the solver."""
    data = Gaussian(4, rotate=False)
    rows = []

    def D(z, sigma):
        rows.append(len(z))
        return data.denoise(z, sigma)

    x = data.points(4)
    _, info = ode_log_likelihood(D, x, 1e-2, 50.0, hutchinson_samples=4, max_batch=8, generator=seeded(0))
    assert set(rows) == {8} and len(rows) == 2 * info["nfe"] and info["nfe"] > 6
    rows.clear()
    _, loose = ode_log_likelihood(D, x, 1e-2, 50.0, hutchinson_samples=4, generator=seeded(0), rtol=1e-2, atol=1e-2)
    assert set(rows) == {16} and len(rows) == loose["nfe"] < info["nfe"]
    assert ode_log_likelihood(D, x, 1e-2, 50.0, generator=seeded(0), rtol=1e-2, atol=1e-7)[1]["nfe"] > loose["nfe"]


@pytest.mark.parametrize("n_bits", [8, 5])
def test_uniform_model_scores_n_bits_per_dim(n_bits):
    dims = 3 * 4 * 4
    nll = torch.full((7,), dims * math.log(2), dtype=torch.float64)  # uniform on [-1, 1]^D
    assert torch.equal(bits_per_dim(nll, dims, n_bits), torch.full((7,), float(n_bits), dtype=torch.float64))


def test_bits_per_dim_by_hand_for_a_standard_normal():
    # N(0, I) at x = 0 in D = 3: nll = 1.5 ln(2 pi); bpd = log2(2 pi) / 2 - 1 + 8 = 8.325748...
    nll = torch.tensor([1.5 * math.log(2 * math.pi)])
    assert bits_per_dim(nll, 3).item() == pytest.approx(8.3257480, abs=1e-6)
    with pytest.raises(GenkitError):
        bits_per_dim(nll, 0)


def test_dequantize_fills_each_bin():
    k = torch.arange(256, dtype=torch.uint8).repeat(200)
    x = dequantize(k, seeded(0))
    lo, hi = 2 * k.double() / 256 - 1, 2 * (k.double() + 1) / 256 - 1
    assert x.dtype == torch.float32 and ((x >= lo) & (x < hi)).all()
    u = (x.double() + 1) * 128 - k.double()  # the uniform noise, U[0, 1)
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() < 0.01 and u.max() > 0.99
    assert torch.equal(x, dequantize(k, seeded(0)))
    assert dequantize(torch.tensor([15]), torch.Generator(), n_bits=4).item() > 2 * 15 / 16 - 1


def test_dequantize_refuses_floats_and_out_of_range():
    with pytest.raises(GenkitError):
        dequantize(torch.rand(4), None)
    with pytest.raises(GenkitError):
        dequantize(torch.tensor([16]), None, n_bits=4)


class GaussianFamily(Family, Denoising):
    """A denoising family whose density is known: the exact denoiser of Gaussian data, sigma in [1e-3, inf]."""

    name, default_sampler = "gaussian", "ddim"

    def __init__(self):
        self.data = Gaussian(4, rotate=True, seed=2)
        self.sample_shape = (1, 2, 2)
        self.nets = nn.ModuleDict({"none": nn.Linear(1, 1)})  # the device comes from the nets

    def train_step(self, batch, step, opt):
        raise NotImplementedError("exact: nothing to train")

    def denoise(self, z, sigma):
        return self.data.denoise(z.flatten(1).double(), sigma).view_as(z).to(z.dtype)

    def sigmas(self, steps):
        raise NotImplementedError("only the likelihood is used")

    def sigma_range(self):
        return 1e-3, INF


def test_family_bits_per_dim_matches_the_closed_form():
    """Dequantize + ODE + formula, end to end, against log N of the same dequantized points."""
    family = GaussianFamily()
    images = torch.randint(100, 156, (6, 1, 2, 2), generator=seeded(0), dtype=torch.uint8)
    out = family_bits_per_dim(family, images, batch_size=4, generator=seeded(1), exact_divergence=True)
    x = dequantize(images, seeded(1)).flatten(1).double()
    expected = bits_per_dim(-family.data.log_marginal(x, 1e-3), 4)
    assert out["n"] == 6 and out["divergence"] == "exact" and out["dims"] == 4
    assert out["bits_per_dim"] == pytest.approx(expected.mean().item(), abs=1e-3 / math.log(2))
    assert out["bits_per_dim_std"] == pytest.approx(expected.std().item(), abs=1e-2)
    assert out["nats_per_dim"] == pytest.approx(out["bits_per_dim"] * math.log(2))
    assert out["bits_per_dim_se"] == pytest.approx(out["bits_per_dim_std"] / math.sqrt(6))
    assert out["field"] == "unclipped probability-flow ODE"
    one = family_bits_per_dim(family, images[:1], generator=seeded(1), exact_divergence=True)
    assert one["n"] == 1 and one["bits_per_dim_std"] == one["bits_per_dim_se"] == 0.0  # no spread of one image
    assert one["bits_per_dim"] == pytest.approx(expected[0].item(), abs=1e-3 / math.log(2))


def test_the_standard_error_covers_hutchinsons_noise():
    """Probes are drawn per image, so the spread over images holds Hutchinson's noise as well as the data's:
    a one-probe estimate lies within a few of its own standard errors of the exact mean, and that standard
    error is larger than the exact likelihood's (which holds the data's spread only)."""
    family = GaussianFamily()
    family.data = Gaussian(4, rotate=True, seed=5)  # a non-diagonal Jacobian: Hutchinson is noisy here
    images = torch.randint(60, 196, (200, 1, 2, 2), generator=seeded(0), dtype=torch.uint8)
    kw = {"batch_size": 200, "rtol": 1e-4, "atol": 1e-4}
    exact = family_bits_per_dim(family, images, generator=seeded(1), exact_divergence=True, **kw)
    est = family_bits_per_dim(family, images, generator=seeded(1), hutchinson_samples=1, **kw)
    assert est["bits_per_dim_se"] > 1.3 * exact["bits_per_dim_se"], (est, exact)
    assert abs(est["bits_per_dim"] - exact["bits_per_dim"]) < 3 * est["bits_per_dim_se"], (est, exact)


def test_progress_reports_images(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    images = torch.randint(100, 156, (6, 1, 2, 2), generator=seeded(0), dtype=torch.uint8)
    family_bits_per_dim(GaussianFamily(), images, batch_size=4, generator=seeded(1), rtol=1e-3, atol=1e-3,
                        progress=True)
    assert "bits/dim: 6/6 images" in capsys.readouterr().err
    family_bits_per_dim(GaussianFamily(), images, batch_size=4, generator=seeded(1), rtol=1e-3, atol=1e-3)
    assert capsys.readouterr().err == ""


def tiny_ddpm():
    from genkit.families.ddpm import DDPM, DDPMConfig
    from genkit.nn.unet import UNetConfig

    torch.manual_seed(0)
    unet = UNetConfig(channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=4)
    return DDPM(DDPMConfig(timesteps=100, unet=unet), shape=(1, 8, 8))


@pytest.mark.parametrize("options,divergence", [({"exact_divergence": True}, "exact"),
                                                ({"exact_divergence": False}, "hutchinson")])
def test_family_bits_per_dim_on_a_tiny_ddpm(options, divergence):
    """The DDPM's UNet with its output layer zeroed predicts eps_hat = 0, so D(z) = z / alpha: the
    PF-ODE keeps x = z / alpha fixed, z(sigma_max) = (alpha_max / alpha_min) z(sigma_min) ~ N(0, I),
    and the model is exactly N(0, (alpha_min / alpha_max)^2 I) at sigma_min. Its Jacobian is a
    multiple of I, on which Hutchinson's Rademacher estimate is exact too."""
    family = tiny_ddpm()
    with torch.no_grad():
        family.nets["unet"].conv_out.weight.zero_()
        family.nets["unet"].conv_out.bias.zero_()
    family.nets.train()
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=seeded(0), dtype=torch.uint8)
    out = family_bits_per_dim(family, images, generator=seeded(0),
                              rtol=1e-3, atol=1e-3, **options)
    assert {"bits_per_dim", "bits_per_dim_std", "nats_per_dim", "n", "divergence"} <= set(out)
    assert out["divergence"] == divergence and out["n"] == 2
    sigma_min, sigma_max = family.sigma_range()
    assert (out["sigma_min"], out["sigma_max"]) == (sigma_min, sigma_max)
    std = vp_coefficients(sigma_min)[0] / vp_coefficients(sigma_max)[0]
    x = dequantize(images, seeded(0)).flatten(1).double()  # the points the family saw: dequantized first
    expected = bits_per_dim(-torch.distributions.Normal(0.0, std).log_prob(x).sum(1), 64)
    assert out["bits_per_dim"] == pytest.approx(expected.mean().item(), abs=1e-3)
    assert out["bits_per_dim_std"] == pytest.approx(expected.std().item(), abs=1e-3)
    assert family.nets.training  # the mode is restored
    with pytest.raises(GenkitError):
        family_bits_per_dim(family, images[:, :, :4])


def test_family_bits_per_dim_records_its_solver_range_and_probes(monkeypatch):
    """The ODE path integrates between the sigmas it is given (else the family's), draws its probes from the
    generator it is given, and records method, field, divergence, probes and the NFE summed over batches."""
    from genkit.eval import likelihood as lk

    family = tiny_ddpm()
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=seeded(0), dtype=torch.uint8)
    calls = []

    def fake_ode(D, x, sigma_min, sigma_max, *, generator=None, **kwargs):
        calls.append((sigma_min, sigma_max, generator, kwargs))
        return torch.zeros(len(x), dtype=torch.float64), {"divergence": "hutchinson", "probes": 4, "nfe": 10}

    monkeypatch.setattr(lk, "ode_log_likelihood", fake_ode)
    g = seeded(5)
    out = family_bits_per_dim(family, images, batch_size=2, generator=g, sigma_min=0.1, sigma_max=20.0, rtol=1e-4)
    assert [c[:2] for c in calls] == [(0.1, 20.0), (0.1, 20.0)] and all(c[2] is g for c in calls)
    assert calls[0][3] == {"rtol": 1e-4}
    assert out["method"] == "probability-flow ODE, instantaneous change of variables (dopri5)"
    assert out["field"] == "unclipped probability-flow ODE" and out["divergence"] == "hutchinson"
    assert (out["probes"], out["nfe"], out["sigma_min"], out["sigma_max"]) == (4, 20, 0.1, 20.0)
    calls.clear()
    out = family_bits_per_dim(family, images, batch_size=3, generator=g)
    assert calls[0][:2] == family.sigma_range() and out["nfe"] == 10


def test_family_bits_per_dim_checks_its_arguments_and_names_the_ode_option_a_flow_refuses():
    from genkit.families.nice import NICE, NICEConfig

    torch.manual_seed(0)
    flow = NICE(NICEConfig(), shape=(1, 4, 4))
    images = torch.randint(0, 256, (2, 1, 4, 4), generator=seeded(0), dtype=torch.uint8)
    assert family_bits_per_dim(flow, images, batch_size=1)["n"] == 2  # a batch of one is allowed
    with pytest.raises(GenkitError, match=r"^batch_size must be >= 1, got 0$"):
        family_bits_per_dim(flow, images, batch_size=0)
    for options, bad in (({"sigma_min": 0.1}, "sigma_min"), ({"sigma_max": 9.0}, "sigma_max"),
                         ({"sigma_min": 0.1, "sigma_max": 9.0}, "sigma_min"), ({"rtol": 1e-3}, "rtol")):
        with pytest.raises(GenkitError, match=rf"^family_bits_per_dim: '{bad}' is an ODE option; flow 'nice' is "
                                              r"exact$"):
            family_bits_per_dim(flow, images, **options)
    with pytest.raises(GenkitError, match=r"a flow \(nice, glow\) or a denoising family \(ddpm, rectified_flow, "
                                          r"ldm\)$"):
        family_bits_per_dim(type("Plain", (), {"name": "plain", "sample_shape": (1, 4, 4)})(), images)


def test_conditions_repeat_per_sample_rows_only():
    """Per-sample tensors (one row per batch item) are tiled n times; scalars, other shapes and non-tensors pass."""
    from genkit.samplers.likelihood import _repeat

    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(_repeat(rows, 3, 2), rows.repeat(3, 1))
    for value in (torch.tensor(5.0), torch.zeros(3, 2), "a prompt", 7, None):
        assert _repeat(value, 3, 2) is value
