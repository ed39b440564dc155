"""Multistep solvers of the probability-flow ODE: DPM-Solver++(2M), DPM-Solver++(3M), UniPC, iPNDM.

Each reuses the denoiser outputs of earlier steps, so one step costs one network evaluation
(NFE = steps). Notation (VP-scaled state z = alpha x0 + s eps of `genkit.samplers`):

    lambda = log(alpha / s) = -log sigma      the log-SNR (half of it, as Lu et al. write it)
    h      = lambda_n - lambda_t              the step in lambda; r = h_prev / h
    x0_hat = D(z; sigma)                      the data prediction the "++" solvers extrapolate

The exponential integrators (DPM-Solver++, UniPC) are exact for the linear part of the ODE in
lambda: z_n = (s_n / s_t) z_t - alpha_n (e^{-h} - 1) x0_hat + (higher-order corrections).
From sigma = inf (rectified flow, zero-terminal SNR) h = inf and e^{-h} = 0: the first step is
DDIM's z_n = s_n z + alpha_n x0_hat, and history at lambda = -inf adds no higher-order term.
A grid that ends at zero takes a last first-order step z = x0_hat; one that ends at sigma_min
returns the state there (`genkit.samplers.schedules`).

iPNDM integrates in EDM's variable x = z / alpha against sigma, with the Adams-Bashforth
combination of the last slopes eps_hat = (x - x0_hat) / sigma.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from genkit.errors import SamplerError
from genkit.samplers.adapters import Denoiser, eps_from_x0, vp_coefficients
from genkit.samplers.ode import euler_step


def log_snr(sigma: float) -> float:
    """lambda = log(alpha / s) = -log sigma, +inf at sigma = 0 and -inf at sigma = inf."""
    return math.inf if sigma == 0 else -math.log(sigma)


def _sigma(z: Tensor, sigma: float) -> Tensor:
    return z.new_full((z.shape[0],), sigma)


def _grid(sigmas: Tensor) -> list[float]:
    return [float(sigma) for sigma in sigmas]


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
    sig = _grid(sigmas)
    x0_prev, h_prev = None, math.nan
    for sigma_t, sigma_n in zip(sig[:-1], sig[1:]):
        _, s_t = vp_coefficients(sigma_t)
        alpha_n, s_n = vp_coefficients(sigma_n)
        x0 = D(z, _sigma(z, sigma_t), **cond)
        h = log_snr(sigma_n) - log_snr(sigma_t)
        x0_d = x0
        if x0_prev is not None and sigma_n > 0:
            c = 1 / (2 * (h_prev / h))  # 1 / (2r); 0 when the previous step came from sigma = inf
            x0_d = (1 + c) * x0 - c * x0_prev
        z = (s_n / s_t) * z - alpha_n * math.expm1(-h) * x0_d
        x0_prev, h_prev = x0, h
    return z


def sample_dpmpp_3m(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond: Any,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, App. B; diffusers' DPMSolverMultistepScheduler(solver_order=3,
    solver_type="heun")), as k-diffusion's `sample_dpmpp_3m_sde` with eta = 0; NFE = steps.

    With the last three outputs D_0, D_1, D_2, steps h, h_1, h_2 and r_0 = h_1 / h, r_1 = h_2 / h:

        d1_0 = (D_0 - D_1) / r_0      d1_1 = (D_1 - D_2) / r_1
        d1   = d1_0 + (d1_0 - d1_1) r_0 / (r_0 + r_1)          d2 = (d1_0 - d1_1) / (r_0 + r_1)
        phi_2 = (e^{-h} - 1) / h + 1                            phi_3 = phi_2 / h - 1/2
        z_n  = (s_n / s_t) z - alpha_n (e^{-h} - 1) D_0 + alpha_n (phi_2 d1 - phi_3 d2)

    The first step is first order, the second second order (phi_2 d1_0); the step onto 0 is z = D_0.
    """
    sig = _grid(sigmas)
    hist: list[tuple[Tensor, float]] = []  # (x0_hat, h of the step that followed it), newest first
    for sigma_t, sigma_n in zip(sig[:-1], sig[1:]):
        _, s_t = vp_coefficients(sigma_t)
        alpha_n, s_n = vp_coefficients(sigma_n)
        x0 = D(z, _sigma(z, sigma_t), **cond)
        if sigma_n == 0:  # the last step (a grid's only 0 is its end)
            return x0
        h = log_snr(sigma_n) - log_snr(sigma_t)
        z = (s_n / s_t) * z - alpha_n * math.expm1(-h) * x0
        phi_2 = math.expm1(-h) / h + 1
        if len(hist) >= 2:
            (x0_1, h_1), (x0_2, h_2) = hist[0], hist[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            z = z + alpha_n * (phi_2 * d1 - (phi_2 / h - 0.5) * d2)
        elif hist:
            x0_1, h_1 = hist[0]
            z = z + alpha_n * phi_2 * (x0 - x0_1) / (h_1 / h)
        hist = [(x0, h), *hist[:1]]
    return z


# ---------------------------------------------------------------- UniPC (Zhao et al. 2023), B(h) = e^h - 1

def _unipc_rhos(rks: list[float], h: float, order: int, corrector: bool) -> list[float]:
    """UniPC's coefficients rho (Zhao et al. 2023, Alg. 2 and 3 with B(h) = e^{-h} - 1 in data prediction),
    as diffusers computes them: the predictor of order p solves the first p - 1 rows (0.5 for p = 2),
    the corrector of order p all p rows with r_p = 1 (0.5 for p = 1)."""
    if order == 1 and corrector or order == 2 and not corrector:
        return [0.5]
    hh = -h
    B_h = math.expm1(hh)
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1
    R, b = [], []
    nodes = [*rks, 1.0]
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in nodes])
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R_, b_ = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if not corrector:
        R_, b_ = R_[:-1, :-1], b_[:-1]
    return torch.linalg.solve(R_, b_).tolist()


def _unipc_update(z: Tensor, sigmas: list[float], outs: list[Tensor], sigma_n: float, order: int,
                  new: Tensor | None = None) -> Tensor:
    """One UniP step (`new` None) or UniC step (`new`: x0_hat at the target sigma_n) from the state z at
    sigmas[0], with outputs outs[0] = x0_hat there and outs[k] at the earlier sigmas[k] (newest first)."""
    m0 = outs[0]
    _, s_0 = vp_coefficients(sigmas[0])
    alpha_n, s_n = vp_coefficients(sigma_n)
    lam_0 = log_snr(sigmas[0])
    h = log_snr(sigma_n) - lam_0
    z_n = (s_n / s_0) * z - alpha_n * math.expm1(-h) * m0
    # order p uses p - 1 earlier outputs; one at sigma = inf (lambda = -inf) contributes nothing
    k = min(order, 1 + sum(1 for sigma in sigmas[1:] if sigma < math.inf)) - 1
    if k == 0 and new is None:  # (the step onto sigma = 0, where h = inf, is order 1: see sample_unipc)
        return z_n
    rks = [(log_snr(sigmas[i]) - lam_0) / h for i in range(1, k + 1)]
    rhos = _unipc_rhos(rks, h, k + 1, corrector=new is not None)
    res = sum(rho * (outs[i] - m0) / rk for i, (rho, rk) in enumerate(zip(rhos, rks), start=1))  # 0 if k = 0
    if new is not None:
        res = res + rhos[-1] * (new - m0)
    return z_n - alpha_n * math.expm1(-h) * res


def sample_unipc(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, order: int = 3, generator: torch.Generator | None = None,
    **cond: Any,
) -> Tensor:
    """UniPC-p with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023), as diffusers' UniPCMultistepScheduler; NFE = steps.

    Each step first corrects the state it reached (UniC, using the new x0_hat, no extra evaluation),
    then predicts the next (UniP). The order ramps up from 1 and down again towards the end, as
    diffusers' defaults do (lower_order_final): step i of n has order min(p, i + 1, n - i).
    """
    if order not in (1, 2, 3, 4):
        raise SamplerError(f"unipc: order must be 1, 2, 3 or 4, got {order}")
    sig = _grid(sigmas)
    n = len(sig) - 1
    seen: list[float] = []   # sigmas of the outputs, newest first
    outs: list[Tensor] = []  # x0_hat at those sigmas
    z_last: Tensor | None = None
    for i, (sigma_t, sigma_n) in enumerate(zip(sig[:-1], sig[1:])):
        x0 = D(z, _sigma(z, sigma_t), **cond)
        # step i has order n - i (lower_order_final); the outputs at hand (<= order, i + 1) cap it in _unipc_update
        if z_last is not None:  # UniC on the state the last predictor (step i - 1) reached
            z = _unipc_update(z_last, seen, outs, sigma_t, n - i + 1, new=x0)
        seen, outs = [sigma_t, *seen][:order], [x0, *outs][:order]
        z_last = z
        z = _unipc_update(z, seen, outs, sigma_n, n - i)
    return z


# ---------------------------------------------------------------- iPNDM (Zhang & Chen 2023)

# Adams-Bashforth weights of the newest slope first, for orders 1-4 (uniform-step coefficients)
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, max_order: int = 4, generator: torch.Generator | None = None,
    **cond: Any,
) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "DEIS", App.; as in Zhou et al. 2024's diff-sampler): Adams-Bashforth in
    EDM's x = z / alpha against sigma with the slopes eps_hat = (x - x0_hat) / sigma; NFE = steps.

    x_n = x + (sigma_n - sigma) sum_j c_j eps_hat_{i-j}, the order growing 1, 2, 3, 4 as slopes accrue
    (the fixed uniform-step weights `ADAMS_BASHFORTH`, the "improved" PNDM without Runge-Kutta warm-up).
    """
    if max_order not in (1, 2, 3, 4):
        raise SamplerError(f"ipndm: max_order must be 1, 2, 3 or 4, got {max_order}")
    sig = _grid(sigmas)
    slopes: list[Tensor] = []  # eps_hat, newest first
    for sigma, sigma_n in zip(sig[:-1], sig[1:]):
        alpha, s = vp_coefficients(sigma)
        x0 = D(z, _sigma(z, sigma), **cond)
        slopes = [eps_from_x0(z, x0, alpha, s), *slopes][:max_order]
        if len(slopes) == 1:  # Euler (DDIM): finite from sigma = inf too
            z = euler_step(z, x0, sigma, sigma_n)
            continue
        alpha_n, _ = vp_coefficients(sigma_n)
        slope = sum(c * e for c, e in zip(ADAMS_BASHFORTH[len(slopes) - 1], slopes))
        z = alpha_n * (z / alpha + (sigma_n - sigma) * slope)
    return z
