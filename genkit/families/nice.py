"""NICE (Dinh, Krueger & Bengio 2014, "NICE: Non-linear Independent Components Estimation",
arXiv:1410.8516): additive coupling layers on flattened images, a diagonal scaling, a factorised prior.

Notation (the paper's Sec. 3-5):
    x            an image flattened to D dimensions, in [-1, 1] (the paper rescales to [0, 1])
    h = f(x)     = S . g_L . ... . g_1 (x)         the latent, S = diag(exp(s))
    g_i          additive coupling: y_I1 = x_I1, y_I2 = x_I2 + m_i(x_I1), partitions alternating
                 between odd and even indices ("exchanging the role of the two subsets")
    p_H(h)       = prod_d p_Hd(h_d): standard logistic (the paper's MNIST/SVHN/CIFAR) or Gaussian (TFD)
    log p_X(x)   = sum_d log p_Hd(f_d(x)) + sum_d s_d                      (eq. 3: couplings have det 1)
The paper's MNIST model: 4 coupling layers, m = 5 hidden ReLU layers of 1000 units. m's output
layer starts at zero (genkit's choice), so an untrained NICE is h = x: its bits/dim is the prior's.
Sampling: h ~ p_H with its scale multiplied by the temperature, x = f^{-1}(h).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError
from genkit.families.flow_family import FlowFamily
from genkit.nn.flow_layers import AdditiveCoupling, DiagonalScaling, gaussian_log_prob, logistic_log_prob
from genkit.rng import rand, randn


@dataclass
class NICEConfig(FamilyConfig):
    family: str = "nice"
    coupling_layers: int = 4                          # the paper's 4
    hidden: int = 1000                                # units per hidden layer of each m_i
    hidden_layers: int = 5                            # hidden layers of each m_i (the paper's 5)
    prior: Literal["logistic", "gaussian"] = "logistic"
    n_bits: int = 8                                   # bits per pixel of the modelled data


class NICEFlow(nn.Module):
    """f = S . g_L . ... . g_1 on flat vectors; `forward(x)` is log p_X(x) per sample."""

    def __init__(self, shape: tuple[int, int, int], cfg: NICEConfig):
        super().__init__()
        self.shape, self.prior = tuple(shape), cfg.prior
        dim = math.prod(shape)
        self.couplings = nn.ModuleList([AdditiveCoupling(dim, cfg.hidden, cfg.hidden_layers, parity=i % 2)
                                        for i in range(cfg.coupling_layers)])
        self.scaling = DiagonalScaling(dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(h = f(x) of shape (B, D), log|det df/dx| of shape (B,))."""
        h = x.flatten(1)                                  # (B, C, H, W) -> (B, D)
        logdet = h.new_zeros(h.shape[0], dtype=torch.promote_types(h.dtype, torch.float32))
        for layer in [*self.couplings, self.scaling]:
            h, ld = layer(h)
            logdet = logdet + ld
        return h, logdet

    def decode(self, h: Tensor) -> Tensor:
        """x = f^{-1}(h), (B, D) -> (B, C, H, W)."""
        for layer in [self.scaling, *reversed(self.couplings)]:
            h = layer.inverse(h)
        return h.view(-1, *self.shape)

    def prior_log_prob(self, h: Tensor) -> Tensor:
        """log p_H(h) of the factorised prior (logistic or standard normal), summed over dimensions."""
        return logistic_log_prob(h) if self.prior == "logistic" else gaussian_log_prob(h)

    def forward(self, x: Tensor) -> Tensor:
        h, logdet = self.encode(x)
        return self.prior_log_prob(h) + logdet

    def sample(self, n: int, temperature: float, generator: torch.Generator | None) -> Tensor:
        """x = f^{-1}(temperature * h0), h0 from the standard prior (logistic: logit of a uniform)."""
        device, dim = self.scaling.s.device, self.scaling.s.numel()
        if self.prior == "gaussian":
            h0 = randn((n, dim), generator, device)
        else:
            u = rand((n, dim), generator, device).clamp(1e-6, 1 - 1e-6)
            h0 = torch.log(u) - torch.log1p(-u)
        return self.decode(temperature * h0)


class NICE(FlowFamily):
    """NICE: additive couplings + diagonal scaling on flattened images, exact log-likelihood."""

    name = "nice"

    def __init__(self, cfg: NICEConfig, shape: tuple[int, int, int], num_classes: int = 0):
        for key, value in (("coupling_layers", cfg.coupling_layers), ("hidden", cfg.hidden),
                           ("hidden_layers", cfg.hidden_layers)):
            if value < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {value}")
        if not 1 <= cfg.n_bits <= 8:
            raise ConfigError(f"model.n_bits: must be in 1..8, got {cfg.n_bits}")
        super().__init__(cfg, shape, NICEFlow(shape, cfg), cfg.n_bits)
