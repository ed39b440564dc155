"""Samplers of the probability-flow ODE: Euler, Heun, DPM-Solver++(2M) and adaptive RK45.

Convention: arctan time
-----------------------
The state is the VP-scaled z = alpha x0 + s eps of `genkit.samplers`. In the time

    t = arctan(sigma) in [0, pi/2],      alpha = cos t,      s = sin t,

the probability-flow ODE (Song et al. 2021, eq. 13; Karras et al. 2022, eq. 4 with
s(t) = cos t and sigma(t) = tan t) reads

    dz/dt = v(z, t) = alpha eps_hat - s x0_hat,     x0_hat = D(z; sigma),
                                                     eps_hat = (z - alpha x0_hat) / s,

the "velocity" v of Salimans & Ho (2022, Sec. 4). Every quantity stays finite on the whole
interval: sigma = inf is t = pi/2, where alpha = 0, eps_hat = z and v = -x0_hat, so grids that
start at inf (rectified flow, zero-terminal-SNR schedules) need no special case. Euler, Heun
and RK45 integrate this one vector field, `velocity`; t = 0 itself (0/0 in eps_hat) is never
evaluated: Euler and Heun only step onto it, and RK45 hands the last step to the denoiser.

This Euler is not DDIM: DDIM (`genkit.samplers.ddim`) moves z along the exact arc
cos t x0_hat + sin t eps_hat with x0_hat and eps_hat frozen; Euler follows its tangent. Both are
first order and meet in the many-step limit. (Euler in k-diffusion's variable x = z / alpha over
sigma *is* DDIM, Karras et al. 2022, Sec. 3.) DPM-Solver++ has its own update in the log-SNR
lambda = log(alpha / s) = -log sigma, exact for the linear part of the ODE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from genkit.samplers.adapters import Denoiser, eps_from_x0, vp_coefficients
from genkit.samplers.schedules import arctan_time, sigma_at


def velocity(D: Denoiser, z: Tensor, t: float | Tensor, **cond: Any) -> Tensor:
    """dz/dt = alpha eps_hat - s x0_hat at arctan time t in (0, pi/2] (Salimans & Ho 2022, Sec. 4)."""
    sigma = sigma_at(float(t))
    alpha, s = vp_coefficients(sigma)
    x0 = D(z, z.new_full((z.shape[0],), sigma), **cond)
    return alpha * eps_from_x0(z, x0, alpha, s) - s * x0


def _times(sigmas: Tensor) -> list[float]:
    return [arctan_time(float(sigma)) for sigma in sigmas]


def sample_euler(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Euler's method on the PF-ODE in arctan time (first order): z += (t_n - t) v(z, t)."""
    ts = _times(sigmas)
    for t, t_next in zip(ts[:-1], ts[1:]):
        z = z + (t_next - t) * velocity(D, z, t, **cond)
    return z


def sample_heun(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1) in arctan time; NFE = 2 steps - 1.

    An Euler step, then the trapezoidal correction with the slope at its end point, except on a
    step onto sigma = 0 (t = 0), where the slope is not defined and Euler's step is kept.
    """
    ts = _times(sigmas)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        d = velocity(D, z, t, **cond)
        z_euler = z + h * d
        if t_next == 0:
            z = z_euler
        else:
            z = z + (h / 2) * (d + velocity(D, z_euler, t_next, **cond))
    return z


def log_snr(sigma: float) -> float:
    """lambda = log(alpha / s) = -log sigma, +inf at sigma = 0 and -inf at sigma = inf."""
    return math.inf if sigma == 0 else -math.log(sigma)


def sample_dpmpp_2m(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), as k-diffusion's `sample_dpmpp_2m`; NFE = steps.

    With h = lambda_n - lambda_t and r = h_prev / h, one step is (eq. 10 and Alg. 2)

        D_d = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev          (x0_hat alone on the first step)
        z_n = (s_n / s_t) z - alpha_n (exp(-h) - 1) D_d

    The step onto sigma = 0 is first order (z_n = x0_hat). From sigma = inf, h = inf and
    exp(-h) = 0: z_n = s_n z + alpha_n x0_hat, DDIM's step with eps_hat = z; the step after it
    sees r = inf and is first order as well.
    """
    sig = [float(sigma) for sigma in sigmas]
    x0_prev, h_prev = None, math.nan
    for sigma_t, sigma_n in zip(sig[:-1], sig[1:]):
        _, s_t = vp_coefficients(sigma_t)
        alpha_n, s_n = vp_coefficients(sigma_n)
        x0 = D(z, z.new_full((z.shape[0],), sigma_t), **cond)
        h = log_snr(sigma_n) - log_snr(sigma_t)
        x0_d = x0
        if x0_prev is not None and sigma_n > 0:
            c = 1 / (2 * (h_prev / h))  # 1 / (2r); 0 when the previous step came from sigma = inf
            x0_d = (1 + c) * x0 - c * x0_prev
        z = (s_n / s_t) * z - alpha_n * math.expm1(-h) * x0_d
        x0_prev, h_prev = x0, h
    return z


def sample_rk45(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
    generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Adaptive Dormand-Prince RK5(4) (torchdiffeq's dopri5) on the PF-ODE in arctan time.

    Only the grid's ends matter: it integrates from sigmas[0] to the smallest positive sigma
    (the velocity is 0/0 at sigma = 0), then takes the denoising step z = D(z; sigma_min), the
    first-order step onto sigma = 0 of DDIM and DPM-Solver. NFE = the solver's evaluations + 1.
    The error is controlled in the RMS over the whole batch, so a batch shares its step sizes.
    """
    positive = [float(sigma) for sigma in sigmas if sigma > 0]
    sigma_max, sigma_min = positive[0], positive[-1]
    if sigma_max > sigma_min:
        ts = torch.tensor([arctan_time(sigma_max), arctan_time(sigma_min)], dtype=z.dtype, device=z.device)
        field = lambda t, z_t: velocity(D, z_t, t, **cond)  # noqa: E731
        # step_t: land exactly on the end time; dopri5 otherwise steps past it and interpolates
        # back, evaluating the field beyond sigma_min (even at negative sigma)
        z = odeint(field, z, ts, rtol=rtol, atol=atol, method="dopri5", options={"step_t": ts[1:]})[-1]
    return D(z, z.new_full((z.shape[0],), sigma_min), **cond)
