"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling").

Notation (the paper's, which is rectified flow's here, `genkit.families.rectified_flow`):
    x          data, in [-1, 1];  e  noise, N(0, I)
    z_t        = (1 - t) x + t e,   t in [0, 1], t = 1 pure noise
    v          = e - x                                  the conditional (instantaneous) velocity
    u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau  the average velocity over [r, t]
so z_r = z_t - (t - r) u(z_t, r, t) exactly (eq. 1-2), and one step from t = 1 to r = 0 is a sample.

The MeanFlow identity (eq. 6), from differentiating (t - r) u = int_r^t v in t:

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v d_z u + d_t u

so the network u_theta regresses the stop-gradient target
    u_tgt = v - (t - r) (v d_z u_theta + d_t u_theta)               (eq. 8-10)
whose total derivative is one Jacobian-vector product of u_theta(z, r, t) with tangents (v, 0, 1)
(`torch.func.jvp`, Alg. 1). Loss: adaptive weighting (sec. 4.3) w = 1 / (||Delta||^2 + c)^p on
Delta = u_theta - u_tgt, L = sg(w) ||Delta||^2, p = 1 (c = 1e-3). (r, t): two logit-normal draws
sorted (t >= r), and r = t for a fraction 1 - `ratio_r_neq_t` of the batch, where the target is
plain flow matching (the paper's 25% r != t is its ImageNet default).

The target's JVP runs without a graph through the unwrapped UNet (DistributedDataParallel's forward
takes no dual tensors) and the prediction is a second, ordinary forward: one more evaluation per
step than the paper's single `jvp`, the same numbers without dropout (with dropout the two passes
draw different masks).

Network: the diffusers UNet of the other families with a second time embedding: diffusers'
class_embed_type="timestep" embeds a second scalar with the same sinusoidal projection and its own
MLP and adds it to the time embedding; it receives 1000 (t - r), the timestep 1000 t (the
paper's best positional inputs, (t, t - r), Table 1c).

Sampling through the shared samplers: `denoise(z, sigma)` is the one-step jump to the data,
x0_hat = z_t - t u(z_t, 0, t) (sigma = t / (1 - t) as in rectified flow), so `consistency` with
one step is the paper's 1-NFE sampler; two steps (grid t = 1, 0.5, 0) jump, re-noise to t = 0.5
and jump again (2 NFE). The paper's own deterministic 2-step sampler z_0.5 = z_1 - 0.5 u(z_1,
0.5, 1), x = z_0.5 - 0.5 u(z_0.5, 0, 0.5) needs two times per evaluation, which the shared
denoiser D(z, sigma) does not carry: it is `MeanFlow.flow_map_sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import Denoising, Family, StepHandle
from genkit.nn.unet import UNetConfig, build_unet
from genkit.samplers.adapters import vp_coefficients


@dataclass
class MeanFlowConfig(FamilyConfig):
    family: str = "meanflow"
    time_mean: float = -0.4                      # (r, t) ~ sigmoid(N(mean, std^2)), sorted (paper: lognorm(-0.4, 1.0))
    time_std: float = 1.0
    ratio_r_neq_t: float = 0.25                  # fraction of the batch with r != t (the rest: flow matching)
    adaptive_p: float = 1.0                      # w = 1 / (||Delta||^2 + c)^p; p = 0: plain squared error
    adaptive_c: float = 1e-3
    class_cond: bool = False                     # not supported: the class embedding carries t - r
    unet: UNetConfig = field(default_factory=UNetConfig)


U = Callable[[Tensor, Tensor, Tensor], Tensor]  # u(z, r, t) with r, t of shape (B,)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *[1] * (like.dim() - 1))  # (B,) -> (B, 1, 1, 1)


def meanflow_target(u: U, z: Tensor, r: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u(z, r, t), sg[u_tgt]) with u_tgt = v - (t - r)(v d_z u + d_t u), one JVP with tangents (v, 0, 1) (eq. 8)."""
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no forward-mode derivative
        u_pred, dudt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u_pred, (v - _bcast(t - r, v) * dudt).detach()


def adaptive_loss(delta: Tensor, p: float, c: float) -> Tensor:
    """mean over the batch of sg(w) ||Delta||^2, w = 1 / (||Delta||^2 + c)^p (sec. 4.3)."""
    sq = delta.flatten(1).pow(2).sum(1)
    return (sq / (sq.detach() + c) ** p).mean()


def sample_times(a: Tensor, b: Tensor, keep: Tensor, mean: float, std: float, ratio: float) -> tuple[Tensor, Tensor]:
    """(r, t) from two N(0, 1) draws a, b and U[0, 1) draws `keep`: logit-normal, sorted, r = t unless keep < ratio."""
    s1, s2 = torch.sigmoid(mean + std * a), torch.sigmoid(mean + std * b)
    t, r = torch.maximum(s1, s2), torch.minimum(s1, s2)
    return torch.where(keep < ratio, r, t), t


def meanflow_unet(cfg: UNetConfig, channels: int, image_size: int) -> UNet2DModel:
    """The families' UNet with a second time embedding (class_embed_type="timestep") for t - r."""
    config = {k: v for k, v in build_unet(cfg, channels, image_size).config.items() if not k.startswith("_")}
    return UNet2DModel.from_config({**config, "class_embed_type": "timestep"})


class MeanFlow(Family, Denoising):
    """MeanFlow: an average-velocity UNet u(z, r, t) trained by the MeanFlow identity; 1-NFE sampling."""

    name = "meanflow"
    default_sampler = "consistency"
    default_steps = 1
    noise_process = "flow"

    def __init__(self, cfg: MeanFlowConfig, shape: tuple[int, int, int], num_classes: int = 0):
        if cfg.class_cond:
            raise ConfigError("model.class_cond: meanflow is unconditional (its class embedding carries t - r)")
        if not 0 <= cfg.ratio_r_neq_t <= 1:
            raise ConfigError(f"model.ratio_r_neq_t: must be in [0, 1], got {cfg.ratio_r_neq_t}")
        if not cfg.time_std > 0 or not cfg.adaptive_c > 0 or cfg.adaptive_p < 0:
            raise ConfigError("model.time_std and model.adaptive_c must be > 0, model.adaptive_p >= 0")
        self.cfg, self.sample_shape = cfg, tuple(shape)
        self.nets = nn.ModuleDict({"unet": meanflow_unet(cfg.unet, shape[0], shape[1])})

    def u(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """The average velocity u(z_t, r, t) = net(z_t; 1000 t, 1000 (t - r)); r, t of shape (B,)."""
        net = self.nets["unet"]
        return net(z, 1000 * t, class_labels=1000 * (t - r)).sample

    # -- training ----------------------------------------------------------------------
    def loss(self, x: Tensor, e: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(adaptively weighted MeanFlow loss, plain mean squared error) on z_t = (1 - t) x + t e."""
        z = (1 - _bcast(t, x)) * x + _bcast(t, x) * e
        net = self.nets["unet"]
        plain = net.module if isinstance(net, DistributedDataParallel) else net  # DDP's forward takes no duals
        with torch.no_grad():  # the target: a JVP through the unwrapped UNet, no graph
            _, u_tgt = meanflow_target(lambda z_, r_, t_: plain(z_, 1000 * t_, class_labels=1000 * (t_ - r_)).sample,
                                       z, r, t, e - x)
        u_pred = self.u(z, r, t)   # the prediction: an ordinary forward, through DDP when distributed
        delta = u_pred.float() - u_tgt.float()
        return adaptive_loss(delta, self.cfg.adaptive_p, self.cfg.adaptive_c), delta.pow(2).mean()

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step: (r, t), noise from the global-batch stream, the MeanFlow loss."""
        x, cfg = batch["image"], self.cfg
        n = x.shape[0]
        r, t = sample_times(opt.randn(n), opt.randn(n), opt.rand(n), cfg.time_mean, cfg.time_std, cfg.ratio_r_neq_t)
        loss, mse = self.loss(x, opt.randn(*x.shape), r, t)
        opt.step("model", loss)
        return {"loss": loss.detach(), "mse": mse.detach()}

    # -- sampling ----------------------------------------------------------------------
    def denoise(self, z: Tensor, sigma: Tensor) -> Tensor:
        """x0_hat = z_t - t u(z_t, 0, t), z_t = z / (alpha + s), t = s / (alpha + s): the one-step jump."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        alpha, s = vp_coefficients(sigma.to(z.device, dtype))
        t = s / (alpha + s)                              # (B,), 1 at sigma = inf
        z_t = z / _bcast(alpha + s, z)
        return z_t - _bcast(t, z) * self.u(z_t, torch.zeros_like(t), t).to(z.dtype)

    def sigmas(self, steps: int) -> Tensor:
        """Uniform in t from 1 to 0, as rectified flow: sigma_i = (steps - i) / i (inf first, 0 last)."""
        if steps < 1:
            raise SamplerError(f"steps must be >= 1, got {steps}")
        i = torch.arange(steps + 1, dtype=torch.float64)
        return (steps - i) / i

    def sigma_range(self) -> tuple[float, float]:
        """(sigma of t = 1e-3, inf)."""
        return 1e-3 / (1 - 1e-3), float("inf")

    @torch.inference_mode()
    def flow_map_sample(self, noise: Tensor, steps: int = 2) -> Tensor:
        """The paper's deterministic sampler: z_r = z_t - (t - r) u(z_t, r, t) on t = 1, 1 - 1/steps, ..., 0."""
        ts = torch.linspace(1, 0, steps + 1).tolist()
        z = noise.to(self.device)
        for t, r in zip(ts[:-1], ts[1:]):
            tt, rr = z.new_full((len(z),), t), z.new_full((len(z),), r)
            z = z - (t - r) * self.u(z, rr, tt)
        return z
