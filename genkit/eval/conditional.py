"""Conditional accuracy: does a class-conditional model draw the class it was asked for?

On the digits default the shipped digits classifier (`genkit.eval.features.build_digits`, 98.65%
held-out accuracy) reads back the digit of each sample; the fraction that matches the requested
label is an offline check of conditioning and guidance (text control for latent diffusion).
"""

from __future__ import annotations

from typing import Any

import torch

from genkit.data.captions import digit_prompt
from genkit.errors import GenkitError
from genkit.eval.features import build_digits
from genkit.families.base import Family
from genkit.families.ldm import LDM
from genkit.families.sampling import sample
from genkit.io import to_uint8


@torch.inference_mode()
def digits_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images in [-1, 1] (N, 1, H, W) that the shipped digits classifier reads as `labels`."""
    if images.shape[1] != 1:
        raise GenkitError(f"digits accuracy needs 1-channel images, got {images.shape[1]} channels")
    pred = build_digits().logits(to_uint8(images.cpu())).argmax(1)
    return float((pred == labels.cpu()).float().mean())


def conditional_accuracy(family: Family, n: int = 500, *, guidance: float | None = None, seed: int = 0,
                         batch_size: int = 250, **sampler_kwargs: Any) -> dict[str, Any]:
    """Class-balanced samples (labels 0..C-1 in turn) and the digits classifier's agreement with them."""
    if not family.num_classes:
        raise GenkitError(f"family '{family.name}' is not class-conditional (model.class_cond: false)")
    labels = torch.arange(n) % family.num_classes
    out = sample(family, n, generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
                 labels=labels, guidance=guidance, **sampler_kwargs)
    return {"accuracy": digits_accuracy(out.images, labels), "n": n, "guidance": guidance,
            "sampler": out.sampler, "steps": out.steps, "nfe": out.nfe}


def prompt_accuracy(family: Family, n: int = 500, *, guidance: float | None = None, seed: int = 0,
                    batch_size: int = 250, **sampler_kwargs: Any) -> dict[str, Any]:
    """Text control on digits: samples prompted "a handwritten digit <d>" for d = 0..9 in turn, and the
    fraction the digits classifier reads as the digit the prompt asked for (chance: 0.1)."""
    if not isinstance(family, LDM):
        raise GenkitError(f"family '{family.name}' takes no text prompts (model.family: ldm does)")
    labels = torch.arange(n) % 10
    out = sample(family, n, generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
                 prompts=[digit_prompt(int(d)) for d in labels], guidance=guidance,
                 **sampler_kwargs)
    return {"accuracy": digits_accuracy(out.images, labels), "n": n, "guidance": guidance,
            "sampler": out.sampler, "steps": out.steps, "nfe": out.nfe}
