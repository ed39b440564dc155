"""Training logs: metrics.jsonl, tensorboard (through Accelerate's tracker) and a progress bar.

Scalars are accumulated on the device and read back only every `log_every` steps, so the
training loop has no host-device synchronisation per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from genkit.errors import GenkitError
from genkit.io import write_text


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(f"{line}\n" for line in keep))


class TrainLogger:
    """Accumulates step scalars; every `every` steps reduces them across processes and writes.

    Non-finite values never enter the averages: they are counted per term, with the first
    step they appeared at, all on the device. With `stop_on_nan` a logging step (or `check`)
    that finds any raises an error naming the term and the step.
    """

    def __init__(self, accelerator: Any, run_dir: Path, every: int, total: int, start: int,
                 images_per_step: int, stop_on_nan: bool = True):
        self.acc, self.every, self.images_per_step = accelerator, every, images_per_step
        self.stop_on_nan = stop_on_nan
        self.path = run_dir / "metrics.jsonl"
        self._reset()
        self.t0, self.step0 = time.perf_counter(), start
        self.bar = tqdm(total=total, initial=start, disable=not accelerator.is_main_process,
                        dynamic_ncols=True, desc="train", unit="step")

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
                                  "stopped; the last good checkpoint is kept (lower the lr, enable "
                                  "train.clip_grad, or set train.on_nan=skip)")

    def step(self, step: int, lr: float, extra: dict[str, float] | None = None) -> None:
        """Advance the bar; on logging steps reduce, check finiteness, and write."""
        self.bar.update(1)
        if step % self.every == 0 or step == self.bar.total:
            self.flush(step, lr, extra)

    def flush(self, step: int, lr: float, extra: dict[str, float] | None = None) -> None:
        """Reduce what was accumulated since the last record, check it, write it."""
        names = sorted(self.sums)
        if not names:
            return
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
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "lr"}, refresh=False)
        self._reset()

    def write(self, step: int, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and the trackers (main process only)."""
        if not self.acc.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def message(self, text: str) -> None:
        """Print a line on the main process (above the progress bar)."""
        if self.acc.is_main_process:
            self.bar.write(text)

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()
