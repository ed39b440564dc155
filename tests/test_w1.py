"""The dual W1 estimate: known distances under the gradient penalty, K x W1 under clipping, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genkit.cli import main
from genkit.eval.w1 import CriticSettings, wasserstein1

GP = CriticSettings(steps=800, batch_size=256, hidden=64, depth=2, lr=3e-4)


def gaussians(mean_a, mean_b, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(mean_a), torch.tensor(mean_b)
    return torch.randn(n, len(a), generator=g) + a, torch.randn(n, len(b), generator=g) + b


CASES = {
    # equal covariances: W1 = |mean difference| (the shift coupling attains Jensen's lower bound)
    "1-D Gaussians": (*gaussians([0.0], [1.0]), 1.0),
    "2-D Gaussians": (*gaussians([0.0, 0.0], [0.6, -0.8]), 1.0),
    "two Diracs": (torch.zeros(64, 2), torch.tensor([[0.8, 0.6]]).repeat(64, 1), 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_penalty_critic_estimates_known_w1_within_10_percent(case):
    real, fake, w1 = CASES[case]
    out = wasserstein1(real, fake, GP)
    assert abs(out["w1"] - w1) < 0.1 * w1, out
    assert abs(out["w1_normalized"] - w1) < 0.05 * w1, out   # slope-corrected: tighter
    assert 0.8 < out["grad_norm"] < 1.25, out                 # the penalty held the slope near 1


def test_a_weight_clipped_critic_estimates_a_constant_multiple_of_w1():
    """Clipping bounds the Lipschitz constant by an unknown K: the estimate is K x W1, with one K
    for every pair (here shifts of a 1-D Gaussian, W1 = m), and K far from 1."""
    s = CriticSettings(steps=600, batch_size=256, hidden=64, depth=2, lr=5e-3, lipschitz="clip")
    ratios = []
    for m in (0.5, 1.0, 2.0):
        real, fake = gaussians([-m / 2], [m / 2], seed=1)
        ratios.append(abs(wasserstein1(real, fake, s)["w1"]) / m)
    k = sum(ratios) / len(ratios)
    assert all(abs(r - k) < 0.1 * k for r in ratios), ratios
    assert k < 0.1, ratios


def test_cli_w1_in_pixels_separates_a_set_from_a_shifted_copy(tmp_path, capsys):
    g = np.random.default_rng(0)
    images = g.integers(0, 200, size=(200, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images)
    np.savez(tmp_path / "b.npz", images=images + 40)  # every pixel +40/127.5: W1 = 0.314 * sqrt(16)
    args = ["eval", "w1", "--features", "pixels", "--critic-steps", "300", "--critic-hidden", "64",
            "--critic-lr", "1e-3", "--json", "--real"]
    assert main([*args, str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    w1 = 40 / 127.5 * 4
    assert abs(out["w1_normalized"] - w1) < 0.1 * w1 and out["protocol"]["features"] == "pixels", out
    np.savez(tmp_path / "c.npz", images=g.integers(0, 200, size=(200, 1, 4, 4), dtype=np.uint8))
    assert main([*args, str(tmp_path / "a.npz"), "--fake", str(tmp_path / "c.npz")]) == 0
    same = json.loads(capsys.readouterr().out)  # a fresh draw of one distribution: finite-sample W1 only
    assert abs(same["w1"]) < 0.5 * out["w1"], (same, out)
