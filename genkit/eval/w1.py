"""The Wasserstein-1 distance between two image sets: a fresh WGAN-GP critic, scored on held-out samples.

W1(p, q) = sup over 1-Lipschitz f of E_p f - E_q f (Kantorovich-Rubinstein). Each set is split at random
(seeded) into a fitting part and a held-out part (`holdout` of it, default half). An MLP critic f is fitted
on the fitting parts for a fixed budget with the WGAN-GP objective (Gulrajani et al. 2017: Adam 1e-4
(0, 0.9), lambda = 10 on random interpolates), and the dual estimate E_real f - E_fake f is reported on the
held-out parts (`w1`), with its standard error `w1_se` = sqrt(var f(real') / n_real' + var f(fake') / n_fake')
over the held-out samples (the critic fixed).

Why held out: a critic is a flexible function fitted to finite samples, and scored on those same samples
it measures mostly its own overfitting (two draws of N(0, I) in 64 dimensions, 1000 each, default settings:
3.2 in-sample, 0.02 for that critic on fresh samples). Given the critic, the held-out estimate is an unbiased
estimate of E_p f - E_q f; the in-sample value is still reported (`w1_fit`) so that the gap shows.

Sign: negating f keeps the constraint (||grad (-f)|| = ||grad f||, and clipping is symmetric) and flips the
dual term, so whenever the estimate on the fitting parts is negative (checked after each quarter of the
budget) the critic is negated and fitting goes on from the better side. Without it the penalised objective
has a mirrored local optimum: a linear critic f = a x on 1-D data shifted by W settles at a = -(1 - W /
(2 lambda)) from some seeds, reporting -(W - W^2 / (2 lambda)) (-5 at W = lambda = 10).

The penalty is soft: when the sets lie far apart relative to lambda the critic's slope exceeds 1 (a linear
critic on a shift of size W maximises a W - lambda (a - 1)^2: slope a = 1 + W / (2 lambda), estimate
W + W^2 / (2 lambda), 15 at W = lambda = 10), which is why `grad_norm` (mean ||grad f|| on interpolates of
held-out pairs) is reported next to the estimate, with `w1_normalized` = w1 / grad_norm, the dual estimate
of f rescaled to unit mean slope (exact for that linear critic). `lipschitz: clip` fits a weight-clipped
critic instead (Arjovsky et al.): it estimates K x W1 for an unknown K.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from genkit.errors import GenkitError
from genkit.eval.engine import EvalSettings, all_features, build_extractor, subsets
from genkit.eval.features import FeatureExtractor
from genkit.eval.specs import SampleSettings, iter_images
from genkit.eval.stats import is_stats_file
from genkit.nn.lipschitz import clip_weights, critic_grad_norm, gradient_penalty, interpolate
from genkit.runs import resolve_device
from genkit.version import __version__

PIXELS = "pixels"  # --features pixels: flattened images in [-1, 1]


@dataclass
class CriticSettings:
    """How the dual critic is fitted (the CLI's --critic-* options)."""

    steps: int = 2000
    batch_size: int = 256
    hidden: int = 256
    depth: int = 3                      # hidden layers
    lipschitz: Literal["gp", "clip"] = "gp"
    lr: float = 1e-4                    # gp: Adam (0, 0.9); clip: RMSProp
    gp_weight: float = 10.0             # lambda
    clip_value: float = 0.01            # c
    holdout: float = 0.5                # fraction of each set held out for the estimate
    seed: int = 0


def mlp_critic(dim: int, hidden: int, depth: int) -> nn.Sequential:
    """f: R^dim -> R, `depth` hidden LeakyReLU(0.2) layers of width `hidden` (no norm layers)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(dim if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(hidden if depth else dim, 1), nn.Flatten(0))


def _check(real: Tensor, fake: Tensor, s: CriticSettings) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise GenkitError(f"W1 needs two (N, D) sets of one dimension D, got {tuple(real.shape)} and "
                          f"{tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise GenkitError(f"W1 needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    if s.steps < 1 or s.batch_size < 1 or s.hidden < 1 or s.depth < 0 or s.lr <= 0 or not 0 < s.holdout < 1:
        raise GenkitError(f"critic settings out of range: {asdict(s)}")


@torch.no_grad()
def _negate(f: nn.Sequential) -> None:
    """f -> -f: negate the output layer. Adam with beta1 = 0 (and RMSProp) keeps no signed state, so the
    next update starts afresh from -f."""
    out = f[-2]
    out.weight.neg_()
    out.bias.neg_()


def fit_critic(real: Tensor, fake: Tensor, s: CriticSettings) -> nn.Sequential:
    """Fit f on (N, D) samples by maximising E_real f - E_fake f under the Lipschitz constraint; negated
    whenever its estimate on these samples is negative (checked after each quarter of the steps)."""
    _check(real, fake, s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        f = mlp_critic(real.shape[1], s.hidden, s.depth).to(real.device)
    g = torch.Generator().manual_seed(s.seed)
    if s.lipschitz == "gp":
        opt = torch.optim.Adam(f.parameters(), lr=s.lr, betas=(0.0, 0.9))
    else:
        opt = torch.optim.RMSprop(f.parameters(), lr=s.lr)
        clip_weights(f, s.clip_value)
    checks = {s.steps * k // 4 for k in (1, 2, 3, 4)}
    for step in range(1, s.steps + 1):
        xr = real[torch.randint(len(real), (s.batch_size,), generator=g).to(real.device)]
        xf = fake[torch.randint(len(fake), (s.batch_size,), generator=g).to(fake.device)]
        loss = f(xf).mean() - f(xr).mean()
        if s.lipschitz == "gp":
            x_hat = interpolate(xr, xf, torch.rand(s.batch_size, generator=g).to(real.device))
            loss = loss + s.gp_weight * gradient_penalty(f, x_hat)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s.lipschitz == "clip":
            clip_weights(f, s.clip_value)
        if step in checks and dual_estimate(f, real, fake) < 0:
            _negate(f)
    return f.eval()


def critic_values(f: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """f(x) per sample, float64: (N,)."""
    with torch.no_grad():
        return torch.cat([f(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)])


def dual_estimate(f: nn.Module, real: Tensor, fake: Tensor, batch_size: int = 4096) -> float:
    """E_real f - E_fake f over all samples (float64 sums)."""
    return float(critic_values(f, real, batch_size).mean() - critic_values(f, fake, batch_size).mean())


def split(x: Tensor, holdout: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(fitting part, held-out part) of the rows of x: a seeded random `holdout` fraction held out."""
    n_out = round(holdout * len(x))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return x[perm[n_out:]], x[perm[:n_out]]


def wasserstein1(real: Tensor, fake: Tensor, s: CriticSettings | None = None) -> dict[str, Any]:
    """The dual W1 estimate between two (N, D) sample sets on held-out samples, with its standard error,
    and the critic's gradient norm on interpolates of held-out real-fake pairs (near 1 when the penalty holds)."""
    s = s or CriticSettings()
    real, fake = real.float(), fake.float()
    _check(real, fake, s)
    g = torch.Generator().manual_seed(s.seed + 1)
    (real_fit, real_out), (fake_fit, fake_out) = split(real, s.holdout, g), split(fake, s.holdout, g)
    if min(len(real_fit), len(real_out), len(fake_fit), len(fake_out)) < 2:
        raise GenkitError(f"W1 with holdout {s.holdout} needs at least 2 fitting and 2 held-out samples per set, "
                          f"got {len(real)} and {len(fake)} samples")
    f = fit_critic(real_fit, fake_fit, s)
    fr, ff = critic_values(f, real_out), critic_values(f, fake_out)
    w1 = float(fr.mean() - ff.mean())
    se = math.sqrt(float(fr.var()) / len(fr) + float(ff.var()) / len(ff))
    n = min(len(real_out), len(fake_out), 4096)
    xr = real_out[torch.randperm(len(real_out), generator=g)[:n].to(real.device)]
    xf = fake_out[torch.randperm(len(fake_out), generator=g)[:n].to(fake.device)]
    norm = critic_grad_norm(f, interpolate(xr, xf, torch.rand(n, generator=g).to(real.device)), False)
    slope = max(float(norm.mean()), 1e-12)
    return {"w1": w1, "w1_se": se, "w1_normalized": w1 / slope, "w1_normalized_se": se / slope,
            "w1_fit": dual_estimate(f, real_fit, fake_fit), "grad_norm": float(norm.mean()),
            "grad_norm_max": float(norm.max()),
            "split": {"holdout": s.holdout, "seed": s.seed, "fit": [len(real_fit), len(fake_fit)],
                      "held_out": [len(real_out), len(fake_out)]}}


def _vectors(spec: str, s: EvalSettings, extractor: FeatureExtractor | None) -> Tensor:
    """(N, D) features of a SPEC, or its flattened pixels in [-1, 1] when extractor is None."""
    if extractor is not None:
        return all_features(spec, extractor, s).float()
    sample = SampleSettings(**{**asdict(s.sample), "seed": s.seed, "device": s.device})
    batches = [b.float().flatten(1) / 127.5 - 1 for b in iter_images(spec, s.n, s.batch_size, sample, seed=s.seed)]
    if not batches:
        raise GenkitError(f"no images in '{spec}'")
    return torch.cat(batches)


def compute_w1(real: str, fake: str, s: EvalSettings, critic: CriticSettings | None = None) -> dict[str, Any]:
    """W1 between two SPECs (engine.EvalSettings `s`) in a feature space or in pixels."""
    critic = critic or CriticSettings(seed=s.seed)
    for spec in (real, fake):
        if is_stats_file(spec):
            raise GenkitError(f"'{spec}' holds only statistics; W1 needs images")
    extractor = None if s.features == PIXELS else build_extractor(s)
    a, b = _vectors(real, s, extractor), _vectors(fake, s, extractor)
    if a.shape[1] != b.shape[1]:
        raise GenkitError(f"'{real}' and '{fake}' differ in size ({a.shape[1]} vs {b.shape[1]} pixels)")
    device = resolve_device(s.device)
    out = wasserstein1(a.to(device), b.to(device), critic)
    protocol = extractor.protocol_dict() if extractor is not None else {"features": PIXELS, "dim": a.shape[1]}
    return {"metric": "w1", **out, "value": out["w1"], "n_real": len(a), "n_fake": len(b),
            "protocol": protocol, "critic": asdict(critic), "subset": subsets(s, real=real, fake=fake), "real": real,
            "fake": fake, "seed": s.seed, "genkit_version": __version__}
