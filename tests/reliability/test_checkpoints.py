"""Damaged checkpoints, unwritable run folders and the atomic writes that protect outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_runs import assert_same_model, overrides

import genkit
from genkit.errors import RunError
from genkit.io import atomic_dir, save_npz, write_text
from genkit.runs import list_checkpoints, load_recipe
from genkit.training.checkpoint import verify_checkpoint


def recipe(steps: int):
    name, args = overrides("ddpm", steps, 2)
    return load_recipe(name, args)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "state"])
def test_a_damaged_latest_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    run = genkit.train(recipe(4), out=tmp_path / "run")
    latest = list_checkpoints(run / "checkpoints")[-1]
    assert latest.name == "step-4"
    victim = latest / ("state.json" if damage == "state" else "nets.safetensors")
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one bit deep inside a tensor: the file still parses
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_text("{not json")
    with pytest.raises(RunError, match="step-4"):
        verify_checkpoint(latest)
    # resume from step 2 (with a warning naming the damaged one) to 6 == an uninterrupted 6-step run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        genkit.train(recipe(6), out=run, resume=True)
    assert any("step-4" in str(w.message) and "moved aside" in str(w.message) for w in caught)
    assert (run / "checkpoints" / "step-4.damaged").is_dir()  # quarantined, never counted or resumed from
    assert_same_model(run, genkit.train(recipe(6), out=tmp_path / "straight"))


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    run = genkit.train(recipe(2), out=tmp_path / "run")
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "nets.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match="every checkpoint is damaged"):
        genkit.train(recipe(4), out=run, resume=True)


def test_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(RunError, match=r"run folder '.*file/run'.*cannot be created"):
        genkit.train(recipe(2), out=blocker / "run")


def test_atomic_outputs_leave_the_previous_file_when_a_write_fails(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "good")
    with pytest.raises(RuntimeError):
        from genkit.io import atomic_write

        def crash(path):
            path.write_text("half")
            raise RuntimeError("crash mid-write")

        atomic_write(target, crash)
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("crash")
    assert (folder / "a").read_text() == "1"
    save_npz(tmp_path / "s.npz", torch.zeros(2, 1, 4, 4))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
