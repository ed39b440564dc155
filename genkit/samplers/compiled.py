"""`sample(..., compile=True)`: the family's networks through `torch.compile` with weight freezing.

For sampling the weights are constants, so Inductor's `freezing` may fold them into the
compiled graph (on CPU it pre-packs convolution weights for oneDNN and fuses GroupNorm/SiLU
into neighbouring kernels); docs/benchmarks.md has the measured gain and the compile cost.

A frozen graph keeps the weights it was compiled with, and Dynamo's guards do not look at
parameter values: compiling a module, training it a step and compiling it again would reuse the
stale graph. So every network is compiled as a *private copy*, cached on the family together with
a fingerprint of the original's parameters (version counter and storage of each). An in-place
update (an optimizer step, `load_state_dict`, an EMA copy) or a swapped `.data` changes the
fingerprint, and the next compiled sampling call copies and compiles afresh.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from genkit.errors import SamplerError

_CACHE = "_genkit_compiled_nets"  # family attribute: {net name: (fingerprint, compiled copy)}


def fingerprint(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `module` is written in place or replaced."""
    return tuple((id(t), t._version, t.data_ptr(), t.device.type, t.dtype)
                 for t in (*module.parameters(), *module.buffers()))


def compiled_copy(family: Any, name: str, module: nn.Module) -> nn.Module:
    """The cached compiled copy of family.nets[name], rebuilt when the weights changed."""
    cache = family.__dict__.setdefault(_CACHE, {})
    key = fingerprint(module)
    if name not in cache or cache[name][0] != key:
        private = copy.deepcopy(module).eval().requires_grad_(False)
        cache[name] = (key, torch.compile(private))
    return cache[name][1]


@contextlib.contextmanager
def compiled_nets(family: Any) -> Iterator[None]:
    """Within the block, family.nets holds compiled frozen copies; the originals come back after."""
    import torch._inductor.config as inductor_config

    originals = dict(family.nets.items())
    try:
        for name, module in originals.items():
            family.nets[name] = compiled_copy(family, name, module)
        with inductor_config.patch(freezing=True):
            yield
    except torch._dynamo.exc.BackendCompilerFailed as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamplerError(f"compile=True: torch.compile failed ({first}); on CPU it needs a C++ compiler "
                           "(g++), on CUDA triton; sample without compile") from None
    finally:
        for name, module in originals.items():
            family.nets[name] = module
