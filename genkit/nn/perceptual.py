"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features"), offline.

The `lpips` package ships its learned linear layers (`weights/v0.1/{vgg,alex}.pth`), but builds
its backbone with torchvision's ImageNet weights, which it would download, and loads both with
torch's default unpickling. Here the network is built empty (`pretrained=False, pnet_rand=True`)
and every file is loaded by genkit, hash-checked first and then with `weights_only=True`: the
linear layers against the SHA-256 pinned below, the backbone's ImageNet weights from a local
file found by `genkit.weights` (explicit path, $GENKIT_WEIGHTS_DIR, torch hub cache, genkit cache)
against the SHA-256 prefix in torchvision's file name. A missing file is an error that names it.
`random_backbone=True` keeps the random backbone; it is logged as such, never silent.
LPIPS needs inputs of at least 16 px with VGG (its fifth stage down-samples by 16), 32 px with AlexNet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError, GenkitError
from genkit.weights import check_sha256, load_state_dict, locate_weights

BACKBONES = {  # torchvision's ImageNet weights: file name (SHA-256 prefix in it) and where to fetch it
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
MIN_SIZE = {"vgg": 16, "alex": 32}  # smaller inputs vanish in the backbones' pooling
HEADS_SHA256 = {  # lpips' learned linear layers, weights/v0.1/<net>.pth (the same in lpips 0.1.3 and 0.1.4)
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
}


class LPIPS(nn.Module):
    """d(x, y) per image, inputs in [-1, 1] (B, C, H, W); grey images are repeated to RGB. Frozen."""

    def __init__(self, net: str = "vgg", weights: str | None = None, random_backbone: bool = False,
                 option: str = "--weights PATH"):
        super().__init__()
        import lpips

        if net not in BACKBONES:
            raise ConfigError(f"perceptual net: unknown backbone {net!r}; known: {', '.join(BACKBONES)}")
        path, self.sha256, self.min_size = None, None, MIN_SIZE[net]
        if not random_backbone:  # find the file before building anything
            filename, url = BACKBONES[net]
            path, self.sha256 = locate_weights(filename, weights, url=url, option=option)
        heads = load_heads(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", HEADS_SHA256[net])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)  # loads nothing
        self.model.load_state_dict(heads, strict=False)  # the file holds the lin<k> layers; the backbone comes next
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


def load_heads(path: Path, sha256: str) -> dict[str, Tensor]:
    """lpips' shipped linear layers (`lin<k>.model.1.weight`): the file's full SHA-256 checked, then weights only."""
    if not path.is_file():
        raise GenkitError(f"LPIPS linear layers '{path}' are missing: reinstall lpips")
    check_sha256(path, sha256)  # pinned in full, so the file's keys and shapes are known
    return load_state_dict(path)


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
