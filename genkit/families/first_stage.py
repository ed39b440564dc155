"""The first stage of latent diffusion (Rombach et al., CVPR 2022, sec. 3.1): image <-> latent.

The interface a first stage offers to `genkit.families.ldm` is small, so that a KL autoencoder
(`autoencoder_kl` family), a local diffusers autoencoder folder, or any other genkit family with
the same methods (a VQGAN run) can serve:

    nets            nn.ModuleDict of its networks (moved to the LDM's device, kept frozen, eval)
    encode(x)       images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w), deterministic
                    (KL: the posterior mean; VQ: the latents the decoder takes)
    decode(z)       latents -> images, roughly [-1, 1] (the sampler clamps)

Latents are unscaled here: the LDM multiplies them by `model.scale_factor`, computed from the data
by `latent_scale_factor` (1 / std of the latents, so diffusion sees unit variance) and stored in
the LDM run's resolved recipe.

`model.first_stage` names it: a genkit run folder (loaded with `genkit.load`; its family must
have encode/decode), or `local-dir:PATH`, a diffusers `AutoencoderKL` folder (config.json +
weights; a pipeline folder's `vae/` subfolder is found too). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError

LOCAL_DIR = "local-dir:"


class DiffusersAutoencoder:
    """A diffusers `AutoencoderKL` as a first stage: encode = posterior mean, decode = decoder."""

    name = "diffusers_autoencoder"

    def __init__(self, vae: nn.Module):
        self.nets = nn.ModuleDict({"vae": vae})

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the posterior mean latents (unscaled)."""
        return self.nets["vae"].encode(x).latent_dist.mean

    def decode(self, z: Tensor) -> Tensor:
        """Latents (unscaled) -> images in [-1, 1]."""
        return self.nets["vae"].decode(z).sample


def _local_autoencoder(path: Path) -> DiffusersAutoencoder:
    from diffusers import AutoencoderKL

    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.first_stage: '{path}' has no config.json (local-dir: needs a diffusers "
                          "AutoencoderKL folder, as saved by save_pretrained)")
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.first_stage: cannot load the autoencoder in '{path}': "
                          f"{str(e).splitlines()[0]}") from None
    return DiffusersAutoencoder(vae)


def load_first_stage(spec: str) -> Any:
    """The frozen first stage named by `model.first_stage` (run folder or local-dir:PATH), eval, on CPU."""
    if spec.startswith(LOCAL_DIR):
        stage = _local_autoencoder(Path(spec[len(LOCAL_DIR):]).expanduser())
    else:
        from genkit.api import load

        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.first_stage: run folder '{path}' does not exist "
                              "(give a genkit run folder or local-dir:PATH of a diffusers autoencoder)")
        stage = load(path, device="cpu")
        missing = [m for m in ("encode", "decode") if not hasattr(stage, m)]
        if missing:
            raise ConfigError(f"model.first_stage: family '{stage.name}' of '{path}' has no {missing[0]}(); "
                              "a first stage needs encode and decode (autoencoder_kl, vqgan)")
    stage.nets.eval().requires_grad_(False)
    return stage


@torch.no_grad()
def latent_shape(stage: Any, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(c, h, w) of the latents of one (C, H, W) image, found by encoding zeros."""
    device = next(stage.nets.parameters()).device
    try:
        z = stage.encode(torch.zeros(1, *image_shape, device=device))
    except RuntimeError as e:
        raise ConfigError(f"model.first_stage: cannot encode {image_shape[0]}-channel "
                          f"{image_shape[1]}x{image_shape[2]} images: {str(e).splitlines()[0]}") from None
    return tuple(z.shape[1:])


@torch.no_grad()
def latent_scale_factor(stage: Any, images: Tensor, batch_size: int = 256) -> float:
    """1 / std of the latents of `images` (N, C, H, W): scaled latents have unit variance (LDM sec. 4.3.2)."""
    device = next(stage.nets.parameters()).device
    zs = [stage.encode(images[i:i + batch_size].to(device)).double().cpu()
          for i in range(0, len(images), batch_size)]
    std = float(torch.cat(zs).std())
    if not std > 0:
        raise ConfigError("model.scale_factor: the first stage maps the data to constant latents (std 0)")
    return 1.0 / std
