"""VQGAN tokenizer (Esser, Rombach & Ommer, CVPR 2021, "Taming Transformers for High-Resolution Image Synthesis").

Stage 1 of "compress first, then generate": x -> E(x) = z_e -> quantize -> z_q -> G(z_q) = x_rec.
The loss is the paper's eq. (4)-(6):
    L_VQ   = |x - x_rec|_1 + w_p LPIPS(x, x_rec) + ||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2
    L_GAN  = log D(x) + log(1 - D(x_rec))          (hinge form here, as taming's default)
    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta)        the adaptive weight
    total  = L_VQ + d_weight * lambda * L_GAN, with the GAN terms off before `disc_start`
where G_L is the decoder's last layer and L_rec = L1 + w_p LPIPS. Two parameter groups, stepped
through the trainer's handle: "ae" (encoder, decoder and, without EMA, the codebook) and "disc"
(the PatchGAN). The quantizer (`genkit.nn.vq`) offers EMA codes, cosine codes and dead-code
restart; codebook usage and perplexity are logged every step.

Declared a `Tokenizer` (`genkit.families.base`) for the prior and evaluation: `encode(x) -> indices
(B, h, w)`, `decode(indices) -> x in [-1, 1]`, `reconstruct(x) -> x_rec` (the trainer's grids show
reconstructions of the first training images for autoencoders). A tokenizer samples nothing by
itself: every sampler is refused with a pointer to the `ar_prior` family.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError
from genkit.families.base import Family, StepHandle, Tokenizer
from genkit.nn.perceptual import LPIPS, MIN_SIZE
from genkit.nn.vq import VectorQuantizer
from genkit.nn.vqgan_nets import Decoder, Encoder, PatchDiscriminator


@dataclass
class QuantizerConfig:
    num_codes: int = 512                  # K
    dim: int = 64                         # d, the code dimension
    beta: float = 0.25                    # commitment weight
    ema: bool = False                     # EMA codebook updates instead of the codebook loss
    decay: float = 0.99                   # gamma of the EMA codebook
    cosine: bool = False                  # l2-normalised codes (ViT-VQGAN)
    restart_threshold: float = 0.0        # restart codes used less than this / K (0: never)
    usage_decay: float = 0.99             # EMA of each code's usage (restart criterion)


@dataclass
class VQGANConfig(FamilyConfig):
    family: str = "vqgan"
    f: int = 4                                                            # down-sampling factor
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])   # per level: log2(f) + 1 entries
    blocks: int = 1                                                       # ResNet blocks per level
    norm_groups: int = 8
    attention: bool = True                                                # self-attention at the lowest resolution
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    perceptual: Literal["none", "lpips", "lpips_random"] = "none"        # lpips_random: random backbone (logged)
    perceptual_net: Literal["vgg", "alex"] = "vgg"
    perceptual_weights: str | None = None                                 # backbone file (else GENKIT_WEIGHTS_DIR ...)
    perceptual_weight: float = 1.0
    disc_start: int = 0                   # first step with the GAN terms
    disc_weight: float = 0.8              # d_weight multiplying the adaptive lambda
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_max: float = 1e4             # lambda is clamped to [0, this] (taming)


def check_config(cfg: VQGANConfig, image_size: int) -> None:
    """Values no type can express: f a power of two matching the levels and the image size."""
    levels = len(cfg.channels)
    if cfg.f < 1 or cfg.f & (cfg.f - 1):
        raise ConfigError(f"model.f: must be a power of two, got {cfg.f}")
    if 2 ** (levels - 1) != cfg.f:
        raise ConfigError(f"model.channels has {levels} levels, model.f={cfg.f} needs {int(math.log2(cfg.f)) + 1}")
    if image_size % cfg.f:
        raise ConfigError(f"data.image_size={image_size} is not divisible by model.f={cfg.f}")
    if image_size // 2 ** cfg.disc_layers < 3:  # the PatchGAN's last two 4x4 convs need >= 3 px left
        raise ConfigError(f"model.disc_layers={cfg.disc_layers} down-samples data.image_size={image_size} "
                          f"below 3 px: use at most {max(0, int(math.log2(image_size / 3)))} layers")
    if cfg.quantizer.num_codes < 2:
        raise ConfigError(f"model.quantizer.num_codes: must be >= 2, got {cfg.quantizer.num_codes}")
    if not 0 <= cfg.quantizer.decay < 1:
        raise ConfigError(f"model.quantizer.decay: must be in [0, 1), got {cfg.quantizer.decay}")


class VQAutoencoder(nn.Module):
    """Encoder, quantizer, decoder as one module (one DDP wrapper): forward(x) -> (x_rec, z_e, k, vq)."""

    def __init__(self, cfg: VQGANConfig, channels: int):
        super().__init__()
        q = cfg.quantizer
        self.encoder = Encoder(channels, cfg.channels, cfg.blocks, q.dim, cfg.norm_groups, cfg.attention)
        self.quantizer = VectorQuantizer(q.num_codes, q.dim, beta=q.beta, ema=q.ema, decay=q.decay,
                                         cosine=q.cosine, restart_threshold=q.restart_threshold,
                                         usage_decay=q.usage_decay)
        self.decoder = Decoder(channels, cfg.channels, cfg.blocks, q.dim, cfg.norm_groups, cfg.attention)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        z_e = self.encoder(x)
        z_q, k, vq = self.quantizer(z_e)
        return self.decoder(z_q), z_e, k, vq


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator hinge loss: mean relu(1 - D(x)) + mean relu(1 + D(x_rec)), halved (taming)."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_value: float,
                    delta: float = 1e-4) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), clamped to [0, max] and detached (eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(max=max_value).detach()  # a ratio of norms: >= 0


class VQGAN(Family, Tokenizer):
    """VQGAN tokenizer family: nets {"autoencoder", "disc"}, groups {"ae", "disc"}."""

    name = "vqgan"
    default_sampler = None  # a tokenizer generates through an ar_prior run
    sampling_hint = ": a vqgan run is a tokenizer; train an ar_prior recipe with model.tokenizer=<this run>"

    def __init__(self, cfg: VQGANConfig, shape: tuple[int, int, int], num_classes: int = 0):
        for size in shape[1:]:  # H and W
            check_config(cfg, size)
        self.cfg, self.sample_shape = cfg, tuple(shape)
        self._codebook_step: int | None = None  # the step whose micro-batches the quantizer accumulates
        self.nets = nn.ModuleDict({"autoencoder": VQAutoencoder(cfg, shape[0]),
                                   "disc": PatchDiscriminator(shape[0], cfg.disc_channels, cfg.disc_layers)})
        self.perceptual = None
        if cfg.perceptual != "none":
            if (size := min(shape[1:])) < MIN_SIZE[cfg.perceptual_net]:
                raise ConfigError(f"model.perceptual={cfg.perceptual} with {cfg.perceptual_net} needs "
                                  f"data.image_size >= {MIN_SIZE[cfg.perceptual_net]}, got {size}")
            self.perceptual = build_perceptual(cfg)

    @property
    def num_codes(self) -> int:
        """K, the codebook size (the prior's vocabulary)."""
        return self.cfg.quantizer.num_codes

    @property
    def token_shape(self) -> tuple[int, int]:
        """(h, w) of the index map of one image."""
        return self.sample_shape[1] // self.cfg.f, self.sample_shape[2] // self.cfg.f

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Two optimizer groups: "ae" (encoder, decoder, codebook) and "disc" (PatchGAN)."""
        return {"ae": list(self.nets["autoencoder"].parameters()), "disc": list(self.nets["disc"].parameters())}

    # -- training ----------------------------------------------------------------------
    def rec_loss(self, x: Tensor, x_rec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_rec = |x - x_rec|_1 + w_p LPIPS(x, x_rec) (the perceptual term only if configured)."""
        l1 = (x.float() - x_rec.float()).abs().mean()
        if self.perceptual is None:
            return l1, {"l1": l1.detach()}
        p = self.perceptual.to(x.device)(x.float(), x_rec.float()).mean()
        return l1 + self.cfg.perceptual_weight * p, {"l1": l1.detach(), "lpips": p.detach()}

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """Autoencoder step (L_VQ + lambda L_GAN), then discriminator step, then the codebook update:
        the codebook statistics of the step's micro-batches are summed and applied once, when "ae"
        steps, so grad_accum = 2 at batch B updates the codebook as grad_accum = 1 at batch 2B."""
        x = batch["image"]
        ae, disc = self.nets["autoencoder"], self.nets["disc"]
        x_rec, z_e, k, vq = ae(x)
        rec, logs = self.rec_loss(x, x_rec)
        gan_on = step >= self.cfg.disc_start
        loss = rec + vq["loss"]
        if gan_on:
            # through the unwrapped disc: under DDP the "ae" backward must not leave its gradient reducer waiting
            g_loss = -extract_model_from_parallel(disc)(x_rec).float().mean()
            last = extract_model_from_parallel(ae).decoder.conv_out.weight
            lam = adaptive_weight(rec, g_loss, last, self.cfg.adaptive_max)
            loss = loss + self.cfg.disc_weight * lam * g_loss
            logs.update(g_loss=g_loss.detach(), adaptive_weight=lam)
        quantizer = extract_model_from_parallel(ae).quantizer
        if step != self._codebook_step:  # a new step: drop micro-batches of one whose optimizer skipped
            quantizer.discard()
            self._codebook_step = step
        quantizer.accumulate(z_e, k)
        stepped = opt.step("ae", loss)
        if gan_on:
            d_loss = hinge_d_loss(disc(x.detach()).float(), disc(x_rec.detach()).float())
            opt.step("disc", d_loss)
            logs["d_loss"] = d_loss.detach()
        restarted = quantizer.update(opt.randint) if stepped else 0  # once per optimizer step
        return {"loss": loss.detach(), **logs, "commitment": vq["commitment"], "codebook": vq["codebook"],
                "perplexity": vq["perplexity"], "usage": vq["usage"],
                "restarted": torch.tensor(float(restarted))}

    # -- tokenizer capabilities --------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) -> code indices (B, H/f, W/f)."""
        ae = extract_model_from_parallel(self.nets["autoencoder"])
        _, k, _ = ae.quantizer(ae.encoder(x.to(self.device)))
        return k

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> images (B, C, H, W), clamped to [-1, 1]."""
        ae = extract_model_from_parallel(self.nets["autoencoder"])
        return ae.decoder(ae.quantizer.lookup(indices.to(self.device))).clamp(-1, 1)


def build_perceptual(cfg: VQGANConfig) -> nn.Module:
    """The LPIPS loss of `model.perceptual` (ImageNet backbone resolved offline, or random if named)."""
    random = cfg.perceptual == "lpips_random"
    if random:
        warnings.warn("model.perceptual=lpips_random: LPIPS with a RANDOMLY INITIALISED backbone")
    return LPIPS(cfg.perceptual_net, cfg.perceptual_weights, random_backbone=random,
                 option="model.perceptual_weights=PATH")
