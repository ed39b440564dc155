"""Training logs: metrics.jsonl, tensorboard (through Accelerate's trackers) and progress.

Scalars are accumulated on the device and read back only every `log_every` steps, so the
training loop has no host-device synchronisation per step. Progress is a bar on a terminal and
one plain line per logging step elsewhere (`genkit.progress`); TQDM_DISABLE silences it.
TensorBoard also gets sample grids (`image`) and the flattened recipe as hyperparameters
(`hparams`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from genkit.errors import GenkitError
from genkit.io import make_grid, write_text
from genkit.progress import Progress


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(f"{line}\n" for line in keep))


def flatten_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested recipe dict as TensorBoard hyperparameters: dotted keys; lists, None and the rest as JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)  # [8, 16], null, {}
    return flat


class TrainLogger:
    """Accumulates step scalars; every `every` steps reduces them across processes and writes.

    Non-finite values never enter the averages: they are counted per term, with the first
    step they appeared at, all on the device. With `stop_on_nan` a logging step (or `check`)
    that finds any raises an error naming the term and the step. `label` names the stage
    (e.g. "first_stage", "ldm") on the bar and at the start of each plain progress line.
    """

    def __init__(self, accelerator: Any, run_dir: Path, every: int, total: int, start: int,
                 images_per_step: int, stop_on_nan: bool = True, label: str = "train",
                 kept: Callable[[], str] = lambda: "the last good checkpoint is kept"):
        self.acc, self.every, self.total, self.images_per_step = accelerator, every, total, images_per_step
        self.stop_on_nan, self.kept = stop_on_nan, kept  # kept(): what a stop leaves to resume from
        self.path = run_dir / "metrics.jsonl"
        self._reset()
        self.t0, self.step0 = time.perf_counter(), start
        self.progress = Progress(total, label, "step", initial=start, every=every,
                                 disable=not accelerator.is_main_process)

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.first_bad: dict[str, torch.Tensor] = {}  # first step with a non-finite value, or -1

    def add(self, logs: dict[str, torch.Tensor], step: int) -> None:
        """Accumulate the scalars of 0-based `step` (no host sync)."""
        for k, v in logs.items():
            v = v.detach().float()
            finite = torch.isfinite(v)
            if k not in self.sums:
                self.sums[k], self.counts[k] = torch.zeros_like(v), torch.zeros_like(v)
                self.first_bad[k] = torch.full_like(v, -1.0)
            self.sums[k] = self.sums[k] + torch.where(finite, v, torch.zeros_like(v))
            self.counts[k] = self.counts[k] + finite.float()
            self.first_bad[k] = torch.where(~finite & (self.first_bad[k] < 0), torch.full_like(v, step),
                                            self.first_bad[k])

    def check(self) -> None:
        """With stop_on_nan: raise if any process saw a non-finite value since the last record."""
        names = sorted(self.first_bad)
        if not names or not self.stop_on_nan:
            return
        bad = torch.stack([self.first_bad[k] for k in names])
        bad = self.acc.gather(torch.where(bad < 0, torch.full_like(bad, float("inf")), bad))  # (world * K,)
        for k, at in zip(names, bad.reshape(-1, len(names)).min(0).values.tolist()):
            if math.isfinite(at):
                raise GenkitError(f"loss term '{k}' is not finite (nan/inf) at step {int(at) + 1}: training "
                                  f"stopped; {self.kept()} (lower the lr, enable train.clip_grad, or set "
                                  "train.on_nan=skip)")

    def step(self, step: int, lr: float, extra: dict[str, float] | None = None, last: bool = False,
             total: int | None = None) -> None:
        """On logging steps (and the `last`) reduce, check finiteness and write; advance the progress (with
        the record). `total` re-estimates the run's steps (a time budget), so the bar and its ETA follow it."""
        if total is not None and total != self.total:
            self.total = self.progress.total = self.progress.bar.total = total
        record = None
        if step % self.every == 0 or step == self.total or last:
            record = self.flush(step, lr, extra)
        self.progress.update(1, **(record or {}))

    def flush(self, step: int, lr: float, extra: dict[str, float] | None = None) -> dict[str, float] | None:
        """Reduce what was accumulated since the last record, check it, write it; returns the record."""
        names = sorted(self.sums)
        if not names:
            return None
        self.check()
        stats = torch.stack([torch.stack([self.sums[k], self.counts[k]]) for k in names])  # (K, 2)
        stats = self.acc.reduce(stats, reduction="sum").tolist()
        record = {k: (s / c if c else float("nan")) for k, (s, c) in zip(names, stats)}
        now = time.perf_counter()  # throughput over this logging interval
        record["images_per_s"] = (step - self.step0) * self.images_per_step / max(now - self.t0, 1e-9)
        self.t0, self.step0 = now, step
        record["lr"] = lr
        record.update(extra or {})
        self.write(step, record)
        self._reset()
        return record

    def write(self, step: int, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and the trackers (main process only)."""
        if not self.acc.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def image(self, step: int, tag: str, images: Tensor) -> None:
        """Log images in [-1, 1], (N, C, H, W), as one grid to TensorBoard (main process only)."""
        if not self.acc.is_main_process:
            return
        grid = make_grid(images.detach().float())[None]  # (1, H', W', C) uint8
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: grid}, step=step, dataformats="NHWC")

    def hparams(self, recipe: dict[str, Any]) -> None:
        """Log the recipe, flattened to dotted keys, as the run's hyperparameters (main process only, once)."""
        if not self.acc.is_main_process:
            return
        flat = flatten_hparams(recipe)
        for tracker in self.acc.trackers:
            tracker.store_init_configuration(flat)

    def message(self, text: str) -> None:
        """Print a line on the main process (above the progress bar)."""
        if self.acc.is_main_process:
            self.progress.write(text)

    def close(self) -> None:
        """Close the progress bar (off a terminal: print the last position if no line showed it)."""
        self.progress.close()
