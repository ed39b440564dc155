"""The abstractions every family, sampler and trainer agrees on: Protocols, no logic.

A *family* owns networks, losses and generation. The trainer knows nothing else about it.
A *sampler* is a plain function over a denoiser and a decreasing sigma grid; see
`genkit.samplers` for the coordinate convention shared by every iterative family.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class StepHandle(Protocol):
    """What the trainer hands to `Family.train_step` as `opt`.

    `step(group, loss)` back-propagates `loss` into that group's parameters only and steps
    its optimizer when gradients are synchronised (after `grad_accum` micro-batches); it
    returns whether the optimizer really stepped. Random draws for the *global* batch go
    through `randn`/`rand`/`randint`, which are seeded by (seed, step, micro-batch, call) and
    return this process's slice, so that N processes at batch B train exactly like one
    process at batch N*B and a resumed run draws the same numbers as an uninterrupted one.
    """

    device: torch.device

    def step(self, group: str, loss: Tensor) -> bool:
        """Back-propagate `loss` into `group` only and step its optimizer; True if it stepped."""

    def randn(self, *shape: int) -> Tensor:
        """N(0, I) of this process's slice of the global batch, resume-exact."""

    def rand(self, *shape: int) -> Tensor:
        """U[0, 1) of this process's slice of the global batch, resume-exact."""

    def randint(self, high: int, *shape: int) -> Tensor:
        """Integers in [0, high) of this process's slice of the global batch, resume-exact."""


class Family(Protocol):
    """Networks + losses + generation; registered in `genkit.families.FAMILIES`.

    Optional: `ema_nets: tuple[str, ...]` names the nets the trainer's EMA averages (default:
    all of `nets`), e.g. only a GAN's generator.
    """

    name: str                            # the key in FAMILIES
    nets: nn.ModuleDict                  # trainable networks; the trainer prepares each
    sample_shape: tuple[int, int, int]   # (C, H, W) of generated images
    default_sampler: str
    default_steps: int | None

    @property
    def device(self) -> torch.device:
        """The device of the family's networks."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups by name; each gets its own optimizer (`optim.<group>`)."""

    def train_step(self, batch: Mapping[str, Tensor], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One training step on a batch; calls `opt.step(group, loss)` and returns scalars to log."""

    def generate(
        self, n: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
        steps: int | None = None, **options: Any,
    ) -> Tensor:
        """n images in [-1, 1], shape (n, C, H, W)."""


@runtime_checkable
class Denoiser(Protocol):
    """D(z; sigma) -> x0_hat, with z = (x0 + sigma * eps) / sqrt(1 + sigma^2) (VP-scaled)."""

    def __call__(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


@runtime_checkable
class DenoisingFamily(Family, Protocol):
    """An iterative family: exposes its denoiser and its sigma grid to the shared samplers."""

    def denoise(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """D(z; sigma) -> x0_hat in the samplers' VP-scaled coordinates."""

    def sigmas(self, steps: int) -> Tensor:
        """The family's decreasing sigma grid of `steps` steps, ending at 0."""
