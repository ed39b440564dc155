"""What NICE and Glow share: one invertible network, the bits/dim objective, exact `log_prob`,
data-dependent initialisation and `direct` sampling with a temperature. Each flow's math stays
in its own module (`nice.py`, `glow.py`).

The network (`nets["flow"]`) maps images x in [-1, 1] (the model's space of every family) to
latents: its `forward(x)` returns log p(x) in nats per sample (so the trainer's prepared, possibly
DDP-wrapped module computes the objective), and its `sample(n, temperature, generator)` inverts it.

Objective (Dinh et al. 2014; Kingma & Dhariwal 2018): the training images, quantized to uint8 as
every evaluation SPEC is (`genkit.io.to_uint8`) and reduced to n_bits levels, are dequantized with
uniform noise, and the loss is their bits/dim under the one formula of
`genkit.samplers.likelihood.bits_per_dim` (the Jacobian of the scaling to [-1, 1] counted), so the
training loss and `genkit eval bpd` measure the same quantity.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import SamplerError
from genkit.families.base import Direct, Family, Likelihood, StepHandle
from genkit.io import to_uint8
from genkit.samplers.likelihood import bits_per_dim, dequantize_with, reduce_bits


class FlowFamily(Family, Direct, Likelihood):
    """Base of NICE and Glow: `nets = {"flow": module}`, one parameter group "model"."""

    default_sampler = "direct"
    compile_sampling = False  # samples through the flow's inverse, which compiling the networks' forward does not reach

    def __init__(self, cfg: FamilyConfig, shape: tuple[int, int, int], flow: nn.Module, n_bits: int):
        self.cfg, self.n_bits = cfg, n_bits
        self.sample_shape = tuple(shape)  # (C, H, W)
        self.dims = math.prod(shape)
        self.nets = nn.ModuleDict({"flow": flow})

    def flow(self) -> nn.Module:
        """The network itself (unwrapped from DDP, for its non-forward methods)."""
        return extract_model_from_parallel(self.nets["flow"])

    # -- likelihood and training -------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per sample, for x (B, C, H, W) in [-1, 1] (exact change of variables)."""
        return self.nets["flow"](x)

    def levels(self, images: Tensor) -> Tensor:
        """Training images in [-1, 1] -> integer levels in [0, 2^n_bits), as evaluation quantizes them."""
        return reduce_bits(to_uint8(images), self.n_bits)

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step on the bits/dim of the uniformly dequantized batch (noise from the global stream)."""
        k = self.levels(batch["image"])
        x = dequantize_with(k, opt.rand(*k.shape), self.n_bits)
        bpd = bits_per_dim(-self.log_prob(x).float(), self.dims, self.n_bits).mean()
        opt.step("model", bpd)
        return {"bpd": bpd.detach()}

    # -- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def direct(self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None,
               temperature: float = 1.0) -> Tensor:
        """n images in [-1, 1] by inverting the flow from its prior, standard deviation x temperature."""
        if temperature < 0:
            raise SamplerError(f"temperature must be >= 0, got {temperature}")
        batch_size = batch_size or n
        chunks = [self.flow().sample(min(batch_size, n - i), temperature, generator).float()
                  for i in range(0, n, batch_size)]
        return torch.cat(chunks)
