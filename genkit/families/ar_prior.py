"""Autoregressive transformer prior over VQGAN codes (Esser et al., CVPR 2021, "Taming Transformers", sec. 3.2).

Stage 2 of "compress first, then generate". A frozen tokenizer run (`model.tokenizer`, a
`vqgan` run that `genkit.runs` loads and passes in as a declared `Stage`) maps an image to its index map s = (s_1, ..., s_T),
T = h w in raster order; a decoder-only transformer (`genkit.nn.gpt`) learns
    p(s | c) = prod_i p(s_i | s_<i, c)
with c a class given as a prefix token (or one start token when unconditional). Training
minimises the NLL in nats per token (log K for a uniform guess; the first logged numbers sit
near it). The tokenizer lives outside `nets`: it is never trained, checkpointed or averaged;
its codes are computed on the fly from each batch (so `data.hflip` works), in eval mode.

Sampling (`autoregressive` sampler): T forward passes, each drawing s_i from
softmax(logits / temperature) restricted to the top-k tokens and/or the smallest set of mass
>= top-p (Holtzman et al. 2020). The draw is an inverse-CDF look-up of uniforms taken from the
caller's generator, so a seed gives the same tokens with or without the KV cache and on any
device. The tokens are decoded by the tokenizer into images in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genkit.config import FamilyConfig
from genkit.errors import ConfigError, SamplerError
from genkit.families.base import Autoregressive, Family, Stage, StepHandle, Tokenizer
from genkit.families.unet_family import sample_labels
from genkit.nn.gpt import GPT, GPTConfig


@dataclass
class ArPriorConfig(FamilyConfig):
    family: str = "ar_prior"
    tokenizer: str | None = None            # the vqgan run folder whose codes are modelled (required)
    conditional: bool = False               # class of each image as a prefix token (needs labels)
    gpt: GPTConfig = field(default_factory=GPTConfig)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf all logits outside the top-k and outside the smallest top set of probability >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw_tokens(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw from softmax(logits) (B, V) with uniforms u (B,) in [0, 1): the first i with CDF_i > u."""
    cdf = logits.float().softmax(-1).cumsum(-1)  # (B, V)
    # u * CDF_last < CDF_last for u < 1, so i < V (the factor absorbs a last CDF value rounded below 1)
    return torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int) -> None:
    """One-line SamplerErrors for out-of-range sampling options."""
    if not temperature > 0:
        raise SamplerError(f"temperature: must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise SamplerError(f"top_k: must be in [1, {vocab}] (the codebook size), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SamplerError(f"top_p: must be in (0, 1], got {top_p}")


class ArPrior(Family, Autoregressive):
    """Transformer prior over a frozen tokenizer's codes: nets {"gpt"}, one group "model"."""

    name = "ar_prior"
    default_sampler = "autoregressive"
    stages = (Stage("tokenizer", Tokenizer),)

    def __init__(self, cfg: ArPriorConfig, shape: tuple[int, int, int], num_classes: int = 0, *,
                 tokenizer: Tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tuple(self.tokenizer.sample_shape) != tuple(shape):
            raise ConfigError(f"model.tokenizer works on images {tuple(self.tokenizer.sample_shape)}, "
                              f"the data are {tuple(shape)}: match data.image_size and the dataset")
        if cfg.conditional and num_classes < 1:
            raise ConfigError("model.conditional=true needs a labelled dataset (this one has no classes)")
        if cfg.gpt.dim % cfg.gpt.heads:
            raise ConfigError(f"model.gpt.dim={cfg.gpt.dim} is not divisible by model.gpt.heads={cfg.gpt.heads}")
        self.sample_shape = tuple(shape)
        self.num_classes = num_classes if cfg.conditional else 0
        self.K = self.tokenizer.num_codes
        self.T = math.prod(self.tokenizer.token_shape)
        vocab_in = self.K + max(1, self.num_classes)  # codes, then the prefix tokens (classes or one start)
        self.nets = nn.ModuleDict({"gpt": GPT(cfg.gpt, vocab_in, self.K, self.T)})
        self.tokenizer.nets.eval().requires_grad_(False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer group, "model": the transformer (the tokenizer is frozen, outside)."""
        return {"model": list(self.nets["gpt"].parameters())}

    def _tokenizer(self, device: torch.device) -> Tokenizer:
        self.tokenizer.nets.to(device)  # a no-op once it is there
        return self.tokenizer

    def prefix(self, labels: Tensor | None, b: int, device: torch.device) -> Tensor:
        """The first input token (B, 1): K + class, or K (the start token) when unconditional."""
        if self.num_classes:
            if labels is None or (labels < 0).any():
                raise SamplerError("a conditional prior needs labels in [0, num_classes) for every image")
            return (self.K + labels.to(device).long()).view(b, 1)
        return torch.full((b, 1), self.K, dtype=torch.long, device=device)

    # -- training ----------------------------------------------------------------------
    def codes(self, x: Tensor) -> Tensor:
        """The frozen tokenizer's indices of images, flattened in raster order: (B, T)."""
        return self._tokenizer(x.device).encode(x).flatten(1)

    def token_nll(self, s: Tensor, labels: Tensor | None) -> Tensor:
        """Mean NLL in nats per token of code sequences s (B, T) under the prior."""
        inputs = torch.cat([self.prefix(labels, len(s), s.device), s[:, :-1]], 1)  # (B, T)
        logits = self.nets["gpt"](inputs)                                           # (B, T, K)
        return F.cross_entropy(logits.float().reshape(-1, self.K), s.reshape(-1))

    def train_step(self, batch: Mapping[str, Any], step: int, opt: StepHandle) -> dict[str, Tensor]:
        """Teacher-forced next-token cross-entropy on the tokenizer's codes of the batch."""
        s = self.codes(batch["image"])
        loss = self.token_nll(s, batch.get("label"))  # an unconditional prior's prefix ignores labels
        opt.step("model", loss)
        return {"loss": loss.detach(), "bits_per_token": loss.detach() / math.log(2)}

    # -- sampling ----------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, labels: Tensor | None, u: Tensor, *, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      kv_cache: bool = True) -> tuple[Tensor, Tensor]:
        """Draw T tokens per row of u (B, T) (uniforms); returns (tokens (B, T), logits used (B, T, K))."""
        gpt, b = self.nets["gpt"], u.shape[0]
        seq = self.prefix(labels, b, self.device)  # (B, 1)
        cache = gpt.new_cache(b, self.device) if kv_cache else None
        used = []
        for i in range(self.T):
            step_in = seq[:, -1:] if kv_cache else seq
            logits = gpt(step_in, cache)[:, -1].float() / temperature  # (B, K)
            logits = filter_logits(logits, top_k, top_p)
            used.append(logits)
            seq = torch.cat([seq, draw_tokens(logits, u[:, i]).unsqueeze(1)], 1)
        return seq[:, 1:], torch.stack(used, 1)

    def autoregressive(self, n: int, *, generator: torch.Generator | None = None, batch_size: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       kv_cache: bool = True, labels: Tensor | Sequence[int] | None = None) -> tuple[Tensor, int]:
        """n images: tokens drawn one by one (KV cache), decoded by the tokenizer; (images, forward passes per batch).

        A conditional prior draws class `labels` (one for all or n: `genkit sample --class`), by default
        the classes in turn (image i has class i mod C).
        """
        check_sampling(temperature, top_k, top_p, self.K)
        if labels is not None and not self.num_classes:
            raise SamplerError("family 'ar_prior' is unconditional (model.conditional: false); it takes no class labels")
        all_labels = sample_labels(n, labels, self.num_classes) if self.num_classes else None
        batch_size = batch_size or n
        tok, h_w = self._tokenizer(self.device), self.tokenizer.token_shape
        images = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            u = torch.rand(b, self.T, generator=generator)  # CPU draws: same tokens on any device
            batch_labels = None if all_labels is None else all_labels[start:start + b]
            s, _ = self.sample_tokens(batch_labels, u, temperature=temperature, top_k=top_k, top_p=top_p,
                                      kv_cache=kv_cache)
            images.append(tok.decode(s.view(b, *h_w)).float())
        return torch.cat(images), self.T
