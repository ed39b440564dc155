"""EDM: Elucidating the Design Space of Diffusion-Based Generative Models (Karras et al., NeurIPS 2022).

The data y is noised as x = y + n, n ~ N(0, sigma^2 I), and the denoiser is preconditioned
(sec. 5 and Table 1, "Ours"):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4

so the network F sees unit-variance inputs and regresses a unit-variance target for data of
standard deviation sigma_data. Training draws ln(sigma) ~ N(P_mean, P_std^2) and minimises

    lambda(sigma) || D(y + n; sigma) - y ||^2,    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

which equals || F(c_in x; c_noise) - (y - c_skip x) / c_out ||^2 since lambda c_out^2 = 1 (eq. 8).
Sampling: EDM's grid (eq. 5, rho = 7, sigma in [0.002, 80]) and Heun's method (Alg. 1), 18 steps
(NFE 35) by default; every shared sampler works, since D is already the samplers' denoiser.

Notation: the samplers' VP-scaled state is z = x / sqrt(1 + sigma^2) (`genkit.samplers`), so
`denoise(z, sigma)` first scales z back to EDM's x. F is diffusers' UNet2DModel, the network of
DDPM (`genkit.families.unet_family`), with c_noise as its timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from genkit.config import FamilyConfig
from genkit.errors import ConfigError
from genkit.families.base import StepHandle
from genkit.families.unet_family import UNetFamily
from genkit.nn.unet import UNetConfig
from genkit.samplers.schedules import karras_sigmas


@dataclass
class EDMConfig(FamilyConfig):
    family: str = "edm"
    sigma_data: float = 0.5                      # standard deviation of the data (EDM: 0.5 for images in [-1, 1])
    p_mean: float = -1.2                         # ln(sigma) ~ N(P_mean, P_std^2) in training
    p_std: float = 1.2
    sigma_min: float = 0.002                     # the sampling grid's span (Table 1)
    sigma_max: float = 80.0
    rho: float = 7.0                             # the grid's exponent (eq. 5)
    class_cond: bool = False                     # condition on data labels (classifier-free guidance)
    cond_dropout: float = 0.1                    # P(label -> null label) in training
    unet: UNetConfig = field(default_factory=UNetConfig)


def preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 at noise level sigma."""
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = total.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1): 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDM(UNetFamily):
    """EDM family: EDM's preconditioning, noise distribution and loss weighting around a diffusers UNet."""

    name = "edm"
    default_sampler = "heun"
    noise_process = "ve"  # picks each sampler's default grid (`genkit.samplers.SamplerSpec.grids`)
    default_steps = 18

    def __init__(self, cfg: EDMConfig, shape: tuple[int, int, int], num_classes: int = 0):
        for key in ("sigma_data", "p_std", "sigma_min", "rho"):
            if not getattr(cfg, key) > 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(cfg, key)}")
        if not cfg.sigma_max > cfg.sigma_min:
            raise ConfigError(f"model.sigma_max: must be > model.sigma_min={cfg.sigma_min}, got {cfg.sigma_max}")
        super().__init__(cfg, shape, cfg.unet, num_classes)

    def D(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) in EDM's unscaled x = y + n; sigma (B,)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = sigma.to(x.device, dtype).clamp_min(1e-20)  # sigma = 0 gives D = x (c_out = 0), not ln 0
        c_skip, c_out, c_in, c_noise = (c.view(-1, *[1] * (x.dim() - 1)) for c in
                                        preconditioning(sigma, self.cfg.sigma_data))
        net_dtype = next(self.nets["unet"].parameters()).dtype
        F = self.unet((c_in * x).to(net_dtype), c_noise.flatten().to(net_dtype), label)
        return c_skip * x + c_out * F.to(dtype)

    def loss(self, y: Tensor, sigma: Tensor, n: Tensor, label: Tensor | None = None) -> Tensor:
        """lambda(sigma) ||D(y + n; sigma) - y||^2 averaged over pixels and batch (n ~ N(0, sigma^2 I))."""
        D_yn = self.D(y + n, sigma, label)
        weight = loss_weight(sigma.to(D_yn), self.cfg.sigma_data).view(-1, *[1] * (y.dim() - 1))
        return torch.mean(weight * (D_yn - y) ** 2)

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step: ln(sigma) ~ N(P_mean, P_std^2) and the noise from the global-batch stream."""
        y = batch["image"]
        sigma = (self.cfg.p_mean + self.cfg.p_std * opt.randn(y.shape[0])).exp()
        n = opt.randn(*y.shape) * sigma.view(-1, *[1] * (y.dim() - 1))
        loss = self.loss(y, sigma, n, self.train_labels(batch, opt))
        opt.step("model", loss)
        return {"loss": loss.detach()}

    def denoise(self, z: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """D(z; sigma[, y]) -> x0_hat from the VP-scaled state z = x / sqrt(1 + sigma^2)."""
        scale = (1 + sigma.to(z.device, torch.promote_types(z.dtype, torch.float32)) ** 2).sqrt()
        x = z * scale.view(-1, *[1] * (z.dim() - 1))
        return self.D(x, sigma, label).to(z.dtype)

    def sigmas(self, steps: int) -> Tensor:
        """EDM's grid (eq. 5): `steps` sigmas from sigma_max to sigma_min uniform in sigma^(1/rho), then 0."""
        return karras_sigmas(steps, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho)

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the sampling grid."""
        return self.cfg.sigma_min, self.cfg.sigma_max
