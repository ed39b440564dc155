"""Kill and resume: a run killed at a random moment (SIGKILL) or stopped by SIGTERM and resumed
with --resume ends with the same weights, bitwise, as an uninterrupted run on CPU.

Bitwise is possible because every random draw of a step is a function of (seed, step, micro-batch,
call) (`genkit.training.handle`), the data order of (seed, epoch) and the checkpoint restores the
RNG states, optimizer and EMA exactly; CPU kernels are deterministic for a fixed thread count.
"""

from __future__ import annotations

import random
import signal

import pytest
from tiny_runs import (
    FAMILY_RUNS,
    STAGES,
    assert_same_model,
    kill,
    overrides,
    start,
    tiny_stage,
    train_command,
    wait_for_step,
)

import genkit
from genkit.families import FAMILIES
from genkit.runs import list_checkpoints, load_recipe

STEPS = 30  # far beyond the kill point, so even the fastest tiny run is still training when killed


def uninterrupted(family: str, out, stage=None):
    recipe, args = overrides(family, STEPS, stage=stage)
    return genkit.train(load_recipe(recipe, args), out=out)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """family -> a tiny frozen run it depends on, trained on first use."""
    root, built = tmp_path_factory.mktemp("stages"), {}

    def get(family):
        if family not in built:
            built[family] = tiny_stage(STAGES[family], root / STAGES[family])
        return built[family]
    return get


def test_every_family_has_a_reliability_run():
    assert sorted(FAMILY_RUNS) == sorted(FAMILIES), "add a tiny run for each family to tiny_runs.FAMILY_RUNS"


# every family, and the SIGTERM stop below, run in the slow step of .ci/run
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(family, tmp_path, stages):
    tok = stages(family) if family in STAGES else None
    rng = random.Random(family)  # a different, reproducible kill point per family
    kill_after = rng.randint(3, 8)
    run = tmp_path / "killed"
    proc = start(train_command(family, run, STEPS, stage=tok))
    wait_for_step(proc, run, kill_after)
    code, _ = kill(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL  # a half-written .step-N.tmp may remain: resume ignores it
    done = [int(p.name.split("-")[1]) for p in list_checkpoints(run / "checkpoints")]
    assert done and max(done) < STEPS, done
    recipe, args = overrides(family, STEPS, stage=tok)
    genkit.train(load_recipe(recipe, args), out=run, resume=True)
    assert_same_model(run, uninterrupted(family, tmp_path / "straight", tok))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_130(tmp_path):
    run = tmp_path / "term"
    proc = start(train_command("ddpm", run, 100, "train.checkpoint_every=1000"))
    wait_for_step(proc, run, 3)
    code, err = kill(proc, signal.SIGTERM)
    assert code == 130, err
    [ckpt] = list_checkpoints(run / "checkpoints")  # no periodic checkpoint: this one is SIGTERM's
    step = int(ckpt.name.split("-")[1])
    assert 3 <= step < 100 and f"SIGTERM at step {step}" in err and "--resume" in err
    recipe, args = overrides("ddpm", 100, 1000)
    genkit.train(load_recipe(recipe, args), out=run, resume=True)
    straight = genkit.train(load_recipe(recipe, args), out=tmp_path / "straight")
    assert_same_model(run, straight)
