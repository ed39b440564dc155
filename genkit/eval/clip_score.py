"""CLIP score (Hessel et al., EMNLP 2021, "CLIPScore"): 100 * max(cos(E_img(x), E_txt(y)), 0), averaged.

Computed with a pretrained open_clip model from local weights only (`local-dir:FOLDER` with
open_clip_config.json and weights, or a weights FILE with the open_clip model name), as the
`clip` features of `genkit.eval.features`; without local weights it is a clear error, never a
download. The 100 x clipped cosine is torchmetrics' convention (the paper's w = 2.5 rescales it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from genkit.errors import GenkitError
from genkit.eval.features import build_clip
from genkit.io import to_uint8


@torch.inference_mode()
def clip_score(images: torch.Tensor, prompts: Sequence[str], weights: str | None, protocol: str | None = None,
               batch_size: int = 100, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Mean CLIP score of images in [-1, 1] (N, C, H, W) against their N prompts."""
    import open_clip  # heavy: only for CLIP scores

    if len(prompts) != len(images):
        raise GenkitError(f"CLIP score: {len(prompts)} prompts for {len(images)} images")
    if weights is None:
        raise GenkitError("CLIP score needs a pretrained open_clip model from local weights: "
                          "weights='local-dir:FOLDER' (open_clip_config.json + weights) or a FILE with protocol=MODEL")
    features = build_clip(protocol, weights).to(device)
    tokenizer = open_clip.get_tokenizer(str(weights) if str(weights).startswith("local-dir:") else protocol)
    scores = []
    for i in range(0, len(images), batch_size):
        x = to_uint8(images[i:i + batch_size])
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB
        img = F.normalize(features(x.to(device)), dim=-1)
        txt = F.normalize(features.model.encode_text(tokenizer(list(prompts[i:i + batch_size])).to(device)).float(),
                          dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp_min(0))
    s = torch.cat(scores)
    return {"clip_score": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 0.0, "n": len(s),
            "model": features.protocol, "weights_sha256": features.weights_sha256}
