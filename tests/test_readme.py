"""Every command in the README's code blocks runs, in order, on tiny settings: the README cannot drift.

Concrete commands run in one working folder through `genkit.cli.main`, with their training shrunk to
seconds (the tiny overrides of tests/reliability/tiny_runs.py appended) and image counts capped; the
few that need what an offline machine lacks (CIFAR-10 files, Inception statistics, your own image
folder) must fail with the one-line error that says so. Synopsis lines (with RUN, SPEC ... placeholders)
are checked against `--help`: every flag they show exists.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from tiny_runs import FAMILY_RUNS  # noqa: E402

from genkit.runs import load_recipe  # noqa: E402

STEPS = ["train.steps=2", "train.checkpoint_every=2"]
EXTRA = {"vqgan": ["model.quantizer.num_codes=32"]}  # the README samples its prior with --top-k 20
STAGE = ["first_stage.train.steps=2", "first_stage.data.batch_size=8", "first_stage.model.channels=[16,32]",
         "first_stage.model.latent_channels=2"]
# commands that need what this offline machine lacks: (text in the command, text of the expected error)
OFFLINE = [("cifar10_train.npz", "cifar10_train.npz"), ("ref_stats.npz", "ref_stats.npz"),
           ("/path/to/images", "does not exist")]
PLACEHOLDER = re.compile(r"\b(RECIPE|RUN_DIR|RUN|SPEC|DIR|NAME|N|B)\b")


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, continuations joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line.split("&& ")[-1])  # the Quickstart's install steps are .ci/run's business
    return lines


def tiny(argv: list[str]) -> list[str]:
    """A README command with its training shrunk to seconds and its image counts capped."""
    cmd = argv[0]
    if cmd == "train":
        family = load_recipe(argv[1]).model.family
        overrides = [o for o in FAMILY_RUNS[family][1] if not o.startswith(("model.tokenizer=", "model.first_stage="))]
        return [*argv, *overrides, *STEPS, *EXTRA.get(family, []), *(STAGE if family == "ldm" else [])]
    argv = ["16" if prev in ("--n", "--pairs") and int(a) > 16 else a for prev, a in zip(["", *argv], argv)]
    extra = {"sample": ["--n", "4"], "eval": ["--n", "8"]}.get(cmd, [])
    if "--n" in argv or argv[:2] in (["eval", "stats"], ["eval", "fid"]) and "runs/" not in " ".join(argv):
        extra = []
    if argv[:2] == ["eval", "w1"]:
        extra = ["--critic-steps", "20"]
    return [*argv, *extra]


def test_the_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) > 30 and sum(c.startswith("genkit train") for c in commands) >= 8


def test_synopsis_lines_use_only_flags_that_exist():
    for line in readme_commands():
        if not line.startswith("genkit ") or not PLACEHOLDER.search(line):
            continue
        argv = shlex.split(line)[1:]
        cmd = argv[:2] if argv[0] == "eval" else argv[:1]
        cmd = [c.split("|")[0] for c in cmd]  # eval fid|kid|is|prdc
        help_text = run_cli(*cmd, "--help").stdout
        for flag in re.findall(r"--[a-z][a-z-]*", line):
            assert flag in help_text, f"README: `{line}` shows {flag}, which `genkit {' '.join(cmd)}` lacks"


def test_python_m_benchmarks_names_exist():
    from benchmarks.__main__ import BENCHMARKS

    for line in readme_commands():
        if line.startswith("python -m benchmarks"):
            names = re.findall(r"\b[a-z]+\b", line.split("benchmarks", 1)[1].split("]")[0])
            assert set(names) <= set(BENCHMARKS), names


@pytest.mark.slow
def test_every_concrete_readme_command_runs_on_tiny_settings(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "genkit" / "recipes")
    (tmp_path / "prompts.txt").write_text("a handwritten digit seven\nthe number 3\n")
    ran = 0
    for line in readme_commands():
        if not line.startswith("genkit ") or PLACEHOLDER.search(line) or "|" in line:
            continue
        argv = tiny(shlex.split(line)[1:])
        r = run_cli(*argv, cwd=tmp_path)
        expected = [error for needle, error in OFFLINE if needle in line]
        if expected:
            assert r.returncode == 2 and expected[0] in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
                (line, r.stderr)
        else:
            assert r.returncode == 0, (line, argv, r.stderr[-2000:])
        ran += 1
    assert ran >= 25
