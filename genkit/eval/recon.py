"""Reconstruction quality of a tokenizer run: PSNR, LPIPS, rFD and codebook usage (`genkit eval recon`).

Images come from a SPEC as uint8; reconstructions x_rec = decode(encode(x)) are quantized to
uint8 exactly as saved PNGs would be, and every metric compares the two uint8 sets:
    PSNR   mean over images of 10 log10(255^2 / MSE)                (MSE over pixels and channels)
    LPIPS  mean LPIPS distance (ImageNet backbone resolved offline; skipped, with the reason,
           when its weights are absent or the images are smaller than 16 px)
    rFD    Frechet distance between the features of x and of x_rec (`--features`; default
           `digits` for runs trained on digits, else `inception`)
    usage  fraction of the K codes used over the whole set, and the perplexity of their histogram
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genkit.errors import GenkitError
from genkit.eval.engine import EvalSettings, build_extractor, default_features
from genkit.eval.frechet import GaussianStats, frechet_distance
from genkit.eval.specs import iter_images
from genkit.families.base import Tokenizer
from genkit.io import from_uint8, to_uint8
from genkit.nn.perceptual import LPIPS
from genkit.nn.vq import code_stats
from genkit.runs import load
from genkit.version import __version__


def psnr_uint8(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of uint8 images (B, C, H, W); inf for identical images."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def _optional(build: Any) -> tuple[Any, str | None]:
    """(the built object, None), or (None, the one-line reason it could not be built)."""
    try:
        return build(), None
    except GenkitError as e:
        return None, str(e)


@torch.inference_mode()
def compute_recon(run: str | Path, data: str | None, s: EvalSettings,
                  lpips_weights: str | None = None) -> dict[str, Any]:
    """PSNR, LPIPS, rFD and codebook usage of a tokenizer run's reconstructions of `data` (default: its test split).

    `s` is an `genkit.eval.engine.EvalSettings`; `s.features` None picks the default extractor.
    """
    run = Path(run)
    family = load(run, device=s.device)
    if not isinstance(family, Tokenizer):
        raise GenkitError(f"'{run}' is a {family.name} run: eval recon needs a tokenizer run (vqgan)")
    data = data or f"recipe:{run / 'config.yaml'}:test"
    s.features = s.features or default_features(run)
    extractor = build_extractor(s)
    device = next(extractor.parameters()).device
    lpips, lpips_reason = (None, "images smaller than 16 px") if family.sample_shape[1] < 16 else \
        _optional(lambda: LPIPS("vgg", lpips_weights, option="--lpips-weights PATH").to(family.device))
    real, fake = GaussianStats(extractor.dim), GaussianStats(extractor.dim)
    psnr, dist, codes = [], [], []
    for batch in iter_images(data, s.n, s.batch_size):
        x = from_uint8(batch).to(family.device)
        k = family.encode(x)
        rec = to_uint8(family.decode(k).float().cpu())
        codes.append(k.flatten().cpu())
        psnr.append(psnr_uint8(batch, rec))
        if lpips is not None:
            dist.append(lpips(x, from_uint8(rec).to(family.device)).double().cpu())
        real.update(extractor(batch.to(device)).double().cpu())
        fake.update(extractor(rec.to(device)).double().cpu())
    if not psnr:
        raise GenkitError(f"no images in '{data}'")
    (mu1, s1), (mu2, s2) = real.mean_cov(), fake.mean_cov()
    stats = code_stats(torch.cat(codes), family.num_codes)
    rfd_key = "rfid" if extractor.name == "inception" else f"rfd_{extractor.name}"
    return {"metric": "recon", "psnr": float(torch.cat(psnr).mean()),
            "lpips": float(torch.cat(dist).mean()) if dist else None,
            "lpips_skipped": lpips_reason, rfd_key: frechet_distance(mu1, s1, mu2, s2),
            "codebook_usage": float(stats["usage"]), "codebook_perplexity": float(stats["perplexity"]),
            "num_codes": family.num_codes, "n": real.count, "data": data, "run": str(run),
            "protocol": extractor.protocol_dict(), "genkit_version": __version__,
            "lpips_backbone": None if lpips is None else lpips.backbone}
