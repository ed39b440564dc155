"""Shared pieces of the peer benchmarks: one thread, interleaved timing, FLOP counting, GEMM peak.

Every contender runs on one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`) and the
contenders are timed in interleaved rounds (A, B, C, B, C, A, ...), so load from other jobs on
the machine falls on all of them alike; tables report the median and the spread (min-max).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def single_thread() -> None:
    """Pin this process (and the subprocesses it starts) to one intra-op thread."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every contender once per round, rotating the order; each call returns seconds."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(contenders[name]())
    return times


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn() (CUDA synchronised when present)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a list of measurements."""
    return statistics.median(values), min(values), max(values)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch.utils.flop_counter attributes to fn() (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 7) -> float:
    """Measured FLOP/s of an n x n x n torch.mm in `dtype` on one thread: the best of `reps`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN / MKL kernel selection)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best


class ShuffledBatches:
    """Batches of `batch` rows of an in-memory tensor, reshuffled each epoch (the peers' loops)."""

    def __init__(self, data: torch.Tensor, batch: int, generator: torch.Generator | None = None):
        self.data, self.batch, self.generator = data, batch, generator
        self.order, self.pos = torch.randperm(len(data), generator=generator), 0

    def __call__(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.data):  # a new epoch, reshuffled (drop_last, as a DataLoader)
            self.order, self.pos = torch.randperm(len(self.data), generator=self.generator), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.data[idx]


def train_for(contenders: dict[str, Callable[[int], object]], budget: float, chunk: int) -> dict[str, dict]:
    """Round-robin calls contender(chunk) (chunk more training steps) until each has trained
    `budget` seconds of its own time; machine load falls on all alike. Contenders carry `params`."""
    spent = {k: 0.0 for k in contenders}
    steps = {k: 0 for k in contenders}
    while any(v < budget for v in spent.values()):
        for k, c in contenders.items():
            if spent[k] < budget:
                t0 = time.perf_counter()
                c(chunk)
                spent[k] += time.perf_counter() - t0
                steps[k] += chunk
    return {k: {"seconds": spent[k], "steps": steps[k], "params": contenders[k].params} for k in contenders}


def write_png_folder(images: torch.Tensor, folder: Path) -> Path:
    """Images in [-1, 1] (N, C, H, W) as 8-bit PNG files, for peers that train from a folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i, img in enumerate(pixels):
        array = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:05d}.png")
    return folder


def fmt_rate(values: list[float], per_call: float) -> str:
    """'median (min-max)' of per_call / seconds."""
    rates = sorted(per_call / v for v in values)
    return f"{statistics.median(rates):.1f} ({rates[0]:.1f}-{rates[-1]:.1f})"
