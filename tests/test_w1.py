"""The dual W1 estimate: scored on held-out samples (no overfitting), known distances under the gradient
penalty, the penalty's closed-form bias, the sign of the critic, K x W1 under clipping, the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from genkit.cli import main
from genkit.eval.w1 import CriticSettings, wasserstein1

GP = CriticSettings(steps=800, batch_size=256, hidden=64, depth=2, lr=3e-4)
# cheap enough for the default suite in 64 dimensions (~2 s): one hidden layer, a larger step
CHEAP_64 = CriticSettings(steps=400, batch_size=256, hidden=64, depth=1, lr=2e-3)


def gaussians(mean_a, mean_b, n=10000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(mean_a), torch.tensor(mean_b)
    return torch.randn(n, len(a), generator=g) + a, torch.randn(n, len(b), generator=g) + b


def shifted_64(w1: float, n: int = 10000, seed: int = 0):
    """N(0, I) and N(m, I) in 64 dimensions with ||m|| = w1 (equal covariances: W1 = ||m||)."""
    return gaussians([0.0] * 64, [w1 / 8] * 64, n, seed)


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


def test_equal_distributions_in_64_dimensions_score_zero_on_held_out_samples():
    """Two draws of N(0, I): scored on its own fitting samples the critic reports its overfitting (w1_fit,
    ~0.4 here, 3.2 with the default critic on 1000 samples); on the held-out halves, zero within its error."""
    real, fake = shifted_64(0.0)
    out = wasserstein1(real, fake, CHEAP_64)
    assert abs(out["w1"]) < 0.05 and abs(out["w1"]) < 3 * out["w1_se"], out
    assert 0.01 < out["w1_se"] < 0.03, out  # ~ sqrt(2 var f / 5000) with var f ~ 1 (a 1-Lipschitz f)
    assert out["w1_fit"] > 0.2, out         # the overfitting the held-out estimate no longer reports
    assert out["split"] == {"holdout": 0.5, "seed": 0, "fit": [5000, 5000], "held_out": [5000, 5000]}


@pytest.mark.parametrize("w1", [1.0, 2.0])
def test_shifted_gaussians_in_64_dimensions_within_10_percent(w1):
    out = wasserstein1(*shifted_64(w1), CHEAP_64)
    assert abs(out["w1"] - w1) < 0.1 * w1, out
    assert abs(out["w1_normalized"] - w1) < 0.1 * w1, out


@pytest.mark.slow
def test_default_critic_in_64_dimensions():
    """The default critic (2000 steps, 3 x 256): ~40-80 s for the two fits on 2 cores."""
    out = wasserstein1(*shifted_64(0.0), CriticSettings())
    assert abs(out["w1"]) < 0.05 and abs(out["w1"]) < 3 * out["w1_se"], out
    out = wasserstein1(*shifted_64(2.0), CriticSettings())
    assert abs(out["w1"] - 2.0) < 0.2, out


LINEAR = {"depth": 0, "lr": 1e-2, "steps": 1000, "gp_weight": 10.0}


@pytest.mark.parametrize("seed", range(6))
def test_linear_critic_reaches_the_closed_form_optimum_from_every_seed(seed):
    """f = a x + b between Diracs at 0 and W = 10 with lambda = 10: the penalised objective a W - lambda (a - 1)^2
    peaks at a = 1 + W / (2 lambda) = 1.5, estimate W + W^2 / (2 lambda) = 15 and w1_normalized = W. Its mirror
    a = -(1 - W / (2 lambda)) = -0.5 is a local optimum too (-5), where 4 of these 6 seeds settle unless the
    critic is negated when its fitting estimate is negative."""
    real, fake = torch.zeros(512, 1), torch.full((512, 1), 10.0)
    out = wasserstein1(real, fake, CriticSettings(seed=seed, **LINEAR))
    assert out["w1"] == pytest.approx(15.0, rel=0.01), out
    assert out["grad_norm"] == pytest.approx(1.5, rel=0.01), out
    assert out["w1_normalized"] == pytest.approx(10.0, rel=0.01), out


def test_standard_error_is_that_of_the_held_out_critic_values():
    """A linear critic of slope a on N(0, 1) and N(10, 1): var f = a^2 on both sides, so the standard error
    over 1000 + 1000 held-out samples is a sqrt(2 / 1000), a = grad_norm."""
    real, fake = gaussians([0.0], [10.0], n=2000, seed=3)
    out = wasserstein1(real, fake, CriticSettings(seed=0, **LINEAR))
    assert out["split"]["held_out"] == [1000, 1000]
    assert out["w1_se"] == pytest.approx(out["grad_norm"] * math.sqrt(2 / 1000), rel=0.1), out
    assert out["w1"] == pytest.approx(15.0, abs=4 * out["w1_se"] + 0.05), out


def test_a_weight_clipped_critic_estimates_a_constant_multiple_of_w1():
    """Clipping bounds the Lipschitz constant by an unknown K: the estimate is K x W1, with one K
    for every pair (here shifts of a 1-D Gaussian, W1 = m), and K far from 1."""
    s = CriticSettings(steps=600, batch_size=256, hidden=64, depth=2, lr=5e-3, lipschitz="clip")
    ratios = []
    for m in (0.5, 1.0, 2.0):
        real, fake = gaussians([-m / 2], [m / 2], n=3000, seed=1)
        ratios.append(abs(wasserstein1(real, fake, s)["w1"]) / m)
    k = sum(ratios) / len(ratios)
    assert all(abs(r - k) < 0.1 * k for r in ratios), ratios
    assert k < 0.1, ratios


def test_too_few_samples_to_hold_any_out_is_refused():
    from genkit.errors import GenkitError

    with pytest.raises(GenkitError, match="2 fitting and 2 held-out"):
        wasserstein1(torch.zeros(3, 2), torch.ones(3, 2), CriticSettings(steps=1))
    with pytest.raises(GenkitError, match="out of range"):
        wasserstein1(torch.zeros(8, 2), torch.ones(8, 2), CriticSettings(steps=1, holdout=1.0))


def test_cli_w1_in_pixels_separates_a_set_from_a_shifted_copy(tmp_path, capsys):
    g = np.random.default_rng(0)
    images = g.integers(0, 200, size=(400, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images)
    np.savez(tmp_path / "b.npz", images=images + 40)  # every pixel +40/127.5: W1 = 0.314 * sqrt(16)
    args = ["eval", "w1", "--features", "pixels", "--critic-steps", "300", "--critic-hidden", "64",
            "--critic-lr", "1e-3", "--json", "--real"]
    assert main([*args, str(tmp_path / "a.npz"), "--fake", str(tmp_path / "b.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    w1 = 40 / 127.5 * 4
    assert abs(out["w1_normalized"] - w1) < 0.1 * w1 and out["protocol"]["features"] == "pixels", out
    assert out["split"]["held_out"] == [200, 200] and out["critic"]["holdout"] == 0.5 and out["w1_se"] > 0
    np.savez(tmp_path / "c.npz", images=g.integers(0, 200, size=(400, 1, 4, 4), dtype=np.uint8))
    assert main([*args, str(tmp_path / "a.npz"), "--fake", str(tmp_path / "c.npz"), "--holdout", "0.25"]) == 0
    same = json.loads(capsys.readouterr().out)  # a fresh draw of one distribution: zero within its error
    assert abs(same["w1"]) < 3 * same["w1_se"] and same["split"]["held_out"] == [100, 100], same


def test_compute_w1_is_wasserstein1_of_the_specs_vectors_with_its_record(tmp_path):
    """Pixels are x / 127.5 - 1; features are the extractor's; the record names what was measured."""
    from genkit.errors import GenkitError
    from genkit.eval.engine import EvalSettings, all_features, build_extractor
    from genkit.eval.stats import RefStats, save_stats
    from genkit.eval.w1 import compute_w1

    g = np.random.default_rng(1)
    a, b = (g.integers(0, 256, size=(40, 1, 8, 8), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "a.npz", images=a)
    np.savez(tmp_path / "b.npz", images=b)
    critic = CriticSettings(steps=5, hidden=8, seed=3)
    s = EvalSettings(features="pixels", n=30, seed=2)
    out = compute_w1(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), s, critic)
    chosen = sorted(torch.randperm(40, generator=torch.Generator().manual_seed(2))[:30].tolist())
    va, vb = (torch.from_numpy(x[chosen]).float().flatten(1) / 127.5 - 1 for x in (a, b))
    want = wasserstein1(va, vb, critic)
    assert out["w1"] == want["w1"] and out["w1_se"] == want["w1_se"] and out["value"] == want["w1"]
    assert out["metric"] == "w1" and (out["n_real"], out["n_fake"]) == (30, 30)
    assert out["protocol"] == {"features": "pixels", "dim": 64} and out["critic"]["seed"] == 3
    assert out["subset"] == {"real": {"n": 30, "of": 40, "seed": 2}, "fake": {"n": 30, "of": 40, "seed": 2}}
    assert (out["real"], out["fake"], out["seed"]) == (str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), 2)
    # features: the extractor's vectors; without critic settings the critic takes the eval seed
    s = EvalSettings(features="digits", n=None, seed=4)
    out = compute_w1(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), s, critic)
    ex = build_extractor(s)
    fa, fb = (all_features(str(tmp_path / f"{k}.npz"), ex, s).float() for k in "ab")
    assert out["w1"] == wasserstein1(fa, fb, critic)["w1"] and out["protocol"] == ex.protocol_dict()
    np.savez(tmp_path / "c.npz", images=g.integers(0, 256, size=(40, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(GenkitError, match=r"^'.*a\.npz' and '.*c\.npz' differ in size \(64 vs 16 pixels\)$"):
        compute_w1(str(tmp_path / "a.npz"), str(tmp_path / "c.npz"), EvalSettings(features="pixels"), critic)
    save_stats(tmp_path / "st.npz", RefStats(np.zeros(2), np.eye(2), 3, {"features": "digits"}))
    with pytest.raises(GenkitError, match=r"^'.*st\.npz' holds only statistics; W1 needs images$"):
        compute_w1(str(tmp_path / "a.npz"), str(tmp_path / "st.npz"), EvalSettings(features="pixels"), critic)


def test_compute_w1_seeds_its_critic_with_the_eval_seed(tmp_path, monkeypatch):
    from genkit.eval import w1 as w1_module
    from genkit.eval.engine import EvalSettings

    np.savez(tmp_path / "a.npz", images=np.random.default_rng(0).integers(0, 256, (8, 1, 2, 2), dtype=np.uint8))
    seen = []
    monkeypatch.setattr(w1_module, "wasserstein1", lambda a, b, critic: seen.append(critic) or {"w1": 0.0})
    w1_module.compute_w1(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), EvalSettings(features="pixels", seed=7))
    assert seen == [CriticSettings(seed=7)]


def test_pixel_vectors_of_a_run_follow_the_eval_sampling_settings(monkeypatch):
    """W1 in pixels of a run SPEC generates with the command's sampler, steps and options, the eval's seed and
    device, and scales uint8 to [-1, 1]."""
    from genkit.eval import w1
    from genkit.eval.engine import EvalSettings
    from genkit.eval.specs import SampleSettings

    seen = {}

    def fake_iter_images(spec, n, batch_size, sample=None, *, seed=0):
        seen.update(spec=spec, n=n, batch_size=batch_size, sample=sample, seed=seed)
        yield torch.tensor([[[[0, 255]]]], dtype=torch.uint8)

    monkeypatch.setattr(w1, "iter_images", fake_iter_images)
    s = EvalSettings(features=None, n=5, batch_size=3, device="cpu", seed=11,
                     sample=SampleSettings(sampler="ddim", steps=7, options={"eta": 0.5}))
    v = w1._vectors("runs/x", s, None)
    assert torch.equal(v, torch.tensor([[-1.0, 1.0]]))
    assert (seen["spec"], seen["n"], seen["batch_size"], seen["seed"]) == ("runs/x", 5, 3, 11)
    assert seen["sample"] == SampleSettings(sampler="ddim", steps=7, seed=11, device="cpu", options={"eta": 0.5})


def test_input_checks_name_what_is_wrong():
    from genkit.errors import GenkitError

    x = torch.zeros(4, 2)
    for real, fake in ((x, torch.zeros(4, 2, 1)), (torch.zeros(4, 2, 1), x), (torch.zeros(4, 3), x)):
        with pytest.raises(GenkitError, match=rf"^W1 needs two \(N, D\) sets of one dimension D, got "
                                              rf"{re.escape(str(tuple(real.shape)))} and "):
            wasserstein1(real, fake, CriticSettings(steps=1))
    with pytest.raises(GenkitError, match="^W1 needs at least 2 samples per set, got 1 and 4$"):
        wasserstein1(x[:1], x, CriticSettings(steps=1))
    with pytest.raises(GenkitError, match="2 fitting and 2 held-out"):   # 2 samples pass the first check
        wasserstein1(x[:2], x[:2], CriticSettings(steps=1))
    for bad in ({"steps": 0}, {"batch_size": 0}, {"hidden": 0}, {"depth": -1}, {"lr": 0.0}, {"holdout": 0.0}):
        with pytest.raises(GenkitError, match="^critic settings out of range: "):
            wasserstein1(torch.zeros(8, 2), torch.ones(8, 2), CriticSettings(**{"steps": 1, **bad}))


def test_critic_sign_is_checked_at_each_quarter_and_at_the_end(monkeypatch):
    """The dual estimate is checked at steps floor(k T / 4), k = 1..4 (the last step included), and a critic
    with a negative estimate is negated."""
    from genkit.eval import w1

    real, fake = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.randn(64, 2) + 1
    for steps in (6, 8):
        calls = []
        monkeypatch.setattr(w1, "dual_estimate", lambda f, r, fk: calls.append(1) or 1.0)
        kept = w1.fit_critic(real, fake, CriticSettings(steps=steps, hidden=8, seed=1))
        assert len(calls) == 4, steps
        calls.clear()
        monkeypatch.setattr(w1, "dual_estimate", lambda f, r, fk: calls.append(1) or (-1.0 if len(calls) == 4 else 1.0))
        flipped = w1.fit_critic(real, fake, CriticSettings(steps=steps, hidden=8, seed=1))
        with torch.no_grad():
            torch.testing.assert_close(flipped(real), -kept(real))


def test_gradient_norm_is_measured_on_at_most_4096_interpolates(monkeypatch):
    from genkit.eval import w1

    seen = []
    norm = w1.critic_grad_norm
    monkeypatch.setattr(w1, "critic_grad_norm", lambda f, x, *a: seen.append(len(x)) or norm(f, x, *a))
    g = torch.Generator().manual_seed(0)
    out = wasserstein1(torch.randn(10000, 2, generator=g), torch.randn(10000, 2, generator=g),
                       CriticSettings(steps=1, hidden=8))
    assert seen == [4096] and out["split"]["held_out"][0] > 4096
