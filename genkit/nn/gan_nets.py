"""GAN generators and critics: DCGAN-style and ResNet-style, any 4 x 2^k resolution.

- dcgan (Radford, Metz & Chintala 2016): strided (transposed) 4x4 convolutions, batch norm in
  the generator, LeakyReLU(0.2) in the critic, no norm on the critic's first layer, weights
  drawn from N(0, 0.02). The WGAN-GP paper's "DCGAN" CIFAR nets are this shape.
- resnet (Gulrajani et al. 2017, appendix F, `gan_cifar_resnet.py`): pre-activation residual
  blocks; the generator up-samples (nearest) in every block after a linear map to 4x4; the
  critic's first block is the "optimized" one (conv, ReLU, conv, mean-pool; shortcut
  mean-pool, 1x1 conv), its head ReLU, global mean pool, linear.

Generator `channels[i]` is the width at resolution 4 x 2^i. dcgan ends with one more
transposed convolution to the image (4 x 2^len(channels) = image size); resnet ends with
norm, ReLU and a 3x3 convolution at its last level (4 x 2^(len - 1) = image size).
Critic `channels[i]` is the width of block i from the image resolution down; `down[i]` says
whether block i halves the resolution (default: all do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError


@dataclass
class GeneratorConfig:
    arch: Literal["dcgan", "resnet"] = "dcgan"
    channels: list[int] = field(default_factory=lambda: [128, 64])  # width at 4x4, 8x8, ...
    norm: Literal["batch", "none"] = "batch"


@dataclass
class CriticConfig:
    arch: Literal["dcgan", "resnet"] = "dcgan"
    channels: list[int] = field(default_factory=lambda: [64, 128])  # width of each block, image size down
    down: list[bool] | None = None                                  # which blocks halve (default: all)
    norm: Literal["none", "batch", "layer"] = "none"                # layer = GroupNorm(1, C)


def norm2d(kind: str, c: int) -> nn.Module:
    """batch -> BatchNorm2d, layer -> GroupNorm(1, C) (layer norm over C, H, W), none -> Identity."""
    if kind == "batch":
        return nn.BatchNorm2d(c)
    return nn.GroupNorm(1, c) if kind == "layer" else nn.Identity()


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv / linear weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ResBlock(nn.Module):
    """Pre-activation residual block, resample None / "up" (nearest, before conv 1) / "down"
    (mean pool after conv 2); shortcut: the same resampling and a 1x1 conv where shapes change."""

    def __init__(self, c_in: int, c_out: int, resample: str | None, norm: str, first: bool = False):
        super().__init__()
        self.resample, self.first = resample, first
        c_mid = c_in if resample == "down" and not first else c_out
        self.norm1 = nn.Identity() if first else norm2d(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, padding=1)
        self.norm2 = norm2d(norm, c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1)
        reshape = c_in != c_out or resample is not None
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if reshape else nn.Identity()

    def _resample(self, h: Tensor, where: str) -> Tensor:
        if where == "up" and self.resample == "up":
            return nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        if where == "down" and self.resample == "down":
            return nn.functional.avg_pool2d(h, 2)
        return h

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else torch.relu(self.norm1(x))  # the critic's first block sees raw pixels
        h = self.conv1(self._resample(h, "up"))
        h = self._resample(self.conv2(torch.relu(self.norm2(h))), "down")
        if self.first:  # "optimized" block: pool before the 1x1 conv
            return h + self.shortcut(self._resample(x, "down"))
        return h + self._resample(self.shortcut(self._resample(x, "up")), "down")


def _check_channels(channels: list[int], key: str) -> None:
    if not channels or min(channels) < 1:
        raise ConfigError(f"{key}: expected a non-empty list of positive widths, got {channels}")


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, C, H, W) in [-1, 1] (tanh), DCGAN- or ResNet-style."""

    def __init__(self, cfg: GeneratorConfig, latent_dim: int, out_channels: int, image_size: int):
        super().__init__()
        ch = cfg.channels
        _check_channels(ch, "model.generator.channels")
        levels = len(ch) + (cfg.arch == "dcgan")  # dcgan: one more transposed conv to the image
        if 4 * 2 ** (levels - 1) != image_size:
            need = (image_size.bit_length() - 3) + (cfg.arch == "resnet")
            raise ConfigError(f"model.generator.channels: {len(ch)} levels from 4x4 give "
                              f"{4 * 2 ** (levels - 1)} px with arch {cfg.arch}, data.image_size is "
                              f"{image_size}: use {need} levels (image size must be 4 x 2^k)")
        self.c0 = ch[0]
        self.fc = nn.Linear(latent_dim, ch[0] * 16)
        if cfg.arch == "dcgan":
            self.body = nn.Sequential(norm2d(cfg.norm, ch[0]), nn.ReLU(), *self._dcgan(ch, cfg.norm),
                                      nn.ConvTranspose2d(ch[-1], out_channels, 4, 2, 1), nn.Tanh())
            dcgan_init(self)
        else:
            blocks = [ResBlock(a, b, "up", cfg.norm) for a, b in zip(ch, ch[1:])]
            self.body = nn.Sequential(*blocks, norm2d(cfg.norm, ch[-1]), nn.ReLU(),
                                      nn.Conv2d(ch[-1], out_channels, 3, padding=1), nn.Tanh())

    @staticmethod
    def _dcgan(ch: list[int], norm: str) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=norm == "none"), norm2d(norm, b), nn.ReLU()]
        return layers

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.fc(z).view(-1, self.c0, 4, 4))  # (B, c0 * 16) -> (B, c0, 4, 4)


class Critic(nn.Module):
    """images (B, C, H, W) -> scores f(x) (B,): no sigmoid (the losses apply their own link)."""

    def __init__(self, cfg: CriticConfig, in_channels: int, image_size: int):
        super().__init__()
        ch = cfg.channels
        _check_channels(ch, "model.critic.channels")
        down = cfg.down if cfg.down is not None else [True] * len(ch)
        if len(down) != len(ch):
            raise ConfigError(f"model.critic.down has {len(down)} entries, model.critic.channels has "
                              f"{len(ch)}: give one flag per block")
        if image_size % 2 ** sum(down):
            raise ConfigError(f"data.image_size={image_size} does not halve {sum(down)} times "
                              f"(model.critic.down): it must be divisible by {2 ** sum(down)}")
        self.arch, res = cfg.arch, image_size // 2 ** sum(down)
        ins = [in_channels, *ch[:-1]]
        if cfg.arch == "dcgan":
            layers: list[nn.Module] = []
            for i, (a, b, d) in enumerate(zip(ins, ch, down)):
                conv = nn.Conv2d(a, b, 4, 2, 1) if d else nn.Conv2d(a, b, 3, 1, 1)
                layers += [conv, norm2d("none" if i == 0 else cfg.norm, b), nn.LeakyReLU(0.2)]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(ch[-1] * res * res, 1)
            dcgan_init(self)
        else:
            self.body = nn.Sequential(*[ResBlock(a, b, "down" if d else None, cfg.norm, first=i == 0)
                                        for i, (a, b, d) in enumerate(zip(ins, ch, down))])
            self.head = nn.Linear(ch[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.arch == "dcgan":
            return self.head(h.flatten(1)).squeeze(1)
        return self.head(torch.relu(h).mean(dim=(2, 3))).squeeze(1)  # global mean pool (B, C)
