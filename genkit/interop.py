"""Interoperability with Hugging Face diffusers: runs export as pipeline folders, UNet folders import.

Export (`genkit export RUN --format diffusers --out DIR`)::

    DIR/model_index.json          DDPMPipeline: unet + scheduler
    DIR/unet/                     UNet2DModel config.json + diffusion_pytorch_model.safetensors
    DIR/scheduler/                scheduler_config.json: the family's noise process
    DIR/genkit_export.json        provenance: run, family, which weights, how to reproduce genkit

The weights are the run's EMA weights by default (`model/weights.safetensors` holds them), the
raw weights of its latest checkpoint with `weights="raw"`; always safetensors, and the folder
appears whole or not at all (`genkit.io.atomic_dir`). `EXPORTERS` maps a family name to the
function that builds its pipeline: a plain dict, so latent diffusion (issue 9: UNet + autoencoder
+ scheduler, text encoder documented) is one more line.

    ddpm            DDPMScheduler with genkit's betas, prediction type, clip_sample and timestep
                    spacing, and set_alpha_to_one=True, steps_offset=0 for DDIMPipeline (which
                    rebuilds a DDIMScheduler from this config). With the same generator:
                    DDPMPipeline(num_inference_steps=N)  == genkit `ancestral`, N steps;
                    DDIMPipeline(num_inference_steps=N, eta=e, use_clipped_model_output=True)
                                                         == genkit `ddim`, N steps, eta=e
                    (genkit takes eps from the clipped x0_hat; diffusers' default does not).
    consistency     ConsistencyModelPipeline + CMStochasticIterativeScheduler (same sigma_min, sigma_data,
                    rho; its sigma_max is the run's first sampling sigma, `model.sample_sigmas[0]`, where
                    genkit's 1 step starts; c_skip, c_out, c_in and the timestep 250 ln sigma are genkit's
                    `parametrization: edm`): pipeline(num_inference_steps=1) == genkit `consistency`
                    1 step from the same noise (x = sample_sigmas[0] eps). A run fine-tuned with
                    `parametrization: ddpm|rectified_flow` reads its UNet otherwise: refused.
    meanflow        refused: no diffusers pipeline evaluates an average velocity u(z, r, t).
    rectified_flow  FlowMatchEulerDiscreteScheduler(shift=model.shift) in DDPMPipeline's loop,
                    whose step IS genkit's `ddim` on this family (timestep = 1000 t, output =
                    noise - data). Its default grid is linspace(1, 1/1000, N) then 0, genkit's is
                    uniform 1 .. 1/N then 0: `scheduler.set_timesteps(sigmas=linspace(1, 1/N, N))`
                    in a hand loop reproduces genkit's N-step `ddim` exactly (docs/api.md).

Import (`genkit import-diffusers DIR --out RUN`, or `genkit.load(DIR)` / `genkit sample DIR` on
the folder itself): a pipeline folder with unet/ (UNet2DModel, safetensors weights only) and
scheduler/ becomes a genkit family whose UNet keeps its exact diffusers architecture
(`model.unet.diffusers`) and whose noise process is read from the scheduler config
(`IMPORTERS`: DDPM/DDIM -> `ddpm`, FlowMatchEuler -> `rectified_flow`). Keys genkit cannot
honour are refused one at a time, naming the key and its value; nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from safetensors import SafetensorError

from genkit.config import Recipe, dump_recipe, recipe_to_dict
from genkit.errors import ConfigError, RunError
from genkit.families.base import Family
from genkit.families.consistency import Consistency
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.ldm import LDM, LDMConfig
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.io import atomic_dir, load_tensors, save_tensors, write_json, write_text
from genkit.nn.unet import UNetConfig, build_unet
from genkit.runs import (
    CHECKPOINTS,
    CKPT_NETS,
    CONFIG,
    INFO,
    MODEL,
    WEIGHTS,
    build_loaded,
    latest_checkpoint,
    load,
    recipe_from_dict,
)
from genkit.version import __version__

# genkit name -> diffusers name
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "linspace"}
FLOW_MATCH_TIMESTEPS = 1000  # genkit's rectified flow feeds the UNet 1000 t

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
EXPORT_INFO = "genkit_export.json"


# ------------------------------------------------------------------------------- export


def ddpm_scheduler(cfg: DDPMConfig | LDMConfig, clip_sample: bool) -> DDPMScheduler:
    """The DDPMScheduler of a genkit DDPM (or latent-diffusion) noise process; DDIMPipeline's
    DDIMScheduler reads the same config."""
    sched = DDPMScheduler(
        num_train_timesteps=cfg.timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=BETA_SCHEDULES[cfg.schedule], prediction_type=PREDICTIONS[cfg.prediction],
        clip_sample=clip_sample, clip_sample_range=1.0, timestep_spacing=SPACINGS[cfg.spacing],
        variance_type="fixed_small", steps_offset=0,
    )
    sched.register_to_config(set_alpha_to_one=True)  # DDIM: the last step lands on x0_hat, as genkit's grid
    return sched


def flow_match_scheduler(cfg: RectifiedFlowConfig) -> FlowMatchEulerDiscreteScheduler:
    """The FlowMatchEulerDiscreteScheduler of a genkit rectified-flow config (same SD3 shift)."""
    if cfg.clip_sample:
        raise ConfigError("model.clip_sample=true: FlowMatchEulerDiscreteScheduler cannot clamp x0_hat; "
                          "export a run trained with clip_sample: false")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_MATCH_TIMESTEPS, shift=cfg.shift)


def _ddpm_pipeline(family: DDPM) -> DDPMPipeline:
    return DDPMPipeline(unet=family.nets["unet"], scheduler=ddpm_scheduler(family.cfg, family.cfg.clip_sample))


def _flow_pipeline(family: RectifiedFlow) -> DDPMPipeline:
    return DDPMPipeline(unet=family.nets["unet"], scheduler=flow_match_scheduler(family.cfg))


class LatentDiffusionFolders:
    """A latent-diffusion run as diffusers component folders: unet/, vae/, scheduler/, text_encoder/.

    diffusers has no pipeline for genkit's text encoder (a small transformer over open_clip's BPE
    tokens, or an open_clip text tower), so there is no model_index.json: load the parts with
    `UNet2DConditionModel.from_pretrained(DIR / "unet")`, `AutoencoderKL.from_pretrained(DIR /
    "vae")` and `DDPMScheduler.from_pretrained(DIR / "scheduler")`; latents are
    `scale_factor * vae.encode(x).latent_dist.mean` (genkit_ldm.json), and the text encoder's
    weights and config are in text_encoder/ (`genkit.nn.text.TextEncoder`). LoRA adapters are
    fused into the exported UNet.
    """

    def __init__(self, family: LDM):
        nets = family.first_stage.nets
        if "vae" not in nets:
            raise ConfigError(f"model.first_stage of this run is a '{family.first_stage.name}', not an AutoencoderKL: "
                              "only KL first stages export as a diffusers vae/ folder")
        self.family, self.vae = family, nets["vae"]
        self.scheduler = ddpm_scheduler(family.cfg, clip_sample=False)

    def _unet(self) -> Any:
        unet = copy.deepcopy(self.family.nets["unet"])
        if self.family.cfg.lora.rank:
            unet.fuse_lora()
            unet.unload_lora()
        return unet

    def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
        """Write unet/, vae/, scheduler/, text_encoder/ and genkit_ldm.json into `folder`."""
        family = self.family
        self._unet().save_pretrained(folder / "unet", safe_serialization=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        text = family.cfg.text
        if "text" in family.nets:
            save_tensors(folder / "text_encoder" / "model.safetensors", family.nets["text"].state_dict())
            write_json(folder / "text_encoder" / "config.json", dataclasses.asdict(text))
        write_json(folder / "genkit_ldm.json", {
            "scale_factor": family.cfg.scale_factor, "prediction_type": family.cfg.prediction,
            "text_encoder": "text_encoder/ (genkit.nn.text.TextEncoder, open_clip's BPE tokenizer)"
            if "text" in family.nets else f"frozen open_clip text tower: {text.encoder}",
            "context_length": text.context_length})


def _ldm_folders(family: LDM) -> LatentDiffusionFolders:
    return LatentDiffusionFolders(family)


def _consistency_pipeline(family: Consistency) -> ConsistencyModelPipeline:
    """ConsistencyModelPipeline of an iCT-parametrised run (c_in x, timestep 250 ln sigma: diffusers' convention)."""
    cfg = family.cfg
    if cfg.parametrization != "edm" or cfg.class_cond:
        why = "class-conditional" if cfg.class_cond else f"parametrization={cfg.parametrization!r}"
        raise ConfigError(f"model.{'class_cond' if cfg.class_cond else 'parametrization'}: a {why} consistency "
                          "model has no diffusers pipeline (ConsistencyModelPipeline needs parametrization: edm, "
                          "unconditional)")
    # the scheduler's sigma_max is only where sampling starts (init_noise_sigma, the Karras grid's top): genkit's
    # first sampling sigma, so that the pipeline's default 1 step is genkit's (cm_digits starts at 10, not 80)
    scheduler = CMStochasticIterativeScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sample_sigmas[0],
                                               sigma_data=cfg.sigma_data, rho=cfg.rho, clip_denoised=True)
    return ConsistencyModelPipeline(unet=family.nets["unet"], scheduler=scheduler)


# family name -> its diffusers pipeline, or an object with save_pretrained() and .scheduler
EXPORTERS: dict[str, Callable[[Family], Any]] = {
    "ddpm": _ddpm_pipeline,
    "rectified_flow": _flow_pipeline,
    "ldm": _ldm_folders,
    "consistency": _consistency_pipeline,
}

# family name -> why it has no diffusers export (said instead of the generic refusal)
NOT_EXPORTABLE = {
    "meanflow": "no diffusers pipeline or scheduler evaluates MeanFlow's average velocity u(z, r, t) "
                "(a UNet with two time embeddings); sample it with genkit",
}

REPRODUCE = {
    "ddpm": "DDPMPipeline(num_inference_steps=N) == genkit ancestral N steps; DDIMPipeline(num_inference_steps=N, "
            "eta=E, use_clipped_model_output=True) == genkit ddim N steps eta=E (same generator)",
    "rectified_flow": "DDPMPipeline runs FlowMatchEuler steps on the grid linspace(1, 1/1000, N), 0; "
                      "set_timesteps(sigmas=linspace(1, 1/N, N)) in a hand loop == genkit ddim N steps",
    "consistency": "ConsistencyModelPipeline(num_inference_steps=1) == genkit consistency 1 step from the same "
                   "noise (latents=eps: x = sample_sigmas[0] eps); timesteps=[...] for multistep",
    "ldm": "no diffusers pipeline (genkit's text encoder): load unet/, vae/, scheduler/ separately; "
           "latents = scale_factor * vae mean (genkit_ldm.json); text_encoder/ loads into genkit.nn.text.TextEncoder",
}


def _check_new_folder(out: Path, what: str) -> None:
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise RunError(f"{what} '{out}' is the working directory (or holds it): name a new folder for --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{what} '{out}' already exists: choose another --out or remove it")


def _run_family(run: Path, weights: str) -> tuple[Family, str]:
    """The run's family on CPU with its EMA (default) or raw weights, and what was loaded."""
    family = load(run, device="cpu")
    if weights == "raw":
        ckpt = latest_checkpoint(run / CHECKPOINTS)
        if ckpt is None:
            raise RunError(f"'{run}' has no checkpoint: raw weights live in {CHECKPOINTS}/step-N/{CKPT_NETS}")
        family.nets.load_state_dict(load_tensors(ckpt / CKPT_NETS))
        return family, f"raw ({ckpt.name})"
    if weights != "ema":
        raise ConfigError(f"weights: expected 'ema' or 'raw', got {weights!r}")
    info = run / MODEL / INFO
    trained_with_ema = json.loads(info.read_text()).get("ema", True) if info.exists() else True
    return family, "ema" if trained_with_ema else "final (trained without EMA)"


def export_diffusers(run: str | Path, out: str | Path, *, weights: str = "ema") -> Path:
    """Write a genkit run as a diffusers pipeline folder (safetensors, atomic); returns the folder.

    Args:
        run: a run folder written by `genkit.train`.
        out: the folder to create; `DDPMPipeline.from_pretrained(out)` loads it.
        weights: "ema" (the run's final EMA weights, default) or "raw" (latest checkpoint's).
    """
    run, out = Path(run), Path(out)
    _check_new_folder(out, "export folder")
    family, loaded = _run_family(run, weights)
    if family.name in NOT_EXPORTABLE:
        raise ConfigError(f"model.family={family.name!r} has no diffusers export: {NOT_EXPORTABLE[family.name]}")
    if family.name not in EXPORTERS:
        raise ConfigError(f"model.family={family.name!r} has no diffusers export; exportable: "
                          f"{', '.join(EXPORTERS)}")
    pipeline = EXPORTERS[family.name](family)
    with atomic_dir(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / EXPORT_INFO, {
            "run": str(run.resolve()), "family": family.name, "weights": loaded,
            "pipeline": type(pipeline).__name__, "scheduler": type(pipeline.scheduler).__name__,
            "reproduce": REPRODUCE.get(family.name, ""), "genkit_version": __version__})
    return out


# ------------------------------------------------------------------------------- import


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _choice(config: dict[str, Any], key: str, table: dict[str, str], where: str) -> str:
    """The genkit name of a diffusers value (table: genkit -> diffusers)."""
    inverse = {v: k for k, v in table.items()}
    if config[key] not in inverse:
        raise ConfigError(f"{where}: {key}={config[key]!r} is not supported; supported: {', '.join(inverse)}")
    return inverse[config[key]]


def _check_keys(config: dict[str, Any], cls: type, where: str, mapped: set[str],
                fixed: dict[str, tuple], unused: set[str]) -> dict[str, Any]:
    """Complete `config` with `cls`'s defaults and refuse what genkit cannot honour, key by key.

    mapped: keys translated into the genkit config; fixed: key -> the values genkit reproduces;
    unused: keys without effect under the fixed values. Other keys must keep the class default.
    """
    defaults = _defaults(cls)
    full = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, value in full.items():
        if key in mapped or key in unused:
            continue
        if key in fixed:
            if value not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                raise ConfigError(f"{where}: {key}={value!r} is not supported (genkit reproduces {allowed})")
        elif key not in defaults or value != defaults[key]:
            raise ConfigError(f"{where}: unknown scheduler key {key}={value!r}")
    return full


DDPM_FIXED = {"trained_betas": (None,), "thresholding": (False,), "rescale_betas_zero_snr": (False,),
              "clip_sample_range": (1.0,), "steps_offset": (0,), "set_alpha_to_one": (True,),
              "variance_type": ("fixed_small", "fixed_small_log")}
DDPM_MAPPED = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
               "clip_sample", "timestep_spacing"}
DDPM_UNUSED = {"dynamic_thresholding_ratio", "sample_max_value"}  # read only when thresholding


def _ddpm_config(config: dict[str, Any], cls: type, where: str, unet: UNetConfig) -> DDPMConfig:
    """DDPMConfig from a DDPMScheduler / DDIMScheduler config."""
    c = _check_keys(config, cls, where, DDPM_MAPPED, DDPM_FIXED, DDPM_UNUSED)
    return DDPMConfig(
        schedule=_choice(c, "beta_schedule", BETA_SCHEDULES, where), timesteps=int(c["num_train_timesteps"]),
        beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
        prediction=_choice(c, "prediction_type", PREDICTIONS, where), clip_sample=bool(c["clip_sample"]),
        spacing=_choice(c, "timestep_spacing", SPACINGS, where), unet=unet)


FLOW_FIXED = {"num_train_timesteps": (FLOW_MATCH_TIMESTEPS,), "use_dynamic_shifting": (False,),
              "invert_sigmas": (False,), "shift_terminal": (None,), "use_karras_sigmas": (False,),
              "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "stochastic_sampling": (False,)}
FLOW_UNUSED = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}


def _flow_config(config: dict[str, Any], cls: type, where: str, unet: UNetConfig) -> RectifiedFlowConfig:
    """RectifiedFlowConfig from a FlowMatchEulerDiscreteScheduler config."""
    c = _check_keys(config, cls, where, {"shift"}, FLOW_FIXED, FLOW_UNUSED)
    return RectifiedFlowConfig(shift=float(c["shift"]), unet=unet)


# diffusers scheduler class -> (class, genkit family config builder)
IMPORTERS: dict[str, tuple[type, Callable[..., Any]]] = {
    "DDPMScheduler": (DDPMScheduler, _ddpm_config),
    "DDIMScheduler": (DDIMScheduler, _ddpm_config),
    "FlowMatchEulerDiscreteScheduler": (FlowMatchEulerDiscreteScheduler, _flow_config),
}


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether `path` looks like a diffusers pipeline folder (model_index.json or unet/ + scheduler/)."""
    path = Path(path)
    return (path / "model_index.json").is_file() or (
        (path / "unet" / "config.json").is_file() and (path / SCHEDULER_CONFIG).is_file())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"'{path}' not found: a diffusers folder needs unet/config.json and {SCHEDULER_CONFIG}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"'{path}': not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunError(f"'{path}': expected a JSON object")
    return data


def _unet_shape(config: dict[str, Any], where: Path) -> tuple[int, int, int]:
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"{where}: sample_size={size!r} is not supported (genkit images are square)")
        size = size[0]
    if not isinstance(size, int):
        raise ConfigError(f"{where}: sample_size={size!r}: an integer image size is needed")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", 3) != channels:
        raise ConfigError(f"{where}: out_channels={config.get('out_channels')!r} differs from in_channels="
                          f"{channels!r} (learned-variance UNets are not supported)")
    return channels, size, size


def diffusers_recipe(folder: str | Path) -> tuple[Recipe, tuple[int, int, int]]:
    """The genkit recipe (family from the scheduler, UNet architecture verbatim) and image shape of a folder."""
    folder = Path(folder)
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / SCHEDULER_CONFIG)
    where = folder / SCHEDULER_CONFIG
    name = scheduler.get("_class_name")
    if name not in IMPORTERS:
        raise ConfigError(f"{where}: _class_name={name!r} is not supported; supported: {', '.join(IMPORTERS)}")
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: _class_name={unet_config['_class_name']!r} "
                          f"is not supported; supported: UNet2DModel")
    shape = _unet_shape(unet_config, folder / "unet" / "config.json")
    cls, build = IMPORTERS[name]
    unet = UNetConfig(diffusers={k: v for k, v in unet_config.items() if not k.startswith("_")})
    try:  # build it once: a config diffusers cannot build is refused here, naming its file
        build_unet(unet, shape[0], shape[1])
    except ConfigError as e:
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: {e}") from None
    model = build(scheduler, cls, str(where), unet)
    raw = {"name": folder.resolve().name, "description": f"imported from the diffusers folder {folder.resolve()}",
           "model": recipe_to_dict(Recipe(name="", model=model))["model"],
           "data": {"image_size": shape[1]}}
    return recipe_from_dict(raw, str(folder)), shape


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet's weights as the family's state dict ("unet." keys), from safetensors only."""
    unet_dir = folder / "unet"
    shards = unet_dir / f"{UNET_WEIGHTS}.index.json"
    if not (unet_dir / UNET_WEIGHTS).is_file() and not shards.is_file():
        pickled = sorted(p.name for p in unet_dir.glob("*.bin"))
        hint = f" (found {pickled[0]}: genkit never loads pickled weights)" if pickled else ""
        raise RunError(f"'{unet_dir / UNET_WEIGHTS}' not found{hint}")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)  # converts old attention names
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise RunError(f"cannot read the UNet in '{unet_dir}': {str(e).strip().splitlines()[0]}") from None
    return {f"unet.{k}": v for k, v in unet.state_dict().items()}


def load_diffusers(folder: str | Path, device: str | torch.device | None = None) -> Family:
    """A genkit family (eval mode) from a diffusers folder: `genkit.load(folder)` calls this.

    Args:
        folder: a diffusers pipeline folder with unet/ and scheduler/.
        device: where to put the networks; default CUDA when available, else CPU.
    """
    folder = Path(folder)
    recipe, shape = diffusers_recipe(folder)
    return build_loaded(recipe, shape, 0, _unet_weights(folder), device)


def import_diffusers(folder: str | Path, out: str | Path) -> Path:
    """Turn a diffusers folder into a genkit run folder (config.yaml, model/); returns the run folder.

    Args:
        folder: a diffusers pipeline folder with unet/ (safetensors) and scheduler/.
        out: the run folder to create; `genkit.load(out)` and `genkit sample out` use it.
    """
    folder, out = Path(folder), Path(out)
    _check_new_folder(out, "run folder")
    recipe, shape = diffusers_recipe(folder)
    weights = _unet_weights(folder)
    config = dump_recipe(recipe)
    with atomic_dir(out) as tmp:
        write_text(tmp / CONFIG, config)
        save_tensors(tmp / MODEL / WEIGHTS, weights,
                     metadata={"genkit_config": config, "genkit_version": __version__})
        write_json(tmp / MODEL / INFO, {
            "shape": list(shape), "num_classes": 0, "family": recipe.model.family, "ema": False,
            "imported_from": str(folder.resolve()), "genkit_version": __version__})
    return out
