"""benchmarks/bench_flows.py puts normflows' Glow into genkit's bits/dim units correctly."""

import math

import pytest
import torch

from genkit.eval.likelihood import family_bits_per_dim

nf = pytest.importorskip("normflows")  # the `bench` extra


def test_normflows_log_density_is_converted_to_genkit_pixel_space_exactly():
    from benchmarks.bench_flows import NormflowsAsFamily

    shape = (1, 4, 4)
    model = nf.MultiscaleFlow([nf.distributions.DiagGaussian(shape)], [[]], [], class_cond=False)
    family = NormflowsAsFamily(model, shape)   # y ~ N(0, I) on [0, 1) data <=> x = 2y - 1 ~ N(-1, 4 I)
    x = torch.rand(5, *shape) * 2 - 1
    analytic = torch.distributions.Normal(-1.0, 2.0).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(family.log_prob(x), analytic, atol=1e-4)

    images = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    out = family_bits_per_dim(family, images, generator=torch.Generator().manual_seed(0))
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    x = 2 * (images.double() + u) / 256 - 1
    log_p = torch.distributions.Normal(-1.0, 2.0).log_prob(x).flatten(1).sum(1)
    # each 8-bit level is a cell of width 2/256 in x: log P(k) >= log p(x) + D log(2/256)
    expected = (-(log_p + 16 * math.log(2 / 256)) / (16 * math.log(2))).mean()
    assert abs(out["bits_per_dim"] - float(expected)) < 1e-4
