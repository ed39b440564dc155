"""VQGAN networks (Esser, Rombach & Ommer, CVPR 2021, "Taming Transformers"): the convolutional
encoder/decoder of taming-transformers' `diffusionmodules/model.py` (ResNet blocks, GroupNorm,
swish, a self-attention block at the lowest resolution) and the PatchGAN discriminator of
pix2pix (Isola et al. 2017) that taming uses (`NLayerDiscriminator`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))) with a 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  _norm(c_out, groups), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (scaled dot product over the h*w positions)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm, self.qkv, self.out = _norm(c, groups), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # (B, 1, hw, c)
        y = F.scaled_dot_product_attention(q, k, v)                                           # (B, 1, hw, c)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


def _mid(c: int, groups: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(c, c, groups), AttnBlock(c, groups) if attention else nn.Identity(),
                         ResBlock(c, c, groups))


class Encoder(nn.Module):
    """x (B, C, H, W) -> z_e (B, d, H/f, W/f), f = 2^(levels - 1): ResNet levels with strided-conv down-sampling."""

    def __init__(self, in_channels: int, channels: list[int], blocks: int, dim: int, groups: int,
                 attention: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        c = channels[0]
        for i, c_out in enumerate(channels):
            for _ in range(blocks):
                layers.append(ResBlock(c, c_out, groups))
                c = c_out
            if i < len(channels) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [_mid(c, groups, attention), _norm(c, groups), nn.SiLU(), nn.Conv2d(c, dim, 3, padding=1),
                   nn.Conv2d(dim, dim, 1)]  # taming's quant_conv
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, d, h, w) -> x_rec (B, C, h f, w f): the encoder mirrored, nearest up-sampling + conv."""

    def __init__(self, out_channels: int, channels: list[int], blocks: int, dim: int, groups: int,
                 attention: bool):
        super().__init__()
        c = channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, c, 3, padding=1),  # post_quant_conv
                                   _mid(c, groups, attention)]
        for i, c_out in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                layers.append(ResBlock(c, c_out, groups))
                c = c_out
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c, groups), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)  # the "last layer" of the adaptive weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.net(z))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): (B, C, H, W) -> (B, 1, h', w') logits per patch."""

    def __init__(self, in_channels: int, ndf: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ndf
        for n in range(1, layers + 1):
            c_out = ndf * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.LeakyReLU(0.2)]
            c = c_out
        seq.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*seq)
        self.apply(_init_disc)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _init_disc(m: nn.Module) -> None:
    """pix2pix / taming weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
