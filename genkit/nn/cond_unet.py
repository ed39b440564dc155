"""diffusers' UNet2DConditionModel (Stable Diffusion's UNet) from a small, validated config.

Levels flagged in `cross_attention` use transformer blocks (self-attention + cross-attention to
the text tokens); the middle block always cross-attends. Heads are `channels // head_dim` per
level (diffusers' `attention_head_dim` argument of this model is, for legacy reasons, a number
of heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import UNet2DConditionModel

from genkit.errors import ConfigError
from genkit.nn.unet import check_levels, check_resolution


@dataclass
class CondUNetConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128])  # per resolution level
    cross_attention: list[bool] = field(default_factory=lambda: [True, True])  # per level
    layers_per_block: int = 1
    norm_groups: int = 8
    head_dim: int = 32                 # channels per attention head
    transformer_layers: int = 1        # transformer blocks per attention layer


def build_cond_unet(cfg: CondUNetConfig, channels: int, size: int, cross_dim: int,
                    num_class_embeds: int | None = None) -> UNet2DConditionModel:
    """A UNet2DConditionModel over (channels, size, size) inputs cross-attending to cross_dim tokens."""
    check_levels(cfg.channels, cfg.norm_groups, cfg.layers_per_block)
    if cfg.head_dim < 1 or cfg.transformer_layers < 1:
        raise ConfigError(f"model.unet.head_dim and model.unet.transformer_layers must be >= 1, got "
                          f"{cfg.head_dim}, {cfg.transformer_layers}")
    levels = len(cfg.channels)
    if len(cfg.cross_attention) != levels:
        raise ConfigError(f"model.unet.cross_attention has {len(cfg.cross_attention)} entries, "
                          f"model.unet.channels has {levels}: give one flag per level")
    bad = [c for c in cfg.channels if c % cfg.norm_groups or c % cfg.head_dim]
    if bad:
        raise ConfigError(f"model.unet.channels {bad} not divisible by model.unet.norm_groups={cfg.norm_groups} "
                          f"and model.unet.head_dim={cfg.head_dim}")
    check_resolution(size, levels)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention))
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(cfg.channels),
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cross_dim, attention_head_dim=tuple(c // cfg.head_dim for c in cfg.channels),
        transformer_layers_per_block=cfg.transformer_layers, num_class_embeds=num_class_embeds,
    )
