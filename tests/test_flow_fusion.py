"""Glow's fused training path computes the same function as its layers one by one.

`FlowStep.forward` folds ActNorm into the 1x1 convolution, `_ActNormAct` folds the coupling
network's ActNorm into its convolution and `Conv2dZeros` its output scale into weight and bias
(genkit/nn/flow_layers.py). These tests compose the unfused layers by hand and require equal
outputs, log-determinants and parameter gradients (float64, so only rounding can differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkit.nn import flow_layers as fl


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def unfused_act(m: fl._ActNormAct, x: torch.Tensor) -> torch.Tensor:
    return F.relu((m.conv(x) + m.norm.bias) * torch.exp(m.norm.logs))


def unfused_zeros(m: fl.Conv2dZeros, x: torch.Tensor) -> torch.Tensor:
    return m.conv(x) * torch.exp(m.logs * m.logscale_factor)


def unfused_coupling(c: fl.AffineCoupling, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa, xb = x[:, :c.ca], x[:, c.ca:]
    act1, act2, zeros = c.nn
    h = unfused_zeros(zeros, unfused_act(act2, unfused_act(act1, xa)))
    if not c.affine:
        return torch.cat([xa, xb + h], 1), x.new_zeros(len(x))
    shift, scale = h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)
    return torch.cat([xa, (xb + shift) * scale], 1), torch.log(scale).flatten(1).sum(1)


def unfused_step(step: fl.FlowStep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm, conv, coupling = step.layers
    x, ld1 = norm(x)
    x, ld2 = conv(x)
    x, ld3 = unfused_coupling(coupling, x)
    return x, ld1 + ld2 + ld3


def grads(module: torch.nn.Module, out: torch.Tensor, logdet: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad()
    ((out ** 2).sum() + logdet.sum()).backward()
    return [p.grad.clone() for p in module.parameters()]


def test_fused_flow_step_equals_its_layers_one_by_one():
    torch.manual_seed(0)
    for lu in (True, False):
        for affine in (True, False):
            step = perturb(fl.FlowStep(6, 8, lu=lu, affine=affine)).double()
            x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
            y, ld = step(x)
            y_ref, ld_ref = unfused_step(step, x)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
            g, g_ref = grads(step, y, ld), grads(step, y_ref, ld_ref)
            assert len(g) == len(g_ref) == len(list(step.parameters()))
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            assert any(a.abs().sum() > 0 for a in g)  # the gradients are not all zero (a real check)


def test_fused_pieces_equal_their_definitions_and_init_still_sees_conv_outputs():
    torch.manual_seed(1)
    act = perturb(fl._ActNormAct(3, 5, 3)).double()
    zeros = perturb(fl.Conv2dZeros(3, 4)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(act(x), unfused_act(act, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zeros(x), unfused_zeros(zeros, x), rtol=1e-12, atol=1e-12)
    # data-dependent init still normalises the convolution's own output, then the fused path agrees
    fl.begin_data_init(act)
    out = act(x)
    pre = (act.conv(x) + act.norm.bias) * torch.exp(act.norm.logs)
    torch.testing.assert_close(pre.mean(dim=(0, 2, 3)), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(out, act(x), rtol=1e-12, atol=1e-12)
