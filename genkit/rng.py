"""Seeded random streams that give the same numbers on every device, process and resume.

* `mix_seed(*parts)` turns integers (seed, step, batch index, ...) into a well-mixed 63-bit seed,
  so every (seed, step, ...) tuple owns an independent stream and nothing depends on how many
  numbers were drawn before it: a resumed run, another process or another batch split draws the
  same numbers.
* `randn`, `rand` and `rademacher` draw on the generator's device (the CPU by default) and then
  move the result, so a seed gives the same noise on CPU and CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded with `mix_seed(*parts)`."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def _gen_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, I) drawn on the generator's device (CPU by default), then moved: same noise on any device."""
    return torch.randn(shape, generator=generator, device=_gen_device(generator), dtype=dtype).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """U[0, 1) drawn on the generator's device, then moved."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator), dtype=dtype).to(device)


def rademacher(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Probes with independent +-1 entries (Hutchinson 1989), drawn on the generator's device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=_gen_device(generator))
    return (2 * bits - 1).to(device=device, dtype=dtype)
