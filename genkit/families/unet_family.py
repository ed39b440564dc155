"""What every single-UNet iterative family shares: its one network, device, parameter group,
gradient checkpointing and generation through the shared samplers. The math stays in each
family's own module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from genkit.nn.unet import UNetConfig, build_unet
from genkit.samplers import sample


class UNetFamily:
    """Base of DDPM and rectified flow: `nets = {"unet": UNet2DModel}`, one group "model"."""

    name: str
    default_sampler: str
    default_steps: int

    def __init__(self, cfg: Any, shape: tuple[int, int, int], unet: UNetConfig):
        self.cfg = cfg
        self.sample_shape = tuple(shape)  # (C, H, W)
        self.nets = nn.ModuleDict({"unet": build_unet(unet, shape[0], shape[1])})

    @property
    def device(self) -> torch.device:
        """The device of the networks."""
        return next(self.nets.parameters()).device

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One parameter group, "model": every UNet parameter."""
        return {"model": list(self.nets.parameters())}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in the backward pass (train.gradient_checkpointing)."""
        self.nets["unet"].enable_gradient_checkpointing()

    def generate(self, n: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
                 steps: int | None = None, **options: Any) -> Tensor:
        """n images in [-1, 1] from a shared sampler (default: the family's sampler and steps)."""
        return sample(self, n, sampler=sampler, steps=steps, generator=generator, **options).images
