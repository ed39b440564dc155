"""Evaluation during training: FD of generated samples against cached reference statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genkit.config import Recipe
from genkit.data import ImageDataset
from genkit.eval.engine import EvalSettings, build_extractor, generated_stats
from genkit.eval.frechet import GaussianStats, frechet_distance
from genkit.eval.stats import RefStats, check_same_protocol, load_stats, save_stats
from genkit.families.base import Family
from genkit.families.sampling import sampler_options
from genkit.io import to_uint8


class TrainingEvaluator:
    """FD of `eval.n` samples vs the recipe's training data; reference statistics cached on disk."""

    def __init__(self, recipe: Recipe, run_dir: Path, dataset: ImageDataset, device: torch.device):
        cfg = recipe.eval
        self.recipe, self.dataset = recipe, dataset
        self.settings = EvalSettings(features=cfg.features, protocol=cfg.protocol, weights=cfg.weights,
                                     n=cfg.n, batch_size=cfg.batch_size, device=str(device))
        self.extractor = build_extractor(self.settings)
        self.key = f"fd_{cfg.features}"
        self.cache = run_dir / "eval" / f"reference-{cfg.features}.npz"
        self._ref: RefStats | None = None

    @property
    def reference(self) -> RefStats:
        """The training data's statistics (computed once, cached in the run folder; main process)."""
        if self._ref is None:
            self._ref = self._reference()
        return self._ref

    @torch.inference_mode()
    def _reference(self) -> RefStats:
        if self.cache.exists():
            stats = load_stats(str(self.cache))
            check_same_protocol(stats.protocol, self.extractor.protocol_dict(), f"'{self.cache}'")
            return stats
        acc = GaussianStats(self.extractor.dim)
        bs = self.settings.batch_size
        for start in range(0, len(self.dataset), bs):
            images = torch.stack([self.dataset[i]["image"] for i in range(start, min(start + bs, len(self.dataset)))])
            acc.update(self._features(to_uint8(images)))
        mu, sigma = acc.mean_cov()
        stats = RefStats(mu, sigma, acc.count, self.extractor.protocol_dict(), source=f"recipe:{self.recipe.name}")
        save_stats(self.cache, stats)
        return stats

    def _features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        device = next(self.extractor.parameters()).device
        return self.extractor(images_uint8.to(device)).double().cpu()

    @torch.inference_mode()
    def frechet(self, family: Family, seed: int = 0, accelerator: Any | None = None) -> float | None:
        """FD between `eval.n` samples of the family (recipe's sampler) and the reference.

        With an `accelerator` every process generates its share of the batches and the feature
        sums are all-reduced; the main process returns the FD, the others None.
        """
        s = self.recipe.sample
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        acc, _, _ = generated_stats(family, self.extractor, self.settings.n, self.settings.batch_size, seed,
                                    rank=rank, world=world, sampler=s.sampler, steps=s.steps,
                                    **sampler_options(family, s))
        if world > 1:
            device = accelerator.device
            acc.all_reduce(lambda t: accelerator.reduce(t.to(device), reduction="sum").cpu())
            if not accelerator.is_main_process:
                return None
        mu, sigma = acc.mean_cov()
        return frechet_distance(self.reference.mu, self.reference.sigma, mu, sigma)
