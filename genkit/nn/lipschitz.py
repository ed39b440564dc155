"""Lipschitz constraints for Kantorovich-dual critics (the WGAN family and `genkit eval w1`).

Kantorovich-Rubinstein duality: W1(p, q) = sup over 1-Lipschitz f of E_p f - E_q f.
    weight clipping   (Arjovsky, Chintala & Bottou 2017, "Wasserstein GAN", Algorithm 1):
                      every critic weight clamped to [-c, c] after each update; the critic is
                      then K-Lipschitz for some unknown K, so it estimates K x W1.
    gradient penalty  (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", eq. 3):
                      lambda E_{x_hat} (||grad f(x_hat)||_2 - 1)^2 on x_hat = eps x + (1 - eps) x_tilde,
                      eps ~ U[0, 1], pulling the gradient norm towards 1 along real-fake segments.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def interpolate(real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """x_hat = eps x + (1 - eps) x_tilde, one eps per sample (shape (B,)), as a leaf requiring grad."""
    e = eps.to(real.dtype).view(-1, *[1] * (real.dim() - 1))  # (B,) -> (B, 1, ...)
    return (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)


def critic_grad_norm(critic: Callable[[Tensor], Tensor], x_hat: Tensor, create_graph: bool) -> Tensor:
    """||grad_x f(x_hat)||_2 per sample, shape (B,); with create_graph the norm is differentiable
    in the critic's weights (the penalty's gradient is a second derivative)."""
    with torch.enable_grad():
        out = critic(x_hat).float().sum()
        (grad,) = torch.autograd.grad(out, x_hat, create_graph=create_graph)
    return grad.flatten(1).float().norm(dim=1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """(E (||grad f(x_hat)|| - 1)^2 with its graph, the detached per-sample norms): WGAN-GP eq. 3."""
    norm = critic_grad_norm(critic, x_hat, create_graph=True)
    return ((norm - 1) ** 2).mean(), norm.detach()


@torch.no_grad()
def clip_weights(net: nn.Module, c: float) -> Tensor:
    """Clamp every parameter of `net` to [-c, c] (WGAN Algorithm 1, line 7); returns the fraction clipped."""
    params = list(net.parameters())
    clipped = torch.stack([(p.abs() > c).sum() for p in params]).sum()
    for p in params:
        p.clamp_(-c, c)
    return clipped.float() / sum(p.numel() for p in params)
