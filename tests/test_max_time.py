"""train.max_time: a wall-clock budget that ends the run and drives the LR schedule and EMA warm-up."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_trainer import final_weights, toy_recipe

import genkit
import genkit.training.trainer as trainer_module
from genkit.config import TrainConfig, parse_duration
from genkit.errors import ConfigError
from genkit.training.budget import Budget, step_lr_lambda, warmup_decay

SECONDS_PER_STEP = 10.0


def fake_clock(monkeypatch):
    """A clock that advances SECONDS_PER_STEP at each reading (the trainer reads it once per step)."""
    ticks = itertools.count()
    monkeypatch.setattr(trainer_module, "clock", lambda: SECONDS_PER_STEP * next(ticks))


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400),
                                           (45, 45), (2.5, 2.5), ("1.5h", 5400), ("30", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["20 min", "h", "-5m", 0, "", "2x"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ConfigError, match="train.max_time"):
        parse_duration(bad)


def test_bad_max_time_in_a_recipe_names_the_key(toy_family):
    with pytest.raises(ConfigError, match="train.max_time"):
        toy_recipe(max_time="soon")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_progress_schedule_equals_the_step_schedule_at_the_same_fraction(schedule):
    cfg = TrainConfig(steps=20, warmup=4, lr_schedule=schedule)
    step = step_lr_lambda(cfg)
    for k in range(21):
        assert warmup_decay(cfg, k / cfg.steps) == pytest.approx(step(k), abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_time_budget_reaches_the_final_lr_at_its_last_step(tmp_path, monkeypatch, toy_family, schedule):
    fake_clock(monkeypatch)
    run = genkit.train(toy_recipe(steps=1000, max_time="100s", lr_schedule=schedule, lr=0.1), out=tmp_path / "t")
    logged = records(run)
    assert [r["step"] for r in logged] == list(range(1, 11))  # 10 s per step: the budget holds 10
    for r in logged:   # the LR after step k follows the time used, k * 10 s of 100 s (not k of 1000 steps)
        frac = r["step"] * SECONDS_PER_STEP / 100
        want = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
        assert r["lr"] == pytest.approx(0.1 * want, abs=1e-12)
    assert logged[-1]["lr"] == 0.0
    state = json.loads((run / "checkpoints" / "step-10" / "state.json").read_text())
    assert state["train_seconds"] == 100.0 and state["step"] == 10  # a final checkpoint at the time limit


def test_warmup_is_the_same_fraction_of_a_time_budget(tmp_path, monkeypatch, toy_family):
    fake_clock(monkeypatch)  # warmup 50 of 100 steps: the first half of the time, 5 steps of 10 s
    run = genkit.train(toy_recipe(steps=100, warmup=50, max_time=100, lr_schedule="constant", lr=0.1),
                       out=tmp_path / "w")
    want = [0.1 * (k * SECONDS_PER_STEP / 100 / 0.5 + 1 / 50) for k in range(1, 5)] + [0.1] * 6
    assert [r["lr"] for r in records(run)] == pytest.approx(want, abs=1e-12)


def test_steps_still_cap_a_time_budget(tmp_path, monkeypatch, toy_family):
    fake_clock(monkeypatch)
    run = genkit.train(toy_recipe(steps=4, max_time="1h", lr_schedule="cosine", lr=0.1), out=tmp_path / "cap")
    logged = records(run)
    assert logged[-1]["step"] == 4 and logged[-1]["lr"] == 0.0  # whichever budget binds ends the schedule


def test_resume_after_a_kill_continues_the_time_schedule_exactly(tmp_path, monkeypatch, toy_family):
    recipe = toy_recipe(steps=1000, max_time=100, lr_schedule="cosine", optim="adam", lr=0.01, warmup=200,
                        checkpoint_every=4, keep_last=10, ema_decay=0.9)
    fake_clock(monkeypatch)
    straight = genkit.train(recipe, out=tmp_path / "straight")

    fake_clock(monkeypatch)
    real_step = toy_family.train_step

    def dies_at_step_6(self, batch, step, opt):
        if step == 6:
            raise KeyboardInterrupt  # killed between checkpoints: steps 5 and 6 are lost
        return real_step(self, batch, step, opt)

    monkeypatch.setattr(toy_family, "train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        genkit.train(recipe, out=tmp_path / "killed")
    monkeypatch.setattr(toy_family, "train_step", real_step)
    fake_clock(monkeypatch)  # a new process: its clock starts anew; the training time comes from step-4
    resumed = genkit.train(recipe, out=tmp_path / "killed", resume=True)

    assert [(r["step"], r["lr"]) for r in records(resumed)] == [(r["step"], r["lr"]) for r in records(straight)]
    a, b = final_weights(straight), final_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_budget_progress_and_estimate():
    clock = iter([0.0, 30.0, 50.0]).__next__
    budget = Budget(TrainConfig(steps=100, max_time="100s"), clock)
    budget.start()
    budget.tick(0)
    assert budget.progress == 0.3 and budget.estimated_steps() == 4 and not budget.exhausted
    budget.tick(0)  # the clock is read once per step
    assert budget.elapsed == 30.0
    budget.tick(1)
    assert budget.progress == 0.5 and budget.estimated_steps() == 4


def test_ema_warmup_follows_the_fraction_of_the_budget():
    from torch import nn

    from genkit.training.ema import EMA

    clock = iter([0.0, 30.0]).__next__
    budget = Budget(TrainConfig(steps=100, max_time=100), clock)
    ema = EMA(nn.Linear(2, 2), 0.999, warmup=True, ramp=budget.ema_updates)
    budget.start()
    budget.tick(0)  # one step done, but 30% of the time: the ramp stands where step 30 of 100 would
    assert ema.current_decay() == pytest.approx((1 + 29) / (10 + 29))


def test_resume_with_a_longer_budget_extends_a_run_that_ended_by_time(tmp_path, monkeypatch, toy_family):
    fake_clock(monkeypatch)
    run = genkit.train(toy_recipe(steps=1000, max_time=50), out=tmp_path / "r")
    assert records(run)[-1]["step"] == 5
    fake_clock(monkeypatch)
    genkit.train(toy_recipe(steps=1000, max_time=80), out=run, resume=True)  # train.max_time is resume-safe
    assert records(run)[-1]["step"] == 8
    assert json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])["changed"]["train.max_time"] == [50.0, 80.0]
