"""What every single-UNet denoising family shares: its one network, class conditioning with
classifier-free guidance and gradient checkpointing. The math stays in each family's own module.

Class conditioning (`model.class_cond: true`) follows Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance": the UNet embeds num_classes + 1 labels, the last one being the null label
"no class"; training replaces each label by the null one with probability `model.cond_dropout`
(drawn from the global-batch stream), so one network learns both D(z; sigma, y) and
D(z; sigma, null). Sampling combines them with `genkit.samplers.guidance`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import Denoising, Family, StepHandle
from genkit.nn.unet import UNetConfig, build_unet


def sample_labels(n: int, labels: Tensor | Sequence[int] | None, num_classes: int) -> Tensor:
    """n class labels: one label or n checked ones, or by default 0, 1, ..., C-1, 0, ... in turn."""
    if labels is None:
        return torch.arange(n) % num_classes
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) == 1:
        labels = labels.expand(n)
    if len(labels) != n:
        raise SamplerError(f"{len(labels)} class labels for n={n} samples: give one label or n")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise SamplerError(f"class label {int(bad[0])} out of range: this run has classes 0..{num_classes - 1}")
    return labels


def null_dropout(label: Tensor, p: float, null_label: int, opt: StepHandle) -> Tensor:
    """Labels with each replaced by `null_label` with probability p (global-batch draw); -1 -> null too."""
    label = label.long()
    drop = opt.rand(label.shape[0]) < p
    return torch.where(drop | (label < 0), torch.full_like(label, null_label), label)


class UNetFamily(Family, Denoising):
    """Base of DDPM and rectified flow: `nets = {"unet": UNet2DModel}`, one group "model"."""

    def __init__(self, cfg: FamilyConfig, shape: tuple[int, int, int], unet: UNetConfig, num_classes: int = 0):
        self.cfg = cfg
        self.sample_shape = tuple(shape)  # (C, H, W)
        self.num_classes = 0
        if cfg.class_cond:
            if num_classes < 2:
                raise ConfigError(f"model.class_cond: the dataset has {num_classes} classes; "
                                  "class conditioning needs labelled data (e.g. data.source: digits)")
            if not 0 <= cfg.cond_dropout < 1:
                raise ConfigError(f"model.cond_dropout: must be in [0, 1), got {cfg.cond_dropout}")
            self.num_classes = num_classes
        embeds = self.num_classes + 1 if self.num_classes else None  # + the null label
        self.nets = nn.ModuleDict({"unet": build_unet(unet, shape[0], shape[1], num_class_embeds=embeds)})

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in the backward pass (train.gradient_checkpointing)."""
        self.nets["unet"].enable_gradient_checkpointing()

    # -- conditioning ------------------------------------------------------------------
    @property
    def null_label(self) -> int:
        """The label index meaning "no class" (the last embedding of a class-conditional UNet)."""
        return self.num_classes

    def unet(self, x: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """The UNet's output at (x, timestep t), with class labels when the family is conditional."""
        if not self.num_classes:
            if label is not None:
                raise SamplerError(f"family '{self.name}' is unconditional (model.class_cond: false); "
                                   "it takes no class labels")
            return self.nets["unet"](x, t).sample
        if label is None:
            label = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        return self.nets["unet"](x, t, class_labels=label.to(x.device)).sample

    def train_labels(self, batch: Mapping[str, Tensor], opt: StepHandle) -> Tensor | None:
        """The batch's labels with each replaced by the null label with probability cond_dropout.

        Unlabelled items (label -1) get the null label. None for an unconditional family.
        """
        if not self.num_classes:
            return None
        return null_dropout(batch["label"], self.cfg.cond_dropout, self.null_label, opt)

    def conditions(self, n: int, labels: Tensor | Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(cond, uncond) denoiser keywords for n samples; uncond None for an unconditional family.

        Without `labels`, a class-conditional family cycles through its classes (0, 1, ..., C-1,
        0, ...), so a grid or an FD sample is class-balanced. Prompts are refused (no text).
        """
        if prompts is not None:
            raise SamplerError(f"family '{self.name}' takes no text prompts (model.family: ldm does)")
        if not self.num_classes:
            if labels is not None:
                raise SamplerError(f"family '{self.name}' is unconditional (model.class_cond: false); "
                                   "it takes no class labels")
            return {}, None
        labels = sample_labels(n, labels, self.num_classes)
        return {"label": labels}, {"label": torch.full((n,), self.null_label, dtype=torch.long)}
