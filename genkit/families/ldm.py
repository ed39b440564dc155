"""Latent diffusion: High-Resolution Image Synthesis with Latent Diffusion Models (Rombach et al., CVPR 2022).

A frozen first stage (`genkit.families.first_stage`) maps images x to latents; diffusion runs on
the scaled latents z0 = scale_factor * E(x) (unit variance), with a UNet that cross-attends to
the token embeddings tau(y) of the caption y (sec. 3.3):

    L = E_{z0, y, eps, t} || target - eps_theta(z_t, t, tau(y)) ||^2

The forward process, its sigma picture, the prediction types, the x0 adapters and the loss weighting
(`model.loss_weighting: min-snr`) are DDPM's (`genkit.families.ddpm`: NoiseSchedule, output_to_x0,
loss_weight); only the conditioning is new here.
Classifier-free guidance (Ho & Salimans 2022): captions are replaced by the empty caption "" with
probability `caption_dropout`, so one network learns D(z; sigma, tau(y)) and D(z; sigma, tau(""));
`conditions` returns both for `genkit.samplers.guidance`. Optional class labels (`class_cond`)
add a null-label class embedding as in `genkit.families.unet_family`.

All shared samplers run on latents: the state has `latent_shape`, and `decode_latents` maps the
final latents back to images (the sampler calls it per batch).

The first stage is declared a `Stage` (`genkit.families.base`): `genkit.runs` loads the run that
`model.first_stage` names and passes it in; when it is unset, the trainer first trains
`model.first_stage_recipe` on this recipe's data (`genkit.training.stages`). The scale factor is
computed from the training data by `configure` unless given.

LoRA (Hu et al., ICLR 2022) through peft: `model.lora.rank > 0` freezes every network and adds
trainable low-rank adapters to the UNet's attention projections; `model.init_from` gives the
LDM run to adapt (its first stage and scale factor are reused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.data import ImageDataset
from genkit.errors import ConfigError, DataError, SamplerError
from genkit.families.base import Autoencoder, Denoising, Family, Stage, StepHandle
from genkit.families.ddpm import (
    NoiseSchedule,
    check_weighting,
    loss_weight,
    make_betas,
    output_to_x0,
    weighted_mse,
)
from genkit.families.first_stage import latent_scale_factor, latent_shape
from genkit.families.unet_family import null_dropout, sample_labels
from genkit.nn.cond_unet import CondUNetConfig, build_cond_unet
from genkit.nn.text import TextConfig, TextEncoder, prompt_embeddings

SCALE_IMAGES = 2048  # images (evenly spread over the training split) that set the scale factor


@dataclass
class LoRAConfig:
    rank: int = 0                      # 0: no LoRA (all of nets train)
    alpha: float | None = None         # adapter scale alpha / rank; default alpha = rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class LDMConfig(FamilyConfig):
    family: str = "ldm"
    first_stage: str | None = None               # run folder | local-dir:PATH; None: train one first
    first_stage_recipe: str = "autoencoder_kl_digits"  # trained on this recipe's data when first_stage is None
    first_stage_overrides: list[str] = field(default_factory=list)
    scale_factor: float | None = None            # None: 1 / std of the data's latents, stored in the run
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Literal["epsilon", "x0", "v"] = "epsilon"
    loss_weighting: Literal["none", "min-snr"] = "none"  # min-snr: Min-SNR-gamma (Hang et al. 2023), as DDPM's
    snr_gamma: float = 5.0
    spacing: Literal["leading", "trailing", "linspace"] = "leading"
    text: TextConfig = field(default_factory=TextConfig)
    caption_dropout: float = 0.1                 # P(caption -> "") in training, for guidance
    class_cond: bool = False                     # also condition on data labels
    cond_dropout: float = 0.1                    # P(label -> null label)
    sample_prompts: list[str] = field(default_factory=list)  # default prompts of sample grids, in turn
    unet: CondUNetConfig = field(default_factory=CondUNetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


class LDM(Family, Denoising):
    """Latent diffusion family: `nets = {"unet", "text" (when trained from scratch)}`, one group "model"."""

    name = "ldm"
    default_sampler = "ddim"
    default_steps = 50
    stages = (Stage("first_stage", Autoencoder, train_recipe="first_stage_recipe",
                    train_overrides="first_stage_overrides", inherit=("scale_factor",), local_dir=True),)

    def __init__(self, cfg: LDMConfig, shape: tuple[int, int, int], num_classes: int = 0, *,
                 first_stage: Autoencoder):
        if cfg.scale_factor is None or not cfg.scale_factor > 0:
            raise ConfigError(f"model.scale_factor must be > 0 (set by `genkit train` from the data), "
                              f"got {cfg.scale_factor}")
        for key in ("caption_dropout", "cond_dropout"):
            if not 0 <= getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(cfg, key)}")
        self.cfg, self.sample_shape = cfg, tuple(shape)  # (C, H, W) of images
        self.first_stage = first_stage
        self._latent_shape = latent_shape(first_stage, self.sample_shape)  # (c, h, w) of the diffusion state
        self.num_classes = num_classes if cfg.class_cond else 0
        if cfg.class_cond and num_classes < 2:
            raise ConfigError(f"model.class_cond: the dataset has {num_classes} classes; class conditioning "
                              "needs labelled data")
        self.schedule = NoiseSchedule(make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end))
        check_weighting(cfg)
        text = TextEncoder(cfg.text)
        unet = build_cond_unet(cfg.unet, self.latent_shape[0], self.latent_shape[1], text.width,
                               self.num_classes + 1 if self.num_classes else None)
        self.nets = nn.ModuleDict({"unet": unet})
        self.frozen_text = text if text.pretrained else None
        if not text.pretrained:
            self.nets["text"] = text
        if cfg.lora.rank:
            add_lora(self.nets, cfg.lora)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(c, h, w) of the diffusion state: the first stage's latents."""
        return self._latent_shape

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer group, "model": the UNet and a from-scratch text encoder (LoRA: adapters only)."""
        return {"model": [p for p in self.nets.parameters() if p.requires_grad]}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's activations in backward (train.gradient_checkpointing)."""
        self.nets["unet"].enable_gradient_checkpointing()

    # -- frozen stages, on the device of the nets -------------------------------------------
    def _stage(self) -> Autoencoder:
        self.first_stage.nets.to(self.device)
        return self.first_stage

    def text_encoder(self) -> nn.Module:
        """The text encoder in use: the trained one in `nets`, or the frozen pretrained one."""
        if self.frozen_text is None:
            return self.nets["text"]
        return self.frozen_text.to(self.device)

    @torch.no_grad()
    def encode_images(self, x: Tensor) -> Tensor:
        """Scaled latents z0 = scale_factor * E(x) of images in [-1, 1]."""
        return self._stage().encode(x.to(self.device)).float() * self.cfg.scale_factor

    def decode_latents(self, z: Tensor) -> Tensor:
        """Images D(z / scale_factor) (the samplers' last step on latents)."""
        return self._stage().decode(z.float() / self.cfg.scale_factor).float()

    # -- the network and the loss -------------------------------------------------------------
    def unet(self, z: Tensor, t: Tensor, text: Tensor, label: Tensor | None = None) -> Tensor:
        """The UNet's prediction at latents z, timestep t, text embeddings (and class labels if any)."""
        if self.num_classes and label is None:
            label = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
        if label is not None and not self.num_classes:
            raise SamplerError("family 'ldm' is not class-conditional (model.class_cond: false); it takes prompts")
        return self.nets["unet"](z, t, encoder_hidden_states=text.to(z.device),
                                 class_labels=None if label is None else label.to(z.device)).sample

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One DDPM step on scaled latents with caption dropout; returns the scalars to log."""
        if "caption" not in batch:
            raise DataError("model.family=ldm trains on captioned data: data.source=digits, or a folder "
                            "with metadata.jsonl (file_name, text)")
        z0 = self.encode_images(batch["image"])
        b = z0.shape[0]
        drop = (opt.rand(b) < self.cfg.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        label = null_dropout(batch["label"], self.cfg.cond_dropout, self.num_classes, opt) \
            if self.num_classes else None
        t = opt.randint(self.schedule.T, b)
        zt, target = self.schedule.noised(z0, t, opt.randn(b, *self.latent_shape), self.cfg.prediction)
        out = self.unet(zt, t.float(), self.text_encoder()(captions), label)
        loss = weighted_mse(out, target, loss_weight(self.cfg, self.schedule, t))
        opt.step("model", loss)
        return {"loss": loss.detach()}

    # -- sampling --------------------------------------------------------------------------
    def denoise(self, z: Tensor, sigma: Tensor, text: Tensor | None = None,
                label: Tensor | None = None) -> Tensor:
        """D(z; sigma, tau(y)[, label]) -> x0_hat in latent space; no text: the empty caption."""
        if text is None:
            text = self.embed([""]).expand(z.shape[0], -1, -1)
        out = self.unet(z, self.schedule.sigma_to_t(sigma), text, label).to(z.dtype)
        return output_to_x0(self.cfg.prediction, z, sigma, out)

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """Token embeddings (B, L, width) of prompts, without gradients."""
        return prompt_embeddings(self.text_encoder(), list(prompts))

    def conditions(self, n: int, labels: Tensor | Sequence[int] | None = None,
                   prompts: Sequence[str] | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) for n samples: prompts (one, or used in turn) vs the empty caption.

        Without prompts: `model.sample_prompts` in turn (the empty caption if none).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(self.cfg.sample_prompts or [""]) if prompts is None else list(prompts)
        if not prompts:
            raise SamplerError("prompts: empty list; give at least one prompt")
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        cond = {"text": self.embed(prompts)}
        uncond = {"text": self.embed([""]).expand(n, -1, -1)}
        if self.num_classes:
            cond["label"] = sample_labels(n, labels, self.num_classes)
            uncond["label"] = torch.full((n,), self.num_classes, dtype=torch.long)
        elif labels is not None:
            raise SamplerError("family 'ldm' is not class-conditional (model.class_cond: false); give prompts")
        return cond, uncond

    def sigmas(self, steps: int) -> Tensor:
        """The sigma grid of `steps` of the DDPM schedule (the recipe's timestep spacing), ending at 0."""
        return self.schedule.sigmas(steps, self.cfg.spacing)

    def sigma_range(self) -> tuple[float, float]:
        """(sigma of t = 0, sigma of t = T - 1): the span of the karras and uniform grids."""
        return float(self.schedule.sigma_table[0]), float(self.schedule.sigma_table[-1])

    # -- training setup: the scale factor, fine-tuning ---------------------------------------
    @classmethod
    def configure(cls, cfg: LDMConfig, stages: Mapping[str, Any], dataset: ImageDataset) -> LDMConfig:
        """The config with `scale_factor` computed from the training data when unset (trainer hook)."""
        if cfg.scale_factor is not None:
            return cfg
        return dataclasses.replace(cfg, scale_factor=data_scale_factor(stages["first_stage"], dataset))

    def init_from_weights(self, weights: Mapping[str, Tensor], run: Path) -> None:
        """Load a run's weights (`model.init_from`) under LoRA adapters: x.weight -> x.base_layer.weight."""
        own = self.nets.state_dict()
        mapped = {k: weights.get(k.replace(".base_layer.", "."), weights.get(k)) for k in own if ".lora_" not in k}
        missing = [k for k, v in mapped.items() if v is None]
        if missing:
            raise ConfigError(f"model.init_from: '{run}' lacks {missing[0]}: use the model config of that run")
        for k, v in mapped.items():
            if v.shape != own[k].shape:
                raise ConfigError(f"model.init_from: '{run}' has {k} of shape {tuple(v.shape)}, this model "
                                  f"{tuple(own[k].shape)}: use the model config of that run")
        self.nets.load_state_dict(mapped, strict=False)


def add_lora(nets: nn.ModuleDict, cfg: LoRAConfig) -> None:
    """Freeze every network and add trainable peft LoRA adapters to the UNet's `cfg.targets` layers."""
    from peft import LoraConfig  # heavy (imports transformers): only when LoRA is used

    if cfg.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0, got {cfg.rank}")
    nets.requires_grad_(False)
    try:
        nets["unet"].add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                            target_modules=list(cfg.targets), init_lora_weights="gaussian"))
    except ValueError as e:
        raise ConfigError(f"model.lora.targets {cfg.targets}: {str(e).splitlines()[0]}") from None


def data_scale_factor(stage: Autoencoder, dataset: ImageDataset) -> float:
    """The scale factor of the training data: 1 / std of the latents of up to SCALE_IMAGES images."""
    step = max(1, len(dataset) // SCALE_IMAGES)
    images = torch.stack([dataset[i]["image"] for i in range(0, len(dataset), step)][:SCALE_IMAGES])
    return latent_scale_factor(stage, images)
