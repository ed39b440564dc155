"""The training budget: steps (`train.steps`) and, optionally, wall-clock time (`train.max_time`).

Progress p in [0, 1] is the fraction of the budget used. With steps alone it is steps done /
`train.steps` and the schedules are the usual step-based ones. With `train.max_time` it is

    p = max(steps done / train.steps, training time / max_time)

so the run ends when either budget runs out, and the learning-rate schedule (warm-up over the
fraction warmup / steps of the budget, then constant, cosine or linear decay) and the EMA warm-up
(as if the budget held `train.steps` steps) follow p: a run cut by time ends its schedule as one
cut by steps does. Training time is the wall time of the training loop (with its periodic grids,
evaluations and checkpoints; not the setup, nor the final checkpoint, weights and grid); it is
checkpointed, so a resumed run continues the same function of training time. The clock is read
once per trainer step (`tick`), by the main process when there are several (its time is broadcast),
so every rank takes the same learning rate and stops at the same step.
"""

from __future__ import annotations

import math
from typing import Callable

from genkit.config import TrainConfig, parse_duration


def warmup_decay(cfg: TrainConfig, progress: float) -> float:
    """LR factor at `progress` of the budget: linear warm-up over warmup / steps of it, then constant,
    cosine or linear decay to 0 at progress 1 (at progress k / steps: the step schedule's factor(k))."""
    w = cfg.warmup / cfg.steps
    if progress < w:
        return min(1.0, progress / w + 1 / cfg.warmup)  # (k + 1) / warmup at k = progress * steps
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = min(1.0, (progress - w) / max(1 / cfg.steps, 1 - w))
    return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac


class Budget:
    """Steps done, training time and the progress p of a run (see the module docstring).

    `clock` gives seconds (time.monotonic); `sync` makes every process agree on a time (the
    trainer broadcasts the main process's); `elapsed` is the training time a resumed run had.
    """

    def __init__(self, cfg: TrainConfig, clock: Callable[[], float], sync: Callable[[float], float] = float,
                 done: int = 0, elapsed: float = 0.0):
        self.cfg, self.clock, self.sync = cfg, clock, sync
        self.max_time = None if cfg.max_time is None else parse_duration(cfg.max_time)
        self.done, self.elapsed = done, elapsed
        self._base, self._t0, self._ticked = elapsed, None, None

    def restore(self, done: int, elapsed: float) -> None:
        """A resumed run's steps done and training time (from its checkpoint)."""
        self.done, self.elapsed, self._base = done, elapsed, elapsed

    @property
    def timed(self) -> bool:
        """Whether the run has a wall-clock budget (`train.max_time`)."""
        return self.max_time is not None

    def start(self) -> None:
        """Start (or, resumed, continue) the training-time clock."""
        if self.timed:
            self._t0 = self.sync(self.clock())

    def tick(self, step: int) -> None:
        """0-based `step` is done: count it and read the clock, once per step (later calls keep the first)."""
        if self._ticked == step:
            return
        self._ticked, self.done = step, step + 1
        if self.timed:
            self.elapsed = self._base + self.sync(self.clock()) - self._t0

    @property
    def progress(self) -> float:
        """The fraction of the budget used, in [0, 1]."""
        p = self.done / self.cfg.steps
        if self.timed:
            p = max(p, self.elapsed / self.max_time)
        return min(1.0, p)

    @property
    def exhausted(self) -> bool:
        """Whether the run has used its whole budget (steps or time)."""
        return self.done >= self.cfg.steps or (self.timed and self.elapsed >= self.max_time)

    def lr_lambda(self) -> Callable[[int], float]:
        """The LambdaLR factor: of the optimizer step count k (steps only), or of the progress (max_time)."""
        if self.timed:
            return lambda k: warmup_decay(self.cfg, self.progress)
        return step_lr_lambda(self.cfg)

    def ema_updates(self) -> float:
        """The update count the EMA warm-up ramps on with max_time: progress x train.steps, less the step
        just done (as the step count of a step-budgeted run's k-th update is k - 1)."""
        return max(0.0, self.progress * self.cfg.steps - 1)

    def estimated_steps(self) -> int:
        """The steps the whole budget will hold at the pace so far (train.steps without max_time)."""
        if not self.timed or self.progress <= 0:
            return self.cfg.steps
        return min(self.cfg.steps, max(self.done, math.ceil(self.done / self.progress)))


def step_lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup over `train.warmup` steps, then constant, cosine or linear decay to 0."""

    def factor(k: int) -> float:
        if k < cfg.warmup:
            return (k + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (k - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac

    return factor
