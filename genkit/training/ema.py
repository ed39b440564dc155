"""Exponential moving average of network weights (Polyak averaging), with warmup."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from genkit.training.sharding import copy_full_into, local_parts


class EMA:
    """Shadow copies of every floating-point parameter and buffer of `nets`.

    The shadows of sharded networks (FSDP2) are sharded as their parameters are (DTensors): each
    process averages its own shard; checkpoints gather them (genkit.training.sharding).

    With warmup the decay at update k is min(decay, (1 + k) / (10 + k)), as in
    TensorFlow's ExponentialMovingAverage with num_updates, so early weights do not linger.
    `ramp`, if given, returns the k the warm-up uses instead of the update count (a time budget:
    the fraction of the budget used times train.steps, `genkit.training.budget`).
    """

    def __init__(self, nets: nn.Module, decay: float, warmup: bool = True, ramp: Callable[[], float] | None = None):
        self.decay, self.warmup, self.updates, self.ramp = decay, warmup, 0, ramp
        self.shadow = {k: v.detach().clone() for k, v in self._floats(nets).items()}

    @staticmethod
    def _floats(nets: nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in nets.state_dict(keep_vars=True).items() if v.is_floating_point()}

    def current_decay(self) -> float:
        """The decay of the next update: `decay`, ramped up as (1 + k) / (10 + k) with warmup."""
        if not self.warmup:
            return self.decay
        k = self.updates if self.ramp is None else self.ramp()
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, nets: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights."""
        weight = 1.0 - self.current_decay()
        live = self._floats(nets)
        keys = list(self.shadow)
        # shard by shard: a sharded network's parameters are DTensors, its buffers (Glow's LU factors) are not
        torch._foreach_lerp_(local_parts([self.shadow[k] for k in keys]), local_parts([live[k].detach() for k in keys]),
                             weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The EMA shadow weights by parameter name."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        """Restore the shadow weights and the update count (resume)."""
        for k, v in state.items():
            copy_full_into(self.shadow[k], v)  # a sharded network's shadow takes this process's shard
        self.updates = updates

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, nets: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `nets` (restored on exit)."""
        live = self._floats(nets)
        backup = {k: v.detach().clone() for k, v in live.items()}
        for k, v in live.items():
            v.data.copy_(self.shadow[k])
        try:
            yield
        finally:
            for k, v in live.items():
                v.data.copy_(backup[k])
