"""The optimizer handle a family's `train_step` receives as `opt`, and the optimizers behind it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from genkit.config import OptimConfig
from genkit.errors import ConfigError, GenkitError
from genkit.families.base import StepHandle
from genkit.rng import seeded
from genkit.training.budget import Budget
from genkit.training.sharding import all_finite


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW, RAdam, RMSProp or SGD (momentum = betas[0]) from an `optim.<group>` section."""
    if cfg.name in ("adam", "adamw", "radam"):
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[cfg.name]
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)


def check_groups(groups: dict[str, Any], optim: dict[str, OptimConfig], family: str) -> None:
    """Every `optim.<group>` of the recipe must name a parameter group of the family."""
    for name in optim:
        if name not in groups:
            raise ConfigError(f"optim.{name}: family '{family}' has no parameter group '{name}'; "
                              f"its groups: {', '.join(groups)}")


class OptimHandle(StepHandle):
    """`opt` of `Family.train_step`: per-group backward/step and global-batch random draws."""

    def __init__(self, accelerator: Any, optimizers: dict[str, Any], schedulers: dict[str, Any],
                 params: dict[str, list[nn.Parameter]], clip_grad: float | None, seed: int,
                 skip_nonfinite: bool = False, budget: Budget | None = None, sharded: bool = False):
        self.budget = budget  # read at each LR-scheduler step: a time-budgeted schedule follows the clock
        self.accelerator, self.optimizers, self.schedulers = accelerator, optimizers, schedulers
        self.params, self.clip_grad, self.seed = params, clip_grad, seed
        self.skip_nonfinite = skip_nonfinite  # train.on_nan=skip
        self.skipped: dict[str, int] = {}     # group -> optimizer steps skipped for non-finite gradients
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.stepped: set[str] = set()
        # sharded (FSDP2) parameters are not the leaves autograd sees (their gathered copies are), so
        # backward cannot be restricted to them: the trainer allows one group there (genkit.training.sharding)
        self.sharded = sharded
        self.begin(0, 0)

    def begin(self, step: int, micro: int) -> None:
        """Called by the trainer before each micro-batch: fixes the random stream."""
        self._step, self._micro, self._calls = step, micro, 0

    def step(self, group: str, loss: Tensor) -> bool:
        """Backward into `group`'s parameters only; step its optimizer when gradients sync."""
        if group not in self.optimizers:
            raise GenkitError(f"train_step stepped unknown group '{group}'; groups: {', '.join(self.optimizers)}")
        self.accelerator.backward(loss, inputs=None if self.sharded else self.params[group])
        if not self.accelerator.sync_gradients:
            return False
        if self.skip_nonfinite and not self._finite_gradients(group):
            self.optimizers[group].zero_grad(set_to_none=True)
            self.skipped[group] = self.skipped.get(group, 0) + 1
            self.stepped.add(group)  # handled: the trainer must not report "stepped no optimizer"
            return False
        if self.clip_grad:
            self.accelerator.clip_grad_norm_(self.params[group], self.clip_grad)
        self.optimizers[group].step()
        if self.budget is not None:
            self.budget.tick(self._step)  # the step's training time, read once, before its LR is set
        self.schedulers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)
        self.stepped.add(group)
        return True

    def _finite_gradients(self, group: str) -> bool:
        """Whether every gradient of `group` is finite (one host sync; gradients are already all-reduced)."""
        return all_finite([p.grad for p in self.params[group] if p.grad is not None])  # sharded: every shard

    def _generator(self) -> torch.Generator:
        self._calls += 1
        return seeded(self.seed, self._step, self._micro, self._calls)

    def _local(self, full: Tensor) -> Tensor:
        n = full.shape[0] // self.world
        return full[self.rank * n:(self.rank + 1) * n].to(self.device)

    def randn(self, *shape: int) -> Tensor:
        """This process's slice of N(0, I) drawn for the global batch (first dim = local batch)."""
        return self._local(torch.randn((shape[0] * self.world, *shape[1:]), generator=self._generator()))

    def rand(self, *shape: int) -> Tensor:
        """This process's slice of U[0, 1) drawn for the global batch."""
        return self._local(torch.rand((shape[0] * self.world, *shape[1:]), generator=self._generator()))

    def randint(self, high: int, *shape: int) -> Tensor:
        """This process's slice of integers in [0, high) drawn for the global batch."""
        return self._local(torch.randint(high, (shape[0] * self.world, *shape[1:]), generator=self._generator()))
