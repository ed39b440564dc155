"""What an Accelerate launch asks for against what the recipe says (docs/accelerate.md).

One rule: the recipe's `train.precision` wins over the launch's mixed precision, because the run
folder's config.yaml must say what ran. `accelerate launch` passes its config's `mixed_precision`
(or `--mixed_precision`) to the processes as ACCELERATE_MIXED_PRECISION; when that differs from
the recipe, the user is told both. A launch of more processes than this machine has CPU cores,
without CUDA, is a mistake worth a word too: every process then trains on the CPU.
"""

from __future__ import annotations

import os

import torch


def _precision_warning(precision: str) -> str | None:
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if not asked or asked == precision:
        return None
    return (f"the Accelerate launch asks for mixed_precision={asked} (ACCELERATE_MIXED_PRECISION), the recipe for "
            f"train.precision={precision}: the recipe wins, so that the run folder says what ran; training runs "
            f"{precision} (set train.precision={asked} to train in {asked})")


def _processes_warning() -> str | None:
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE")  # processes on this machine
    cores = os.cpu_count()
    if torch.cuda.is_available() or not local or not cores or int(local) <= cores:
        return None
    return (f"{int(local)} processes were launched on this machine, which has no CUDA and {cores} CPU cores: each "
            f"process trains on the CPU, sharing the cores; launch at most {cores} (accelerate launch "
            f"--num_processes {cores}), or train without accelerate launch")


def launch_warnings(precision: str) -> list[str]:
    """The warnings of this launch for a recipe's `train.precision`: one line each, none when all agree.

    Reads the environment the launcher set (ACCELERATE_MIXED_PRECISION, LOCAL_WORLD_SIZE or
    WORLD_SIZE), whether CUDA is available, and os.cpu_count().
    """
    return [w for w in (_precision_warning(precision), _processes_warning()) if w is not None]
