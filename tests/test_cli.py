"""The command line end to end: train on digits, sample a grid and an npz, clear errors.

Every command runs in this process through `genkit.cli.main` (`run_cli`); the one real
subprocess start is tests/test_docs.py's `python -m genkit --version`, and the kill/resume
suite's (tests/reliability).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import TINY_UNET, run_cli
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_train_writes_the_run_folder(ddpm_run):
    run = ddpm_run
    assert (run / "config.yaml").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-12"]
    assert {p.name for p in (run / "model").iterdir()} == {"weights.safetensors", "genkit.json"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-12.png", "step-6.png"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all({"loss", "images_per_s", "lr"} <= r.keys() for r in records)
    assert "train.steps" not in (run / "config.yaml").read_text()  # resolved YAML, nested keys
    assert "steps: 12" in (run / "config.yaml").read_text()


def test_sample_writes_grid_and_npz(ddpm_run, tmp_path):
    r = run_cli("sample", str(ddpm_run), "--sampler", "ddim", "--steps", "5", "--n", "10",
                "--out", "grid.png", "--save-npz", "s.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "NFE 5" in r.stdout
    assert Image.open(tmp_path / "grid.png").size[0] > 16
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (10, 1, 16, 16)
        assert int(z["nfe"]) == 5 and str(z["sampler"]) == "ddim"
        first = z["images"]
    r = run_cli("sample", str(ddpm_run), "--sampler", "ddim", "--steps", "5", "--n", "10",
                "--out", "grid2.png", "--save-npz", "s2.npz", cwd=tmp_path)
    with np.load(tmp_path / "s2.npz") as z:
        assert np.array_equal(z["images"], first)  # same seed, same images


def test_sample_defaults_to_the_runs_recipe_sample_section(ddpm_run, tmp_path):
    """`genkit sample RUN` uses the sampler, steps and options the run's recipe ships (measured for it), the
    command line wins, and the recipe's steps/options go with its sampler only."""
    def said(*argv: str) -> str:
        r = run_cli("sample", *argv, "--n", "4", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[-2]

    assert said(str(ddpm_run)).startswith("sampler dpmpp-2m, steps 5, NFE 5,")   # DDPM_RUN's sample.steps=5
    assert said(str(ddpm_run), "--steps", "3").startswith("sampler dpmpp-2m, steps 3, NFE 3,")
    assert said(str(ddpm_run), "--nfe", "4").startswith("sampler dpmpp-2m, steps 4, NFE 4,")
    assert said(str(ddpm_run), "--sampler", "ddim").startswith("sampler ddim, steps 20,")  # the family's default
    run = tmp_path / "eta_run"
    shutil.copytree(ddpm_run, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("sampler: dpmpp-2m", "sampler: ddim").replace("eta: 0.0", "eta: 1.0"))
    images = {}
    for name, extra in (("recipe", []), ("eta1", ["--sampler", "ddim", "--steps", "5", "--eta", "1"]),
                        ("eta0", ["--eta", "0"])):
        r = run_cli("sample", str(run), *extra, "--n", "4", "--save-npz", f"{name}.npz", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / f"{name}.npz") as z:
            images[name] = z["images"]
    assert np.array_equal(images["recipe"], images["eta1"])  # the recipe's eta 1.0 with its sampler
    assert not np.array_equal(images["recipe"], images["eta0"])  # --eta 0 overrides it


def test_sample_refuses_bad_arguments(ddpm_run, tmp_path):
    r = run_cli("sample", str(ddpm_run), "--sampler", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown sampler 'nope'" in r.stderr
    r = run_cli("sample", str(ddpm_run), "--steps", "0", cwd=tmp_path)
    assert r.returncode == 2 and "must be >= 1" in r.stderr
    r = run_cli("sample", str(tmp_path / "not-a-run"), cwd=tmp_path)
    assert r.returncode == 2 and "not a genkit run folder" in r.stderr


def test_existing_run_needs_resume_and_resume_extends(ddpm_run, tmp_path):
    run = tmp_path / "runs" / "ddpm_digits"
    shutil.copytree(ddpm_run, run)
    r = run_cli("train", "ddpm_digits", *TINY_UNET, cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_config_errors_are_one_line(tmp_path):
    r = run_cli("train", "ddpm_digits", "train.stpes=5", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown key 'train.stpes' (did you mean 'train.steps'?)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", "ddpm_digits", "train.steps=abc", cwd=tmp_path)
    assert r.returncode == 2 and "train.steps: expected int, got str 'abc'" in r.stderr
    r = run_cli("train", "no_such_recipe", cwd=tmp_path)
    assert r.returncode == 2 and "recipe not found" in r.stderr


def test_cifar_without_data_fails_at_once_with_where_to_put_it(tmp_path):
    r = run_cli("train", "ddpm_cifar", "data.root=" + str(tmp_path / "nothing"), cwd=tmp_path)
    assert r.returncode == 2
    assert "CIFAR-10 not found" in r.stderr and "data.download=true" in r.stderr
    assert not (tmp_path / "runs" / "ddpm_cifar" / "checkpoints").exists()


def test_recipes_lists_shipped_recipes(tmp_path):
    r = run_cli("recipes", cwd=tmp_path)
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert {"ddpm_digits", "ddpm_cifar"} <= set(names)


def test_help_explains_every_subcommand(tmp_path):
    for cmd in ("train", "sample", "recipes", "reflow", "export", "import-diffusers", "eval"):
        r = run_cli(cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "usage: genkit " + cmd in r.stdout
    assert "--save-npz" in run_cli("sample", "--help", cwd=tmp_path).stdout


def test_eval_fid_of_a_run_prints_json_with_the_protocol(ddpm_run, tmp_path):
    r = run_cli("eval", "fid", "--real", "recipe:ddpm_digits:test", "--fake", str(ddpm_run), "--features", "digits",
                "--n", "24", "--sampler", "ddim", "--steps", "3", "--json", "--out", "fid.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "fid.json").read_text())
    shipped = json.loads((ROOT / "genkit" / "assets" / "digits_classifier.json").read_text())
    assert out["protocol"]["weights_sha256"] == shipped["sha256"]
    assert out["n_real"] == out["n_fake"] == 24 and out["fd_digits"] > 0
    assert out["sampling"] == {"sampler": "ddim", "steps": 3}


def test_missing_inception_weights_is_a_clear_one_line_error(tmp_path, monkeypatch):
    for var, folder in (("GENKIT_WEIGHTS_DIR", "w"), ("TORCH_HOME", "t"), ("XDG_CACHE_HOME", "c")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    r = run_cli("eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "recipe:ddpm_digits:test", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "weights-inception-2015-12-05-6726825d.pth" in r.stderr and "GENKIT_WEIGHTS_DIR" in r.stderr


def test_eval_curve_and_bpd_of_a_run(ddpm_run, tmp_path):
    r = run_cli("eval", "curve", str(ddpm_run), "--samplers", "ddim,euler", "--steps", "2,3", "--n", "20",
                "--features", "digits", "--out", "curve", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "curve" / "curve.csv").read_text().splitlines()
    assert rows[0] == "sampler,steps,schedule,nfe,fd,seconds" and len(rows) == 5
    assert [row.split(",")[3] for row in rows[1:]] == ["2", "3", "2", "3"]  # NFE
    assert Image.open(tmp_path / "curve" / "curve.png").size[0] > 100
    r = run_cli("eval", "bpd", str(ddpm_run), "--n", "2", "--rtol", "1e-2", "--atol", "1e-2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the default: Hutchinson with 4 probes, with the standard error it brings
    assert (out["divergence"], out["probes"], out["n"]) == ("hutchinson", 4, 2)
    assert out["field"] == "unclipped probability-flow ODE" and out["bits_per_dim_se"] > 0
    assert 0 < out["bits_per_dim"] < 40  # 12 training steps, unclipped: ~23 bits/dim
    assert out["data"].endswith(":test") and out["subset"] == {"data": {"n": 2, "of": 297, "seed": 0}}


def test_sample_precision_bf16_is_close_to_fp32(ddpm_run, tmp_path):
    images = {}
    for precision in ("no", "bf16"):
        r = run_cli("sample", str(ddpm_run), "--sampler", "ddim", "--steps", "5", "--n", "8", "--precision", precision,
                    "--out", f"g-{precision}.png", "--save-npz", f"p-{precision}.npz", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / f"p-{precision}.npz") as z:
            images[precision] = z["images"].astype(np.float64)
    diff = np.abs(images["bf16"] - images["no"])
    assert 0 < diff.mean() < 2.0  # bf16 changes some pixels by a few of 255 levels, on average < 2
    bad = run_cli("sample", str(ddpm_run), "--precision", "int8", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'int8'" in bad.stderr


def test_eval_fid_of_two_statistics_files_needs_no_weights(tmp_path, monkeypatch):
    """The protocol comes from the files: no extractor is built, so nothing is looked up offline."""
    from genkit.eval.stats import RefStats, save_stats

    for var, folder in (("GENKIT_WEIGHTS_DIR", "w"), ("TORCH_HOME", "t"), ("XDG_CACHE_HOME", "c"),
                        ("HF_HOME", "h")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(var, str(tmp_path / folder))
    protocol = {"features": "inception", "protocol": "tf", "dim": 4, "weights_sha256": "6726825d" + "0" * 56,
                "resize": "bilinear (TF1-compatible, torch-fidelity) to 299x299"}
    save_stats(tmp_path / "a.npz", RefStats(np.zeros(4), np.eye(4), 10, protocol))
    save_stats(tmp_path / "b.npz", RefStats(np.ones(4), np.eye(4), 12, protocol))
    r = run_cli("eval", "fid", "--real", "a.npz", "--fake", "b.npz", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fid"] == 4.0 and out["protocol"] == protocol and (out["n_real"], out["n_fake"]) == (10, 12)
    save_stats(tmp_path / "c.npz", RefStats(np.ones(4), np.eye(4), 12, {**protocol, "protocol": "pytorch-fid"}))
    r = run_cli("eval", "fid", "--real", "a.npz", "--fake", "c.npz", cwd=tmp_path)
    assert r.returncode == 2 and "different protocols: protocol 'tf' vs 'pytorch-fid'" in r.stderr
    r = run_cli("eval", "fid", "--real", "a.npz", "--fake", "b.npz", "--features", "digits", cwd=tmp_path)
    assert r.returncode == 2 and "features 'inception' vs 'digits'" in r.stderr  # an extractor named: checked


def test_eval_kid_subset_options(tmp_path):
    args = ["eval", "kid", "--real", "recipe:ddpm_digits:test", "--fake", "recipe:ddpm_digits", "--n", "200",
            "--features", "digits", "--kid-subsets", "10"]
    r = run_cli(*args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["kid_subset_size"], out["kid_subsets"]) == (100, 10) and out["kid_std"] > 0
    assert out["subset"] == {"real": {"n": 200, "of": 297, "seed": 0}, "fake": {"n": 200, "of": 1500, "seed": 0}}
    r = run_cli(*args, "--kid-subset-size", "150", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["kid_subset_size"] == 150, r.stderr
    r = run_cli(*args, "--kid-subset-size", "201", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--kid-subset-size 201 is larger than the sets (n_real=200, n_fake=200)" in r.stderr
