"""The Family contract: one explicit base class with documented defaults, and declared capabilities.

A family owns networks, losses and generation. The trainer, the shared samplers, evaluation and
the run folder know it only through the members below; nobody probes a family with `hasattr`.

Required of every family (abstract or set in `__init__`):
    name, default_sampler, default_steps        class attributes (the FAMILIES key, the defaults
                                                `sample` uses)
    cfg, nets, sample_shape                     its config dataclass, trainable networks
                                                (nn.ModuleDict), image shape (C, H, W)
    train_step(batch, step, opt)                one update through `opt` (a `StepHandle`)

Optional hooks, each with its default here:
    param_groups()              {"model": every parameter of nets}
    initialize(batch)           nothing (data-dependent initialisation: Glow's ActNorm)
    ema_nets()                  every net (a GAN averages its generator only)
    conditions(n, ...)          none: refuses labels and prompts
    latent_shape                sample_shape (latent diffusion: the latents' shape)
    decode_latents(z)           z (latent diffusion: the first stage decodes)
    init_from_weights(w, run)   strict load of a run's weights (`model.init_from`)
    enable_gradient_checkpointing()   refused with a one-line error
    configure(cfg, stages, data)      cfg (class method; latent diffusion computes its scale factor)
    stages                      () (class attribute: frozen earlier stages the family is built on)
    num_classes                 0 (classes the family is conditioned on)
    compile_sampling            True (False where sampling bypasses the networks' forward)

What a family can do is declared by the capability classes it derives from, each with its own
abstract methods (so a family that declares one and lacks a method fails at construction):
    Denoising       denoise(z, sigma, **cond), sigmas(steps), sigma_range(),  `ddim`, `euler`, ...
                    clip_x0 (None), noise_process ("vp"; "ve", "flow")
    Direct          direct(n, *, generator, batch_size, **options)            `direct`
    Autoregressive  autoregressive(n, *, generator, batch_size, ...)          `autoregressive`
    Likelihood      log_prob(x), n_bits                                       exact bits/dim
    Autoencoder     encode(x) -> latents, decode(z), reconstruct(x)           a first stage (LDM)
    Tokenizer       encode(x) -> codes, decode(codes), num_codes, token_shape an AR prior's tokens
(Autoencoder and Tokenizer are both a `Codec`: encode, decode, reconstruct.)
`Family.capabilities()` lists them by name; samplers name the capability they need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.data import ImageDataset
from genkit.errors import ConfigError, SamplerError


class StepHandle(ABC):
    """What the trainer hands to `Family.train_step` as `opt` (implemented by the trainer).

    `step(group, loss)` back-propagates `loss` into that group's parameters only and steps its
    optimizer when gradients are synchronised (after `train.grad_accum` micro-batches); it returns
    whether the optimizer really stepped. Random draws for the *global* batch go through
    `randn`/`rand`/`randint`: seeded by (seed, step, micro-batch, call), they return this process's
    slice, so N processes at batch B train exactly like one process at batch N*B and a resumed run
    draws the same numbers as an uninterrupted one.
    """

    device: torch.device

    @abstractmethod
    def step(self, group: str, loss: Tensor) -> bool:
        """Back-propagate `loss` into `group` only and step its optimizer; True if it stepped."""

    @abstractmethod
    def randn(self, *shape: int) -> Tensor:
        """N(0, I) of this process's slice of the global batch, resume-exact."""

    @abstractmethod
    def rand(self, *shape: int) -> Tensor:
        """U[0, 1) of this process's slice of the global batch, resume-exact."""

    @abstractmethod
    def randint(self, high: int, *shape: int) -> Tensor:
        """Integers in [0, high) of this process's slice of the global batch, resume-exact."""


@dataclass(frozen=True)
class Stage:
    """A frozen earlier stage a family is built on, named by a run folder in its config.

    `genkit.runs` loads it (a genkit run folder, or `local-dir:PATH` where `local_dir` allows a
    diffusers folder) and passes it to the family's constructor as the keyword `key`; the trainer
    trains `model.<train_recipe>` into RUN/<key> when `model.<key>` is unset.
    """

    key: str                              # model.<key>: the stage's run folder
    needs: type                           # the capability the stage must have (Autoencoder, Tokenizer)
    train_recipe: str | None = None       # model.<train_recipe>: recipe trained when model.<key> is unset
    train_overrides: str | None = None    # model.<train_overrides>: that recipe's overrides
    inherit: tuple[str, ...] = ()         # model keys taken with the stage from model.init_from's run
    local_dir: bool = False               # model.<key> may be local-dir:PATH (a diffusers autoencoder)


class Family(ABC):
    """Base class of every family: networks, losses and generation (see the module docstring)."""

    name: ClassVar[str]
    default_sampler: ClassVar[str | None]     # None: generates nothing by itself (a tokenizer)
    default_steps: ClassVar[int | None] = None
    stages: ClassVar[tuple[Stage, ...]] = ()
    compile_sampling: ClassVar[bool] = True   # False: sampling bypasses the networks' forward
    sampling_hint: ClassVar[str] = ""         # said when a sampler is refused for lack of any

    cfg: FamilyConfig
    nets: nn.ModuleDict
    sample_shape: tuple[int, int, int]        # (C, H, W) of generated images
    num_classes: int = 0                      # classes the family is conditioned on (0: none)

    @classmethod
    def capabilities(cls) -> tuple[str, ...]:
        """The capability names this family declares by its base classes, e.g. ("denoise",)."""
        return tuple(dict.fromkeys(c.capability for c in cls.__mro__ if "capability" in vars(c)))

    @property
    def device(self) -> torch.device:
        """The device of the trainable networks."""
        return next(self.nets.parameters()).device

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups by name, each with its own optimizer (`optim.<group>`); default one, "model"."""
        return {"model": list(self.nets.parameters())}

    @abstractmethod
    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One training step on a batch; calls `opt.step(group, loss)` and returns scalars to log."""

    # -- optional hooks ------------------------------------------------------------------------
    def initialize(self, batch: Mapping[str, Any]) -> None:
        """Data-dependent initialisation from the first global batch, before training (default: none)."""

    def ema_nets(self) -> tuple[str, ...]:
        """The nets the trainer's EMA averages (default: all of `nets`)."""
        return tuple(self.nets)

    def conditions(self, n: int, labels: Tensor | Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(cond, uncond) keywords of the denoiser for n samples; uncond None when unconditional.

        The default family takes no condition and refuses labels and prompts.
        """
        given = [name for name, value in (("class labels", labels), ("prompts", prompts)) if value is not None]
        if given:
            raise SamplerError(f"family '{self.name}' is unconditional: it takes no {given[0]}")
        return {}, None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sampler state: the image shape (latent diffusion: its latents' shape)."""
        return self.sample_shape

    def decode_latents(self, z: Tensor) -> Tensor:
        """Images from final sampler states (default: the states are the images)."""
        return z

    def init_from_weights(self, weights: Mapping[str, Tensor], run: Path) -> None:
        """Load a run's weights into `nets` (`model.init_from`): the same networks, strictly."""
        own = self.nets.state_dict()
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or extra:
            raise ConfigError(f"model.init_from: '{run}' has other networks than this model "
                              f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
        for key, value in weights.items():
            if value.shape != own[key].shape:
                raise ConfigError(f"model.init_from: '{run}' has {key} of shape {tuple(value.shape)}, "
                                  f"this model {tuple(own[key].shape)}: use the model config of that run")
        self.nets.load_state_dict(dict(weights))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (train.gradient_checkpointing); default: refused."""
        raise ConfigError(f"train.gradient_checkpointing: family '{self.name}' does not support it")

    @classmethod
    def configure(cls, cfg: FamilyConfig, stages: Mapping[str, Any], dataset: ImageDataset) -> FamilyConfig:
        """The config with values that depend on the data and the loaded stages filled in (default: cfg)."""
        return cfg


# -- capabilities ----------------------------------------------------------------------------------
class Denoising(ABC):
    """An iterative family: its denoiser and sigma grid drive the shared samplers (`genkit.samplers`)."""

    capability: ClassVar[str] = "denoise"
    # the noise process, which picks each sampler's default grid (`genkit.samplers.SamplerSpec.grids`):
    # "vp" (DDPM, latent diffusion), "ve" (EDM), "flow" (rectified flow)
    noise_process: ClassVar[str] = "vp"

    @abstractmethod
    def denoise(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """D(z; sigma) -> x0_hat in the samplers' VP-scaled coordinates; sigma has shape (B,)."""

    @abstractmethod
    def sigmas(self, steps: int) -> Tensor:
        """The family's own decreasing sigma grid of `steps` steps, ending at 0 (float64)."""

    @abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min > 0, sigma_max): the span of named grids and of adaptive solvers."""

    @property
    def clip_x0(self) -> float | None:
        """The bound that `ddim` and `ancestral` clamp x0_hat to (diffusers' clip_sample); None: no clamping.

        `denoise` itself never clamps: the ODE solvers and the likelihood follow the model's own field.
        """
        return None


class Direct(ABC):
    """A one-pass family (a GAN's generator, a flow's inverse, a decoder): the `direct` sampler."""

    capability: ClassVar[str] = "direct"

    @abstractmethod
    def direct(self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None,
               **options: Any) -> Tensor:
        """n images in [-1, 1] (n, C, H, W), one network pass per batch."""


class Autoregressive(ABC):
    """A family that draws tokens one by one: the `autoregressive` sampler."""

    capability: ClassVar[str] = "autoregressive"

    @abstractmethod
    def autoregressive(self, n: int, *, generator: torch.Generator | None = None,
                       batch_size: int | None = None, **options: Any) -> tuple[Tensor, int]:
        """(n images in [-1, 1], forward passes per batch)."""


class Likelihood(ABC):
    """A family with an exact log-likelihood (normalizing flows)."""

    capability: ClassVar[str] = "likelihood"
    n_bits: int  # bits per pixel of the modelled data

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per sample for x (B, C, H, W) in [-1, 1]."""


class Codec(ABC):
    """Maps images to a representation and back; the trainer's grids show reconstructions of these."""

    name: ClassVar[str]
    nets: nn.ModuleDict

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) -> their representation, deterministic."""

    @abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """A representation -> images, roughly in [-1, 1]."""

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) clamped to [-1, 1]."""
        return self.decode(self.encode(x)).clamp(-1, 1)


class Autoencoder(Codec):
    """A codec with continuous latents (B, c, h, w): a first stage of latent diffusion."""

    capability: ClassVar[str] = "autoencoder"


class Tokenizer(Codec):
    """A codec with discrete codes: `encode` gives indices (B, h, w), an autoregressive prior's tokens."""

    capability: ClassVar[str] = "tokenizer"

    @property
    @abstractmethod
    def num_codes(self) -> int:
        """K, the codebook size (an autoregressive prior's vocabulary)."""

    @property
    @abstractmethod
    def token_shape(self) -> tuple[int, int]:
        """(h, w) of the index map of one image."""
