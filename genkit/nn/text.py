"""Text encoders for cross-attention conditioning, from open_clip (Radford et al. 2021; Cherti et al. 2023).

Two kinds, one interface `TextEncoder.forward(prompts) -> (B, L, width)` token embeddings:

* `encoder: scratch` - a small causal text transformer (open_clip's `TextTransformer`) trained
  with the diffusion model, over open_clip's shipped BPE vocabulary (`SimpleTokenizer`; its
  vocabulary file is package data, nothing is downloaded);
* `encoder: local-dir:PATH` - the text tower of a pretrained open_clip model in a local folder
  (open_clip_config.json + weights), frozen. Its token embeddings after the final LayerNorm are
  used, as Stable Diffusion uses CLIP's last hidden states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from genkit.errors import ConfigError

LOCAL_DIR = "local-dir:"


@dataclass
class TextConfig:
    encoder: str = "scratch"    # scratch | local-dir:PATH (a pretrained open_clip model, frozen)
    context_length: int = 16    # tokens per prompt (scratch; a pretrained model uses its own)
    width: int = 64             # scratch: embedding width = the UNet's cross-attention dim
    layers: int = 2
    heads: int = 4


class TextEncoder(nn.Module):
    """Prompts -> token embeddings (B, L, width) through an open_clip text transformer."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.pretrained = cfg.encoder != "scratch"
        if not self.pretrained:
            if cfg.width % cfg.heads:
                raise ConfigError(f"model.text.width={cfg.width} not divisible by model.text.heads={cfg.heads}")
            from open_clip.transformer import TextTransformer

            self.tokenizer = SimpleTokenizer(context_length=cfg.context_length)
            self.model = TextTransformer(context_length=cfg.context_length, vocab_size=len(self.tokenizer.encoder),
                                         width=cfg.width, heads=cfg.heads, layers=cfg.layers, output_dim=None,
                                         output_tokens=True, pool_type="argmax")
            self.width = cfg.width
        else:
            self.model, context = _pretrained_text_tower(cfg.encoder)
            self.tokenizer = SimpleTokenizer(context_length=context)
            self.width = int(self.model.ln_final.normalized_shape[0])
            self.requires_grad_(False).eval()

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """(B, L) int64 token ids: start, BPE tokens (truncated), end, zero padding."""
        return self.tokenizer(list(prompts))

    def forward(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenize(prompts).to(self.model.positional_embedding.device)
        if not self.pretrained:
            return self.model(tokens)[1]  # (pooled, tokens): the tokens (B, L, width)
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, width), as CLIP.encode_text
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x)


def _pretrained_text_tower(spec: str) -> tuple[nn.Module, int]:
    """The open_clip model of a local folder (weights loaded, nothing fetched) and its context length."""
    import open_clip

    if not spec.startswith(LOCAL_DIR):
        raise ConfigError(f"model.text.encoder: expected 'scratch' or 'local-dir:PATH', got {spec!r}")
    folder = Path(spec[len(LOCAL_DIR):]).expanduser()
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise ConfigError(f"model.text.encoder: '{config}' not found (local-dir: needs open_clip_config.json "
                          "and a weights file, as open_clip saves them)")
    text_cfg = json.loads(config.read_text()).get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ConfigError(f"model.text.encoder: '{folder}' has a Hugging Face text tower; use an open_clip "
                          "model with a built-in text tower (its tokenizer ships with open_clip)")
    try:
        model = open_clip.create_model(f"{LOCAL_DIR}{folder}", require_pretrained=True)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.text.encoder: cannot load '{folder}': {str(e).splitlines()[0]}") from None
    if not hasattr(model, "token_embedding"):
        raise ConfigError(f"model.text.encoder: '{folder}' is not a CLIP model with a built-in text tower")
    model.visual = None  # only the text tower is used
    return model, int(model.positional_embedding.shape[0])


@torch.no_grad()
def prompt_embeddings(encoder: TextEncoder, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
    """Token embeddings of many prompts, in batches, without gradients."""
    return torch.cat([encoder(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
