"""Tiny, fast training recipes per family for the reliability suite: a shipped digits recipe
plus overrides that shrink it to seconds. Every family in FAMILIES must have one here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from genkit.io import load_tensors

TINY_UNET = ["model.unet.channels=[8,16]", "model.unet.attention=[false,true]",
             "model.unet.layers_per_block=1", "model.unet.norm_groups=4"]
COMMON = ["data.image_size=8", "data.batch_size=8", "train.sample_every=0", "train.log_every=1",
          "train.keep_last=100", "train.lr_schedule=constant", "train.warmup=2", "sample.n=4"]

# family -> (shipped recipe, overrides); the runs are deterministic on CPU
FAMILY_RUNS: dict[str, tuple[str, list[str]]] = {
    "ddpm": ("ddpm_digits", [*TINY_UNET, *COMMON, "data.hflip=true", "model.unet.dropout=0.1",
                             "model.timesteps=50", "sample.steps=2"]),
    "rectified_flow": ("rf_digits", [*TINY_UNET, *COMMON, "model.time_sampling=logit_normal", "sample.steps=2"]),
    # lognormal sigma and the noise both drawn from the global-batch stream
    "edm": ("edm_digits", [*TINY_UNET, *COMMON, "sample.steps=2"]),
    # iCT's curriculum doubles N every 2 steps, so a resume lands on another discretisation
    "consistency": ("cm_digits", [*TINY_UNET, *COMMON, "model.total_steps=16", "sample.steps=2"]),
    # the loss takes a JVP through the UNet (with its attention level)
    "meanflow": ("meanflow_digits", [*TINY_UNET, *COMMON, "sample.steps=2"]),
    # n_critic 3 so a kill often falls inside a critic cycle; EMA of G on
    "gan": ("wgan_gp_digits", [*COMMON, "model.generator.channels=[16]", "model.critic.channels=[16]",
                               "model.latent_dim=8", "model.n_critic=3", "train.ema_decay=0.9"]),
    # flows: data-dependent ActNorm init happens at setup; a resume must not redo it
    "nice": ("nice_digits", [*COMMON, "model.hidden=16", "model.hidden_layers=1"]),
    "glow": ("glow_digits", [*COMMON, "model.levels=2", "model.steps=2", "model.hidden=8"]),
    # the discriminator starts at step 4, so kills land before and after it; the EMA codebook is a buffer
    "vqgan": ("vqgan_digits", [*COMMON, "model.f=2", "model.channels=[8,16]", "model.norm_groups=4",
                               "model.quantizer.num_codes=16", "model.quantizer.dim=8", "model.disc_channels=8",
                               "model.disc_layers=1", "model.disc_start=4"]),
    "ar_prior": ("ar_prior_digits", [*COMMON, "model.tokenizer={vqgan}", "model.gpt.layers=1",
                                     "model.gpt.dim=16", "model.gpt.heads=2"]),
    "autoencoder_kl": ("autoencoder_kl_digits", [*COMMON, "model.channels=[16,32]", "model.latent_channels=2"]),
    "ldm": ("ldm_digits_text", [*COMMON, "model.first_stage={autoencoder_kl}", "model.unet.channels=[16,32]",
                                "model.unet.cross_attention=[false,true]", "model.unet.head_dim=16",
                                "model.text.width=16", "model.text.heads=2", "model.text.layers=1",
                                "model.text.context_length=8", "sample.steps=2"]),
}
STAGES = {"ar_prior": "vqgan", "ldm": "autoencoder_kl"}  # family -> the family of the frozen run it needs
ROOT = Path(__file__).resolve().parents[2]


def overrides(family: str, steps: int, checkpoint_every: int = 2, *extra: str,
              stage: Path | None = None) -> tuple[str, list[str]]:
    """(recipe, overrides) of the family's tiny run; `stage` fills in the frozen run it needs (STAGES)."""
    recipe, base = FAMILY_RUNS[family]
    if family in STAGES:
        base = [a.replace("{" + STAGES[family] + "}", str(stage)) for a in base]
    return recipe, [*base, f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}", *extra]


def tiny_stage(family: str, out: Path) -> Path:
    """A tiny run of `family` (a tokenizer or first stage that another family loads frozen)."""
    import genkit
    from genkit.runs import load_recipe

    if not (out / "model").exists():
        recipe, args = overrides(family, 4)
        genkit.train(load_recipe(recipe, args), out=out)
    return out


def train_command(family: str, out: Path, steps: int, *extra: str, resume: bool = False,
                  stage: Path | None = None) -> list[str]:
    recipe, args = overrides(family, steps, 2, *extra, stage=stage)
    return [sys.executable, "-m", "genkit", "train", recipe, *args, "--out", str(out),
            *(["--resume"] if resume else [])]


def start(cmd: list[str]) -> subprocess.Popen:
    """A training subprocess on one thread (the machine has 2 cores and pytest uses one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return max((json.loads(line)["step"] for line in lines), default=0)
    except ValueError:  # a line being written
        return 0


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while logged_steps(run) < step:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training exited early ({proc.returncode}): {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} logged within {timeout} s")
        time.sleep(0.02)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def assert_same_model(a: Path, b: Path) -> None:
    """Bitwise-equal final weights (nets and EMA) of two run folders."""
    wa, wb = (load_tensors(r / "model" / "weights.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
