"""Post-hoc EMA (Karras et al. 2024): power-function profiles, snapshots, least-squares reconstruction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, run_cli
from test_max_time import records
from test_trainer import toy_recipe

import genkit
from genkit.config import PostHocEMAConfig
from genkit.errors import ConfigError
from genkit.io import load_tensors
from genkit.runs import load_recipe
from genkit.training.phema import (
    PowerEMA,
    gamma_to_sigma_rel,
    reconstruct,
    sigma_rel_to_gamma,
    snapshots,
    solve_coefficients,
    tracking_beta,
)

T = 400


def walk(dim: int = 8) -> torch.Tensor:
    """theta_1 .. theta_T: a random walk of weights (T, dim), float64."""
    return torch.cumsum(torch.randn(T, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)


def track(theta: torch.Tensor, sigma_rel: float, every: int) -> dict[int, torch.Tensor]:
    """The power-function EMA of `theta` tracked with eq. 127's beta, at every `every` steps."""
    gamma, shadow, out = float(sigma_rel_to_gamma(sigma_rel)), theta[0].clone(), {}
    for t in range(1, len(theta) + 1):
        beta = tracking_beta(gamma, t)
        shadow = beta * shadow + (1 - beta) * theta[t - 1]
        if t % every == 0:
            out[t] = shadow.clone()
    return out


def test_sigma_rel_and_gamma_invert_each_other_and_match_the_papers_values():
    gammas = sigma_rel_to_gamma(np.array([0.05, 0.10]))
    np.testing.assert_allclose(gamma_to_sigma_rel(gammas), [0.05, 0.10], rtol=1e-12)
    np.testing.assert_allclose(gammas, [16.97, 6.94], atol=0.01)  # EDM2 Fig. 4: gamma 16.97 and 6.94


def snapshot_table(theta, every=20):
    tracked = {s: track(theta, s, every) for s in (0.05, 0.10)}
    t_in = np.float64([t for s in tracked for t in tracked[s]])
    s_in = np.float64([s for s in tracked for _ in tracked[s]])
    values = torch.stack([v for s in tracked for v in tracked[s].values()])
    return t_in, s_in, values


def test_reconstruction_of_a_tracked_profile_equals_it():
    theta = walk()
    t_in, s_in, values = snapshot_table(theta)
    x = solve_coefficients(t_in, s_in, T, 0.10)
    rec = (torch.from_numpy(x)[:, None] * values).sum(0)
    torch.testing.assert_close(rec, track(theta, 0.10, T)[T], rtol=1e-10, atol=1e-10)


def test_closed_form_solve_matches_discrete_least_squares_and_reconstructs_an_untracked_length():
    """Algorithm 3's closed-form inner products (eq. 151) against the least-squares fit of the exact
    discrete profiles (each snapshot's response to one-hot weights), and the reconstruction of an EMA
    that was not tracked against tracking it directly."""
    theta = walk()
    t_in, s_in, values = snapshot_table(theta)
    profiles = snapshot_table(torch.eye(T, dtype=torch.float64))[2].numpy()   # (snapshots, T) responses
    target = np.asarray(track(torch.eye(T, dtype=torch.float64), 0.07, T)[T])
    discrete = np.linalg.lstsq(profiles.T, target, rcond=None)[0]
    discrete /= discrete.sum()
    closed = solve_coefficients(t_in, s_in, T, 0.07)
    fit = lambda x: np.linalg.norm(profiles.T @ x - target) / np.linalg.norm(target)  # noqa: E731
    assert fit(closed) < 0.02 and fit(closed) < 1.5 * fit(discrete) + 1e-3
    rec = (torch.from_numpy(closed)[:, None] * values).sum(0)
    direct = track(theta, 0.07, T)[T]
    assert float((rec - direct).norm() / (direct - theta[-1]).norm()) < 2e-3


def posthoc_recipe(**train):
    return toy_recipe(steps=10, optim="adam", lr=0.01, checkpoint_every=4, keep_last=10, ema_decay=0.9,
                      posthoc_ema={"every": 2, "budget_mb": 1.0}, **train)


def test_resume_keeps_the_snapshots_exact(tmp_path, monkeypatch, toy_family):
    straight = genkit.train(posthoc_recipe(), out=tmp_path / "straight")
    real_step = toy_family.train_step

    def dies_at_step_6(self, batch, step, opt):
        if step == 6:
            raise KeyboardInterrupt
        return real_step(self, batch, step, opt)

    monkeypatch.setattr(toy_family, "train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        genkit.train(posthoc_recipe(), out=tmp_path / "killed")
    assert list(snapshots(tmp_path / "killed" / "phema")) == [2, 4, 6]  # step 6: written after the checkpoint
    monkeypatch.setattr(toy_family, "train_step", real_step)
    resumed = genkit.train(posthoc_recipe(), out=tmp_path / "killed", resume=True)
    a, b = snapshots(straight / "phema"), snapshots(resumed / "phema")
    assert list(a) == list(b) == [2, 4, 6, 8, 10]
    for step in a:
        sa, sb = load_tensors(a[step]), load_tensors(b[step])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), step
    assert [r["step"] for r in records(resumed)] == list(range(1, 11))


def test_snapshots_stay_within_the_disk_budget():
    net = torch.nn.Linear(64, 64)   # 2 profiles x 4160 floats = 33 KB a snapshot
    cfg = PostHocEMAConfig(every=1, budget_mb=0.1)  # room for 3
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ema = PowerEMA(net, cfg, Path(tmp))
        for step in range(1, 41):
            ema.update(net)
            ema.snapshot(step)
            assert len(snapshots(Path(tmp))) * ema.snapshot_bytes <= 0.1 * 2**20
        assert list(snapshots(Path(tmp))) == [16, 32] and ema.every == 16
    with pytest.raises(ConfigError, match="budget_mb"):
        PowerEMA(net, PostHocEMAConfig(budget_mb=0.01), Path("unused"))


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("phema") / "run"
    return genkit.train(load_recipe("ddpm_digits", [*TINY_UNET, "data.image_size=8", "data.batch_size=16",
                                                    "train.steps=6", "train.sample_every=0", "train.log_every=3",
                                                    "sample.n=4", "sample.steps=2", "model.timesteps=100",
                                                    "train.posthoc_ema.every=2"]), out=out)


def test_cli_reconstructs_a_loadable_run_and_sweeps_fd(phema_run, tmp_path):
    r = run_cli("ema", str(phema_run), "--sigma-rel", "0.1", "--out", str(tmp_path / "ema"))
    assert r.returncode == 0, r.stderr
    family = genkit.load(tmp_path / "ema")
    want = reconstruct(phema_run / "phema", 0.1)
    got = family.nets.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert json.loads((tmp_path / "ema" / "model" / "genkit.json").read_text())["posthoc_ema"] == \
        {"sigma_rel": 0.1, "step": 6}
    assert genkit.sample(family, 2, steps=2).shape == (2, 1, 8, 8)
    r = run_cli("ema", str(phema_run), "--sweep", "--n", "8", "--sigma-rels", "0.05,0.1,0.2")
    assert r.returncode == 0, r.stderr
    rows = json.loads((phema_run / "eval" / "posthoc_ema.json").read_text())["rows"]
    assert [row["sigma_rel"] for row in rows] == [0.05, 0.1, 0.2] and all(np.isfinite(row["fd"]) for row in rows)
    assert (phema_run / "eval" / "posthoc_ema.png").stat().st_size > 0 and "best sigma_rel" in r.stdout
    assert run_cli("ema", str(phema_run)).returncode == 2  # neither --sigma-rel nor --sweep
