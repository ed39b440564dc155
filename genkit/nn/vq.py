"""Vector quantizer (van den Oord et al. 2017, "Neural Discrete Representation Learning", VQ-VAE).

Notation (the paper's section 3.1 and appendix A.1):
    z_e     encoder output at one position, (d,)            (B, d, h, w) as a tensor
    e       the codebook, (K, d)
    k       = argmin_j ||z_e - e_j||^2                      the code index
    z_q     = e_k                                           the quantized vector
    z_st    = z_e + sg[z_q - z_e]                           straight-through: value z_q, gradient identity
    codebook loss   ||sg[z_e] - z_q||^2                     (not used with EMA updates)
    commitment loss beta ||z_e - sg[z_q]||^2
EMA codebook (appendix A.1, Sonnet's VectorQuantizerEMA), with n_i the count and s_i the sum of
the z_e assigned to code i in the batch of the t-th update (one per optimizer step; under gradient
accumulation n_i and s_i sum over its micro-batches):
    N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) s_i,   N_i = m_i = 0 at t = 0
    N^ = N / (1 - gamma^t),  m^ = m / (1 - gamma^t)          zero-debiased (Sonnet's ExponentialMovingAverage)
    e_i  = m^_i / N~_i,  N~_i = (N^_i + eps) / (sum N^ + K eps) * sum N^     (Laplace smoothing)
A code never assigned since its initialisation or restart (N_i = 0) keeps its vector: Sonnet's
formula would set it to 0 / N~_i = 0, collapsing every unused code onto one point.
Cosine codes (Yu et al. 2022, ViT-VQGAN, "factorized and l2-normalized codes"): z_e and e are
l2-normalised before the look-up, so the distance is 2 - 2 cos.
Dead-code restart (as in Jukebox / Zeghidour et al. SoundStream): a code whose running usage
(an EMA of its share of assignments) falls below `restart_threshold` / K is replaced by a
random encoder output of the current batch.

Why hand-written and not vector-quantize-pytorch: that library updates its EMA codebook and
restarts dead codes *inside forward* with torch's global RNG (`torch.randint` in
`sample_vectors`), so a restart is not reproducible on resume nor identical across ranks, and
every micro-batch of gradient accumulation already mutates the codebook. genkit's families draw
global-batch randomness through the trainer's handle (`opt.randint`), which needs the update to
be a separate, explicit call (`accumulate` each micro-batch, `update` after each optimizer step);
the quantizer proper is ~100 lines, while the library pulls in
einops, einx, loguru and torch-einops-utils for features (residual, product, FSQ, ...) we do not use.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of (B, d, h, w) maps with a (K, d) codebook."""

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, cosine: bool = False,
                 restart_threshold: float = 0.0, usage_decay: float = 0.99):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps, self.cosine = ema, decay, eps, cosine
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        init = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)  # taming's init
        if ema:
            self.register_buffer("embedding", init)
            self.register_buffer("cluster_size", torch.zeros(num_codes))     # N_i, before debiasing
            self.register_buffer("embed_sum", torch.zeros(num_codes, dim))   # m_i, before debiasing
        else:
            self.embedding = nn.Parameter(init)
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))  # EMA of n_i / n
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))         # t, checkpointed
        self._pending: tuple[Tensor, Tensor, list[Tensor]] | None = None           # n, s, z_e since the last update

    def codebook(self) -> Tensor:
        """The codes as looked up: e, or e / ||e|| with cosine codes. (K, d)"""
        return F.normalize(self.embedding, dim=1) if self.cosine else self.embedding

    def flat(self, z: Tensor) -> Tensor:
        """(B, d, h, w) -> (B h w, d), l2-normalised with cosine codes."""
        z = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        return F.normalize(z, dim=1) if self.cosine else z

    def nearest(self, z_flat: Tensor) -> Tensor:
        """k = argmin_j ||z - e_j||^2 for each row of z_flat (N, d) -> (N,) int64."""
        e = self.codebook().to(z_flat.dtype)
        d = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)  # (N, K)
        return d.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of an index map (B, h, w) -> (B, d, h, w)."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z_e (B, d, h, w) -> (z_st, indices (B, h, w), {"loss", "commitment", "codebook", "perplexity", "usage"})."""
        b, _, h, w = z.shape
        z_flat = self.flat(z.float())                       # (N, d)
        k = self.nearest(z_flat.detach())                   # (N,)
        z_q = self.codebook()[k]                            # (N, d)
        commitment = F.mse_loss(z_flat, z_q.detach())
        codebook = z.new_zeros((), dtype=torch.float32) if self.ema else F.mse_loss(z_q, z_flat.detach())
        z_st = z_flat + (z_q - z_flat).detach()             # value z_q, gradient identity on z_e
        z_st = z_st.view(b, h, w, self.dim).permute(0, 3, 1, 2).to(z.dtype)
        stats = code_stats(k, self.num_codes)
        loss = codebook + self.beta * commitment
        return z_st, k.view(b, h, w), {"loss": loss, "commitment": commitment.detach(),
                                      "codebook": codebook.detach(), **stats}

    @torch.no_grad()
    def accumulate(self, z: Tensor, indices: Tensor) -> None:
        """Add a micro-batch's counts n_i and sums s_i (and, with restarts, its z_e) to the next update."""
        z_flat = self.flat(z.detach().float())
        onehot = F.one_hot(indices.reshape(-1), self.num_codes).to(z_flat.dtype)  # (N, K)
        counts, sums = onehot.sum(0), onehot.t() @ z_flat                          # (K,), (K, d)
        pool = [z_flat] if self.restart_threshold > 0 else []
        if self._pending is not None:
            counts, sums, pool = counts + self._pending[0], sums + self._pending[1], self._pending[2] + pool
        self._pending = counts, sums, pool

    def discard(self) -> None:
        """Forget what was accumulated since the last update (an optimizer step that did not happen)."""
        self._pending = None

    @torch.no_grad()
    def update(self, draw: Callable[[int, int], Tensor] | None = None) -> int:
        """After an optimizer step: EMA codebook update (if enabled), usage EMA, dead-code restart,
        from the micro-batches accumulated since the last update (summed over processes).

        `draw(high, n)` returns n integers in [0, high) (the trainer's `opt.randint`), used to
        pick the encoder outputs that replace dead codes. Returns the number of codes restarted.
        """
        if self._pending is None:
            raise RuntimeError("VectorQuantizer.update: nothing accumulated since the last update")
        counts, sums, pool = self._pending
        self._pending = None
        counts, sums = _all_reduce(counts), _all_reduce(sums)  # n_i, s_i of the global batch
        self.updates += 1
        if self.ema:
            self.ema_update(counts, sums)
        self.usage.lerp_(counts / counts.sum().clamp_min(1), 1 - self.usage_decay)
        return self.restart_dead(torch.cat(pool), draw) if self.restart_threshold > 0 and draw else 0

    def debias(self) -> Tensor:
        """1 - gamma^t, the weight the zero-started EMAs have gathered after t updates."""
        return (1 - self.decay ** self.updates.double()).to(self.embedding.dtype)

    def ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """N <- g N + (1-g) n, m <- g m + (1-g) s; e = m^ / N~ (debiased, Laplace-smoothed) where N > 0."""
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        debias = self.debias()
        size = self.cluster_size / debias                                             # N^
        total = size.sum()
        smoothed = (size + self.eps) / (total + self.num_codes * self.eps) * total    # N~
        mean = self.embed_sum / debias / smoothed.unsqueeze(1)                        # m^ / N~
        assigned = (self.cluster_size > 0).unsqueeze(1)  # a code never assigned keeps its vector
        self.embedding.copy_(torch.where(assigned, mean, self.embedding))

    def restart_dead(self, z_flat: Tensor, draw: Callable[[int, int], Tensor]) -> int:
        """Replace codes with usage < restart_threshold / K by random encoder outputs of the batch."""
        dead = self.usage < self.restart_threshold / self.num_codes
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        picks = draw(len(z_flat), self.num_codes).to(z_flat.device)[dead]  # fixed-size draw: resume-exact
        fresh = _broadcast(z_flat[picks])                                   # one codebook on every rank
        self.embedding[dead] = fresh.to(self.embedding.dtype)
        self.usage[dead] = 1.0 / self.num_codes
        if self.ema:  # restart the running statistics at the new code: debiased count 1, mean `fresh`
            self.cluster_size[dead] = self.debias()
            self.embed_sum[dead] = fresh.to(self.embed_sum.dtype) * self.debias()
        return n_dead


def code_stats(indices: Tensor, num_codes: int) -> dict[str, Tensor]:
    """Perplexity exp(H(p)) of the code histogram p and the fraction of codes used, from indices."""
    p = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    p = p / p.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"perplexity": entropy.exp(), "usage": (p > 0).float().mean()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over processes (identity on one process): EMA statistics of the global batch."""
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: Tensor) -> Tensor:
    """Rank 0's tensor on every process (identity on one process)."""
    if _distributed():
        t = t.contiguous()
        dist.broadcast(t, 0)
    return t
