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
    """Accumulates step scalars; every `every` steps reduces them across processes and writes."""

    def __init__(self, accelerator: Any, run_dir: Path, every: int, total: int, start: int,
                 images_per_step: int):
        self.acc, self.every, self.images_per_step = accelerator, every, images_per_step
        self.path = run_dir / "metrics.jsonl"
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.t0, self.step0 = time.perf_counter(), start
        self.bar = tqdm(total=total, initial=start, disable=not accelerator.is_main_process,
                        dynamic_ncols=True, desc="train", unit="step")

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's logged scalars."""
        for k, v in logs.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def step(self, step: int, lr: float) -> None:
        """Advance the bar; on logging steps reduce, check finiteness, and write."""
        self.bar.update(1)
        if step % self.every and step != self.bar.total:
            return
        names = sorted(self.sums)
        if not names:
            return
        stacked = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        values = self.acc.reduce(stacked, reduction="mean").tolist()
        record = dict(zip(names, values))
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        if bad:
            raise GenkitError(f"loss term '{bad[0]}' is {record[bad[0]]} at step {step}: training stopped; "
                              f"the last good checkpoint is kept (lower the lr or enable train.clip_grad)")
        now = time.perf_counter()  # throughput over this logging interval
        record["images_per_s"] = (step - self.step0) * self.images_per_step / max(now - self.t0, 1e-9)
        self.t0, self.step0 = now, step
        record["lr"] = lr
        self.write(step, record)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "lr"}, refresh=False)
        self.sums, self.count = {}, 0

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
