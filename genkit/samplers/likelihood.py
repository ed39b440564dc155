"""Exact likelihoods in bits/dim: the one bits/dim formula, and the probability-flow ODE's.

Both a flow's training objective (`genkit.families.flow_family`) and `genkit eval bpd`
(`genkit.eval.likelihood.family_bits_per_dim`) use the formula below.

Bits/dim convention (every family: ODE families here, flows through their `log_prob`)
--------------------------------------------------------------------------------------
Data are integers k in [0, 2^n)^D (n = n_bits, 8 for images). Uniform dequantization

    y = (k + u) / 2^n,  u ~ U[0, 1)^D,      x = 2 y - 1 in [-1, 1]^D   (the model's space)

and `nll_nats` = -log p_model(x), a continuous density in the model's space. With
q(k + u) = p_model(x) 2^D 2^(-nD) the density of k + u, Jensen's inequality gives
(Theis et al. 2016; Ho et al. 2019, Flow++, eq. 3)

    -log P(k) <= E_u[-log p_model(x) - D log 2 + n D log 2]

(the Jacobian 2^D of y -> x counted), and bits/dim = that / (D ln 2). A density uniform on
[-1, 1]^D scores exactly n bits/dim. Training data are k / 127.5 - 1 (`genkit.data.from_uint8`);
the dequantized (k + u) / 128 - 1 span the same [-1, 1] (Song et al. likewise train on k / 255
and evaluate at (k + u) / 256).

Likelihood of the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", Sec. 4.3 and App. D.2)
----------------------------------------------------------------------------------------
In the arctan time t = arctan(sigma) of `genkit.samplers.ode`, z follows dz/dt = v(z, t)
(`velocity`, reused, not rewritten) and the instantaneous change of variables (Chen et al.
2018) gives d log p_t(z(t)) / dt = -div v, so, integrating forward from t_min to t_max,

    log p_{t_min}(x) = log p_{t_max}(z(t_max)) + int_{t_min}^{t_max} div v(z(t), t) dt.

Two approximations, as Song et al. make them:
* the data point is taken as the state at sigma_min > 0 (the field is 0/0 at sigma = 0; Song
  et al. start at eps = 1e-5): the result is the density of the marginal at sigma_min,
  p_{sigma_min} = p_data * N(0, s_min^2) scaled by alpha_min, close to p_data for small sigma_min;
* the prior is N(0, I): exact at sigma_max = inf (alpha = 0), and for a finite sigma_max it is
  the initial noise the shared samplers draw at sigmas[0], so the likelihood is that of the
  model the samplers sample from (the true marginal, mean alpha E[x0], differs by O(alpha)).
The divergence is Hutchinson's estimate (the default) with Rademacher probes drawn per sample and fixed
for the whole integration (Grathwohl et al. 2019, FFJORD, Sec. 3.1), averaged over `hutchinson_samples`
probes; the trajectory does not depend on the probes, so the estimate of log p stays unbiased, and its
noise is part of the spread over samples (a standard error over images includes it). The exact
divergence (one basis vector per dimension) costs D vector-Jacobian products per evaluation instead of
K: 256 for a 16 px grey image, 3072 for 32 px RGB; it is there on request.
The field is the denoiser's own (unclipped: `denoise` never clamps x0_hat; ddim and ancestral clamp
on their side). dopri5 controls the error in the RMS over the batch (as `sample_rk45`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from genkit.errors import GenkitError
from genkit.rng import rademacher, rand
from genkit.samplers.adapters import Denoiser
from genkit.samplers.ode import velocity
from genkit.samplers.schedules import arctan_time

HUTCHINSON_PROBES = 4  # default probes per sample: see genkit.eval.engine.compute_bpd for cost vs standard error


def bits_per_dim(nll_nats: Tensor, dims: int, n_bits: int = 8) -> Tensor:
    """Bits/dim of n_bits-bit data from -log p_model(x) in nats, dequantized (see module doc)."""
    if dims < 1 or n_bits < 1:
        raise GenkitError(f"bits_per_dim needs dims >= 1 and n_bits >= 1, got {dims} and {n_bits}")
    return (nll_nats - dims * math.log(2) + dims * n_bits * math.log(2)) / (dims * math.log(2))


def dequantize(images_uint8: Tensor, generator: torch.Generator | None = None, n_bits: int = 8) -> Tensor:
    """x = 2 (k + u) / 2^n_bits - 1 with u ~ U[0, 1): uniform dequantization into [-1, 1] (float32)."""
    if images_uint8.is_floating_point() or images_uint8.is_complex() or images_uint8.dtype == torch.bool:
        raise GenkitError(f"dequantize needs integer images (e.g. uint8), got {images_uint8.dtype}")
    if images_uint8.numel() and (int(images_uint8.min()) < 0 or int(images_uint8.max()) >= 2**n_bits):
        raise GenkitError(f"dequantize: values must lie in [0, {2**n_bits}) for n_bits={n_bits}, got "
                          f"[{int(images_uint8.min())}, {int(images_uint8.max())}]")
    return dequantize_with(images_uint8, rand(images_uint8.shape, generator, images_uint8.device), n_bits)


def dequantize_with(levels: Tensor, u: Tensor, n_bits: int = 8) -> Tensor:
    """x = 2 (k + u) / 2^n_bits - 1 for integer levels k and given noise u in [0, 1) (no checks:
    for training steps, where `dequantize`'s range check would synchronise with the device)."""
    return 2 * (levels.to(torch.float32) + u) / 2**n_bits - 1


def reduce_bits(images_uint8: Tensor, n_bits: int) -> Tensor:
    """8-bit levels k in [0, 256) to n_bits levels floor(k / 2^(8 - n_bits)) (Glow's n_bits_x)."""
    if not 1 <= n_bits <= 8:
        raise GenkitError(f"n_bits must be in 1..8, got {n_bits}")
    return torch.div(images_uint8, 2 ** (8 - n_bits), rounding_mode="floor")


def _basis(start: int, stop: int, z: Tensor) -> Tensor:
    """Basis vectors e_start .. e_{stop-1}, each for every sample: (n, B, *shape)."""
    n, dim = stop - start, z[0].numel()
    e = z.new_zeros(n, z.shape[0], dim)
    rows = torch.arange(n, device=z.device)
    e[rows, :, start + rows] = 1
    return e.view(n, *z.shape)


def _repeat(value: Any, n: int, batch: int) -> Any:
    """A conditioning tensor with one row per sample, repeated n times along the batch."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(n, *[1] * (value.dim() - 1))
    return value


def velocity_and_divergence(
    D: Denoiser, z: Tensor, t: float | Tensor, probes: Tensor | None = None, *, max_batch: int = 1024,
    **cond: Any,
) -> tuple[Tensor, Tensor]:
    """v(z, t) and div_z v per sample: exact, or Hutchinson's mean of p^T (dv/dz) p (FFJORD, eq. 7).

    `probes` (K, B, *z.shape[1:]) gives Hutchinson's estimate averaged over K probes; None sums
    the diagonal over one basis vector per dimension. Each group of probes is one network call on
    the batch repeated (at most `max_batch` rows) and one vector-Jacobian product, so samples must
    not interact inside D (true of any denoiser in eval mode).
    """
    B, dim = z.shape[0], z[0].numel()
    k = dim if probes is None else probes.shape[0]
    per_call = max(1, max_batch // B)
    div, v = z.new_zeros(B), None
    with torch.enable_grad():
        for start in range(0, k, per_call):
            stop = min(start + per_call, k)
            p = _basis(start, stop, z) if probes is None else probes[start:stop]  # (n, B, *shape)
            n = stop - start
            z_rep = z.detach().repeat(n, *[1] * (z.dim() - 1)).requires_grad_(True)  # (n B, *shape)
            v_rep = velocity(D, z_rep, t, **{key: _repeat(c, n, B) for key, c in cond.items()})
            p = p.reshape(v_rep.shape).to(v_rep.dtype)
            (vjp,) = torch.autograd.grad(v_rep, z_rep, p)
            div += (vjp * p).reshape(n, B, -1).sum((0, 2)).detach()
            v = v_rep[:B].detach() if v is None else v
    return v, div if probes is None else div / k


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample, summed over all but the batch dimension."""
    flat = z.flatten(1)
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


class _AugmentedField:
    """(dz/dt, d delta/dt) = (v, div v) for torchdiffeq, counting its evaluations."""

    def __init__(self, D: Denoiser, probes: Tensor | None, max_batch: int, cond: dict[str, Any]):
        self.D, self.probes, self.max_batch, self.cond, self.nfe = D, probes, max_batch, cond, 0

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        return velocity_and_divergence(self.D, state[0], t, self.probes, max_batch=self.max_batch,
                                       **self.cond)


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise GenkitError(f"likelihood needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


def ode_log_likelihood(
    D: Denoiser, x: Tensor, sigma_min: float, sigma_max: float, *, exact_divergence: bool = False,
    hutchinson_samples: int = HUTCHINSON_PROBES, rtol: float = 1e-5, atol: float = 1e-5,
    generator: torch.Generator | None = None, max_batch: int = 1024, **cond: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """log p(x) in nats per sample along the probability-flow ODE (Song et al. 2021, App. D.2).

    Args:
        D: the denoiser x0_hat = D(z; sigma) (e.g. a family's `denoise`); called with gradients on.
        x: (B, ...) points in the model's space, taken as the state at sigma_min (module doc).
        sigma_min, sigma_max: the ends of the integration; sigma_max may be inf (prior N(0, I)).
        exact_divergence: True: exact (D vector-Jacobian products per evaluation); False: Hutchinson.
        hutchinson_samples: Rademacher probes per sample, fixed for the integration, averaged (default 4).
        rtol, atol: dopri5 tolerances on the state and the integrated divergence.
        generator: draws the probes.
        max_batch: rows per network call when the batch is repeated for several probes.
        cond: conditioning passed on to D.

    Returns:
        (log p(x) of shape (B,), {"divergence": "exact" | "hutchinson", "probes": vector-Jacobian
        products per evaluation, "nfe": evaluations of the ODE's right-hand side}).
    """
    _check_range(sigma_min, sigma_max)
    if x.dim() < 2 or x.shape[0] < 1:
        raise GenkitError(f"likelihood needs a batch of shape (B, ...), got {tuple(x.shape)}")
    if hutchinson_samples < 1:
        raise GenkitError(f"hutchinson_samples must be >= 1, got {hutchinson_samples}")
    dim = x[0].numel()
    with torch.inference_mode(False):
        z = x.detach().clone()  # a normal tensor even when called under inference_mode
        probes = None if exact_divergence else rademacher((hutchinson_samples, *z.shape), generator, z.device, z.dtype)
        field = _AugmentedField(D, probes, max_batch, cond)
        ts = torch.tensor([arctan_time(sigma_min), arctan_time(sigma_max)], dtype=z.dtype, device=z.device)
        with torch.no_grad():
            # step_t: land a step on t_max instead of stepping past it and interpolating back; past
            # pi/2 the field is frozen at sigma = inf (a kink), and that misleads the error control
            z_end, delta = odeint(field, (z, z.new_zeros(z.shape[0])), ts, rtol=rtol, atol=atol,
                                  method="dopri5", options={"step_t": ts[1:]})
        log_p = standard_normal_log_prob(z_end[-1]) + delta[-1]
    info = {"divergence": "exact" if exact_divergence else "hutchinson",
            "probes": dim if exact_divergence else hutchinson_samples,
            "nfe": field.nfe}
    return log_p, info
