"""Atomic, complete training checkpoints: checkpoints/step-N/ appears whole or not at all.

step-N/
  nets.safetensors      trainable networks (unwrapped)
  ema.safetensors       EMA shadow weights (when EMA is on)
  optim-<group>.pt      optimizer state dict      (torch.save; loaded with weights_only=True)
  sched-<group>.pt      LR scheduler state dict
  scaler.pt             fp16 GradScaler state (fp16 only)
  rng-<rank>.pt         torch / CUDA / numpy / python RNG states of each process
  state.json            step, data position, EMA updates, world size, genkit version, and the
                        SHA-256 of every other file (checked at resume)
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
from genkit.runs import CKPT_EMA, CKPT_NETS, CKPT_STATE, list_checkpoints
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


def save_checkpoint(root: Path, step: int, accelerator: Any, nets: torch.nn.Module, ema: Any,
                    optimizers: dict[str, Any], schedulers: dict[str, Any], state: dict[str, Any],
                    keep_last: int) -> Path:
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
    if accelerator.is_main_process and failure is None:
        failure = _attempt(lambda: _write_main(tmp, nets, ema, optimizers, schedulers, accelerator))
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


def _write_main(tmp: Path, nets: torch.nn.Module, ema: Any, optimizers: dict[str, Any],
                schedulers: dict[str, Any], accelerator: Any) -> None:
    """The main process's files: networks, EMA, optimizers, schedulers, GradScaler."""
    save_tensors(tmp / CKPT_NETS, nets.state_dict())
    if ema is not None:
        save_tensors(tmp / CKPT_EMA, ema.state_dict())
    for group, opt in optimizers.items():
        save_torch(tmp / f"optim-{group}.pt", opt.state_dict())
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
                    optimizers: dict[str, Any], schedulers: dict[str, Any]) -> dict[str, Any]:
    """Restore every piece written by `save_checkpoint` after verifying it; returns state.json."""
    state = verify_checkpoint(path)
    if state["world_size"] != accelerator.num_processes:
        raise RunError(f"checkpoint '{path}' was written by {state['world_size']} processes, "
                       f"this run has {accelerator.num_processes}: resume with the same number")
    nets.load_state_dict(load_tensors(path / CKPT_NETS))
    if ema is not None:
        ema.load_state_dict(load_tensors(path / CKPT_EMA), state["ema_updates"])
    for group, opt in optimizers.items():
        opt.load_state_dict(load_torch(path / f"optim-{group}.pt"))
        schedulers[group].load_state_dict(load_torch(path / f"sched-{group}.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(load_torch(path / "scaler.pt"))
    set_rng_state(load_torch(path / f"rng-{accelerator.process_index}.pt"))
    return state
