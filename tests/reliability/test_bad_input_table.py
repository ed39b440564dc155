"""Over a hundred bad inputs across every command, table-driven: each ends with exit code 2, one line on
stderr that names the offending key, file or value, no traceback (`run_cli` runs the CLI in this process,
so any other exception fails the test with its traceback), and no file left behind in the working folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_UNET, run_cli
from PIL import Image

from genkit.interop import export_diffusers

TINY = [*TINY_UNET, "data.image_size=8", "data.batch_size=8", "model.timesteps=50", "train.sample_every=0",
        "train.steps=1", "sample.steps=2", "sample.n=2"]
GAN = ["data.image_size=8", "data.batch_size=8", "model.generator.channels=[16]", "model.critic.channels=[16]",
       "model.latent_dim=8", "train.steps=1", "train.sample_every=0", "sample.n=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ddpm_run) -> dict[str, str]:
    """The files and folders the table refers to by name: runs (good and broken), data, a diffusers folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    r = run_cli("train", "wgan_gp_digits", *GAN, "--out", str(root / "gan"), cwd=root)
    assert r.returncode == 0, r.stderr
    paths = {"RUN": ddpm_run, "GAN": root / "gan", "FILE": root / "a_file.txt", "DIR": root / "a_dir",
             "EMPTY": root / "empty_dir", "PAIRS": root / "pairs"}
    paths["FILE"].write_text("not a recipe\n")
    paths["DIR"].mkdir()
    (paths["DIR"] / "keep.txt").write_text("x")
    paths["EMPTY"].mkdir()
    for name, damage in {"BADCFG": ("config.yaml", b"model: [unclosed"), "NOCFG": ("config.yaml", None),
                         "BADW": ("model/weights.safetensors", b"truncated"),
                         "BADJSON": ("model/genkit.json", b"{not json"),
                         "BADSHAPE": ("model/genkit.json", b'{"shape": "8x8"}')}.items():
        shutil.copytree(ddpm_run, root / name)
        target = root / name / damage[0]
        target.unlink() if damage[1] is None else target.write_bytes(damage[1])
        paths[name] = root / name
    np.savez(root / "unit.npz", images=np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32))
    np.savez(root / "wide.npz", images=np.full((4, 1, 8, 8), 3.0, dtype=np.float32))
    np.savez(root / "flat.npz", images=np.zeros((4, 8, 8), dtype=np.uint8))
    np.savez(root / "nokey.npz", pictures=np.zeros((4, 1, 8, 8), dtype=np.uint8))
    nan = np.zeros((4, 1, 8, 8), dtype=np.float32)
    nan[0, 0, 0, 0] = np.nan
    np.savez(root / "nan.npz", images=nan)
    mixed = root / "mixed_sizes"
    mixed.mkdir()
    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("L", (9, 9)).save(mixed / "b.png")
    (root / "prompts_empty.txt").write_text("\n\n")
    diffusers = export_diffusers(ddpm_run, root / "hf")
    for name, change in {"HF_CHANNELS": {"block_out_channels": [8, 16, 32]},
                         "HF_TYPE": {"layers_per_block": "two"},
                         "HF_CLASS": {"_class_name": "UNet2DConditionModel"}}.items():
        shutil.copytree(diffusers, root / name)
        config_path = root / name / "unet" / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
        paths[name] = root / name
    shutil.copytree(diffusers, root / "HF_PICKLE")
    (root / "HF_PICKLE" / "unet" / "diffusion_pytorch_model.safetensors").rename(
        root / "HF_PICKLE" / "unet" / "diffusion_pytorch_model.bin")
    paths.update(HF=diffusers, HF_PICKLE=root / "HF_PICKLE", ROOT=root)
    return {k: str(v) for k, v in paths.items()}


# (argv, text the one-line error must contain). {NAME} are the `world` paths; {TMP} is the test's own folder.
CASES = [
    # -- train: recipes and overrides ----------------------------------------------------------------------
    (["train", "no_such_recipe"], "recipe not found: 'no_such_recipe'"),
    (["train", "ddpm_digit"], "did you mean 'ddpm_digits'?"),
    (["train", "{FILE}"], "recipe must be a mapping"),
    (["train", "ddpm_digits", "train.stpes=3"], "override 'train.stpes=3': unknown key 'train.stpes'"),
    (["train", "ddpm_digits", "trian.steps=3"], "override 'trian.steps=3': unknown key 'trian.steps'"),
    (["train", "ddpm_digits", "train.steps=abc"], "override 'train.steps=abc': train.steps: expected int"),
    (["train", "ddpm_digits", "train.steps=2.5"], "train.steps: expected int, got float 2.5"),
    (["train", "ddpm_digits", "train.steps=true"], "train.steps: expected int, got bool True"),
    (["train", "ddpm_digits", "train.steps=0"], "train.steps: must be >= 1"),
    (["train", "ddpm_digits", "train.grad_accum=0"], "train.grad_accum: must be >= 1"),
    (["train", "ddpm_digits", "train.checkpoint_every=0"], "train.checkpoint_every: must be >= 1"),
    (["train", "ddpm_digits", "train.keep_last=0"], "train.keep_last: must be >= 1"),
    (["train", "ddpm_digits", "train.log_every=0"], "train.log_every: must be >= 1"),
    (["train", "ddpm_digits", "train.sample_every=-1"], "train.sample_every: must be >= 0"),
    (["train", "ddpm_digits", "train.ema_decay=1"], "train.ema_decay: must be in [0, 1)"),
    (["train", "ddpm_digits", "train.clip_grad=0"], "train.clip_grad: must be > 0"),
    (["train", "ddpm_digits", "train.precision=fp32"], "train.precision: expected one of"),
    (["train", "ddpm_digits", "train.lr_schedule=step"], "train.lr_schedule: expected one of"),
    (["train", "ddpm_digits", "train.on_nan=ignore"], "train.on_nan: expected one of"),
    (["train", "ddpm_digits", "optim.model.lr=0"], "optim.model.lr: must be > 0"),
    (["train", "ddpm_digits", "optim.model.lr=-1e-3"], "optim.model.lr: must be > 0"),
    (["train", "ddpm_digits", "optim.model.betas=[0.9]"], "optim.model.betas: expected a list of 2 items"),
    (["train", "ddpm_digits", "optim.model.betas=[0.9,1.5]"], "optim.model.betas: must be in [0, 1)"),
    (["train", "ddpm_digits", "optim.model.name=lion"], "optim.model.name: expected one of"),
    (["train", "ddpm_digits", "optim.model.weight_decay=-1"], "optim.model.weight_decay: must be >= 0"),
    (["train", "ddpm_digits", *TINY, "optim.G.lr=1e-3", "--out", "{TMP}/o"], "optim.G: family 'ddpm' has no"),
    (["train", "ddpm_digits", "data.batch_size=0"], "data.batch_size: must be >= 1"),
    (["train", "ddpm_digits", "data.image_size=2"], "data.image_size: must be >= 4"),
    (["train", "ddpm_digits", "data.num_workers=-1"], "data.num_workers: must be >= 0"),
    (["train", "ddpm_digits", "data.hflip=1"], "data.hflip: expected bool"),
    (["train", "ddpm_digits", "data.on_error=ignore"], "data.on_error: expected one of"),
    (["train", "ddpm_digits", "sample.n=0"], "sample.n: must be >= 1"),
    (["train", "ddpm_digits", "sample.steps=0"], "sample.steps: must be >= 1 or null"),
    (["train", "ddpm_digits", "eval.n=1"], "eval.n: must be >= 2"),
    (["train", "ddpm_digits", "model.family=diffusion"], "unknown family 'diffusion'"),
    (["train", "ddpm_digits", "model.family=gan"], "override 'model.family=gan': unknown key 'model.schedule'"),
    (["train", "ddpm_digits", "model.prediction=noise"], "model.prediction: expected one of"),
    (["train", "ddpm_digits", "model.unet.channels=[8,16"], "override 'model.unet.channels=[8,16': invalid YAML"),
    (["train", "ddpm_digits", "model.unet"], "must look like key.sub=value"),
    (["train", "ddpm_digits", "=3"], "must look like key.sub=value"),
    (["train", "ddpm_digits", "train=3"], "section 'train' must be a mapping"),
    # -- train: model and data that fail when built --------------------------------------------------------
    (["train", "ddpm_digits", *TINY, "model.unet.channels=[]", "--out", "{TMP}/o"], "model.unet.channels: give at least"),
    (["train", "ddpm_digits", *TINY, "model.unet.channels=[8,10]", "--out", "{TMP}/o"], "not divisible by"),
    (["train", "ddpm_digits", *TINY, "model.unet.attention=[true]", "--out", "{TMP}/o"], "model.unet.attention has 1"),
    (["train", "ddpm_digits", *TINY, "data.image_size=5", "--out", "{TMP}/o"], "data.image_size=5 does not fit"),
    (["train", "ddpm_digits", *TINY, "model.class_cond=true", "data.source=photos", "--out", "{TMP}/o"],
     "model.class_cond"),
    (["train", "ddpm_digits", *TINY, "data.source=imagenet", "--out", "{TMP}/o"], "data.source: unknown source"),
    (["train", "ddpm_digits", *TINY, "data.source=folder", "--out", "{TMP}/o"], "data.root is not set"),
    (["train", "ddpm_digits", *TINY, "data.source=folder", "data.root={TMP}/nowhere", "--out", "{TMP}/o"],
     "does not exist"),
    (["train", "ddpm_digits", *TINY, "data.source=folder", "data.root={EMPTY}", "--out", "{TMP}/o"], "no images found"),
    (["train", "ddpm_digits", *TINY, "data.source=cifar10", "data.root={EMPTY}", "--out", "{TMP}/o"],
     "CIFAR-10 not found"),
    (["train", "ddpm_digits", *TINY, "data.source=pairs", "--out", "{TMP}/o"], "data.root: data.source=pairs"),
    (["train", "ddpm_digits", *TINY, "data.channels=3", "--out", "{TMP}/o"], "data.channels: digits images have 1"),
    (["train", "ddpm_digits", *TINY, "data.batch_size=5000", "--out", "{TMP}/o"], "fewer than one global batch"),
    (["train", "ar_prior_digits", "model.tokenizer=null", "--out", "{TMP}/o"], "model.tokenizer: required"),
    (["train", "ar_prior_digits", "model.tokenizer={TMP}/nowhere", "--out", "{TMP}/o"], "model.tokenizer: run folder"),
    (["train", "ar_prior_digits", "model.tokenizer={RUN}", "--out", "{TMP}/o"], "is a ddpm run, not a tokenizer"),
    (["train", "ldm_digits_text", "model.first_stage={RUN}", "--out", "{TMP}/o"], "is a ddpm run, not an autoencoder"),
    (["train", "ldm_digits_text", "first_stage.train.stpes=3", "--out", "{TMP}/o"], "train.stpes"),
    (["train", "ldm_digits_text", "firststage.train.steps=3"], "did you mean 'first_stage'?"),
    (["train", "ddpm_digits", "first_stage.train.steps=3"], "unknown key 'first_stage.train.steps'"),
    (["train", "ddpm_digits", *TINY, "model.init_from={TMP}/nowhere", "--out", "{TMP}/o"], "model.init_from"),
    (["train", "ddpm_digits", *TINY, "model.init_from={GAN}", "--out", "{TMP}/o"], "model.init_from"),
    # -- train: run folders and resume ---------------------------------------------------------------------
    (["train", "ddpm_digits", *TINY, "--out", "{FILE}"], "is a file"),
    (["train", "ddpm_digits", *TINY, "--out", "{RUN}"], "already holds a run"),
    (["train", "--resume"], "give the run folder to resume"),
    (["train"], "give a recipe to train"),
    (["train", "--resume", "{TMP}/nowhere"], "does not exist"),
    (["train", "--resume", "{DIR}"], "holds no run"),
    (["train", "--resume", "{RUN}", "optim.model.lr=5e-4"], "optim.model.lr: 0.001 -> 0.0005"),
    (["train", "--resume", "{RUN}", "model.unet.channels=[8,8]"], "model.unet.channels: [8, 16] -> [8, 8]"),
    (["train", "--resume", "{RUN}", "data.image_size=8"], "data.image_size: 16 -> 8"),
    (["train", "--resume", "{BADCFG}"], "BADCFG/config.yaml"),
    (["train", "ddpm_digits", "--out", "{TMP}/a", "--resume", "{TMP}/b"], "name different run folders"),
    (["train", "ddpm_digits", "--bogus"], "unrecognized arguments: --bogus"),
    # -- sample ------------------------------------------------------------------------------------------
    (["sample", "{RUN}", "--sampler", "warp"], "unknown sampler 'warp'"),
    (["sample", "{RUN}", "--sampler", "direct"], "sampler 'direct' does not fit family 'ddpm'"),
    (["sample", "{GAN}", "--sampler", "ddim"], "sampler 'ddim' does not fit family 'gan'"),
    (["sample", "{RUN}", "--steps", "0"], "--steps: must be >= 1"),
    (["sample", "{RUN}", "--steps", "two"], "expected a positive integer, got 'two'"),
    (["sample", "{RUN}", "--n", "0"], "--n: must be >= 1"),
    (["sample", "{RUN}", "--eta", "nan"], "--eta: expected a finite number"),
    (["sample", "{RUN}", "--eta", "x"], "--eta: expected a number, got 'x'"),
    (["sample", "{RUN}", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["sample", "{RUN}", "--device", "cuda:7"], "--device 'cuda:7'"),
    (["sample", "{RUN}", "--device", "toaster"], "--device 'toaster': not a device"),
    (["sample", "{RUN}", "--precision", "int8"], "invalid choice: 'int8'"),
    (["sample", "{RUN}", "--compile-mode", "fastest"], "compile must be true, false or one of"),
    (["sample", "{RUN}", "--schedule", "cosine"], "unknown sigma grid 'cosine'; known: karras, logsnr, time-uniform, family"),
    (["sample", "{GAN}", "--schedule", "karras"], "--schedule"),
    (["sample", "{RUN}", "--sampler", "rk45", "--steps", "10"], "sampler 'rk45' chooses its own steps"),
    (["sample", "{GAN}", "--steps", "10"], "--steps"),
    (["sample", "{RUN}", "--prompt", "a seven"], "takes no text prompts"),
    (["sample", "{GAN}", "--prompt", "a seven"], "prompts"),
    (["sample", "{RUN}", "--class", "3"], "is unconditional"),
    (["sample", "{RUN}", "--class", "-1"], "expected comma-separated class labels >= 0"),
    (["sample", "{RUN}", "--guidance", "3"], "guidance=3.0 needs a conditional family"),
    (["sample", "{RUN}", "--temperature", "0.7"], "has no option 'temperature'"),
    (["sample", "{RUN}", "--top-k", "4"], "has no option 'top_k'"),
    (["sample", "{GAN}", "--eta", "0.5"], "has no option 'eta'"),
    (["sample", "{RUN}", "--prompt", "a", "--prompts", "{FILE}"], "give --prompt or --prompts, not both"),
    (["sample", "{RUN}", "--prompts", "{TMP}/nowhere.txt"], "--prompts: cannot read"),
    (["sample", "{RUN}", "--prompts", "{ROOT}/prompts_empty.txt"], "holds no prompts"),
    (["sample", "{TMP}/nowhere"], "not a genkit run folder"),
    (["sample", "{DIR}"], "not a genkit run folder"),
    (["sample", "{NOCFG}"], "not a genkit run folder"),
    (["sample", "{BADCFG}"], "config.yaml' is not valid YAML"),
    (["sample", "{BADW}"], "weights.safetensors' is not a readable safetensors file"),
    (["sample", "{BADJSON}"], "genkit.json' is not readable JSON"),
    (["sample", "{BADSHAPE}"], "has no valid \"shape\""),
    (["sample", "{RUN}", "--out", "{DIR}"], "is a folder"),
    (["sample", "{RUN}", "--save-npz", "{DIR}", "--out", "{TMP}/g.png"], "is a folder"),
    (["sample", "{HF_CHANNELS}"], "unet/config.json"),
    (["sample", "{HF_TYPE}"], "unet/config.json"),
    (["sample", "{HF_CLASS}"], "_class_name='UNet2DConditionModel' is not supported"),
    (["sample", "{HF_PICKLE}"], "genkit never loads pickled weights"),
    # -- eval ------------------------------------------------------------------------------------------
    (["eval", "fid", "--fake", "{RUN}"], "the following arguments are required: --real"),
    (["eval", "fid", "--real", "{TMP}/nowhere", "--fake", "recipe:ddpm_digits", "--features", "digits"], "nowhere"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{RUN}", "--features", "digits"], "--n"),
    (["eval", "fid", "--real", "recipe:nosuch", "--fake", "{RUN}", "--features", "digits"], "'nosuch'"),
    (["eval", "fid", "--real", "recipe:ddpm_digits:valid", "--fake", "{RUN}", "--features", "digits"], "'valid'"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{RUN}", "--features", "vgg"], "vgg"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{RUN}", "--protocol", "torchvision"], "torchvision"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/unit.npz", "--features", "digits"],
     "the [0, 1] convention?"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/wide.npz", "--features", "digits"],
     "must lie in [-1, 1]"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/flat.npz", "--features", "digits"],
     "images must be (N, C, H, W)"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/nokey.npz", "--features", "digits"],
     "has no array 'images'"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/nan.npz", "--features", "digits"], "NaN"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{ROOT}/mixed_sizes", "--features", "digits"],
     "evaluation needs one size"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "{RUN}", "--features", "digits", "--n", "4",
      "--device", "toaster"], "--device 'toaster'"),
    (["eval", "fid", "--real", "recipe:ddpm_digits", "--fake", "recipe:ddpm_digits:test", "--features",
      "inception", "--weights", "{TMP}/nowhere.pth"], "nowhere.pth"),
    (["eval", "kid", "--real", "{ROOT}/nan.npz", "--fake", "recipe:ddpm_digits", "--features", "digits"], "NaN"),
    (["eval", "is", "--fake", "recipe:ddpm_digits", "--features", "dinov2"], "dinov2"),
    (["eval", "bpd", "{GAN}", "--n", "2"], "has no likelihood"),
    (["eval", "bpd", "{RUN}", "--divergence", "approx"], "invalid choice: 'approx'"),
    (["eval", "recon", "{RUN}", "--n", "2"], "eval recon needs a tokenizer run"),
    (["eval", "straightness", "{RUN}", "--n", "2"], "has no straightness"),
    (["eval", "curve", "{RUN}", "--steps", "2,x", "--features", "digits"], "--steps: expected comma-separated"),
    (["eval", "curve", "{RUN}", "--samplers", "warp", "--features", "digits", "--n", "4"], "unknown sampler 'warp'"),
    (["eval", "stats", "recipe:ddpm_digits", "--features", "digits", "--out", "{DIR}"], "is a folder"),
    (["eval", "w1", "--real", "recipe:ddpm_digits", "--fake", "recipe:ddpm_digits", "--critic-steps", "0"],
     "--critic-steps: must be >= 1"),
    (["eval", "mmd", "--real", "a", "--fake", "b"], "invalid choice: 'mmd'"),
    # -- export, import, reflow ---------------------------------------------------------------------------
    (["export", "{RUN}", "--format", "diffusers", "--out", "."], "is the working directory"),
    (["export", "{RUN}", "--format", "diffusers", "--out", "{DIR}"], "already exists"),
    (["export", "{GAN}", "--format", "diffusers", "--out", "{TMP}/x"], "has no diffusers export"),
    (["export", "{RUN}", "--format", "onnx", "--out", "{TMP}/x"], "invalid choice: 'onnx'"),
    (["export", "{TMP}/nowhere", "--format", "diffusers", "--out", "{TMP}/x"], "not a genkit run folder"),
    (["import-diffusers", "{TMP}/nowhere", "--out", "{TMP}/x"], "not found"),
    (["import-diffusers", "{HF_CHANNELS}", "--out", "{TMP}/x"], "unet/config.json"),
    (["import-diffusers", "{HF_TYPE}", "--out", "{TMP}/x"], "unet/config.json"),
    (["import-diffusers", "{HF}", "--out", "{DIR}"], "already exists"),
    (["reflow", "{RUN}", "--pairs", "2", "--out", "{TMP}/p"], "is a ddpm run: reflow pairs"),
    (["reflow", "{RUN}", "--pairs", "0", "--out", "{TMP}/p"], "--pairs: must be >= 1"),
    (["reflow", "{TMP}/nowhere", "--pairs", "2", "--out", "{TMP}/p"], "not a genkit run folder"),
    (["recipes", "extra"], "unrecognized arguments: extra"),
    (["fly"], "invalid choice: 'fly'"),
]


def fill(argv: list[str], world: dict[str, str], tmp: Path) -> list[str]:
    return [a.format(TMP=tmp, **world) for a in argv]


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, needle, world, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(Path(world["ROOT"]).rglob("*"))
    r = run_cli(*fill(argv, world, tmp_path), cwd=cwd)
    assert r.returncode == 2, (r.returncode, r.stderr, r.stdout[-500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert fill([needle], world, tmp_path)[0] in lines[0], lines[0]
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())                      # nothing in the working folder
    assert sorted(p for p in tmp_path.iterdir() if p != cwd) == [], sorted(tmp_path.iterdir())  # nor at --out
    assert sorted(Path(world["ROOT"]).rglob("*")) == before                    # the inputs untouched


def test_the_table_covers_every_command_with_over_a_hundred_inputs():
    commands = {argv[0] for argv, _ in CASES}
    assert len(CASES) >= 100
    assert {"train", "sample", "eval", "export", "import-diffusers", "reflow", "recipes"} <= commands
