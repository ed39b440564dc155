"""`sample(..., compile=True)`: the family's networks through `torch.compile` with weight freezing.

For sampling the weights are constants, so Inductor's `freezing` may fold them into the
compiled graph (on CPU it pre-packs convolution weights for oneDNN and fuses GroupNorm/SiLU
into neighbouring kernels); docs/benchmarks.md has the measured gain and the compile cost.

A frozen graph keeps the weights it was compiled with, and Dynamo's guards do not look at
parameter values: compiling a module, training it a step and compiling it again would reuse the
stale graph. So every network is compiled as a *private copy*, cached on the family's `nets`
(the ModuleDict) together with a fingerprint of the original's parameters (version counter and storage of each). An in-place
update (an optimizer step, `load_state_dict`, an EMA copy) or a swapped `.data` changes the
fingerprint, and the next compiled sampling call copies and compiles afresh. The copies cost one
more set of weights in memory while the networks live.

`compile` may name a torch.compile mode; "max-autotune" also benchmarks Inductor's GEMM
templates while compiling (on this CPU 1.33x instead of 1.23x for the 32 px UNet forward, at a
longer compile).

`BACKEND` is torch.compile's backend: Inductor. The default test suite sets the cheap "eager"
backend, which still proves the copy-and-fingerprint caching (real Inductor runs in the slow step).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from genkit.errors import SamplerError

_CACHE = "_genkit_compiled"  # attribute of the nets ModuleDict: {(net name, mode): (fingerprint, copy)}
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
BACKEND = "inductor"


def compile_mode(compile: bool | str | None) -> str | None:
    """`sample`'s compile argument as a torch.compile mode (None: no compile)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in MODES:
        raise SamplerError(f"compile must be true, false or one of {', '.join(MODES)}; got '{compile}'")
    return compile


def fingerprint(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is written in place or replaced."""
    return tuple((id(t), t._version, t.data_ptr(), t.device.type, t.dtype)
                 for t in (*module.parameters(), *module.buffers()))


def _compile(module: nn.Module, mode: str) -> nn.Module:
    if BACKEND == "inductor":
        return torch.compile(module, mode=mode)
    return torch.compile(module, backend=BACKEND)  # modes are Inductor's


def compiled_copy(nets: nn.ModuleDict, name: str, module: nn.Module, mode: str = "default") -> nn.Module:
    """The cached compiled copy of nets[name], rebuilt when the weights or the mode changed."""
    cache = nets.__dict__.setdefault(_CACHE, {})
    key = fingerprint(module)
    if (name, mode) not in cache or cache[name, mode][0] != key:
        private = copy.deepcopy(module).eval().requires_grad_(False)
        cache[name, mode] = (key, _compile(private, mode))
    return cache[name, mode][1]


@contextlib.contextmanager
def compiled_nets(nets: nn.ModuleDict, mode: str = "default") -> Iterator[None]:
    """Within the block, `nets` holds compiled frozen copies; the originals come back after."""
    import torch._inductor.config as inductor_config

    originals = dict(nets.items())
    try:
        for name, module in originals.items():
            nets[name] = compiled_copy(nets, name, module, mode)
        with inductor_config.patch(freezing=True):
            yield
    except torch._dynamo.exc.BackendCompilerFailed as e:
        inner = e.inner_exception  # the backend's own error, not dynamo's wrapper
        lines = str(inner).strip().splitlines()
        first = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
        raise SamplerError(f"compile={mode!r}: torch.compile failed: {first} (it needs a C++ compiler on CPU, "
                           "triton on CUDA); sample without compile") from None
    finally:
        for name, module in originals.items():
            nets[name] = module
