"""Units of the Glow equal-budget benchmark: normflows' log-likelihood (on y in [0, 1]) converted
to genkit's bits/dim (x = 2y - 1 in [-1, 1], DESIGN.md "Likelihood") must equal genkit's own
evaluation of the same density, so the two contenders' held-out bits/dim are comparable."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genkit.eval.likelihood import family_bits_per_dim
from genkit.nn.flow_layers import gaussian_log_prob

nf = pytest.importorskip("normflows")
bench = pytest.importorskip("benchmarks.bench_flows")

SHAPE = (1, 4, 4)
D = math.prod(SHAPE)


def base_only(q0) -> "nf.MultiscaleFlow":
    """A normflows multi-scale model with no flow layers: its density is its base distribution's."""
    return nf.MultiscaleFlow([q0], [[]], [], class_cond=False)


def digits_like(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class GaussianFlow:
    """A genkit flow family in the model space x in [-1, 1]: log p(x) = N(x; mean, exp(logs)^2)."""

    name, n_bits, device, sample_shape = "gaussian", 8, torch.device("cpu"), SHAPE

    def __init__(self, mean: float, logs: float):
        self.nets, self.mean, self.logs = nn.ModuleDict(), mean, logs

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x, torch.full_like(x, self.mean), torch.full_like(x, self.logs))


def test_uniform_normflows_model_scores_exactly_n_bits_per_dim():
    # a density uniform on normflows' data cube [0, 1]^D is uniform on genkit's [-1, 1]^D: exactly 8 bits/dim
    bpd = bench.normflows_held_out(base_only(nf.distributions.base.Uniform(SHAPE, 0.0, 1.0)), digits_like())
    torch.testing.assert_close(bpd, torch.full_like(bpd, 8.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("loc, scale", [(0.5, 0.25), (0.3, 0.1)])
def test_normflows_gaussian_equals_the_same_density_evaluated_by_genkit(loc, scale):
    # N(loc, scale^2) on y in [0, 1] is N(2 loc - 1, (2 scale)^2) on x = 2y - 1: one distribution,
    # scored once by normflows (y-space log-likelihood, converted) and once by genkit's eval path
    q0 = nf.distributions.DiagGaussian(SHAPE, trainable=False)
    q0.loc.fill_(loc)
    q0.log_scale.fill_(math.log(scale))
    images = digits_like()
    ours = family_bits_per_dim(GaussianFlow(2 * loc - 1, math.log(2 * scale)), images, batch_size=len(images),
                               generator=torch.Generator().manual_seed(0))
    theirs = bench.normflows_held_out(base_only(q0), images, seed=0)
    assert ours["bits_per_dim"] == pytest.approx(float(theirs.mean()), abs=1e-5)
    assert ours["bits_per_dim_std"] == pytest.approx(float(theirs.std()), abs=1e-5)
