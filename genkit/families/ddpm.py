"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, NeurIPS 2020).

Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), t = 0 .. T-1,
alpha_bar_t = prod_{s <= t} (1 - beta_s). The network predicts eps, x_0 or
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, trained with plain MSE, or with the
Min-SNR-gamma weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting
Strategy", ICCV 2023): with SNR_t = alpha_bar_t / (1 - alpha_bar_t), each sample's MSE is weighted
so that the loss equals min(SNR_t, gamma) ||x0_hat - x0||^2 whatever the prediction type:
    eps: min(SNR, gamma) / SNR      x0: min(SNR, gamma)      v: min(SNR, gamma) / (SNR + 1)

In the samplers' sigma picture (as k-diffusion's discrete-schedule wrapper):
    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    z       = x_t                       (the VP-scaled state of `genkit.samplers`)
    t(sigma) = interpolation of the table in log-sigma
so `denoise(z, sigma)` = x0_hat and `sigmas(steps)` is the grid of the chosen timesteps.
The UNet is diffusers' UNet2DModel; the diffusion math lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import Tensor

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import StepHandle
from genkit.families.unet_family import UNetFamily
from genkit.nn.unet import UNetConfig
from genkit.samplers.adapters import TO_X0, training_target, vp_coefficients


@dataclass
class DDPMConfig(FamilyConfig):
    family: str = "ddpm"
    schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    timesteps: int = 1000                        # T
    beta_start: float = 1e-4                     # linear / scaled_linear schedule: beta_0
    beta_end: float = 0.02                       # linear / scaled_linear schedule: beta_{T-1}
    prediction: Literal["epsilon", "x0", "v"] = "epsilon"
    loss_weighting: Literal["none", "min-snr"] = "none"  # min-snr: Min-SNR-gamma (Hang et al. 2023)
    snr_gamma: float = 5.0                       # gamma of min-snr (the paper's default, 5)
    clip_sample: bool = True                     # ddim/ancestral clamp x0_hat to [-1, 1] (not the ODE solvers)
    spacing: Literal["leading", "trailing", "linspace"] = "leading"  # timesteps of a short grid
    class_cond: bool = False                     # condition on data labels (classifier-free guidance)
    cond_dropout: float = 0.1                    # P(label -> null label) in training (Ho & Salimans: 0.1-0.2)
    unet: UNetConfig = field(default_factory=UNetConfig)


def make_betas(schedule: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """beta_t in float64: linear (Ho et al.), scaled_linear (linear in sqrt(beta), Stable Diffusion's;
    diffusers' "scaled_linear") or cosine (Nichol & Dhariwal 2021, max 0.999)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    s = 0.008
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)


class NoiseSchedule:
    """The discrete forward process: betas, alpha_bar, its sigma table and posterior."""

    def __init__(self, betas: Tensor):
        self.betas = betas.double()
        self.T = len(betas)
        self.alpha_bar = torch.cumprod(1 - self.betas, 0)
        self.sigma_table = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()  # increasing in t
        self.log_sigmas = self.sigma_table.log()

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """(x_t, regression target) of a training draw: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
        the closed form of q(x_t | x0); the network sees x_t at t and learns the target."""
        dtype = torch.promote_types(x0.dtype, torch.float32)  # float64 data (tests) stays float64
        ab = self.alpha_bar.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1)).to(dtype)
        alpha, s = ab.sqrt(), (1 - ab).sqrt()
        return alpha * x0 + s * eps, training_target(prediction, x0, eps, alpha, s)

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2 of integer timesteps t, float64."""
        ab = self.alpha_bar.to(t.device)[t]
        return ab / (1 - ab)

    def posterior(self, x0: Tensor, xt: Tensor, t: int) -> tuple[Tensor, float]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
        ab_t = float(self.alpha_bar[t])
        ab_prev = float(self.alpha_bar[t - 1]) if t > 0 else 1.0
        beta = float(self.betas[t])
        mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 \
            + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * xt
        return mean, (1 - ab_prev) / (1 - ab_t) * beta

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of each sigma: linear interpolation of t in log-sigma."""
        dtype = torch.float32 if sigma.device.type == "mps" else torch.float64
        log_sigmas = self.log_sigmas.to(sigma.device, dtype)
        ls = sigma.to(dtype).clamp_min(float(self.sigma_table[0])).log()
        hi = torch.searchsorted(log_sigmas, ls).clamp(1, self.T - 1)
        lo = hi - 1
        w = (ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w.clamp(0, 1)).float()

    def timesteps(self, steps: int, spacing: str = "leading") -> Tensor:
        """Decreasing timesteps of a `steps`-long grid, spaced as diffusers' schedulers."""
        T = self.T
        if not 1 <= steps <= T:
            raise SamplerError(f"steps must be between 1 and T={T} for this schedule, got {steps}")
        # numpy float64, as diffusers (torch's arange/linspace round some .5 cases the other way);
        # [:steps]: for some counts (T=1000, steps=61) float arange overshoots to a timestep of -1
        if spacing == "leading":
            ts = np.arange(steps) * (T // steps)
        elif spacing == "trailing":
            ts = (np.round(np.arange(T, 0, -T / steps))[:steps] - 1)[::-1]
        else:
            ts = np.linspace(0, T - 1, steps).round()
        return torch.from_numpy(ts[::-1].astype(np.int64))

    def sigmas(self, steps: int, spacing: str = "leading") -> Tensor:
        """The sigma grid of those timesteps, decreasing, with a final 0."""
        ts = self.timesteps(steps, spacing)
        return torch.cat([self.sigma_table[ts], torch.zeros(1, dtype=torch.float64)])


def min_snr_weight(snr: Tensor, prediction: str, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight per sample (Hang et al. 2023, eq. 9 and its eps / v forms): the MSE of
    each prediction type times it is min(SNR, gamma) times the MSE of x0_hat."""
    clipped_snr = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped_snr / snr        # ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2
    if prediction == "x0":
        return clipped_snr
    return clipped_snr / (snr + 1)      # ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2


def weighted_mse(out: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """Mean squared error over pixels and batch; with `weight` (B,), each sample's pixel mean weighted."""
    if weight is None:
        return torch.mean((out.float() - target) ** 2)
    per_sample = ((out.float() - target) ** 2).flatten(1).mean(1)
    return torch.mean(weight.to(per_sample) * per_sample)


def loss_weight(cfg: Any, schedule: NoiseSchedule, t: Tensor) -> Tensor | None:
    """The per-sample loss weight of `model.loss_weighting` at timesteps t (None: unweighted MSE)."""
    if cfg.loss_weighting == "none":
        return None
    return min_snr_weight(schedule.snr(t), cfg.prediction, cfg.snr_gamma)


def check_weighting(cfg: Any) -> None:
    """`model.snr_gamma` must be > 0."""
    if not cfg.snr_gamma > 0:
        raise ConfigError(f"model.snr_gamma: must be > 0, got {cfg.snr_gamma}")


def output_to_x0(prediction: str, z: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
    """x0_hat from a network output (eps, x0 or v) at the VP-scaled state z of noise level sigma (B,)."""
    dtype = torch.promote_types(z.dtype, torch.float32)  # float64 sampling stays float64
    alpha, s = vp_coefficients(sigma.to(dtype).view(-1, *[1] * (z.dim() - 1)))
    return TO_X0[prediction](z, out, alpha, s)


class DDPM(UNetFamily):
    """DDPM family: a UNet eps/x0/v-predictor over a discrete noise schedule."""

    name = "ddpm"
    # DPM-Solver++(2M) on the log-SNR grid, x0_hat clamped with clip_sample: at 10 NFE it matched the converged
    # ODE on ddpm_digits where ddim on its best grid was 3.6x it (docs/benchmarks.md, "Few-step sampling");
    # 20 leaves a margin for data the benchmark did not see
    default_sampler = "dpmpp-2m"
    default_steps = 20

    def __init__(self, cfg: DDPMConfig, shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__(cfg, shape, cfg.unet, num_classes)
        self.schedule = NoiseSchedule(make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end))
        check_weighting(cfg)

    def loss(self, x0: Tensor, t: Tensor, eps: Tensor, label: Tensor | None = None) -> Tensor:
        """Simple loss: || target - net(x_t, t[, y]) ||^2 averaged over pixels and batch (each sample
        weighted by `model.loss_weighting`)."""
        xt, target = self.schedule.noised(x0, t, eps, self.cfg.prediction)
        out = self.unet(xt, t.float(), label)
        return weighted_mse(out, target, loss_weight(self.cfg, self.schedule, t))

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step of the simple loss on a global-batch draw of t and eps."""
        x0 = batch["image"]
        t = opt.randint(self.schedule.T, x0.shape[0])
        eps = opt.randn(*x0.shape)
        loss = self.loss(x0, t, eps, self.train_labels(batch, opt))
        opt.step("model", loss)
        return {"loss": loss.detach()}

    def denoise(self, z: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """D(z; sigma[, y]) -> x0_hat through the UNet at the timestep of sigma."""
        out = self.unet(z, self.schedule.sigma_to_t(sigma), label).to(z.dtype)
        return output_to_x0(self.cfg.prediction, z, sigma, out)

    @property
    def clip_x0(self) -> float | None:
        """1 with `model.clip_sample`: ddim and ancestral clamp x0_hat to [-1, 1]; the ODE solvers do not."""
        return 1.0 if self.cfg.clip_sample else None

    def sigmas(self, steps: int) -> Tensor:
        """The sigmas of `steps` timesteps spaced as `model.spacing`, decreasing, with a final 0."""
        return self.schedule.sigmas(steps, self.cfg.spacing)

    def sigma_range(self) -> tuple[float, float]:
        """(sigma of t=0, sigma of t=T-1): the span of the Karras and uniform grids."""
        return float(self.schedule.sigma_table[0]), float(self.schedule.sigma_table[-1])

