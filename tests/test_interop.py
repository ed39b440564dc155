"""diffusers interop: exported runs sample in diffusers exactly as in genkit; diffusers folders import."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY_UNET
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

import genkit
from genkit.cli import main
from genkit.errors import ConfigError, RunError
from genkit.families.ddpm import make_betas
from genkit.families.rectified_flow import RectifiedFlowConfig
from genkit.interop import EXPORTERS, export_diffusers, flow_match_scheduler, import_diffusers, load_diffusers
from genkit.io import load_tensors
from genkit.samplers.ddim import sample_ddim

TINY = [*TINY_UNET, "data.image_size=8", "data.batch_size=8", "train.steps=3", "train.warmup=0",
        "train.ema_decay=0.5", "sample.n=2", "sample.steps=2", "train.log_every=1"]
DDPM_RUNS = {  # two genkit DDPM configurations that exercise every mapped scheduler key
    "cosine-eps-clip-trailing": ["model.timesteps=50", "model.schedule=cosine", "model.prediction=epsilon",
                                 "model.clip_sample=true", "model.spacing=trailing"],
    "scaled-v-leading": ["model.timesteps=100", "model.schedule=scaled_linear", "model.beta_start=0.0008",
                         "model.beta_end=0.03", "model.prediction=v", "model.clip_sample=false",
                         "model.spacing=leading"],
}
F32 = dict(rtol=1e-4, atol=1e-4)  # float32 diffusers tables vs genkit's float64 ones, a few dozen steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs (3 steps on digits at 8x8, EMA 0.5 so EMA and raw weights differ)."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: genkit.train("ddpm_digits", overrides=[*TINY, *o], out=root / name) for name, o in DDPM_RUNS.items()}
    out["rf"] = genkit.train("rf_digits", overrides=[*TINY, "model.shift=2.0"], out=root / "rf")
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    return {name: export_diffusers(run, root / name) for name, run in runs.items()}


def pipeline_images(pipe, n: int, seed: int, **kwargs) -> torch.Tensor:
    """A diffusers pipeline's images mapped back to [-1, 1], (n, C, H, W)."""
    images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    return images * 2 - 1


# ---------------------------------------------------------------- export: DDPM


@pytest.mark.parametrize("steps", [None, 7])
@pytest.mark.parametrize("name", list(DDPM_RUNS))
def test_ddpm_pipeline_equals_genkit_ancestral(runs, exported, name, steps):
    """Same seed, same step count: DDPMPipeline reproduces genkit's ancestral sampler (T or 7 steps)."""
    family = genkit.load(runs[name], device="cpu")
    steps = steps or family.schedule.T
    ours = genkit.sample(family, 3, sampler="ancestral", steps=steps, seed=5)
    theirs = pipeline_images(DDPMPipeline.from_pretrained(exported[name]), 3, 5, num_inference_steps=steps)
    assert ours.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, **F32)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("name", list(DDPM_RUNS))
def test_ddim_pipeline_equals_genkit_ddim(runs, exported, name, eta):
    """DDIMPipeline (which rebuilds a DDIMScheduler from the exported config) == genkit ddim, 10 steps."""
    family = genkit.load(runs[name], device="cpu")
    pipe = DDIMPipeline.from_pretrained(exported[name])
    assert pipe.scheduler.config.set_alpha_to_one and pipe.scheduler.config.steps_offset == 0
    ours = genkit.sample(family, 3, sampler="ddim", steps=10, seed=1, eta=eta)
    theirs = pipeline_images(pipe, 3, 1, num_inference_steps=10, eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(ours, theirs, **F32)
    if family.cfg.clip_sample:  # the documented flag matters: diffusers' default takes the raw eps
        default = pipeline_images(pipe, 3, 1, num_inference_steps=10, eta=eta)
        assert (ours - default).abs().max() > 1e-2


def test_export_writes_ema_weights_as_safetensors_and_raw_on_request(runs, exported, tmp_path):
    run = runs["cosine-eps-clip-trailing"]
    folder = exported["cosine-eps-clip-trailing"]
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    assert "diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    unet = load_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    ema = {k.removeprefix("unet."): v for k, v in load_tensors(run / "model" / "weights.safetensors").items()}
    ckpt = next((run / "checkpoints").iterdir())
    raw = {k.removeprefix("unet."): v for k, v in load_tensors(ckpt / "nets.safetensors").items()}
    assert unet.keys() == ema.keys()
    assert all(torch.equal(unet[k], ema[k]) for k in unet)
    assert any(not torch.equal(unet[k], raw[k]) for k in unet)  # EMA 0.5 over 3 steps: not the raw weights
    assert json.loads((folder / "genkit_export.json").read_text())["weights"] == "ema"
    raw_folder = export_diffusers(run, tmp_path / "raw", weights="raw")
    raw_unet = load_tensors(raw_folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(raw_unet[k], raw[k]) for k in raw_unet)


def test_export_refusals_are_one_line(runs, exported, tmp_path, monkeypatch):
    run = runs["cosine-eps-clip-trailing"]
    with pytest.raises(RunError, match="already exists"):  # never overwrites a folder
        export_diffusers(run, exported["cosine-eps-clip-trailing"])
    with pytest.raises(ConfigError, match="'ema' or 'raw'"):
        export_diffusers(run, tmp_path / "x", weights="best")
    with pytest.raises(ConfigError, match="clip_sample=true"):
        flow_match_scheduler(RectifiedFlowConfig(clip_sample=True))
    monkeypatch.delitem(EXPORTERS, "ddpm")
    with pytest.raises(ConfigError, match="'ddpm' has no diffusers export; exportable: rectified_flow"):
        export_diffusers(run, tmp_path / "y")
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------- export: rectified flow


def flow_sigmas(t: torch.Tensor) -> torch.Tensor:
    """FlowMatch times t -> genkit sigmas t / (1 - t) (inf at t = 1)."""
    t = t.double()
    return torch.where(t >= 1, torch.full_like(t, float("inf")), t / (1 - t))


def test_rf_export_samples_with_flow_match_euler_like_genkit_ddim(runs, exported):
    """DDPMPipeline + FlowMatchEulerDiscreteScheduler == genkit's ddim on the scheduler's grid; on
    genkit's own uniform grid (set_timesteps(sigmas=...)) == genkit.sample(ddim, N) itself."""
    family = genkit.load(runs["rf"], device="cpu")
    pipe = DDPMPipeline.from_pretrained(exported["rf"])
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    N = 6
    theirs = pipeline_images(pipe, 3, 2, num_inference_steps=N)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = sample_ddim(family.denoise, noise, flow_sigmas(pipe.scheduler.sigmas)).clamp(-1, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    sched = pipe.scheduler
    sched.set_timesteps(sigmas=np.linspace(1, 1 / N, N))  # diffusers applies the shift, as genkit's grid
    torch.testing.assert_close(flow_sigmas(sched.sigmas), family.sigmas(N), rtol=1e-6, atol=0)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t).sample, t, x).prev_sample
    ref = genkit.sample(family, 3, sampler="ddim", steps=N, seed=2)
    torch.testing.assert_close(x.clamp(-1, 1), ref, rtol=1e-5, atol=1e-5)
    assert (ours - ref).abs().max() > 1e-3  # the two grids really differ


TRAINING_ONLY = ("loss_weighting", "snr_gamma")  # how the loss was weighted: not part of a diffusers folder


@pytest.mark.parametrize("name", ["scaled-v-leading", "rf"])
def test_exported_folder_loads_back_into_the_same_model(runs, exported, name, tmp_path):
    """export -> genkit.load(folder) and -> import_diffusers -> load: same config, same samples."""
    family = genkit.load(runs[name], device="cpu")
    direct = genkit.load(exported[name], device="cpu")
    imported = genkit.load(import_diffusers(exported[name], tmp_path / "run"), device="cpu")
    for other in (direct, imported):
        a, b = dict(vars(family.cfg)), dict(vars(other.cfg))
        for key in ("unet", *TRAINING_ONLY):
            a.pop(key, None), b.pop(key, None)
        assert a == b
        torch.testing.assert_close(genkit.sample(other, 2, sampler="heun", steps=4, seed=3),
                                   genkit.sample(family, 2, sampler="heun", steps=4, seed=3), rtol=0, atol=0)


# ---------------------------------------------------------------- import: a folder made by diffusers


def make_folder(path, scheduler, seed: int = 0, safe: bool = True):
    """A random small UNet2DModel (an architecture genkit's own UNetConfig cannot express) + scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_num_groups=4, attention_head_dim=4, flip_sin_to_cos=False,
                       freq_shift=1)
    with torch.no_grad():  # widen the untrained output so the parametrisation matters
        unet.conv_out.weight.mul_(4)
    unet.save_pretrained(path / "unet", safe_serialization=safe)
    scheduler.save_pretrained(path / "scheduler")
    return unet


SCHEDULES = [("scaled_linear", "v_prediction"), ("linear", "epsilon"), ("squaredcos_cap_v2", "sample")]


@pytest.mark.parametrize("beta_schedule,prediction", SCHEDULES)
def test_imported_denoiser_is_the_diffusers_unet_mapped_to_x0(tmp_path, beta_schedule, prediction):
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction,
                          beta_start=0.0008, beta_end=0.03, clip_sample=False)
    unet = make_folder(tmp_path, sched)
    family = load_diffusers(tmp_path, device="cpu")
    torch.testing.assert_close(family.schedule.betas.float(), sched.betas, rtol=1e-5, atol=1e-8)
    z = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0, 13, 57, 99):
            sigma = family.schedule.sigma_table[t].expand(2)
            ref = sched.step(unet(z, t).sample, t, z).pred_original_sample
            torch.testing.assert_close(family.denoise(z, sigma), ref, rtol=1e-4, atol=1e-4, msg=f"t={t}")


def test_imported_folder_samples_with_the_shared_samplers_and_ddim_matches_diffusers(tmp_path):
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", prediction_type="v_prediction",
                          beta_start=0.0008, beta_end=0.03, clip_sample=False, timestep_spacing="trailing")
    unet = make_folder(tmp_path / "hf", sched)
    family = genkit.load(tmp_path / "hf", device="cpu")
    run = genkit.load(import_diffusers(tmp_path / "hf", tmp_path / "run"), device="cpu")
    assert family.cfg.unet.diffusers["layers_per_block"] == 2 and family.sample_shape == (2, 8, 8)
    for sampler in ("ddim", "heun", "dpmpp-2m", "euler", "ancestral"):
        images = genkit.sample(family, 2, sampler=sampler, steps=5, seed=0)
        assert images.shape == (2, 2, 8, 8) and torch.isfinite(images).all() and images.std() > 0.05, sampler
        assert torch.equal(images, genkit.sample(run, 2, sampler=sampler, steps=5, seed=0)), sampler
    ddim = DDIMScheduler.from_config(sched.config)  # the diffusers DDIM loop on the original UNet
    ddim.set_timesteps(10)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(genkit.sample(family, 2, sampler="ddim", steps=10, seed=4), x.clamp(-1, 1), **F32)


BAD = [  # (scheduler class, config change, text the one-line error must contain)
    (DDPMScheduler, {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    (DDPMScheduler, {"prediction_type": "flow"}, "prediction_type='flow'"),
    (DDPMScheduler, {"thresholding": True}, "thresholding=True"),
    (DDPMScheduler, {"trained_betas": [0.1] * 100}, "trained_betas=[0.1"),
    (DDPMScheduler, {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    (DDPMScheduler, {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    (DDPMScheduler, {"timestep_spacing": "random"}, "timestep_spacing='random'"),
    (DDIMScheduler, {"steps_offset": 1}, "steps_offset=1"),
    (DDIMScheduler, {"set_alpha_to_one": False}, "set_alpha_to_one=False"),
    (DDPMScheduler, {"brand_new_key": 3}, "unknown scheduler key brand_new_key=3"),
    (DDPMScheduler, {"_class_name": "PNDMScheduler"}, "_class_name='PNDMScheduler'"),
    (FlowMatchEulerDiscreteScheduler, {"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    (FlowMatchEulerDiscreteScheduler, {"num_train_timesteps": 500}, "num_train_timesteps=500"),
]


@pytest.mark.parametrize("cls,change,message", BAD, ids=[m.split("=")[0] for _, _, m in BAD])
def test_unsupported_scheduler_configs_are_refused_naming_key_and_value(tmp_path, cls, change, message):
    make_folder(tmp_path, cls(num_train_timesteps=100) if cls is not FlowMatchEulerDiscreteScheduler else cls())
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ConfigError) as info:
        load_diffusers(tmp_path, device="cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unet_shape_problems_are_refused(tmp_path):
    make_folder(tmp_path, DDPMScheduler(num_train_timesteps=100))
    path = tmp_path / "unet" / "config.json"
    config = json.loads(path.read_text())
    for change, message in [({"out_channels": 4}, "learned-variance"), ({"sample_size": [8, 16]}, "square"),
                            ({"num_class_embeds": 10}, "class-conditional"), ({"not_an_arg": 1}, "not_an_arg")]:
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=message):
            load_diffusers(tmp_path, device="cpu")


def test_import_never_unpickles(tmp_path, monkeypatch):
    """Pickled (.bin) UNet weights are refused; a safetensors folder loads with pickle disabled."""
    make_folder(tmp_path / "bin", DDPMScheduler(num_train_timesteps=100), safe=False)
    with pytest.raises(RunError, match="diffusion_pytorch_model.bin: genkit never loads pickled weights"):
        load_diffusers(tmp_path / "bin", device="cpu")
    make_folder(tmp_path / "st", DDPMScheduler(num_train_timesteps=100))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    genkit.load(import_diffusers(tmp_path / "st", tmp_path / "run"), device="cpu")
    load_diffusers(tmp_path / "st", device="cpu")


def test_scaled_linear_betas_match_diffusers():
    for T in (50, 1000):
        ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).betas
        torch.testing.assert_close(make_betas("scaled_linear", T, 0.00085, 0.012).float(), ref, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(make_betas("linear", T, 0.00085, 0.012).float(), ref)


def test_cli_import_sample_and_export(tmp_path, capsys, runs):
    make_folder(tmp_path / "hf", DDPMScheduler(num_train_timesteps=100))
    assert main(["sample", str(tmp_path / "hf"), "--n", "2", "--steps", "3", "--sampler", "dpmpp-2m",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert main(["import-diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--steps", "3", "--out", str(tmp_path / "b.png")]) == 0
    assert main(["export", str(runs["rf"]), "--format", "diffusers", "--out", str(tmp_path / "rf")]) == 0
    assert (tmp_path / "rf" / "model_index.json").is_file()
    assert main(["import-diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"genkit import-diffusers: error: run folder '{tmp_path / 'run'}' already exists: "
                   f"choose another --out or remove it"]
