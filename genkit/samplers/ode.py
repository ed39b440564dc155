"""Samplers of the probability-flow ODE: EDM's Euler and Heun in sigma, their arctan-time
variants, and adaptive RK45.

EDM's variable: sigma
---------------------
Karras et al. (2022, eq. 4 with s(t) = 1, sigma(t) = t) write the ODE in x = z / alpha (the
variance-exploding state x0 + sigma eps) against sigma itself:

    dx/dsigma = (x - D(x; sigma)) / sigma = eps_hat,

and `euler` and `heun` are their Algorithm 1 (without churn), k-diffusion's `sample_euler` and
`sample_heun`. Euler's step x_n = x + (sigma_n - sigma) eps_hat = x0_hat + sigma_n eps_hat is DDIM
(Karras et al. 2022, Sec. 3): `euler` and `ddim` (eta = 0) take the same steps, except that `ddim`
clamps x0_hat when the family asks. The steps are written in the VP-scaled z of `genkit.samplers`,
so a grid may start at sigma = inf for Euler (x is infinite there, Euler's step has the finite limit
z_n = s_n z + alpha_n x0_hat); Heun's trapezoidal correction does not, and refuses such a grid.

Arctan time
-----------
In the time

    t = arctan(sigma) in [0, pi/2],      alpha = cos t,      s = sin t,

the same ODE (Song et al. 2021, eq. 13; Karras et al. 2022, eq. 4 with s(t) = cos t and
sigma(t) = tan t) reads

    dz/dt = v(z, t) = alpha eps_hat - s x0_hat,     x0_hat = D(z; sigma),
                                                     eps_hat = (z - alpha x0_hat) / s,

the "velocity" v of Salimans & Ho (2022, Sec. 4). Every quantity stays finite on the whole
interval: sigma = inf is t = pi/2, where alpha = 0, eps_hat = z and v = -x0_hat.
`euler-arctan`, `heun-arctan` and `rk45` integrate this one vector field, `velocity`; t = 0 itself
(0/0 in eps_hat) is never evaluated: Euler and Heun only step onto it, and RK45 hands the last step
to the denoiser. Euler in arctan time follows the tangent of DDIM's arc cos t x0_hat + sin t eps_hat
instead of the arc itself: first order too, but a different method from `euler`.

The multistep solvers in log-SNR (DPM-Solver++, UniPC) and iPNDM are in `genkit.samplers.multistep`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from genkit.errors import SamplerError
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


def _sigma(z: Tensor, sigma: float) -> Tensor:
    return z.new_full((z.shape[0],), sigma)


def euler_step(z: Tensor, x0: Tensor, sigma: float, sigma_n: float) -> Tensor:
    """EDM's Euler step x_n = x0_hat + sigma_n eps_hat, VP-scaled: z_n = alpha_n x0_hat + s_n eps_hat."""
    alpha, s = vp_coefficients(sigma)
    alpha_n, s_n = vp_coefficients(sigma_n)
    return alpha_n * x0 + s_n * eps_from_x0(z, x0, alpha, s)


def sample_euler(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Euler's method in sigma (Karras et al. 2022, Alg. 1 without its correction; k-diffusion's
    `sample_euler`): x_n = x + (sigma_n - sigma) (x - D(x; sigma)) / sigma. NFE = steps."""
    sig = [float(sigma) for sigma in sigmas]
    for sigma, sigma_n in zip(sig[:-1], sig[1:]):
        z = euler_step(z, D(z, _sigma(z, sigma), **cond), sigma, sigma_n)
    return z


def sample_heun(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Heun's 2nd-order method in sigma (Karras et al. 2022, Alg. 1, no churn; k-diffusion's `sample_heun`).

    In x = z / alpha: d = (x - D(x; sigma)) / sigma, x' = x + (sigma_n - sigma) d, then the trapezoid
    x_n = x + (sigma_n - sigma) (d + d') / 2 with d' the slope at (x', sigma_n); the step onto
    sigma = 0 keeps Euler's x'. NFE = 2 steps - 1 on grids that end at zero, 2 steps otherwise.
    """
    sig = [float(sigma) for sigma in sigmas]
    if math.isinf(sig[0]):
        raise SamplerError("heun integrates in sigma and cannot start at sigma = inf: use a grid with a finite "
                           "sigma_max (karras, logsnr) or heun-arctan")
    for sigma, sigma_n in zip(sig[:-1], sig[1:]):
        alpha, s = vp_coefficients(sigma)
        alpha_n, s_n = vp_coefficients(sigma_n)
        x = z / alpha
        d = eps_from_x0(z, D(z, _sigma(z, sigma), **cond), alpha, s)  # (x - x0_hat) / sigma
        x_euler = x + (sigma_n - sigma) * d
        if sigma_n == 0:  # the last step: Euler's (the slope at sigma = 0 is not defined)
            z = x_euler
        else:
            z_euler = alpha_n * x_euler
            d_n = eps_from_x0(z_euler, D(z_euler, _sigma(z, sigma_n), **cond), alpha_n, s_n)
            z = alpha_n * (x + (sigma_n - sigma) * (d + d_n) / 2)
    return z


def sample_euler_arctan(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Euler's method on the PF-ODE in arctan time (first order): z += (t_n - t) v(z, t)."""
    ts = _times(sigmas)
    for t, t_next in zip(ts[:-1], ts[1:]):
        z = z + (t_next - t) * velocity(D, z, t, **cond)
    return z


def sample_heun_arctan(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """Heun's 2nd-order method in arctan time; NFE = 2 steps - 1 on grids that end at zero.

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
