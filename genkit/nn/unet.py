"""diffusers' UNet2DModel built from a small, validated config (Ho et al. 2020 layout)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import UNet2DModel

from genkit.errors import ConfigError


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # per resolution level
    attention: list[bool] = field(default_factory=lambda: [False, False, True])  # per level
    layers_per_block: int = 1
    dropout: float = 0.0
    norm_groups: int = 8
    attention_head_dim: int | None = 8
    mid_attention: bool = True


def check_resolution(image_size: int, levels: int, key: str = "model.unet.channels") -> None:
    """The image must halve cleanly at each of the UNet's levels - 1 down-samplings."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ConfigError(f"data.image_size={image_size} does not fit {key} with {levels} levels: "
                          f"it must be divisible by {factor}")


def build_unet(cfg: UNetConfig, channels: int, image_size: int, num_class_embeds: int | None = None) -> UNet2DModel:
    """A UNet2DModel with ResNet blocks per level and self-attention where `cfg.attention` says."""
    levels = len(cfg.channels)
    if len(cfg.attention) != levels:
        raise ConfigError(f"model.unet.attention has {len(cfg.attention)} entries, "
                          f"model.unet.channels has {levels}: give one flag per level")
    bad = [c for c in cfg.channels if c % cfg.norm_groups]
    if bad:
        raise ConfigError(f"model.unet.channels {bad} not divisible by model.unet.norm_groups={cfg.norm_groups}")
    check_resolution(image_size, levels)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.channels), down_block_types=down, up_block_types=up,
        layers_per_block=cfg.layers_per_block, dropout=cfg.dropout,
        norm_num_groups=cfg.norm_groups, attention_head_dim=cfg.attention_head_dim,
        add_attention=cfg.mid_attention, num_class_embeds=num_class_embeds,
    )
