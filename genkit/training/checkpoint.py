"""Atomic, complete training checkpoints: checkpoints/step-N/ appears whole or not at all.

step-N/
  nets.safetensors      trainable networks (unwrapped)
  ema.safetensors       EMA shadow weights (when EMA is on)
  optim-<group>.pt      optimizer state dict      (torch.save; loaded with weights_only=True)
  sched-<group>.pt      LR scheduler state dict
  scaler.pt             fp16 GradScaler state (fp16 only)
  phema.safetensors     post-hoc EMA profiles (train.posthoc_ema only)
  rng-<rank>.pt         torch / CUDA / numpy / python RNG states of each process
  state.json            step, data position (in samples: genkit.data.position), samples per step, EMA
                        updates, world size, genkit version, and the SHA-256 of every other file
                        (checked at resume)
Every file holds full tensors, whatever the number of processes and whether the networks were
sharded (genkit.training.sharding gathers them), so a checkpoint resumes with any number of
processes: each process restores its own RNG file when there is one, and a process the saving run
did not have seeds its generators from (seed, step, rank).
The folder is assembled as .step-N.tmp and renamed, so "latest" is always a whole checkpoint.
A checkpoint damaged later (truncated copy, bad disk) fails its checksums: at resume (the trainer
falls back to the previous one with a warning) or when pruning. Either way it is moved aside as
step-N.damaged (with the reason in DAMAGED.txt), never counted among the `keep_last` kept ones and
never deleted: pruning removes only verified checkpoints beyond the newest `keep_last` verified.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genkit.errors import RunError
from genkit.io import load_tensors, load_torch, save_tensors, save_torch, sha256_file, write_json
from genkit.rng import mix_seed
from genkit.runs import CKPT_EMA, CKPT_NETS, CKPT_STATE, list_checkpoints
from genkit.training.sharding import (
    full_model_state,
    full_optimizer_state,
    full_tensors,
    load_full_model_state,
    load_full_optimizer_state,
)
from genkit.version import __version__


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]]),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore this process's RNG states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"])
    random.setstate((3, tuple(int(v) for v in state["python"]), None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int) -> None:
    """Seed this process's torch (and CUDA), numpy and python generators from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(root: Path, step: int, accelerator: Any, nets: torch.nn.Module, ema: Any,
                    optimizers: dict[str, Any], schedulers: dict[str, Any], state: dict[str, Any],
                    keep_last: int, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoints/step-N atomically from every process, then prune to `keep_last`.

    An OSError (disk full, folder removed) removes the partial folder and is raised after
    the processes' barriers, so no rank waits forever and the previous checkpoints stay.
    """
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    failure = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _attempt(lambda: tmp.mkdir(parents=True))
    accelerator.wait_for_everyone()
    failure = failure or _attempt(lambda: save_torch(tmp / f"rng-{accelerator.process_index}.pt", rng_state()))
    full = _gather(nets, ema, optimizers)  # every process: sharded tensors are gathered collectively
    if accelerator.is_main_process and failure is None:
        failure = _attempt(lambda: _write_main(tmp, full, schedulers, accelerator, extra or {}))
    accelerator.wait_for_everyone()  # every rank's rng file is in place
    if accelerator.is_main_process and failure is None:
        failure = _attempt(lambda: _seal(tmp, dict(state, step=step, world_size=accelerator.num_processes,
                                                   genkit_version=__version__)))
    if failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    elif accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune(root, keep_last, known_good=final)
    accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    return final


def prune(root: Path, keep_last: int, known_good: Path | None = None) -> None:
    """Keep the newest `keep_last` checkpoints that verify; quarantine damaged ones, delete older good ones."""
    kept = 0
    for path in reversed(list_checkpoints(root)):
        if path != known_good:
            try:
                verify_checkpoint(path)
            except RunError as error:
                quarantine(path, str(error))
                continue
        kept += 1
        if kept > keep_last:
            shutil.rmtree(path, ignore_errors=True)


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged checkpoint aside as step-N.damaged (reason in DAMAGED.txt); never counted or pruned."""
    target = path.with_name(f"{path.name}.damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(target)
    with contextlib.suppress(OSError):
        (target / "DAMAGED.txt").write_text(reason + "\n")
    return target


def _attempt(write: Any) -> OSError | None:
    try:
        write()
    except OSError as error:
        return error
    return None


def _gather(nets: torch.nn.Module, ema: Any, optimizers: dict[str, Any]) -> dict[str, Any]:
    """Full state dicts of the networks, EMA and optimizers (genkit.training.sharding; as they are unsharded)."""
    return {"nets": full_model_state(nets), "ema": None if ema is None else full_tensors(ema.state_dict()),
            "optim": {group: full_optimizer_state(nets, opt) for group, opt in optimizers.items()}}


def _write_main(tmp: Path, full: dict[str, Any], schedulers: dict[str, Any], accelerator: Any,
                extra: dict[str, dict[str, torch.Tensor]]) -> None:
    """The main process's files: networks, EMA, optimizers, schedulers, GradScaler, `extra` tensors."""
    save_tensors(tmp / CKPT_NETS, full["nets"])
    for name, tensors in extra.items():
        save_tensors(tmp / f"{name}.safetensors", tensors)
    if full["ema"] is not None:
        save_tensors(tmp / CKPT_EMA, full["ema"])
    for group, state in full["optim"].items():
        save_torch(tmp / f"optim-{group}.pt", state)
        save_torch(tmp / f"sched-{group}.pt", schedulers[group].state_dict())
    if accelerator.scaler is not None:
        save_torch(tmp / "scaler.pt", accelerator.scaler.state_dict())


def _seal(tmp: Path, meta: dict[str, Any]) -> None:
    """state.json with the SHA-256 of every other file, written last."""
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    write_json(tmp / CKPT_STATE, dict(meta, files=files))


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint whose files all match their recorded SHA-256; RunError otherwise."""
    try:
        state = json.loads((path / CKPT_STATE).read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"checkpoint '{path}': unreadable state.json ({error})") from error
    missing = [key for key in ("step", "files", "world_size") if not isinstance(state, dict) or key not in state]
    if missing or CKPT_NETS not in state["files"]:
        raise RunError(f"checkpoint '{path}': state.json is incomplete (no {missing[0] if missing else CKPT_NETS})")
    for name, digest in state["files"].items():
        file = path / name
        if not file.is_file():
            raise RunError(f"checkpoint '{path}': file '{name}' is missing")
        if sha256_file(file) != digest:
            raise RunError(f"checkpoint '{path}': file '{name}' is corrupt (SHA-256 mismatch)")
    return state


def load_checkpoint(path: Path, accelerator: Any, nets: torch.nn.Module, ema: Any,
                    optimizers: dict[str, Any], schedulers: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Restore every piece written by `save_checkpoint` after verifying it; returns state.json.

    Any number of processes may resume (see the module docstring); `seed` seeds the RNG of a process
    that has no RNG file in the checkpoint."""
    state = verify_checkpoint(path)
    load_full_model_state(nets, load_tensors(path / CKPT_NETS))
    if ema is not None:
        ema.load_state_dict(load_tensors(path / CKPT_EMA), state["ema_updates"])
    for group, opt in optimizers.items():
        load_full_optimizer_state(nets, opt, load_torch(path / f"optim-{group}.pt"))
        schedulers[group].load_state_dict(load_torch(path / f"sched-{group}.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(load_torch(path / "scaler.pt"))
    rank = accelerator.process_index
    if rank < state["world_size"]:
        set_rng_state(load_torch(path / f"rng-{rank}.pt"))
    else:  # more processes than the saving run had
        seed_rng(mix_seed(seed, state["step"], rank))
    return state
