"""Invertible layers of normalizing flows, each with its exact log-determinant.

NICE (Dinh, Krueger & Bengio 2014, "NICE: Non-linear Independent Components Estimation",
arXiv:1410.8516): additive coupling on flat vectors with alternating partitions, diagonal scaling.
Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions",
arXiv:1807.03039, and its official code openai/glow `model.py`): ActNorm with data-dependent
initialisation, invertible 1x1 convolution (plain or LU-parametrised), affine coupling with the
official sigmoid scale, squeeze, and the split's learned Gaussian prior.

Contract of every layer: `forward(x) -> (y, logdet)` with logdet = log|det dy/dx| of shape (B,),
and `inverse(y) -> x`. Images are (B, C, H, W); NICE's layers take flat (B, D) vectors.

Speed (the same function, fewer activation-sized ops): outside data-dependent initialisation,
`FlowStep.forward` runs ActNorm and the 1x1 convolution as one convolution with bias, and the
coupling network folds its ActNorms and `Conv2dZeros`' output scale into the convolutions'
weights and biases (tests/test_flow_fusion.py checks values and gradients against the layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision tensors (autocast outputs), float64 kept: sums of logs stay exact."""
    return t if t.dtype == torch.float64 else t.float()


def gaussian_log_prob(z: Tensor, mean: Tensor | float = 0.0, logs: Tensor | float = 0.0) -> Tensor:
    """log N(z; mean, exp(logs)^2) per sample, summed over all but the batch dimension."""
    z = _wide(z)
    if not isinstance(mean, Tensor) and not isinstance(logs, Tensor) and mean == 0 and logs == 0:
        return -0.5 * (LOG_2PI + z * z).flatten(1).sum(1)  # the standard normal: the same value, 3 ops fewer
    mean = _wide(mean) if isinstance(mean, Tensor) else mean
    logs = _wide(logs) if isinstance(logs, Tensor) else torch.tensor(logs, dtype=z.dtype)
    lp = -0.5 * (LOG_2PI + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))
    return lp.flatten(1).sum(1)


def logistic_log_prob(z: Tensor) -> Tensor:
    """log of the standard logistic density, -(softplus(z) + softplus(-z)), summed per sample (NICE)."""
    z = _wide(z)
    return -(F.softplus(z) + F.softplus(-z)).flatten(1).sum(1)


def squeeze2d(x: Tensor) -> Tensor:
    """Space to depth, as Glow's `squeeze2d`: (B, C, H, W) -> (B, 4C, H/2, W/2); volume-preserving."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2)          # (B, C, H/2, 2, W/2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    """Depth to space: the inverse of `squeeze2d`."""
    B, C4, H, W = x.shape
    x = x.view(B, C4 // 4, 2, 2, H, W)              # (B, C, 2, 2, H/2, W/2)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * H, 2 * W)


# -- NICE ------------------------------------------------------------------------------------
class AdditiveCoupling(nn.Module):
    """NICE additive coupling (eq. 5-6): y_I1 = x_I1, y_I2 = x_I2 + m(x_I1); log|det J| = 0.

    The partition alternates with `parity`: I1 = indices with i % 2 == parity (the paper's odd /
    even split, roles exchanged from one layer to the next). m is a ReLU MLP whose output layer
    starts at zero, so an untrained coupling is the identity.
    """

    def __init__(self, dim: int, hidden: int, layers: int, parity: int):
        super().__init__()
        idx = torch.arange(dim)
        self.register_buffer("keep", idx[idx % 2 == parity], persistent=False)    # I1
        self.register_buffer("change", idx[idx % 2 != parity], persistent=False)  # I2
        sizes = [len(self.keep)] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        out = nn.Linear(sizes[-1], len(self.change))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.m = nn.Sequential(*blocks, out)

    def _couple(self, x: Tensor, sign: float) -> Tensor:
        y = torch.empty_like(x)
        x1 = x[:, self.keep]
        y[:, self.keep] = x1
        y[:, self.change] = x[:, self.change] + sign * self.m(x1).to(x.dtype)
        return y

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, 1.0), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`."""
        return self._couple(y, -1.0)


class DiagonalScaling(nn.Module):
    """NICE's last layer: y = exp(s) * x (the paper's S = exp(s)); log|det J| = sum(s)."""

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.s), self.s.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`."""
        return y * torch.exp(-self.s)


# -- Glow ------------------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel affine y = (x + b) * exp(logs) (Glow Sec. 3.1); log|det J| = H W sum(logs).

    Data-dependent initialisation: while `pending_init` is set, the next forward pass sets
    b = -mean and logs = -log(std + 1e-6) per channel from its input (the official code's
    `actnorm` with scale 1), so that batch's output has zero mean and unit variance per channel.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.pending_init = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set b and logs from the per-channel mean and standard deviation of x."""
        x = _wide(x)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.pending_init = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.pending_init:
            self.initialize(x)
        logdet = x.shape[2] * x.shape[3] * self.logs.sum()
        return (x + self.bias) * torch.exp(self.logs), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`."""
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution y = W x per pixel (Glow Sec. 3.2); log|det J| = H W log|det W|.

    W starts as a random rotation (QR of a Gaussian matrix). With `lu`, W = P L (U + diag(sign_s
    exp(log_s))) with P fixed, L unit lower-triangular, U strictly upper-triangular (Glow eq. 10):
    log|det W| = sum(log_s) costs O(C) instead of O(C^3).
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(w)
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def matrix(self) -> tuple[Tensor, Tensor]:
        """(W, log|det W|)."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(len(self.log_s), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.lower * self.l_mask + eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w, logdet_w = self.matrix()
        y = F.conv2d(x, w.to(x.dtype)[:, :, None, None])
        return y, (x.shape[2] * x.shape[3] * logdet_w).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`."""
        w, _ = self.matrix()
        w_inv = torch.linalg.inv(w.double()).to(y.dtype)  # float64: a tight inverse for deep flows
        return F.conv2d(y, w_inv[:, :, None, None])


class Conv2dZeros(nn.Module):
    """The official code's `conv2d_zeros`: a 3x3 convolution starting at zero, output * exp(3 logs)."""

    def __init__(self, cin: int, cout: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: Tensor) -> Tensor:
        # conv(x) * s == conv with weight * s and bias * s: the scale acts on the (small) weight,
        # not on the activation (one activation-sized multiply less, forward and backward)
        s = torch.exp(self.logs * self.logscale_factor).view(-1)
        return F.conv2d(x, self.conv.weight * s[:, None, None, None], self.conv.bias * s, padding=1)


class _ActNormAct(nn.Module):
    """Convolution without bias, ActNorm (data-initialised like the flow's), ReLU: the official `conv2d`."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)  # the official code's default init
        self.norm = ActNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm.pending_init:  # data-dependent init needs the convolution's own output
            return F.relu(self.norm(self.conv(x))[0])
        # (conv(x) + b) * s == conv(x; weight * s) + b * s: ActNorm folded into the convolution's
        # weight and bias, so no activation-sized add and multiply (nor their backward) remain
        s = torch.exp(self.norm.logs).view(-1)
        return F.relu(F.conv2d(x, self.conv.weight * s[:, None, None, None], self.norm.bias.view(-1) * s,
                               padding=self.conv.padding))


class AffineCoupling(nn.Module):
    """Glow's coupling (Sec. 3.3) as in the official code: (x_a, x_b) = split(x); h = NN(x_a);
    shift = h[:, 0::2], scale = sigmoid(h[:, 1::2] + 2); y_b = (x_b + shift) * scale, y_a = x_a.

    log|det J| = sum log(scale). `affine=False` is the additive variant y_b = x_b + NN(x_a).
    NN = conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> Conv2dZeros 3x3, so an
    untrained coupling shifts by 0 and scales by sigmoid(2).
    """

    def __init__(self, channels: int, hidden: int, affine: bool = True):
        super().__init__()
        self.ca, self.affine = channels // 2, affine
        cb = channels - self.ca
        self.nn = nn.Sequential(_ActNormAct(self.ca, hidden, 3), _ActNormAct(hidden, hidden, 1),
                                Conv2dZeros(hidden, 2 * cb if affine else cb))

    def _shift_scale(self, xa: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.nn(xa)
        if not self.affine:
            return h, None
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, :self.ca], x[:, self.ca:]
        shift, scale = self._shift_scale(xa)
        if scale is None:
            return torch.cat([xa, xb + shift], 1), x.new_zeros(x.shape[0])
        logdet = torch.log(_wide(scale)).flatten(1).sum(1)
        return torch.cat([xa, (xb + shift) * scale], 1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`."""
        ya, yb = y[:, :self.ca], y[:, self.ca:]
        shift, scale = self._shift_scale(ya)
        xb = yb - shift if scale is None else yb / scale - shift
        return torch.cat([ya, xb], 1)


class FlowStep(nn.Module):
    """One step of Glow's flow (Fig. 2a): ActNorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, channels: int, hidden: int, lu: bool = True, affine: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels, lu),
                                     AffineCoupling(channels, hidden, affine)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        norm, conv, coupling = self.layers
        if norm.pending_init:  # data-dependent init: each layer on its own input
            logdet = x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
            for layer in self.layers:
                x, ld = layer(x)
                logdet = logdet + ld
            return x, logdet
        # W ((x + b) * s) == (W diag(s)) x + W (b * s): ActNorm and the 1x1 convolution as one
        # convolution with bias; log|det| = H W (sum(logs) + log|det W|), the two layers' sum
        w, logdet_w = conv.matrix()
        s = torch.exp(norm.logs).view(-1)
        weight, bias = w * s, w @ (norm.bias.view(-1) * s)
        y = F.conv2d(x, weight.to(x.dtype)[:, :, None, None], bias.to(x.dtype))
        y, ld = coupling(y)
        wide = torch.promote_types(x.dtype, torch.float32)
        logdet = x.shape[2] * x.shape[3] * (norm.logs.sum() + logdet_w)
        return y, logdet.to(wide) + ld.to(wide)

    def inverse(self, y: Tensor) -> Tensor:
        """The exact inverse of `forward`: the three layers inverted in reverse order."""
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class SplitPrior(nn.Module):
    """Glow's `split2d`: z = (z1, z2) by channels; z2 ~ N(mean, exp(logs)^2) with
    (mean, logs) = Conv2dZeros(z1) interleaved as [0::2, 1::2] (the learned prior); z1 flows on.

    As a bijection z -> (z1, eps) with eps = (z2 - mean) exp(-logs) standardised (the official
    `get_eps`): log|det J| = -sum(logs), and log p(z2 | z1) = log N(eps; 0, I) - sum(logs).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.c1 = channels // 2
        self.conv = Conv2dZeros(self.c1, 2 * (channels - self.c1))

    def prior(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log-scale) of the learned Gaussian prior of the split-off half, given the kept half."""
        h = self.conv(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z1, eps, log|det d(z1, eps)/dz|)."""
        z1, z2 = z[:, :self.c1], z[:, self.c1:]
        mean, logs = self.prior(z1)
        return z1, (z2 - mean) * torch.exp(-logs), -_wide(logs).flatten(1).sum(1)

    def inverse(self, z1: Tensor, eps: Tensor, temperature: float = 1.0) -> Tensor:
        """z from z1 and eps: z2 = mean + temperature * exp(logs) * eps (the official `eps_std`)."""
        mean, logs = self.prior(z1)
        return torch.cat([z1, mean + temperature * torch.exp(logs) * eps.to(mean.dtype)], 1)


def begin_data_init(module: nn.Module) -> int:
    """Mark every ActNorm under `module` for data-dependent initialisation by the next forward pass."""
    norms = [m for m in module.modules() if isinstance(m, ActNorm)]
    for m in norms:
        m.pending_init = True
    return len(norms)
