"""Logs and progress like the ecosystem's: TQDM_DISABLE, plain lines off a terminal, TensorBoard images
and hparams, and the Accelerate launch rule (genkit/progress.py, training/logger.py, training/launch.py)."""

from __future__ import annotations

import io
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from test_eval_engine import PixelProjection
from test_rectified_flow import tiny_rf
from toy_family import Toy, ToyConfig

import genkit.reflow
from genkit.eval import engine
from genkit.families.sampling import sample
from genkit.io import make_grid
from genkit.progress import Progress, disabled_by_env
from genkit.training.launch import launch_warnings
from genkit.training.logger import TrainLogger, flatten_hparams


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def shown(monkeypatch):
    """Progress switched on (tests/conftest.py sets TQDM_DISABLE=1 for the suite)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


# ---------------------------------------------------------------- genkit.progress


def test_off_a_terminal_progress_prints_plain_lines_at_every_multiple_and_the_end(shown):
    out = io.StringIO()
    with Progress(10, "sample", "image", every=4, file=out) as bar:
        for _ in range(5):
            bar.update(2, loss=0.25)
    text = out.getvalue()
    assert "\r" not in text
    got = lines(text)
    assert [line.split("  ")[0] for line in got] == ["sample: 4/10 images", "sample: 8/10 images",
                                                     "sample: 10/10 images"]
    assert all("loss=0.25" in line and "images/s" in line and "elapsed" in line for line in got)
    assert all("eta" in line for line in got[:-1]) and "eta" not in got[-1]


def test_progress_defaults_to_a_line_per_twentieth_and_closes_with_the_last_position(shown):
    out = io.StringIO()
    with Progress(100, "features", "image", file=out) as bar:
        for _ in range(8):
            bar.update(3)  # crosses a multiple of 5 at 6, 12 (10), 15, 21 (20); 24 crosses none
    assert [line.split("  ")[0] for line in lines(out.getvalue())] == [
        f"features: {n}/100 images" for n in (6, 12, 15, 21, 24)]  # 24: printed by close
    out = io.StringIO()
    with Progress(None, "features", "image", every=100, file=out) as bar:
        bar.update(30)
    assert lines(out.getvalue())[0].startswith("features: 30 images  ")  # no total: no eta


def test_scalars_may_have_any_name(shown):
    out = io.StringIO()
    with Progress(2, "train", "step", file=out) as bar:
        bar.update(2, n=0.5, self=1.0)  # loss terms are named by the families
    assert "n=0.5  self=1" in out.getvalue()


def test_on_a_terminal_progress_keeps_the_bar(shown):
    out = Terminal()
    with Progress(10, "sample", "image", every=4, file=out) as bar:
        for _ in range(5):
            bar.update(2)
    text = out.getvalue()
    assert "\r" in text and "sample: 100%" in text and "10/10" in text
    assert "elapsed" not in text


@pytest.mark.parametrize("value, off", [("1", True), ("true", True), ("0", True), ("", False)])
def test_tqdm_disable_silences_progress_by_tqdms_rule(monkeypatch, value, off):
    """tqdm disables on any non-empty TQDM_DISABLE (it casts the string with bool), "0" included."""
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert disabled_by_env() is off
    for out in (io.StringIO(), Terminal()):
        with Progress(4, "sample", "image", every=1, file=out) as bar:
            bar.update(4)
        assert (out.getvalue() == "") is off


def test_a_disabled_progress_prints_nothing(shown):
    out = io.StringIO()
    with Progress(4, "sample", "image", every=1, disable=True, file=out) as bar:
        bar.update(4)
    assert out.getvalue() == ""


# ---------------------------------------------------------------- TrainLogger


@pytest.fixture
def accelerator(tmp_path):
    """A CPU Accelerator logging to tmp_path/tensorboard, as the trainer's."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    acc.init_trackers("tensorboard")
    yield acc
    acc.end_training()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train(log: TrainLogger, steps: int) -> None:
    for step in range(steps):
        log.add({"loss": torch.tensor(0.5)}, step)
        log.step(step + 1, lr=1e-3)
    log.close()


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_train_logger_respects_tqdm_disable(accelerator, tmp_path, monkeypatch, capsys):
    """The logger passes disable= for the other processes; TQDM_DISABLE still silences the main one."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train(TrainLogger(accelerator, tmp_path, every=4, total=10, start=0, images_per_step=8), 10)
    assert capsys.readouterr().err == ""
    assert [r["step"] for r in records(tmp_path)] == [4, 8, 10]


def test_train_logger_off_a_terminal_prints_one_line_per_logging_step(accelerator, tmp_path, shown, capsys):
    log = TrainLogger(accelerator, tmp_path, every=4, total=10, start=0, images_per_step=8, label="ldm")
    train(log, 10)
    err = capsys.readouterr().err
    assert "\r" not in err
    got = lines(err)
    assert [line.split("  ")[0] for line in got] == ["ldm: 4/10 steps", "ldm: 8/10 steps", "ldm: 10/10 steps"]
    for line in got:
        assert "loss=0.5" in line and "images_per_s=" in line and "lr=0.001" in line and "elapsed" in line
    assert all("eta" in line for line in got[:-1])
    # metrics.jsonl as before: one record per logging step, the same keys in the same order
    assert [list(r) for r in records(tmp_path)] == [["step", "loss", "images_per_s", "lr"]] * 3


def test_train_logger_on_a_terminal_keeps_the_bar_with_its_label(accelerator, tmp_path, shown, monkeypatch):
    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    train(TrainLogger(accelerator, tmp_path, every=4, total=10, start=0, images_per_step=8,
                      label="first_stage"), 10)
    text = out.getvalue()
    assert "\r" in text and "first_stage: 100%" in text and "loss=0.5" in text
    assert "elapsed" not in text


def test_train_logger_resumed_prints_from_the_resume_step(accelerator, tmp_path, shown, capsys):
    log = TrainLogger(accelerator, tmp_path, every=4, total=10, start=6, images_per_step=8)
    for step in range(6, 10):
        log.add({"loss": torch.tensor(0.5)}, step)
        log.step(step + 1, lr=1e-3)
    log.message("samples: grid.png")
    log.close()
    got = lines(capsys.readouterr().err)
    assert [line.split("  ")[0] for line in got] == ["train: 8/10 steps", "train: 10/10 steps", "samples: grid.png"]


def test_flatten_hparams_dots_keys_and_writes_lists_and_none_as_text():
    recipe = {"model": {"family": "ddpm", "unet": {"channels": [8, 16], "attention": [False, True]}, "extra": {}},
              "train": {"steps": 12, "lr": 1e-4, "ema_decay": None, "compile": False}}
    assert flatten_hparams(recipe) == {
        "model.family": "ddpm", "model.unet.channels": "[8, 16]", "model.unet.attention": "[false, true]",
        "model.extra": "{}", "train.steps": 12, "train.lr": 1e-4, "train.ema_decay": "null", "train.compile": False}


def test_image_and_hparams_reach_the_tensorboard_event_files(accelerator, tmp_path):
    log = TrainLogger(accelerator, tmp_path, every=1, total=1, start=0, images_per_step=1)
    log.hparams({"model": {"family": "ddpm", "unet": {"channels": [8, 16]}}, "train": {"steps": 12}})
    images = torch.linspace(-1, 1, 4 * 8 * 8).reshape(4, 1, 8, 8)
    log.image(6, "samples", images)
    log.close()
    accelerator.end_training()  # closes the writer: the events are on disk

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    [event] = events.Images("samples")
    assert event.step == 6 and (event.width, event.height) == (22, 22)  # 2 x 2 tiles of 8 px, 2 px padding
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert (decoded.reshape(22, 22, -1)[..., 0] == make_grid(images)[..., 0]).all()

    [hparams_dir] = [p.parent for p in (tmp_path / "tensorboard").rglob("events.out.tfevents*")
                     if p.parent != tmp_path / "tensorboard"]  # add_hparams writes to a sub-run
    events = EventAccumulator(str(hparams_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.family"].string_value == "ddpm"
    assert hparams["model.unet.channels"].string_value == "[8, 16]"
    assert hparams["train.steps"].number_value == 12


def test_image_and_hparams_log_on_the_main_process_only(tmp_path):
    class Refusing:
        name = "tensorboard"

        def log_images(self, *args, **kwargs):
            raise AssertionError("logged images on a process other than the main one")

        def store_init_configuration(self, *args, **kwargs):
            raise AssertionError("logged hparams on a process other than the main one")

    other = SimpleNamespace(is_main_process=False, trackers=[Refusing()])
    log = TrainLogger(other, tmp_path, every=1, total=1, start=0, images_per_step=1)
    log.image(1, "samples", torch.zeros(1, 1, 4, 4))
    log.hparams({"train": {"steps": 1}})
    log.close()


# ---------------------------------------------------------------- sample, eval, reflow


@pytest.fixture
def toy():
    return Toy(ToyConfig(), (1, 4, 4))


def test_sample_reports_progress_over_batches_only_when_asked(toy, shown, capsys):
    quiet = sample(toy, 6, batch_size=2, generator=torch.Generator().manual_seed(0)).images
    assert capsys.readouterr().err == ""  # library calls stay quiet by default
    loud = sample(toy, 6, batch_size=2, generator=torch.Generator().manual_seed(0), progress=True).images
    got = lines(capsys.readouterr().err)
    assert [line.split("  ")[0] for line in got] == [f"sample: {n}/6 images" for n in (2, 4, 6)]
    assert torch.equal(quiet, loud)
    sample(toy, 6, generator=torch.Generator().manual_seed(0), progress=True)  # one batch: nothing to report
    assert capsys.readouterr().err == ""


def test_eval_features_report_progress_when_the_settings_ask(tmp_path, shown, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (10, 1, 4, 4), dtype=np.uint8))
    extractor = PixelProjection()
    engine.all_features(str(path), extractor, engine.EvalSettings(batch_size=4))
    assert capsys.readouterr().err == ""
    feats = engine.all_features(str(path), extractor, engine.EvalSettings(batch_size=4, n=10, progress=True))
    assert len(feats) == 10
    got = lines(capsys.readouterr().err)
    assert [line.split("  ")[0] for line in got] == [f"features {path}: {n}/10 images" for n in (4, 8, 10)]


def test_generated_stats_report_this_processes_images(toy, shown, capsys):
    extractor = PixelProjection()
    engine.generated_stats(toy, extractor, 10, 4, rank=1, world=2, progress=True)  # batches 1: 4 images
    assert [line.split("  ")[0] for line in lines(capsys.readouterr().err)] == ["generate + features: 4/4 images"]
    engine.generated_stats(toy, extractor, 10, 4)
    assert capsys.readouterr().err == ""


def test_reflow_pairs_progress_follows_the_same_rules(tmp_path, monkeypatch, capsys):
    family = tiny_rf()  # untrained: the progress, not the pairs, is under test
    monkeypatch.setattr(genkit.reflow, "load", lambda run, device=None: family)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    genkit.reflow.generate_pairs(tmp_path / "run", tmp_path / "a", 8, sampler="ddim", steps=1, shard_size=4)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split("  ")[0] for line in lines(err)] == ["reflow pairs: 4/8 pairs", "reflow pairs: 8/8 pairs"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    genkit.reflow.generate_pairs(tmp_path / "run", tmp_path / "b", 8, sampler="ddim", steps=1, shard_size=4)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- genkit.training.launch


@pytest.fixture
def launch_env(monkeypatch):
    """No launcher variables, CUDA absent, 2 CPU cores; each test sets what its launch would."""
    for name in ("ACCELERATE_MIXED_PRECISION", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    return monkeypatch


def test_launch_precision_differing_from_the_recipe_warns_with_both_and_the_recipe_wins(launch_env):
    assert launch_warnings("bf16") == []  # no launcher
    launch_env.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launch_warnings("bf16") == []
    [warning] = launch_warnings("no")
    assert "mixed_precision=bf16" in warning and "train.precision=no" in warning and "the recipe wins" in warning
    launch_env.setenv("ACCELERATE_MIXED_PRECISION", "no")
    [warning] = launch_warnings("bf16")
    assert "mixed_precision=no" in warning and "train.precision=bf16" in warning


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "WORLD_SIZE"])
def test_more_processes_than_cpu_cores_without_cuda_warns_with_both_numbers(launch_env, variable):
    launch_env.setenv(variable, "8")
    [warning] = launch_warnings("no")
    assert "8 processes" in warning and "2 CPU cores" in warning and "each process trains on the CPU" in warning
    launch_env.setenv(variable, "2")
    assert launch_warnings("no") == []  # one process per core
    launch_env.setenv(variable, "8")
    launch_env.setattr(torch.cuda, "is_available", lambda: True)
    assert launch_warnings("no") == []  # GPUs: num_processes counts them


def test_local_world_size_counts_this_machines_processes(launch_env):
    launch_env.setenv("WORLD_SIZE", "16")      # two nodes ...
    launch_env.setenv("LOCAL_WORLD_SIZE", "2")  # ... of 2 processes each
    assert launch_warnings("no") == []
