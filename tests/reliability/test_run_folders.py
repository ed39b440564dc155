"""Run folders a user can trust: resume from the run itself, config.yaml that says what ran, retries after
a failed start, retention that never counts a damaged checkpoint, folders that can be moved, and an LDM
first stage that takes its own overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_UNET, run_cli
from tiny_runs import overrides

import genkit
from genkit.runs import list_checkpoints, load_recipe
from genkit.training import checkpoint

TINY = [*TINY_UNET, "data.image_size=8", "data.batch_size=8", "model.timesteps=50", "train.sample_every=0",
        "train.log_every=1", "sample.steps=2", "sample.n=2", "train.warmup=0"]


def config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def resumes(run: Path) -> list[dict]:
    path = run / "resumes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def small_run(tmp_path) -> Path:
    """A DDPM trained 3 steps with a non-default UNet (checkpoints at 2 and 3)."""
    r = run_cli("train", "ddpm_digits", *TINY, "model.unet.channels=[8,8]", "train.steps=3",
                "train.checkpoint_every=2", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return tmp_path / "run"


def test_resume_continues_from_the_run_folder_without_the_recipe(small_run, tmp_path):
    """`genkit train --resume RUN train.steps=5` rebuilds from RUN/config.yaml (its [8, 8] UNet), not from
    a recipe retyped on the command line, and records the resume."""
    r = run_cli("train", "--resume", str(small_run), "train.steps=5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in list_checkpoints(small_run / "checkpoints")][-1] == "step-5"
    assert config(small_run)["train"]["steps"] == 5 and config(small_run)["model"]["unet"]["channels"] == [8, 8]
    [record] = resumes(small_run)
    assert record["step"] == 3 and record["changed"] == {"train.steps": [3, 5]} and record["time"]


def test_resume_refuses_unsafe_changes_listing_old_and_new_values(small_run, tmp_path):
    before = (small_run / "config.yaml").read_text()
    r = run_cli("train", "ddpm_digits", *TINY, "train.steps=5", "--out", str(small_run), "--resume", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model.unet.channels: [8, 8] -> [8, 16]" in r.stderr
    r = run_cli("train", "--resume", str(small_run), "optim.model.lr=5e-4", cwd=tmp_path)
    assert r.returncode == 2 and "optim.model.lr: 0.001 -> 0.0005" in r.stderr
    assert (small_run / "config.yaml").read_text() == before and resumes(small_run) == []  # nothing half-applied


def test_the_same_recipe_and_overrides_resume_without_complaint(small_run, tmp_path):
    r = run_cli("train", "ddpm_digits", *TINY, "model.unet.channels=[8,8]", "train.steps=4",
                "train.checkpoint_every=2", "--resume", str(small_run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert resumes(small_run)[0]["changed"] == {"train.steps": [3, 4]}


def test_a_failed_start_leaves_nothing_that_blocks_the_same_command(tmp_path):
    args = ("train", "ddpm_digits", *TINY, "data.source=folder", f"data.root={tmp_path / 'no_images'}",
            "--out", "run")
    for _ in range(2):  # the second attempt meets the same error, not "the folder exists"
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()


def test_nan_before_the_first_checkpoint_says_nothing_is_kept_and_cleans_up(tmp_path):
    args = ("train", "ddpm_digits", *TINY, "optim.model.lr=1e30", "train.clip_grad=null", "train.steps=4",
            "train.checkpoint_every=100", "--out", "run")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "not finite" in r.stderr and "nothing is kept" in r.stderr, r.stderr
    assert "last good checkpoint" not in r.stderr and not (tmp_path / "run").exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_zero(small_run, tmp_path):
    shutil.rmtree(small_run / "checkpoints")
    shutil.rmtree(small_run / "model")
    r = run_cli("train", "--resume", str(small_run), cwd=tmp_path)
    assert r.returncode == 0 and "training from step 0" in r.stdout, r.stderr
    assert [p.name for p in list_checkpoints(small_run / "checkpoints")] == ["step-2", "step-3"]


def test_a_damaged_checkpoint_is_quarantined_and_never_counted_as_kept(tmp_path):
    run = genkit.train(load_recipe("ddpm_digits", [*TINY, "train.steps=4", "train.checkpoint_every=1",
                                                   "train.keep_last=2"]), out=tmp_path / "run")
    ckpts = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-3", "step-4"]
    (ckpts / "step-4" / "nets.safetensors").write_bytes(b"truncated")  # the newest is damaged
    with pytest.warns(UserWarning, match="step-4.*moved aside"):
        genkit.train(load_recipe("ddpm_digits", [*TINY, "train.steps=6", "train.checkpoint_every=1",
                                                 "train.keep_last=2"]), out=run, resume=True)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-5", "step-6"]  # keep_last verified ones
    assert (ckpts / "step-4.damaged" / "DAMAGED.txt").read_text().startswith("checkpoint")
    assert resumes(run)[0]["step"] == 3  # fell back past the damaged one


def test_pruning_quarantines_a_damaged_older_checkpoint_and_keeps_keep_last_verified(tmp_path):
    run = genkit.train(load_recipe("ddpm_digits", [*TINY, "train.steps=3", "train.checkpoint_every=1",
                                                   "train.keep_last=2"]), out=tmp_path / "run")
    ckpts = run / "checkpoints"
    (ckpts / "step-2" / "state.json").write_text("{}")  # an older checkpoint damaged on disk
    checkpoint.prune(ckpts, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-3"] and (ckpts / "step-2.damaged").is_dir()
    checkpoint.prune(ckpts, keep_last=1)  # a verified one is never quarantined, the damaged one never deleted
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-3"] and (ckpts / "step-2.damaged").is_dir()


def test_run_folders_move_together_and_work_from_any_directory(tmp_path):
    """An AR prior names its tokenizer run, a fine-tuned run its init_from: both stored relative to the run."""
    home = tmp_path / "a"
    home.mkdir()
    recipe, args = overrides("vqgan", 2, 2)
    assert run_cli("train", recipe, *args, "--out", "runs/vq", cwd=home).returncode == 0
    recipe, args = overrides("ar_prior", 2, 2, stage=Path("runs/vq"))  # relative to the working directory
    r = run_cli("train", recipe, *args, "--out", "runs/prior", cwd=home)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", recipe, *args, "model.init_from=runs/prior", "--out", "runs/tuned", cwd=home)
    assert r.returncode == 0, r.stderr
    assert config(home / "runs" / "prior")["model"]["tokenizer"] == "../vq"
    assert config(home / "runs" / "tuned")["model"]["init_from"] == "../prior"
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(str(home), moved)
    other = tmp_path / "other"
    other.mkdir()
    for run in ("prior", "tuned"):
        r = run_cli("sample", str(moved / "runs" / run), "--n", "2", "--out", f"{run}.png", cwd=other)
        assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(moved / "runs" / "tuned"), "train.steps=3", cwd=other)
    assert r.returncode == 0, r.stderr
    assert config(moved / "runs" / "tuned")["model"]["tokenizer"] == "../vq"


def test_ldm_first_stage_takes_its_own_overrides_and_says_what_it_trains(tmp_path):
    recipe, args = overrides("ldm", 2, 2, stage=Path("unused"))
    args = [a for a in args if not a.startswith("model.first_stage=")]
    r = run_cli("train", recipe, *args, "first_stage.train.steps=3", "first_stage.model.channels=[8,16]",
                "first_stage.model.latent_channels=2", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "first_stage: training autoencoder_kl_digits (autoencoder_kl, 3 steps" in r.stdout
    stage = config(tmp_path / "run" / "first_stage")
    assert stage["train"]["steps"] == 3 and stage["model"]["channels"] == [8, 16]
    assert config(tmp_path / "run")["model"]["first_stage"] == "first_stage"  # relative: moves with the run
    r = run_cli("train", recipe, *args, "firststage.train.steps=3", "--out", "run2", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'first_stage'?" in r.stderr
    assert not (tmp_path / "run2").exists()
    family = genkit.load(tmp_path / "run")
    assert torch.isfinite(family.decode_latents(torch.zeros(1, *family.latent_shape))).all()


def test_resuming_with_the_recipe_keeps_what_the_run_decided(tmp_path):
    """An LDM recipe leaves model.first_stage and model.scale_factor null; the run decided them, and a resume
    with that same recipe keeps them rather than calling the difference a change."""
    recipe, args = overrides("ldm", 2, 2, stage=Path("unused"))
    args = [a for a in args if not a.startswith("model.first_stage=")]
    stage = ["first_stage.train.steps=2", "first_stage.model.channels=[8,16]", "first_stage.model.latent_channels=2"]
    assert run_cli("train", recipe, *args, *stage, "--out", "run", cwd=tmp_path).returncode == 0
    before = config(tmp_path / "run")["model"]
    r = run_cli("train", recipe, *args, *stage, "train.steps=3", "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    after = config(tmp_path / "run")["model"]
    assert after["scale_factor"] == before["scale_factor"] is not None and after["first_stage"] == "first_stage"
    assert resumes(tmp_path / "run")[0]["changed"] == {"train.steps": [2, 3]}
