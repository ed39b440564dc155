"""Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions",
arXiv:1807.03039), following the official code (openai/glow, `model.py`) where the paper is silent.

Notation (the paper's Sec. 3 and Fig. 2; the official code's names in brackets):
    x                      an image in [-1, 1] (the official code uses [-0.5, 0.5]; ActNorm absorbs it)
    L levels, K steps      per level: squeeze (2x2 space to depth), K steps of flow, then split
                           (all but the last level) [`encoder`, `revnet2d`, `split2d`]
    step of flow           ActNorm -> invertible 1x1 conv (LU option) -> affine coupling
    coupling               shift, scale = h[0::2], sigmoid(h[1::2] + 2) with h = NN(x_a) [`f`]
    split                  z = (z1, z2); z2 ~ N(mu(z1), exp(logs(z1))^2), mu/logs from a zero-init
                           conv of z1 (the learned prior) [`split2d_prior`]; z1 continues
    top prior              N(0, I), or N(mu, exp(logs)^2) with learned mu, logs [`learntop`]
    eps                    standardised latents (z - mu) / exp(logs) of every split and of the top
    log p(x)               = sum log N(eps; 0, I) + log|det d eps / dx|
Sampling at temperature T: eps ~ N(0, T^2 I) [`eps_std`], x = f^{-1}(eps). The paper's CIFAR-10
model: L = 3, K = 32, 512 hidden channels, affine coupling, 8 bits (3.35 bits/dim).
Left out from the official code: the extra "edge" input channel of its padded convolutions, the
logscale factor 3 of ActNorm's log-scale (both reparametrisations, not part of the model class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError
from genkit.families.flow_family import FlowFamily
from genkit.nn.flow_layers import (
    ActNorm,
    FlowStep,
    SplitPrior,
    begin_data_init,
    gaussian_log_prob,
    squeeze2d,
    unsqueeze2d,
)
from genkit.rng import rand, randn
from genkit.samplers.likelihood import dequantize_with

INIT_SEED = 0  # dequantization noise of the data-dependent initialisation (draws no global RNG)


@dataclass
class GlowConfig(FamilyConfig):
    family: str = "glow"
    levels: int = 3                                   # L
    steps: int = 32                                   # K steps of flow per level
    hidden: int = 512                                 # channels of the coupling networks
    coupling: Literal["affine", "additive"] = "affine"
    lu: bool = True                                   # LU-parametrised 1x1 convolutions (paper eq. 10)
    learn_top: bool = False                           # learned mean / log-scale of the top prior
    n_bits: int = 8                                   # bits per pixel of the modelled data (n_bits_x)


class GlowFlow(nn.Module):
    """The multi-scale Glow network: `forward(x)` is log p(x) per sample."""

    def __init__(self, shape: tuple[int, int, int], cfg: GlowConfig):
        super().__init__()
        c, h, w = shape
        self.levels, self.splits, self.latent_shapes = nn.ModuleList(), nn.ModuleList(), []
        for i in range(cfg.levels):
            c, h, w = 4 * c, h // 2, w // 2              # squeeze
            self.levels.append(nn.ModuleList([FlowStep(c, cfg.hidden, cfg.lu, cfg.coupling == "affine")
                                              for _ in range(cfg.steps)]))
            if i < cfg.levels - 1:
                self.splits.append(SplitPrior(c))
                self.latent_shapes.append((c - c // 2, h, w))  # z2 leaves, z1 = c // 2 channels go on
                c = c // 2
        self.latent_shapes.append((c, h, w))
        self.top = nn.Parameter(torch.zeros(1, 2 * c, h, w)) if cfg.learn_top else None

    def top_prior(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logs) of the top latent: zeros, or the learned `top` interleaved [0::2, 1::2]."""
        if self.top is None:
            zero = like.new_zeros(())  # broadcasts against the top latent
            return zero, zero
        return self.top[:, 0::2], self.top[:, 1::2]

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(eps of every split and of the top, log|det d eps / dx| of shape (B,))."""
        h, logdet, eps = x, x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32)), []
        for i, steps in enumerate(self.levels):
            h = squeeze2d(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if i < len(self.splits):
                h, e, ld = self.splits[i](h)
                eps.append(e)
                logdet = logdet + ld
        if self.top is None:  # N(0, I): eps = h, no log-scale term (the same values, no ops)
            return eps + [h], logdet
        mean, logs = self.top_prior(h)
        eps.append((h - mean) * torch.exp(-logs))
        return eps, logdet - logs.sum().to(logdet.dtype)  # the prior's scale is shared by the batch

    def decode(self, eps: list[Tensor], temperature: float = 1.0) -> Tensor:
        """x = f^{-1}(temperature * eps): the top and every split's z2 = mean + T exp(logs) eps."""
        mean, logs = self.top_prior(eps[-1])
        h = mean + temperature * torch.exp(logs) * eps[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                h = self.splits[i].inverse(h, eps[i], temperature)
            for step in reversed(self.levels[i]):
                h = step.inverse(h)
            h = unsqueeze2d(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        eps, logdet = self.encode(x)
        return sum(gaussian_log_prob(e) for e in eps) + logdet

    def sample(self, n: int, temperature: float, generator: torch.Generator | None) -> Tensor:
        """x = f^{-1}(temperature * eps) with eps from the standard priors of every level."""
        device = next(self.parameters()).device
        return self.decode([randn((n, *s), generator, device) for s in self.latent_shapes], temperature)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent ActNorm initialisation (Glow Sec. 3.1): one forward pass over x."""
        begin_data_init(self)
        self(x)
        pending = [m for m in self.modules() if isinstance(m, ActNorm) and m.pending_init]
        assert not pending, "every ActNorm is initialised by the pass"


class Glow(FlowFamily):
    """Glow: multi-scale flow of ActNorm, invertible 1x1 convolutions and affine couplings."""

    name = "glow"

    def __init__(self, cfg: GlowConfig, shape: tuple[int, int, int], num_classes: int = 0):
        for key, value in (("levels", cfg.levels), ("steps", cfg.steps), ("hidden", cfg.hidden)):
            if value < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {value}")
        if not 1 <= cfg.n_bits <= 8:
            raise ConfigError(f"model.n_bits: must be in 1..8, got {cfg.n_bits}")
        size = shape[1]
        if size % 2**cfg.levels or shape[1] != shape[2]:
            raise ConfigError(f"data.image_size: {size} does not fit model.levels={cfg.levels} (each level "
                              f"halves the size: it must be a multiple of {2**cfg.levels})")
        super().__init__(cfg, shape, GlowFlow(shape, cfg), cfg.n_bits)

    @torch.no_grad()
    def initialize(self, batch: Mapping[str, Any]) -> None:
        """Data-dependent ActNorm initialisation from one batch, called by the trainer before
        `accelerator.prepare`: every process sees the same batch, so no statistics are reduced.
        Its dequantization noise comes from a private generator: no global RNG is drawn."""
        k = self.levels(batch["image"]).to(self.device)
        u = rand(k.shape, torch.Generator().manual_seed(INIT_SEED), k.device)
        self.flow().initialize(dequantize_with(k, u, self.n_bits))
