"""Shared test fixtures: one thread, the toy family, an in-process CLI and tiny runs built once per session."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

TINY_UNET = [
    "model.unet.channels=[8,16]", "model.unet.attention=[false,true]",
    "model.unet.layers_per_block=1", "model.unet.norm_groups=4",
]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and one thread is immune to OpenMP spin-waits
    when another process (a subprocess test, a parallel job) shares the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_family(monkeypatch):
    """Register the toy family under model.family=toy for one test."""
    from toy_family import Toy, ToyConfig

    from genkit.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "toy", (Toy, ToyConfig))
    return Toy


def seeded_build(build, seed: int = 0):
    """`build()` under torch's global seed `seed`, leaving the caller's RNG state as it was (tiny families)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | str | None = None) -> CliResult:
    """`genkit ARGS` in this process (`genkit.cli.main`), in `cwd`, with its exit code and output.

    An exception other than SystemExit propagates: the CLI turns every GenkitError into exit code
    2, so anything else reaching here is a traceback a user would have seen.
    """
    from genkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, --version and usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        os.chdir(previous)
    return CliResult(code, out.getvalue(), err.getvalue())


DDPM_RUN = [*TINY_UNET, "train.steps=12", "train.checkpoint_every=5", "train.sample_every=6",
            "train.log_every=4", "sample.steps=5", "sample.n=16", "data.batch_size=16"]


@pytest.fixture(scope="session")
def ddpm_run(tmp_path_factory) -> Path:
    """A tiny DDPM on the 16 px digits, trained 12 steps by `genkit train` (checkpoints at 5, 10, 12;
    grids at 6, 12; logs at 4, 8, 12). Shared by every test that needs a trained run: read it, never
    write into it (copy it first)."""
    cwd = tmp_path_factory.mktemp("ddpm_cli")
    r = run_cli("train", "ddpm_digits", *DDPM_RUN, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd / "runs" / "ddpm_digits"
