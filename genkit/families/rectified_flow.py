"""Rectified flow (Liu, Gong & Liu, ICLR 2023, "Flow Straight and Fast"), diffusers' FlowMatch conventions.

Notation (diffusers' `FlowMatchEulerDiscreteScheduler`, SD3):
    x          data (x0 in the samplers' notation), in [-1, 1]
    eps        noise, N(0, I)
    t          flow time in [0, 1]; t = 1 is pure noise (diffusers' scheduler "sigmas")
    x_t        = (1 - t) x + t eps                                   the straight interpolation
    timestep   = 1000 t                                              what the UNet sees
    v          = eps - x,  v_hat = net(x_t, 1000 t) ~ E[eps - x | x_t]   the flow-matching target
The paper writes X_t = t X_1 + (1 - t) X_0 with X_0 ~ noise and X_1 ~ data and integrates
dX/dt = v(X, t) from t = 0 to 1; here t_paper = 1 - t, X_0 = eps, X_1 = x and v_paper = -v.

In the samplers' sigma picture (VP-scaled state z = alpha x0 + s eps of `genkit.samplers`):
    sigma = t / (1 - t)            (sigma = inf at t = 1)
    t     = s / (alpha + s)        = sigma / (1 + sigma), exactly 1 at sigma = inf
    z     = x_t / r,   r = sqrt((1 - t)^2 + t^2) = 1 / (alpha + s)    (alpha = (1 - t)/r, s = t/r)
so `denoise(z, sigma)` = x0_hat = x_t - t v_hat, and `sigmas(steps)` is uniform in t from 1 to 0.

Samplers: DDIM (eta = 0) on this family IS the paper's Euler step x_{t'} = x_t + (t' - t) v_hat
(and diffusers' FlowMatchEulerDiscreteScheduler.step), exact in one step on straight (reflowed)
couplings; genkit's `euler` is Euler in arctan time (`genkit.samplers.ode`), a different
first-order discretisation of the same ODE. So the default sampler is `ddim`.

Reflow and distillation (the paper's sections 2.3 and 3): `genkit reflow RUN` writes pairs
(eps, x = ODE_RUN(eps)) and `data.source=pairs` trains on that coupling (`train_step` uses
the batch's "noise"), starting from the run's weights with `model.init_from`
(`genkit.runs.init_from_run`, called by the trainer). k-step distillation sets
`time_sampling: grid` with `distill_steps: k`: t is drawn from the k start points
{1, 1 - 1/k, ..., 1/k} of the uniform sampling grid, so at the optimum v_hat(x_t, t) = eps - x
there and k `ddim` steps (with `shift: 1`) reproduce each pair exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import StepHandle
from genkit.families.unet_family import UNetFamily
from genkit.nn.unet import UNetConfig
from genkit.rng import randn
from genkit.samplers.adapters import vp_coefficients


@dataclass
class RectifiedFlowConfig(FamilyConfig):
    family: str = "rectified_flow"
    time_sampling: Literal["uniform", "logit_normal", "grid"] = "uniform"  # U[0,1], sigmoid(N(m, s^2)) (SD3),
                                                 # or the distill_steps grid start points (distillation)
    distill_steps: int = 1                       # k of k-step distillation (time_sampling: grid)
    logit_mean: float = 0.0                      # m of the logit-normal
    logit_std: float = 1.0                       # s of the logit-normal
    shift: float = 1.0                           # SD3 timestep shift of the sampling grid: sigma -> shift sigma
    clip_sample: bool = False                    # ddim/ancestral clamp x0_hat to [-1, 1] (not the ODE solvers)
    class_cond: bool = False                     # condition on data labels (classifier-free guidance)
    cond_dropout: float = 0.1                    # P(label -> null label) in training
    unet: UNetConfig = field(default_factory=UNetConfig)


def sigma_to_t(sigma: Tensor) -> Tensor:
    """Flow time t = sigma / (1 + sigma), computed as s / (alpha + s): exactly 1 at sigma = inf."""
    alpha, s = vp_coefficients(sigma)
    return s / (alpha + s)


def t_to_sigma(t: Tensor) -> Tensor:
    """sigma = t / (1 - t); inf at t = 1 (IEEE division by +0)."""
    return t / (1 - t)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *[1] * (like.dim() - 1))  # (B,) -> (B, 1, 1, 1)


class RectifiedFlow(UNetFamily):
    """Rectified flow: a UNet velocity field v_hat(x_t, t) ~ eps - x on straight interpolations."""

    name = "rectified_flow"
    default_sampler = "ddim"   # the paper's Euler step in this family's coordinates (see module doc)
    default_steps = 50
    noise_process = "flow"

    def __init__(self, cfg: RectifiedFlowConfig, shape: tuple[int, int, int], num_classes: int = 0):
        if cfg.distill_steps < 1:
            raise ConfigError(f"model.distill_steps: must be >= 1, got {cfg.distill_steps}")
        super().__init__(cfg, shape, cfg.unet, num_classes)

    # -- training ----------------------------------------------------------------------
    def velocity(self, x_t: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """v_hat(x_t, t[, y]) = net(x_t, 1000 t) ~ E[eps - x | x_t] (diffusers' flow-matching output)."""
        return self.unet(x_t, 1000 * t, label)

    def sample_t(self, n: int, opt: StepHandle) -> Tensor:
        """Training times: U[0, 1), SD3's logit-normal sigmoid(m + s N(0, 1)), or the k-step grid.

        "grid" (k-step distillation): t = 1 - i / k with i uniform in {0, ..., k-1}, the start
        points of the k Euler (`ddim`) steps that sample from t = 1 to 0.
        """
        if self.cfg.time_sampling == "uniform":
            return opt.rand(n)
        if self.cfg.time_sampling == "grid":
            k = self.cfg.distill_steps
            return 1 - opt.randint(k, n).float() / k
        return torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * opt.randn(n))

    def loss(self, x: Tensor, t: Tensor, eps: Tensor, label: Tensor | None = None) -> Tensor:
        """Conditional flow matching: mean || v_hat((1-t) x + t eps, t[, y]) - (eps - x) ||^2."""
        tb = _bcast(t, x)
        x_t = (1 - tb) * x + tb * eps
        return torch.mean((self.velocity(x_t, t, label).float() - (eps - x).float()) ** 2)

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """One step; a batch with "noise" (reflow pairs {"image": x, "noise": eps}) trains on that coupling."""
        x = batch["image"]
        t = self.sample_t(x.shape[0], opt)
        eps = batch["noise"] if "noise" in batch else opt.randn(*x.shape)
        loss = self.loss(x, t, eps, self.train_labels(batch, opt))
        opt.step("model", loss)
        return {"loss": loss.detach()}

    # -- sampling ----------------------------------------------------------------------
    def denoise(self, z: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """D(z; sigma[, y]) -> x0_hat = x_t - t v_hat(x_t, t) with x_t = z / (alpha + s)."""
        dtype = torch.promote_types(z.dtype, torch.float32)  # float64 sampling stays float64
        alpha, s = vp_coefficients(sigma.to(dtype))
        t = s / (alpha + s)                              # (B,), 1 at sigma = inf
        x_t = z / _bcast(alpha + s, z)
        v = self.unet(x_t, 1000 * t, label).to(z.dtype)
        return x_t - _bcast(t, z) * v

    @property
    def clip_x0(self) -> float | None:
        """1 with `model.clip_sample`: ddim and ancestral clamp x0_hat to [-1, 1]; the ODE solvers do not."""
        return 1.0 if self.cfg.clip_sample else None

    def sigmas(self, steps: int) -> Tensor:
        """Uniform in t from 1 to 0: sigma_i = shift (steps - i) / i, i = 0..steps (inf first, 0 last)."""
        if steps < 1:
            raise SamplerError(f"steps must be >= 1, got {steps}")
        i = torch.arange(steps + 1, dtype=torch.float64)
        return self.cfg.shift * (steps - i) / i  # i = 0: inf; i = steps: 0

    def sigma_range(self) -> tuple[float, float]:
        """(sigma of t = 1e-3, inf): the span of the uniform grid and of adaptive solvers."""
        t_min = 1e-3
        return t_min / (1 - t_min), float("inf")


    @torch.inference_mode()
    def straightness(self, n: int, generator: torch.Generator | None = None, steps: int = 50) -> float:
        """The paper's S(Z) = int_0^1 E||(Z_1 - Z_0) - v(Z_t, t)||^2 dt along simulated Euler paths.

        In this module's time, a path runs from x(t=1) = eps to x(t=0) = x_final with
        dx/dt = v_hat, so its straight displacement per unit time is eps - x_final, the mean of
        the Euler velocities. S = mean over steps and samples of ||(eps - x_final) - v_i||^2 / D:
        0 exactly when every path is a straight line traversed at constant speed.
        """
        was_training = self.nets.training
        self.nets.eval()
        try:
            eps = randn((n, *self.sample_shape), generator, self.device)
            label = self.conditions(n)[0].get("label")  # class-balanced labels when conditional
            ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
            x, vs = eps, []
            for t, t_next in zip(ts[:-1], ts[1:]):
                v = self.velocity(x, x.new_full((n,), t), label)
                vs.append(v)
                x = x + (t_next - t) * v
            dev = torch.stack([((eps - x) - v).flatten(1).pow(2).mean(1) for v in vs])  # (steps, n)
            return float(dev.mean())
        finally:
            self.nets.train(was_training)
