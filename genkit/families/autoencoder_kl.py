"""KL-regularised autoencoder: the first stage of latent diffusion (Rombach et al., CVPR 2022, sec. 3.1).

An encoder E maps x to a diagonal Gaussian posterior q(z | x) = N(mu, sigma^2); the decoder D
reconstructs x from z ~ q. The loss (the paper's appendix G, without its adversarial term):

    L = | x - D(z) |_1  +  perceptual_weight * LPIPS(x, D(z))  +  kl_weight * KL(q(z | x) || N(0, I))

with a small kl_weight (1e-6 in the paper) so latents stay informative; the LDM rescales them to
unit variance (`genkit.families.first_stage.latent_scale_factor`). The network is diffusers'
`AutoencoderKL`. LPIPS (`perceptual: lpips`, `genkit.nn.perceptual.LPIPS`) needs torchvision's
VGG16 weights `vgg16-397923af.pth` in $GENKIT_WEIGHTS_DIR, the torch hub cache or genkit's cache
(nothing is downloaded; the file is hash-checked before it is loaded, weights only); the default
`perceptual: none` needs nothing.

As a family it samples by decoding prior draws z ~ N(0, I) (`direct`); its use is as a frozen
first stage: `encode(x)` (the posterior mean) and `decode(z)`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError
from genkit.families.base import Autoencoder, Direct, Family, StepHandle
from genkit.nn.perceptual import LPIPS, MIN_SIZE
from genkit.nn.unet import check_resolution
from genkit.rng import randn


@dataclass
class AutoencoderKLConfig(FamilyConfig):
    family: str = "autoencoder_kl"
    channels: list[int] = field(default_factory=lambda: [32, 64])  # per level; images shrink 2^(levels-1)x
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8
    mid_attention: bool = True
    kl_weight: float = 1e-6
    perceptual: Literal["none", "lpips"] = "none"
    perceptual_weight: float = 1.0
    perceptual_weights: str | None = None  # the VGG16 backbone file (else $GENKIT_WEIGHTS_DIR, the caches)


def build_autoencoder(cfg: AutoencoderKLConfig, channels: int, image_size: int) -> nn.Module:
    """diffusers AutoencoderKL with one DownEncoderBlock2D / UpDecoderBlock2D per level."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(cfg.channels)
    bad = [c for c in cfg.channels if c % cfg.norm_groups]
    if bad:
        raise ConfigError(f"model.channels {bad} not divisible by model.norm_groups={cfg.norm_groups}")
    check_resolution(image_size, levels, "model.channels")
    return DiffusersAutoencoderKL(
        in_channels=channels, out_channels=channels, block_out_channels=tuple(cfg.channels),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups, sample_size=image_size, mid_block_add_attention=cfg.mid_attention)


def _training_forward(vae: nn.Module, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_rec, KL per image) with z = mu + sigma * eps: the training forward of the KL autoencoder.

    diffusers' AutoencoderKL.forward does not return the posterior the KL term needs, and under
    DDP only computation that enters through the wrapped module's forward gets its gradients
    all-reduced, so the family gives its autoencoder instance this forward.
    """
    posterior = vae.encode(x).latent_dist
    return vae.decode(posterior.mean + posterior.std * eps).sample, posterior.kl()


class AutoencoderKL(Family, Direct, Autoencoder):
    """KL autoencoder family: `nets = {"vae": AutoencoderKL}`, one group "model"."""

    name = "autoencoder_kl"
    default_sampler = "direct"
    compile_sampling = False  # samples through its decoder's `decode`, which compiling the networks' forward does not reach

    def __init__(self, cfg: AutoencoderKLConfig, shape: tuple[int, int, int], num_classes: int = 0):
        if cfg.kl_weight < 0 or cfg.perceptual_weight < 0:
            raise ConfigError("model.kl_weight and model.perceptual_weight must be >= 0")
        self.cfg = cfg
        self.sample_shape = tuple(shape)  # (C, H, W)
        vae = build_autoencoder(cfg, shape[0], shape[1])
        vae.forward = types.MethodType(_training_forward, vae)  # this instance only; class and weights unchanged
        self.nets = nn.ModuleDict({"vae": vae})
        factor = 2 ** (len(cfg.channels) - 1)
        self.prior_shape = (cfg.latent_channels, shape[1] // factor, shape[2] // factor)  # (c, h, w) of z
        self.lpips = None
        if cfg.perceptual == "lpips":
            if (size := min(shape[1:])) < MIN_SIZE["vgg"]:
                raise ConfigError(f"model.perceptual=lpips needs images of at least {MIN_SIZE['vgg']} px, "
                                  f"got {size}")
            self.lpips = LPIPS("vgg", cfg.perceptual_weights, option="model.perceptual_weights=PATH")  # hash-checked

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (train.gradient_checkpointing): less memory, more compute."""
        self.nets["vae"].enable_gradient_checkpointing()

    def loss(self, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """L1 + perceptual + kl_weight * KL with z = mu + sigma * eps (reparameterised)."""
        x_rec, kl = self.nets["vae"](x, eps)  # through forward: DDP synchronises only what enters there
        x_rec = x_rec.float()
        rec = (x - x_rec).abs().mean()
        kl = kl.mean() / x[0].numel()  # nats per pixel, so kl_weight is per-pixel as L1
        total = rec + self.cfg.kl_weight * kl
        out = {"rec_l1": rec, "kl": kl}
        if self.lpips is not None:
            p = self.lpips.to(x.device)(x_rec, x).mean()  # grey images are repeated to RGB inside
            total = total + self.cfg.perceptual_weight * p
            out["lpips"] = p
        out["loss"] = total
        return out

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step of reconstruction + KL loss; returns the scalars to log."""
        x = batch["image"]
        losses = self.loss(x, opt.randn(x.shape[0], *self.prior_shape))
        opt.step("model", losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

    # -- first-stage interface (genkit.families.first_stage) ----------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Latents of images in [-1, 1]: the posterior mean (deterministic)."""
        return self.nets["vae"].encode(x).latent_dist.mean

    def decode(self, z: Tensor) -> Tensor:
        """Images from latents (unclamped)."""
        return self.nets["vae"].decode(z).sample

    @torch.no_grad()
    def direct(self, n: int, *, generator: torch.Generator | None = None,
               batch_size: int | None = None) -> Tensor:
        """Decoded prior draws z ~ N(0, I): rough samples (the KL weight is small by design)."""
        batch_size = batch_size or n
        chunks = [self.decode(randn((min(batch_size, n - i), *self.prior_shape), generator, self.device))
                  for i in range(0, n, batch_size)]
        return torch.cat(chunks).float()
