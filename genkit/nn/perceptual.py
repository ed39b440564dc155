"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features"), offline.

The `lpips` package ships its learned linear layers (`weights/v0.1/{vgg,alex}.pth`), but builds
its backbone with torchvision's ImageNet weights, which it would download. Here the backbone is
built randomly (`pnet_rand=True`) and its ImageNet weights are loaded from a local file found by
`genkit.weights` (explicit path, $GENKIT_WEIGHTS_DIR, torch hub cache, genkit cache) and
checked against the SHA-256 prefix in torchvision's file name. A missing file is an error that
names it. `random_backbone=True` keeps the random backbone; it is logged as such, never silent.
LPIPS needs inputs of at least 16 px with VGG (its fifth stage down-samples by 16), 32 px with AlexNet.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError, GenkitError
from genkit.weights import load_state_dict, locate_weights

BACKBONES = {  # torchvision's ImageNet weights: file name (SHA-256 prefix in it) and where to fetch it
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
MIN_SIZE = {"vgg": 16, "alex": 32}  # smaller inputs vanish in the backbones' pooling


class LPIPS(nn.Module):
    """d(x, y) per image, inputs in [-1, 1] (B, C, H, W); grey images are repeated to RGB. Frozen."""

    def __init__(self, net: str = "vgg", weights: str | None = None, random_backbone: bool = False):
        super().__init__()
        import lpips

        if net not in BACKBONES:
            raise ConfigError(f"perceptual net: unknown backbone {net!r}; known: {', '.join(BACKBONES)}")
        path, self.sha256, self.min_size = None, None, MIN_SIZE[net]
        if not random_backbone:  # find the file before building anything
            filename, url = BACKBONES[net]
            path, self.sha256 = locate_weights(filename, weights, url=url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.backbone = "random (NOT ImageNet: LPIPS values are not comparable)"
        if path is not None:
            load_backbone(self.model.net, load_state_dict(path), str(path))
            self.backbone = f"ImageNet {path.name}"
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the backbone's dropout stays off

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise GenkitError(f"LPIPS needs images of at least {self.min_size} px, got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.model(x, y).flatten()  # (B,)


def load_backbone(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy torchvision's `features.<i>.*` weights into lpips' slices (`slice<k>.<i>.*`); all must match."""
    own = {}
    for name, tensor in net.state_dict().items():  # e.g. "slice2.5.weight" -> "features.5.weight"
        _, index, leaf = name.split(".")
        own[f"features.{index}.{leaf}"] = (name, tensor)
    missing = [k for k in own if k not in state]
    if missing:
        raise GenkitError(f"weights file '{source}' lacks {missing[0]}: not a torchvision backbone for LPIPS")
    with torch.no_grad():
        for key, (name, tensor) in own.items():
            if state[key].shape != tensor.shape:
                raise GenkitError(f"weights file '{source}': {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(tensor.shape)}")
            tensor.copy_(state[key])
