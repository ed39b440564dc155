"""Deterministic toy families for trainer tests: no randomness, so runs are comparable exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genkit.config import FamilyConfig
from genkit.families.base import Denoising, Family


@dataclass
class ToyConfig(FamilyConfig):
    family: str = "toy"
    two_groups: bool = False


class Toy(Family, Denoising):
    """a: Linear(D, D); b: Linear(D, 1). loss_a = ||a(x) - x||^2, loss_b = (b(a(x)) - 1)^2.

    With two groups, loss_b also depends on a's weights: the trainer must not let it leak
    into a's gradients.
    """

    name = "toy"
    default_sampler = "ddim"
    default_steps = 1

    def __init__(self, cfg: ToyConfig, shape, num_classes=0):
        self.cfg, self.sample_shape = cfg, tuple(shape)
        d = shape[0] * shape[1] * shape[2]
        nets = {"a": nn.Linear(d, d)}
        if cfg.two_groups:
            nets["b"] = nn.Linear(d, 1)
        self.nets = nn.ModuleDict(nets)

    def param_groups(self):
        if self.cfg.two_groups:
            return {"a": list(self.nets["a"].parameters()), "b": list(self.nets["b"].parameters())}
        return {"model": list(self.nets.parameters())}

    def losses(self, x):
        x = x.flatten(1)
        h = self.nets["a"](x)
        loss_a = ((h - x) ** 2).mean()
        if not self.cfg.two_groups:
            return {"loss": loss_a}
        return {"loss_a": loss_a, "loss_b": ((self.nets["b"](h) - 1) ** 2).mean()}

    def train_step(self, batch, step, opt):
        losses = self.losses(batch["image"])
        if self.cfg.two_groups:
            opt.step("a", losses["loss_a"])
            opt.step("b", losses["loss_b"])
        else:
            opt.step("model", losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

    def denoise(self, z, sigma):
        return torch.zeros_like(z)

    def sigmas(self, steps):
        return torch.tensor([1.0, 0.0], dtype=torch.float64)

    def sigma_range(self):
        return 1.0, 1.0
