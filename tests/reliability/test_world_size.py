"""Resume across world sizes: the data position is kept in samples, so a run saved with N processes
continues with M at the same sample (genkit.data.position); the checkpoints hold full tensors.

The fast tests check the sampler and the position; the slow ones train under torchrun (2 processes,
gloo on CPU) and resume with 1, and the other way round. What differs from an uninterrupted run:
gradients are averaged over processes in another order (float rounding), so weights agree to the
DDP test's tolerance, not bitwise; per-process RNG (dropout) and batch statistics differ, so those runs
leave dropout out, as the DDP test does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import flat, train

from genkit.data.position import DataPosition, GlobalBatchSampler, epoch_order
from genkit.io import load_tensors


def take(n: int, batch: int, world: int, start: DataPosition, steps: int) -> list[list[int]]:
    """The global batches (ranks' slices joined) of `steps` steps from `start`."""
    streams = [iter(GlobalBatchSampler(n, batch, rank, world, 7, start)) for rank in range(world)]
    return [sum((next(s) for s in streams), []) for _ in range(steps)]


def advance(position: DataPosition, global_batch: int, n: int, steps: int) -> DataPosition:
    for _ in range(steps):
        position = position.advance(global_batch, n)
    return position


def test_two_processes_take_the_global_batches_of_one_process_at_twice_the_batch():
    one = take(50, 8, 1, DataPosition(), 9)
    assert take(50, 4, 2, DataPosition(), 9) == one
    assert one[0] == epoch_order(50, 7, 0)[:8]  # Accelerate's seedable sampler: randperm seeded seed + epoch
    assert one[6] == epoch_order(50, 7, 1)[:8]  # 6 batches of 8 per epoch of 50, 2 dropped


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_a_resume_with_another_world_size_continues_at_the_same_sample(before, after):
    n, g = 50, 8
    straight = take(n, g, 1, DataPosition(), 10)
    saved = advance(DataPosition(), g, n, 4)          # 4 steps with `before` processes
    assert saved.samples == 4 * g
    resumed = take(n, g // before, before, DataPosition(), 4) + take(n, g // after, after, saved, 6)
    assert resumed == straight


def test_another_global_batch_takes_the_rest_of_the_epoch_without_skipping_or_repeating():
    n = 60
    saved = advance(DataPosition(), 8, n, 3)          # 24 samples of epoch 0
    seen = sum(take(n, 8, 1, DataPosition(), 3) + take(n, 6, 2, saved, 3), [])  # 36 more: epoch 0 is done
    assert sorted(seen) == list(range(n)) and seen == epoch_order(n, 7, 0)
    assert advance(saved, 12, n, 3) == DataPosition(0, 60, 60)
    assert advance(saved, 12, n, 4) == DataPosition(1, 12, 72)


def test_positions_of_older_checkpoints_convert_from_micro_batches():
    assert DataPosition.from_batches(7, 16, 50) == advance(DataPosition(), 16, 50, 7) == DataPosition(2, 16, 112)


def state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())


NO_DROPOUT = ["model.unet.dropout=0.0"]  # per-process dropout masks differ with the world size


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes_continues_at_the_right_sample(before, after, tmp_path):
    global_batch = 16
    run = train(tmp_path / "run", before, global_batch // before, 4, *NO_DROPOUT)
    assert state(run, 4)["world_size"] == before and state(run, 4)["data"]["samples"] == 4 * global_batch
    train(run, after, global_batch // after, 6, *NO_DROPOUT, f"data.batch_size={global_batch // after}",
          resume=True)
    assert state(run, 6)["world_size"] == after and state(run, 6)["data"]["samples"] == 6 * global_batch
    straight = train(tmp_path / "straight", 1, global_batch, 6, *NO_DROPOUT)
    a, b = (load_tensors(r / "model" / "weights.safetensors") for r in (run, straight))
    for k in a:  # nets and EMA
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    moved, gap = (flat(run, 6) - flat(run, 4)).norm(), (flat(run, 6) - flat(straight, 6)).norm()
    assert gap < 0.02 * moved, f"resumed vs straight {gap:.3g}, the two resumed steps moved {moved:.3g}"


@pytest.mark.slow
def test_a_resume_with_fewer_processes_at_the_same_per_process_batch_warns_and_counts_samples(tmp_path):
    run = train(tmp_path / "run", 2, 8, 2, *NO_DROPOUT)
    with pytest.warns(UserWarning, match="trained 16 samples per step, this resume trains 8 .*data.batch_size=16"):
        train(run, 1, 8, 3, *NO_DROPOUT, resume=True)
    assert state(run, 3)["data"]["samples"] == 2 * 16 + 8
