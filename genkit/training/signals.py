"""SIGTERM / SIGINT during training: finish the step, checkpoint, stop (cluster pre-emption).

Schedulers (SLURM, Kubernetes) send SIGTERM and wait a grace period before SIGKILL; Ctrl-C
sends SIGINT. The handler only records the signal; the trainer checks it after each step, so
the checkpoint is a consistent one. Under DDP every rank must stop at the same step, so the
flag is all-reduced (max) across processes each step when there are several.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set a flag instead of killing the process."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.name = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def received(self, accelerator: Any) -> bool:
        """Whether any process received a stop signal (all processes agree)."""
        if accelerator.num_processes == 1:
            return self.name is not None
        flag = torch.tensor([float(self.name is not None)], device=accelerator.device)
        got = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if got and self.name is None:
            self.name = "SIGTERM (another process)"
        return got
