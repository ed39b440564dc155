"""A StepHandle for family unit tests: seeded draws, each recorded in order, and the losses it is asked to step."""

from __future__ import annotations

import torch

from genkit.families.base import StepHandle


class RecordingHandle(StepHandle):
    """`opt` of `Family.train_step` without a trainer: draws from one seeded generator, kept in `draws` (so a
    test can recompute the loss from them); `step(group, loss)` appends (group, loss) to `steps`, steps nothing."""

    device = torch.device("cpu")

    def __init__(self, seed: int = 5):
        self.g = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []
        self.steps: list[tuple[str, torch.Tensor]] = []

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        self.draws.append(x)
        return x

    def randn(self, *shape: int) -> torch.Tensor:
        return self._keep(torch.randn(shape, generator=self.g))

    def rand(self, *shape: int) -> torch.Tensor:
        return self._keep(torch.rand(shape, generator=self.g))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return self._keep(torch.randint(high, shape, generator=self.g))

    def step(self, group: str, loss: torch.Tensor) -> bool:
        self.steps.append((group, loss))
        return True
