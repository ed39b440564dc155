"""GANs with a Kantorovich-dual critic: DCGAN, hinge, WGAN (weight clipping) and WGAN-GP.

Papers:
    non-saturating  Goodfellow et al. 2014, sec. 3; Radford et al. 2016 (DCGAN)
    hinge           Lim & Ye 2017; Miyato et al. 2018 (SN-GAN), eq. 17
    wgan            Arjovsky, Chintala & Bottou 2017, Algorithm 1 (clip c = 0.01, RMSProp 5e-5, n_critic 5)
    wgan-gp         Gulrajani et al. 2017, Algorithm 1 (lambda = 10, Adam 1e-4 (0, 0.9), n_critic 5)

Notation (the WGAN papers'):
    x        real images in [-1, 1];  z ~ N(0, I) latents of size `latent_dim`
    G        the generator (net "G", parameter group "G");  x_tilde = G(z)
    f        the critic (net "D", parameter group "D"); raw scores, no sigmoid
    x_hat    eps x + (1 - eps) x_tilde, eps ~ U[0, 1] per sample (the GP's interpolates)
    W_hat    E_real f - E_fake f, the critic's dual estimate of W1 (K x W1 under clipping)

Losses (critic L_D, generator L_G; sp = softplus, so sp(-f) = -log sigmoid(f)):
    non-saturating  L_D = E sp(-f(x)) + E sp(f(x_tilde))     L_G = E sp(-f(x_tilde))
    hinge           L_D = E relu(1 - f(x)) + E relu(1 + f(x_tilde))      L_G = -E f(x_tilde)
    wgan            L_D = E f(x_tilde) - E f(x) = -W_hat; then every weight of f clamped to [-c, c]
    wgan-gp         L_D = -W_hat + lambda E (||grad f(x_hat)||_2 - 1)^2  L_G = -E f(x_tilde)

Update order (`train_step`, the papers' Algorithm 1): every call is one critic update on fresh
fakes; after every `n_critic`-th critic update (`(step + 1) % n_critic == 0`) one generator
update through the updated critic. The counter is the trainer's step, so a resumed run
continues the cycle exactly. Under grad_accum > 1 the generator's micro-batches before the
last see the critic before this step's update (only the last micro-batch steps it).

Distributed: the generator loss goes through the *unwrapped* critic. Its backward reaches G's
parameters only; through DDP's wrapper it would leave the critic's reducer waiting for
gradients that never come, and the next iteration would fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from torch.nn import functional as F

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import Direct, Family, StepHandle
from genkit.nn.gan_nets import Critic, CriticConfig, Generator, GeneratorConfig
from genkit.nn.lipschitz import clip_weights, critic_grad_norm, gradient_penalty, interpolate

WASSERSTEIN_LOSSES = ("wgan", "wgan-gp")


@dataclass
class GANConfig(FamilyConfig):
    family: str = "gan"
    loss: Literal["non-saturating", "hinge", "wgan", "wgan-gp"] = "wgan-gp"
    latent_dim: int = 64
    n_critic: int | None = None       # critic updates per generator update; null: 5 for wgan/wgan-gp, else 1
    clip_value: float = 0.01          # wgan: c, critic weights clamped to [-c, c]
    gp_weight: float = 10.0           # wgan-gp: lambda
    generator_batch_multiple: int = 1  # generator batch = this x critic batch (the GP ResNet code: 2)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


def critic_loss(loss: str, f_real: Tensor, f_fake: Tensor) -> Tensor:
    """L_D of the module docstring, without the gradient penalty."""
    if loss == "non-saturating":
        return F.softplus(-f_real).mean() + F.softplus(f_fake).mean()
    if loss == "hinge":
        return F.relu(1 - f_real).mean() + F.relu(1 + f_fake).mean()
    return f_fake.mean() - f_real.mean()


def generator_loss(loss: str, f_fake: Tensor) -> Tensor:
    """L_G of the module docstring: -log sigmoid f for the non-saturating GAN, else -E f."""
    return F.softplus(-f_fake).mean() if loss == "non-saturating" else -f_fake.mean()


def truncated_latents(shape: tuple[int, ...], generator: torch.Generator | None,
                      truncation: float | None) -> Tensor:
    """z ~ N(0, I) on the generator's device; with truncation t, entries with |z| > t are redrawn
    until none is left (the truncation trick of Brock et al. 2019, BigGAN)."""
    device = generator.device if generator is not None else "cpu"
    z = torch.randn(shape, generator=generator, device=device)
    if truncation is None:
        return z
    if truncation <= 0:
        raise SamplerError(f"truncation must be > 0, got {truncation}")
    while (bad := z.abs() > truncation).any():
        z[bad] = torch.randn(int(bad.sum()), generator=generator, device=device)
    return z


class GAN(Family, Direct):
    """A generator G and a critic f trained adversarially through two parameter groups, "G" and "D"."""

    name = "gan"
    default_sampler = "direct"

    def __init__(self, cfg: GANConfig, shape: tuple[int, int, int], num_classes: int = 0):
        self._validate(cfg)
        self.cfg = cfg
        self.sample_shape = tuple(shape)  # (C, H, W)
        self.n_critic = cfg.n_critic or (5 if cfg.loss in WASSERSTEIN_LOSSES else 1)
        c, h, _ = shape
        self.nets = nn.ModuleDict({"G": Generator(cfg.generator, cfg.latent_dim, c, h),
                                   "D": Critic(cfg.critic, c, h)})
        if cfg.loss == "wgan":  # every critic ever evaluated lies in the clipped set
            clip_weights(self.nets["D"], cfg.clip_value)

    @staticmethod
    def _validate(cfg: GANConfig) -> None:
        for key, value, ok in [("latent_dim", cfg.latent_dim, cfg.latent_dim >= 1),
                               ("n_critic", cfg.n_critic, cfg.n_critic is None or cfg.n_critic >= 1),
                               ("clip_value", cfg.clip_value, cfg.clip_value > 0),
                               ("gp_weight", cfg.gp_weight, cfg.gp_weight >= 0),
                               ("generator_batch_multiple", cfg.generator_batch_multiple,
                                cfg.generator_batch_multiple >= 1)]:
            if not ok:
                raise ConfigError(f"model.{key}: out of range, got {value}")
        if cfg.loss == "wgan-gp" and cfg.critic.norm == "batch":
            raise ConfigError("model.critic.norm: batch norm couples the samples whose input gradients "
                              "the gradient penalty constrains (WGAN-GP sec. 4); use none or layer")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Two optimizer groups: "G" (generator) and "D" (critic / discriminator)."""
        return {"G": list(self.nets["G"].parameters()), "D": list(self.nets["D"].parameters())}

    def ema_nets(self) -> tuple[str, ...]:
        """The trainer's EMA (train.ema_decay) averages the generator only."""
        return ("G",)

    # -- training ----------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One critic update; one generator update after every n_critic-th (the papers' Algorithm 1)."""
        logs = self.critic_step(batch["image"], opt)
        if (step + 1) % self.n_critic == 0:
            self.generator_step(batch["image"].shape[0] * self.cfg.generator_batch_multiple, opt)
        return logs

    def critic_step(self, x: Tensor, opt: StepHandle) -> dict[str, Tensor]:
        """L_D on (x, G(z)) and, for wgan-gp, the penalty on interpolates; clip after a real update."""
        f = self.nets["D"]
        n = x.shape[0]
        with torch.no_grad():
            fake = self.nets["G"](opt.randn(n, self.cfg.latent_dim)).to(x.dtype)
        f_real, f_fake = f(x).float(), f(fake).float()  # (B,), (B,)
        loss = critic_loss(self.cfg.loss, f_real, f_fake)
        x_hat = interpolate(x, fake, opt.rand(n))
        if self.cfg.loss == "wgan-gp":
            penalty, grad_norm = gradient_penalty(f, x_hat)
            loss = loss + self.cfg.gp_weight * penalty
        else:  # a diagnostic only: through the unwrapped critic, no graph kept
            grad_norm = critic_grad_norm(extract_model_from_parallel(f), x_hat, create_graph=False)
        stepped = opt.step("D", loss)
        logs = {"loss_D": loss.detach(), "loss_G": generator_loss(self.cfg.loss, f_fake.detach()),
                "wasserstein": (f_real.mean() - f_fake.mean()).detach(), "grad_norm": grad_norm.mean()}
        if self.cfg.loss == "wgan" and stepped:
            logs["clipped_fraction"] = clip_weights(extract_model_from_parallel(f), self.cfg.clip_value)
        return logs

    def generator_step(self, n: int, opt: StepHandle) -> Tensor:
        """L_G on fresh latents, through the unwrapped critic (DDP-safe: see the module docstring)."""
        fake = self.nets["G"](opt.randn(n, self.cfg.latent_dim))
        loss = generator_loss(self.cfg.loss, extract_model_from_parallel(self.nets["D"])(fake).float())
        opt.step("G", loss)
        return loss.detach()

    # -- sampling ----------------------------------------------------------------------
    def direct(self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None,
               truncation: float | None = None) -> Tensor:
        """n images in [-1, 1], one generator pass per batch; all latents drawn first, so the images
        do not depend on batch_size. `truncation`: redraw latent entries with |z| > truncation."""
        z = truncated_latents((n, self.cfg.latent_dim), generator, truncation).to(self.device)
        G, bs = self.nets["G"], batch_size or n
        return torch.cat([G(z[i:i + bs]).float() for i in range(0, n, bs)])
