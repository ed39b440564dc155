"""Consistency models: consistency training from scratch (iCT) and consistency fine-tuning (ECT).

Papers: Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (CM); Song & Dhariwal 2024,
"Improved Techniques for Training Consistency Models" (iCT); Geng, Pokle, Luo, Lin & Kolter 2025,
"Consistency Models Made Easy" (ECT).

A consistency function f(x, sigma) maps every point x = y + sigma n of a probability-flow
trajectory to its end y, the data. It is parametrised so that the boundary condition
f(x, sigma_min) = x holds exactly, by construction (CM, eq. 5 and Appendix C):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma)
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma_data^2 + sigma^2)

so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0. F is the diffusers UNet of the other families,
`model.parametrization` says how its output is read:

    edm             F = net(c_in x; c_noise), c_in = 1/sqrt(sigma^2 + sigma_data^2) (EDM, `genkit.families.edm`),
                    c_noise = 250 ln(sigma) (the CM UNet's timestep, diffusers' CMStochasticIterativeScheduler):
                    training from scratch, exportable to diffusers' ConsistencyModelPipeline
    ddpm            the net is a DDPM run's (`model.init_from`): its denoiser D_ddpm(x, sigma) (same
    rectified_flow  schedule, prediction) is read as EDM's F = (D - c_skip^EDM x) / c_out^EDM, so that
                    f = c_skip x + c_out F equals D_ddpm up to the CM/EDM scalings' difference at
                    small sigma: fine-tuning starts from the diffusion model's denoiser (ECT)

Training (`model.training`) pairs a noise level sigma_hi with a smaller sigma_lo on the same noise
n and minimises  lambda d(f(y + sigma_hi n, sigma_hi), sg[f(y + sigma_lo n, sigma_lo)])  with the
network itself as its (stop-gradient) target, no EMA teacher (iCT, sec. 3.2):

    ct   iCT: sigma_lo, sigma_hi = sigma_i, sigma_{i+1} of the Karras grid of N(k) points (CM eq. 5
         with rho = 7), N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))
         (iCT eq. 8, "exponential curriculum"), i drawn with p(i) ~ erf((ln sigma_{i+1} - P_mean) /
         (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std)) (iCT eq. 9, lognormal)
    ect  ECT: sigma_hi = t, ln t ~ N(P_mean, P_std^2), sigma_lo = r = max(t - t n(t) / q^(floor(k/d) + 1), 0),
         n(t) = 1 + k_ect sigmoid(-b t) (ECT eq. 8; the stage count as the official code's
         `update_schedule`): with q = 2 the first stage's r is 0 for most t (target y: denoising score
         matching) and each later stage halves the gap; ECT's one-hour CIFAR-10 run uses q = 256 and one
         stage (d beyond the run), a small gap from the start; f(x, r) = x for r <= sigma_min

    lambda = 1 / (sigma_hi - sigma_lo)                         (iCT sec. 3.5; ECT's w(t, r))
    d(a, b) = sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim)   pseudo-Huber (iCT sec. 3.3)

Sampling: one evaluation at `model.sample_sigmas[0]` (80 = sigma_max in the papers; the digits recipes start
at 10, where an epsilon-parametrised network is far better conditioned), or multistep consistency sampling on
`model.sample_sigmas` (`genkit.samplers.consistency`, sampler `consistency`; NFE = number of sigmas).
Notation: the samplers' VP-scaled state is z = x / sqrt(1 + sigma^2) (`genkit.samplers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import StepHandle
from genkit.families.ddpm import DDPM, DDPMConfig
from genkit.families.edm import preconditioning
from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from genkit.families.unet_family import UNetFamily
from genkit.nn.unet import UNetConfig


@dataclass
class ConsistencyConfig(FamilyConfig):
    family: str = "consistency"
    training: Literal["ct", "ect"] = "ct"        # iCT from scratch, or ECT (fine-tuning, model.init_from)
    parametrization: Literal["edm", "ddpm", "rectified_flow"] = "edm"  # how the UNet's output is read
    sigma_data: float = 0.5
    sigma_min: float = 0.002                     # the boundary: f(x, sigma_min) = x
    sigma_max: float = 80.0
    rho: float = 7.0                             # the Karras grid's exponent
    p_mean: float = -1.1                         # lognormal noise: ln sigma ~ N(P_mean, P_std^2) (iCT)
    p_std: float = 2.0
    huber_c: float | None = None                 # pseudo-Huber c; None: 0.00054 sqrt(dim) (iCT)
    s0: int = 10                                 # ct: the curriculum's first and last number of steps
    s1: int = 1280
    total_steps: int = 400000                    # ct: K, the curriculum's length (set it to train.steps)
    ect_q: float = 2.0                           # ect: the gap shrinks by q (2: halves) ...
    ect_stage: int = 25000                       # ... every d trainer steps
    ect_k: float = 8.0                           # ect: n(t) = 1 + k sigmoid(-b t)
    ect_b: float = 1.0
    sample_sigmas: list[float] = field(default_factory=lambda: [80.0, 0.821])  # multistep sampling (iCT's 2-step)
    # parametrization ddpm: the schedule of the DDPM run it starts from (model.init_from)
    schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Literal["epsilon", "x0", "v"] = "epsilon"
    class_cond: bool = False                     # condition on data labels (classifier-free guidance)
    cond_dropout: float = 0.1
    unet: UNetConfig = field(default_factory=UNetConfig)


# -- the paper's formulas -----------------------------------------------------------------------
def boundary_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of CM Appendix C: c_skip(sigma_min) = 1, c_out(sigma_min) = 0 exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample (iCT sec. 3.3), over all but the batch dim."""
    return ((a - b).flatten(1).pow(2).sum(1) + c * c).sqrt() - c


def huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(d) for data of d dimensions (0.03 on CIFAR-10's 3x32x32)."""
    return 0.00054 * math.sqrt(dim)


def curriculum_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)) (iCT eq. 8)."""
    K_prime = max(math.floor(K / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def karras_grid(N: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_1 < ... < sigma_N, uniform in sigma^(1/rho) (CM eq. 5, EDM eq. 5), float64, exact ends."""
    i = torch.arange(N, dtype=torch.float64) / (N - 1)
    sigmas = (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def lognormal_index_probs(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(i) of the pair (sigma_i, sigma_{i+1}), i = 1..N-1 (iCT eq. 9): the lognormal mass between them."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ect_gap(t: Tensor, k: int, q: float, stage: int, k_ect: float, b: float) -> Tensor:
    """r = max(t - t n(t) / q^(floor(k/d) + 1), 0), n(t) = 1 + k_ect sigmoid(-b t) (ECT eq. 8, stage as ECT's code)."""
    n_t = 1 + k_ect * torch.sigmoid(-b * t)
    return (t - t * n_t / q ** (k // stage + 1)).clamp_min(0)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))  # (B,) -> (B, 1, 1, 1)


class Consistency(UNetFamily):
    """Consistency model f(x, sigma) around a diffusers UNet, trained by iCT or ECT."""

    name = "consistency"
    default_sampler = "consistency"
    default_steps = 1
    noise_process = "ve"

    def __init__(self, cfg: ConsistencyConfig, shape: tuple[int, int, int], num_classes: int = 0):
        for key in ("sigma_data", "sigma_min", "p_std", "rho", "s0", "s1", "total_steps", "ect_stage"):
            if not getattr(cfg, key) > 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(cfg, key)}")
        if not cfg.sigma_max > cfg.sigma_min:
            raise ConfigError(f"model.sigma_max: must be > model.sigma_min={cfg.sigma_min}, got {cfg.sigma_max}")
        if cfg.s1 < cfg.s0:
            raise ConfigError(f"model.s1: must be >= model.s0={cfg.s0}, got {cfg.s1}")
        sig = cfg.sample_sigmas
        if not sig or any(not cfg.sigma_min < s <= cfg.sigma_max for s in sig) or sorted(sig, reverse=True) != sig \
                or len(set(sig)) != len(sig):
            raise ConfigError(f"model.sample_sigmas: need decreasing sigmas in (sigma_min, sigma_max], got {sig}")
        super().__init__(cfg, shape, cfg.unet, num_classes)
        self.diffusion = self._diffusion_model(cfg, shape, num_classes)

    def _diffusion_model(self, cfg: ConsistencyConfig, shape: tuple[int, int, int], num_classes: int):
        """The DDPM / rectified-flow family whose denoiser the UNet computes (parametrization ddpm, rectified_flow)."""
        common = dict(unet=cfg.unet, class_cond=cfg.class_cond, cond_dropout=cfg.cond_dropout)
        if cfg.parametrization == "ddpm":
            inner = DDPM(DDPMConfig(schedule=cfg.schedule, timesteps=cfg.timesteps, beta_start=cfg.beta_start,
                                    beta_end=cfg.beta_end, prediction=cfg.prediction, **common), shape, num_classes)
        elif cfg.parametrization == "rectified_flow":
            inner = RectifiedFlow(RectifiedFlowConfig(**common), shape, num_classes)
        else:
            return None
        inner.nets = self.nets  # one network: the trainer's (prepared, wrapped) nets are the inner family's too
        return inner

    # -- the consistency function ------------------------------------------------------
    def F(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """EDM's network output F(x, sigma) in the unscaled x = y + sigma n (see the module docstring)."""
        c_skip_e, c_out_e, c_in, _ = (_bcast(c, x) for c in preconditioning(sigma, self.cfg.sigma_data))
        if self.diffusion is None:
            net_dtype = next(self.nets["unet"].parameters()).dtype
            t = 250 * sigma.log()                                # CM's c_noise = 1000 * 0.25 ln(sigma)
            return self.unet((c_in * x).to(net_dtype), t.to(net_dtype), label).to(x.dtype)
        z = x * torch.rsqrt(1 + _bcast(sigma, x) ** 2)           # the VP-scaled state of the inner family
        D = self.diffusion.denoise(z, sigma, label).to(x.dtype)
        return (D - c_skip_e * x) / c_out_e

    def f(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """f(x, sigma) = c_skip x + c_out F(x, sigma): exactly x at sigma = sigma_min; sigma (B,)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, sigma = x.to(dtype), sigma.to(x.device, dtype)
        c_skip, c_out = (_bcast(c, x) for c in boundary_scalings(sigma, self.cfg.sigma_data, self.cfg.sigma_min))
        return c_skip * x + c_out * self.F(x, sigma, label)

    # -- training ----------------------------------------------------------------------
    def noise_pair(self, n: int, step: int, opt: StepHandle) -> tuple[Tensor, Tensor]:
        """(sigma_hi, sigma_lo) of the batch: iCT's grid pairs or ECT's (t, r) (module docstring)."""
        cfg = self.cfg
        if cfg.training == "ct":
            N = curriculum_steps(step, cfg.total_steps, cfg.s0, cfg.s1)
            sigmas = karras_grid(N, cfg.sigma_min, cfg.sigma_max, cfg.rho)
            cdf = lognormal_index_probs(sigmas, cfg.p_mean, cfg.p_std).cumsum(0)
            u = opt.rand(n).double().cpu()
            # inverse CDF: pair (i, i + 1); the clamp catches u above a last CDF value rounded below 1
            i = torch.searchsorted(cdf, u, right=True).clamp_max(N - 2)
            return sigmas[i + 1].float().to(opt.device), sigmas[i].float().to(opt.device)
        t = (cfg.p_mean + cfg.p_std * opt.randn(n)).exp().clamp(cfg.sigma_min, cfg.sigma_max)
        return t, ect_gap(t, step, cfg.ect_q, cfg.ect_stage, cfg.ect_k, cfg.ect_b)

    def loss(self, y: Tensor, n: Tensor, sigma_hi: Tensor, sigma_lo: Tensor,
             label: Tensor | None = None) -> Tensor:
        """mean of d(f(y + sigma_hi n, sigma_hi), sg f(y + sigma_lo n, sigma_lo)) / (sigma_hi - sigma_lo)."""
        x_lo = y + _bcast(sigma_lo, y) * n
        with torch.no_grad():  # the same network, stop-gradient: no EMA teacher (iCT)
            target = self.f(x_lo, sigma_lo.clamp_min(self.cfg.sigma_min), label)
            target = torch.where(_bcast(sigma_lo <= self.cfg.sigma_min, y), x_lo.to(target.dtype), target)
        pred = self.f(y + _bcast(sigma_hi, y) * n, sigma_hi, label)
        c = self.cfg.huber_c if self.cfg.huber_c is not None else huber_c(y[0].numel())
        weight = 1 / (sigma_hi - sigma_lo).to(pred.dtype)
        return torch.mean(weight * pseudo_huber(pred.float(), target.float(), c))

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step: a noise pair and the noise from the global-batch stream, the consistency loss."""
        y = batch["image"]
        sigma_hi, sigma_lo = self.noise_pair(y.shape[0], step, opt)
        n = opt.randn(*y.shape)
        loss = self.loss(y, n, sigma_hi, sigma_lo, self.train_labels(batch, opt))
        opt.step("model", loss)
        return {"loss": loss.detach()}

    # -- sampling ----------------------------------------------------------------------
    def denoise(self, z: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """f(x, sigma) from the VP-scaled state z = x / sqrt(1 + sigma^2): the consistency sampler's D."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        sigma = sigma.to(z.device, dtype).clamp_min(self.cfg.sigma_min)   # below sigma_min f is the identity
        x = z.to(dtype) * _bcast((1 + sigma**2).sqrt(), z)
        return self.f(x, sigma, label).to(z.dtype)

    def sigmas(self, steps: int) -> Tensor:
        """`steps` sigmas of `model.sample_sigmas` then 0; more steps: a Karras grid down to its last sigma."""
        if steps < 1:
            raise SamplerError(f"steps must be >= 1, got {steps}")
        given = self.cfg.sample_sigmas
        if steps <= len(given):
            points = torch.tensor(given[:steps], dtype=torch.float64)
        else:
            points = karras_grid(steps, given[-1], self.cfg.sigma_max, self.cfg.rho).flip(0)
        return torch.cat([points, points.new_zeros(1)])

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the training grid."""
        return self.cfg.sigma_min, self.cfg.sigma_max
