"""diffusers' UNet2DModel built from a small, validated config (Ho et al. 2020 layout)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

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
    # a UNet2DModel config verbatim (models imported from diffusers, `genkit.interop`); when set it
    # replaces every field above, so any diffusers UNet2DModel architecture can be a genkit model
    diffusers: dict[str, Any] | None = None


def check_resolution(image_size: int, levels: int, key: str = "model.unet.channels") -> None:
    """The image must halve cleanly at each of the UNet's levels - 1 down-samplings."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ConfigError(f"data.image_size={image_size} does not fit {key} with {levels} levels: "
                          f"it must be divisible by {factor}")


def check_levels(channels: list[int], norm_groups: int, layers_per_block: int, key: str = "model.unet") -> None:
    """One-line errors for what no type expresses: at least one level, positive widths, groups that divide them."""
    if not channels:
        raise ConfigError(f"{key}.channels: give at least one level's width, e.g. [32, 64], got []")
    if min(channels) < 1 or norm_groups < 1 or layers_per_block < 1:
        raise ConfigError(f"{key}: channels, norm_groups and layers_per_block must be >= 1, got {channels}, "
                          f"{norm_groups}, {layers_per_block}")
    bad = [c for c in channels if c % norm_groups]
    if bad:
        raise ConfigError(f"{key}.channels {bad} not divisible by {key}.norm_groups={norm_groups}")


def build_unet(cfg: UNetConfig, channels: int, image_size: int, num_class_embeds: int | None = None) -> UNet2DModel:
    """A UNet2DModel with ResNet blocks per level and self-attention where `cfg.attention` says."""
    if cfg.diffusers is not None:
        return unet_from_config(cfg.diffusers, channels, image_size)
    check_levels(cfg.channels, cfg.norm_groups, cfg.layers_per_block)
    levels = len(cfg.channels)
    if len(cfg.attention) != levels:
        raise ConfigError(f"model.unet.attention has {len(cfg.attention)} entries, "
                          f"model.unet.channels has {levels}: give one flag per level")
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


def unet_from_config(config: dict[str, Any], channels: int, image_size: int) -> UNet2DModel:
    """A UNet2DModel from its diffusers config (`model.unet.diffusers`), checked against the data shape."""
    known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"model.unet.diffusers.{unknown[0]}: not a UNet2DModel argument")
    for key, want in (("in_channels", channels), ("out_channels", channels), ("sample_size", image_size)):
        got = config.get(key, inspect.signature(UNet2DModel.__init__).parameters[key].default)
        if got != want:
            raise ConfigError(f"model.unet.diffusers.{key}={got!r} does not fit the data ({key} must be {want})")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ConfigError("model.unet.diffusers: class-conditional UNets (num_class_embeds / class_embed_type) "
                          "are not supported")
    try:
        return UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"model.unet.diffusers: not a UNet2DModel config diffusers can build: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
