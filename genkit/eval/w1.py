"""The Wasserstein-1 distance between two image sets, by a freshly trained WGAN-GP critic.

W1(p, q) = sup over 1-Lipschitz f of E_p f - E_q f (Kantorovich-Rubinstein). An MLP critic f
is fitted on the two sets' features (or flattened pixels) for a fixed budget with the WGAN-GP
objective (Gulrajani et al. 2017: Adam 1e-4 (0, 0.9), lambda = 10 on random interpolates) and
the dual estimate E_real f - E_fake f over all samples is reported (`w1`).

Fitting a critic is the estimator itself (like fitting a linear probe), so it runs here on
fixed tensors, not through the trainer. The penalty is soft: when the sets lie far apart
relative to lambda the critic's slope exceeds 1 (a linear critic on a shift of size W reaches
slope 1 + W / (2 lambda) and estimate W + W^2 / (4 lambda)), which is why `grad_norm` (mean
||grad f|| on interpolates) is reported next to the estimate, with `w1_normalized` = w1 /
grad_norm, the dual estimate of f rescaled to unit mean slope (exact for that linear critic). `lipschitz: clip` fits a
weight-clipped critic instead (Arjovsky et al.): it estimates K x W1 for an unknown K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from genkit.errors import GenkitError
from genkit.eval.engine import EvalSettings, all_features, build_extractor
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
    if s.steps < 1 or s.batch_size < 1 or s.hidden < 1 or s.depth < 0 or s.lr <= 0:
        raise GenkitError(f"critic settings out of range: {asdict(s)}")


def fit_critic(real: Tensor, fake: Tensor, s: CriticSettings) -> nn.Module:
    """Fit f on (N, D) samples by maximising E_real f - E_fake f under the Lipschitz constraint."""
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
    for _ in range(s.steps):
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
    return f.eval()


def dual_estimate(f: nn.Module, real: Tensor, fake: Tensor, batch_size: int = 4096) -> float:
    """E_real f - E_fake f over all samples (float64 sums)."""
    with torch.no_grad():
        def mean(x: Tensor) -> Tensor:
            return torch.cat([f(x[i:i + batch_size]).double() for i in range(0, len(x), batch_size)]).mean()
        return float(mean(real) - mean(fake))


def wasserstein1(real: Tensor, fake: Tensor, s: CriticSettings | None = None) -> dict[str, float]:
    """The dual W1 estimate between two (N, D) sample sets, and the critic's gradient norm on
    interpolates of random real-fake pairs (near 1 when the penalty holds)."""
    s = s or CriticSettings()
    real, fake = real.float(), fake.float()
    f = fit_critic(real, fake, s)
    g = torch.Generator().manual_seed(s.seed + 1)
    n = min(len(real), len(fake), 4096)
    xr = real[torch.randperm(len(real), generator=g)[:n].to(real.device)]
    xf = fake[torch.randperm(len(fake), generator=g)[:n].to(fake.device)]
    norm = critic_grad_norm(f, interpolate(xr, xf, torch.rand(n, generator=g).to(real.device)), False)
    w1 = dual_estimate(f, real, fake)
    return {"w1": w1, "w1_normalized": w1 / max(float(norm.mean()), 1e-12), "grad_norm": float(norm.mean()),
            "grad_norm_max": float(norm.max())}


def _vectors(spec: str, s: EvalSettings, extractor: FeatureExtractor | None) -> Tensor:
    """(N, D) features of a SPEC, or its flattened pixels in [-1, 1] when extractor is None."""
    if extractor is not None:
        return all_features(spec, extractor, s).float()
    sample = SampleSettings(**{**asdict(s.sample), "seed": s.seed, "device": s.device})
    batches = [b.float().flatten(1) / 127.5 - 1 for b in iter_images(spec, s.n, s.batch_size, sample)]
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
            "protocol": protocol, "critic": asdict(critic), "real": real, "fake": fake, "seed": s.seed,
            "genkit_version": __version__}
