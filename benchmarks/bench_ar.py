"""Autoregressive sampling throughput of the AR prior: tokens/s with and without the KV cache.

Run: `python -m benchmarks.bench_ar [--batch 16] [--repeats 2]`. The prior is `ar_prior`'s
transformer at two named sizes (untrained weights: the cost does not depend on them) over a
tokenizer with a 16x16 index map (T = 256 tokens, K = 512 codes; f = 2 on 32x32 RGB), sampling
through `ArPrior.sample_tokens` from the same uniforms with `kv_cache=True` and `False`. Each
row checks that both paths drew identical tokens. Target (issue 8): >= 5x at 256 tokens.
Cached: T single-token passes attending to the cache; uncached: T passes over the growing prefix.
"""

from __future__ import annotations

import argparse
import time

import torch

from genkit.families.ar_prior import ArPrior, ArPriorConfig
from genkit.families.vqgan import VQGAN, QuantizerConfig, VQGANConfig
from genkit.nn.gpt import GPTConfig

SIZES = {"digits recipe (4 x 128)": GPTConfig(layers=4, heads=4, dim=128),
         "medium (8 x 256)": GPTConfig(layers=8, heads=8, dim=256)}


def build(gpt: GPTConfig, device: torch.device) -> ArPrior:
    """An ar_prior over an (untrained) f=2 VQGAN on 32x32 RGB: 16x16 = 256 tokens, K = 512."""
    torch.manual_seed(0)
    tok = VQGAN(VQGANConfig(f=2, channels=[16, 16], norm_groups=4, disc_layers=2,
                            quantizer=QuantizerConfig(num_codes=512, dim=16)), shape=(3, 32, 32))
    prior = ArPrior(ArPriorConfig(tokenizer="bench", gpt=gpt), (3, 32, 32), tokenizer=tok)
    prior.nets.to(device).eval()
    return prior


def _time(prior: ArPrior, u: torch.Tensor, kv_cache: bool, repeats: int) -> tuple[float, torch.Tensor]:
    best, tokens = float("inf"), None
    for _ in range(repeats):
        if u.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, _ = prior.sample_tokens(None, u, kv_cache=kv_cache)
        if u.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def run(batch: int = 16, repeats: int = 2) -> list[dict]:
    """One row per model size: tokens/s cached and uncached, the speed-up, and token equality."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, gpt in SIZES.items():
        prior = build(gpt, device)
        u = torch.rand(batch, prior.T, generator=torch.Generator().manual_seed(0)).to(device)
        t_cache, s_cache = _time(prior, u, True, repeats)
        t_full, s_full = _time(prior, u, False, repeats)
        n = batch * prior.T
        rows.append({"model": name, "tokens": prior.T, "batch": batch, "cached tok/s": n / t_cache,
                     "uncached tok/s": n / t_full, "speed-up": t_full / t_cache,
                     "same tokens": bool(torch.equal(s_cache.cpu(), s_full.cpu()))})
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| model | tokens | batch | KV cache tok/s | no cache tok/s | speed-up | same tokens |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['model']} | {r['tokens']} | {r['batch']} | {r['cached tok/s']:.0f} | {r['uncached tok/s']:.0f} | "
        f"{r['speed-up']:.1f}x | {'yes' if r['same tokens'] else 'NO'} |\n" for r in rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    print(markdown(run(a.batch, a.repeats)))
