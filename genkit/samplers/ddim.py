"""DDIM (Song et al., 2021, eq. 12) and ancestral DDPM sampling (Ho et al., 2020).

In VP-scaled coordinates z = alpha x0 + s eps, one step from sigma_t to sigma_n is

    x0_hat = D(z_t; sigma_t)                          eps_hat = (z_t - alpha_t x0_hat) / s_t
    c      = eta * (s_n / s_t) * sqrt(1 - alpha_t^2 / alpha_n^2)      (DDIM's sigma_t(eta))
    z_n    = alpha_n x0_hat + sqrt(s_n^2 - c^2) eps_hat + c * noise

eta = 0 is the deterministic DDIM sampler; eta = 1 gives the DDPM posterior q(x_n | x_t, x0_hat),
i.e. ancestral sampling, whose variance on consecutive timesteps is beta_tilde_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genkit.rng import randn
from genkit.samplers.adapters import Denoiser, eps_from_x0, vp_coefficients


def sample_ddim(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, eta: float = 0.0,
    generator: torch.Generator | None = None, **cond,
) -> Tensor:
    """DDIM over a decreasing sigma grid ending at 0; eta in [0, 1] scales the injected noise."""
    sig = [float(s) for s in sigmas]
    for sigma_t, sigma_n in zip(sig[:-1], sig[1:]):
        alpha_t, s_t = vp_coefficients(sigma_t)
        alpha_n, s_n = vp_coefficients(sigma_n)
        x0 = D(z, z.new_full((z.shape[0],), sigma_t), **cond)
        eps = eps_from_x0(z, x0, alpha_t, s_t)
        c = eta * (s_n / s_t) * math.sqrt(max(1.0 - (alpha_t / alpha_n) ** 2, 0.0))  # alpha_n > 0: sigma_n < inf
        z = alpha_n * x0 + math.sqrt(max(s_n * s_n - c * c, 0.0)) * eps
        if c > 0:
            z = z + c * randn(z.shape, generator, z.device, z.dtype)
    return z


def sample_ancestral(
    D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, **cond,
) -> Tensor:
    """Ancestral DDPM sampling: each step draws from the posterior q(x_n | x_t, x0_hat)."""
    return sample_ddim(D, z, sigmas, eta=1.0, generator=generator, **cond)
