"""What every family built on `nets` shares: its device, and one parameter group by default."""

from __future__ import annotations

import torch
from torch import nn


class NetsFamily:
    """Base of the families: `nets` (an nn.ModuleDict) is set by the subclass's __init__."""

    nets: nn.ModuleDict

    @property
    def device(self) -> torch.device:
        """The device of the trainable networks."""
        return next(self.nets.parameters()).device

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer group, "model": every parameter of `nets` (override for several groups)."""
        return {"model": list(self.nets.parameters())}
