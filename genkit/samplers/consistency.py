"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

A consistency model f(x, sigma) maps any point of a probability-flow trajectory to its end, the
data. One evaluation at sigma_max is a sample; more steps alternate "jump to the data" and
"re-noise to the next, smaller sigma" on a given list of sigmas:

    x0_hat  = f(x_{sigma_0}, sigma_0)                           one step: the sample
    x_{n}   = x0_hat + sqrt(sigma_n^2 - sigma_min^2) eps,       eps ~ N(0, I) fresh each step
    x0_hat  = f(x_n, sigma_n)                                   ... for each further sigma

In the samplers' VP-scaled state z = alpha x0 + s eps (`genkit.samplers`) the re-noising is
z_n = alpha_n x0_hat + s_n eps, i.e. sigma_min = 0 in the formula above: the paper's
sqrt(sigma_n^2 - sigma_min^2) differs from sigma_n by sigma_min^2 / (2 sigma_n) (2e-6 at
sigma_n = 0.821, sigma_min = 0.002), far below the model's error. The family's denoiser D(z, sigma)
is f. NFE = the number of positive sigmas before the final 0: the grid [sigma_max, 0] is the
one-step sampler, [80, 0.821, 0] iCT's two-step sampler. A grid that ends at a positive sigma
returns the re-noised state there (the samplers' end=sigma_min convention), without evaluating it.

The sampler runs on any denoiser: on a diffusion model it is a stochastic sampler that restarts
from its own x0 estimate at each sigma (one-step DDIM when the grid has one step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from genkit.rng import randn
from genkit.samplers.adapters import Denoiser, vp_coefficients


def sample_consistency(D: Denoiser, z: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None,
                       **cond) -> Tensor:
    """Multistep consistency sampling over a decreasing sigma grid (Song et al. 2023, Alg. 1)."""
    sig = [float(s) for s in sigmas]
    for sigma, sigma_next in zip(sig[:-1], sig[1:]):
        x0 = D(z, z.new_full((z.shape[0],), sigma), **cond)   # jump to the trajectory's end
        if sigma_next == 0:
            return x0
        alpha_n, s_n = vp_coefficients(sigma_next)
        z = alpha_n * x0 + s_n * randn(z.shape, generator, z.device, z.dtype)  # re-noise to sigma_next
    return z
