"""The first stage of latent diffusion (Rombach et al., CVPR 2022, sec. 3.1): image <-> latent.

A first stage is any `Autoencoder` (`genkit.families.base`), so that a KL autoencoder
(`autoencoder_kl` family), a local diffusers autoencoder folder (`DiffusersAutoencoder`), or any
other genkit family that declares the capability can serve:

    nets            nn.ModuleDict of its networks (moved to the LDM's device, kept frozen, eval)
    encode(x)       images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w), deterministic
                    (KL: the posterior mean)
    decode(z)       latents -> images, roughly [-1, 1] (the sampler clamps)

Latents are unscaled here: the LDM multiplies them by `model.scale_factor`, computed from the data
by `latent_scale_factor` (1 / std of the latents, so diffusion sees unit variance) and stored in
the LDM run's resolved recipe.

`model.first_stage` names it: a genkit run folder whose family is an `Autoencoder`, or
`local-dir:PATH`, a diffusers `AutoencoderKL` folder (config.json + weights; a pipeline folder's
`vae/` subfolder is found too); `genkit.runs` loads it and hands it to the LDM. Nothing is
downloaded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError
from genkit.families.base import Autoencoder


class DiffusersAutoencoder(Autoencoder):
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


@torch.no_grad()
def latent_shape(stage: Autoencoder, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(c, h, w) of the latents of one (C, H, W) image, found by encoding zeros."""
    device = next(stage.nets.parameters()).device
    try:
        z = stage.encode(torch.zeros(1, *image_shape, device=device))
    except RuntimeError as e:
        raise ConfigError(f"model.first_stage: cannot encode {image_shape[0]}-channel "
                          f"{image_shape[1]}x{image_shape[2]} images: {str(e).splitlines()[0]}") from None
    return tuple(z.shape[1:])


@torch.no_grad()
def latent_scale_factor(stage: Autoencoder, images: Tensor, batch_size: int = 256) -> float:
    """1 / std of the latents of `images` (N, C, H, W): scaled latents have unit variance (LDM sec. 4.3.2)."""
    device = next(stage.nets.parameters()).device
    zs = [stage.encode(images[i:i + batch_size].to(device)).double().cpu()
          for i in range(0, len(images), batch_size)]
    std = float(torch.cat(zs).std())
    if not std > 0:
        raise ConfigError("model.scale_factor: the first stage maps the data to constant latents (std 0)")
    return 1.0 / std
