"""A decoder-only transformer (Radford et al. 2019, GPT-2; layout after nanoGPT's `model.py`).

Pre-norm blocks, causal self-attention through `F.scaled_dot_product_attention` (flash /
memory-efficient kernels where available), learned position embeddings, and a KV cache for
sampling: `forward(idx, cache, pos)` runs only the new tokens and attends to the cached keys
and values of the earlier ones, so a sequence of T tokens costs T single-token passes instead
of T passes over growing prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    layers: int = 4
    heads: int = 4
    dim: int = 128          # model width; must be divisible by heads
    dropout: float = 0.0


class KVCache:
    """Pre-allocated keys and values per layer, (B, nh, T_max, hs) each; `length` tokens are filled."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through SDPA, with an optional KV cache for sampling."""
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            start = cache.length
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k, v = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]  # (B, nh, S, hs)
            # query i (absolute position start + i) sees keys 0..start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2)."""
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.dim), CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (B, T) in [0, vocab_in) -> logits (B, T, vocab_out) for the next token."""

    def __init__(self, cfg: GPTConfig, vocab_in: int, vocab_out: int, max_len: int):
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.tok = nn.Embedding(vocab_in, cfg.dim)
        self.pos = nn.Embedding(max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_out, bias=False)
        self.apply(_init)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens."""
        c = self.cfg
        return KVCache(c.layers, batch, c.heads, self.max_len, c.dim // c.heads, device, dtype)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits of the tokens after each of idx (B, T); with a cache, idx continues its sequences."""
        start = cache.length if cache is not None else 0
        t = idx.shape[1]
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length = start + t
        return self.head(self.ln_f(x))  # (B, T, V)


def _init(m: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
