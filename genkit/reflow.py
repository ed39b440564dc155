"""Reflow and distillation (Liu, Gong & Liu, ICLR 2023, "Flow Straight and Fast", sec. 2.3, 3).

k-rectified flow: solve the ODE of a trained (k-1)-RF from noise eps to x = ODE(eps), then
train a rectified flow on the coupling (x, eps) instead of the independent one; its paths
are straighter, so fewer Euler steps (`ddim` on rectified flow) are needed. Distillation
trains on the same pairs with `time_sampling: grid` (see `genkit.families.rectified_flow`).

    transport(family, noise)            x = ODE(noise), the deterministic map a sampler defines
    generate_pairs(run, out, n)         PAIRS/manifest.json + shard-*.safetensors (`genkit reflow`)
    straightness(run)                   the paper's S(Z) of a run (`genkit eval straightness`)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genkit.data.pairs import MANIFEST, num_shards, read_manifest, shard_name, shard_rows
from genkit.errors import GenkitError, RunError
from genkit.families.base import Family
from genkit.families.rectified_flow import RectifiedFlow
from genkit.families.sampling import resolve_sampler, sample
from genkit.io import save_tensors, write_json
from genkit.progress import Progress
from genkit.rng import randn, seeded
from genkit.runs import load
from genkit.version import __version__

# manifest keys that must agree when an interrupted generation is resumed
RESUME_KEYS = ("run", "n", "sampler", "steps", "options", "seed", "shard_size", "sample_shape")


def transport(family: Family, noise: Tensor, sampler: str | None = "rk45", steps: int | None = None,
              **options: Any) -> Tensor:
    """x = ODE(noise): a deterministic sampler run from the given initial state, clamped to [-1, 1].

    `noise` is the state at the grid's first sigma (for rectified flow sigma = inf, where the
    state is eps exactly). Adaptive samplers (rk45) ignore `steps`; rk45 shares its step sizes
    across a batch, so the same noise in another batch composition differs at its tolerance.
    """
    return sample(family, len(noise), sampler=sampler, steps=steps, noise=noise, **options).images


def _shard_noise(seed: int, k: int, rows: int, shape: tuple[int, ...]) -> Tensor:
    """The noise of shard k, from its own seeded CPU stream: the same on resume and any device."""
    return randn((rows, *shape), seeded(seed, k), torch.device("cpu"))


def _manifest(run: Path, family: Family, n: int, sampler: str | None, steps: int | None, seed: int,
              shard_size: int, options: dict[str, Any]) -> dict[str, Any]:
    name, spec = resolve_sampler(family, sampler)
    return {"run": str(run.resolve()), "n": n, "sampler": name,
            "steps": None if spec.adaptive else steps or family.default_steps,
            "options": options, "seed": seed, "shard_size": shard_size,
            "sample_shape": list(family.sample_shape), "genkit_version": __version__}


def _check_resume(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check an existing one against this request (resume)."""
    if not (out / MANIFEST).exists():
        if out.exists() and any(out.glob("shard-*.safetensors")):
            raise RunError(f"'{out}' holds shards but no {MANIFEST}: choose another --out")
        write_json(out / MANIFEST, manifest)
        return
    old = read_manifest(out)
    for key in RESUME_KEYS:
        if old.get(key) != manifest[key]:
            raise RunError(f"'{out / MANIFEST}' was written with {key}={old.get(key)!r}, this request has "
                           f"{key}={manifest[key]!r}: use another --out or the same settings to resume")


def generate_pairs(run: str | Path, out: str | Path, n: int, *, sampler: str | None = "rk45",
                   steps: int | None = None, batch_size: int = 256, seed: int = 0, shard_size: int = 1024,
                   device: str | torch.device | None = None, **options: Any) -> Path:
    """Write n reflow pairs (noise, ODE(noise)) of a run into `out` (resumable); returns `out`.

    Args:
        run: a trained run folder (its final EMA weights are used).
        out: the pairs folder: manifest.json and shard-00000.safetensors, ... (noise, image float32).
        n: number of pairs.
        sampler, steps, options: the deterministic sampler solving the ODE (default rk45,
            e.g. ``rtol=1e-5, atol=1e-5``).
        batch_size: pairs per network batch (within a shard).
        seed: the noise of shard k is drawn from seed mix(seed, k): complete shards are skipped
            on a rerun and the result equals an uninterrupted generation.
        shard_size: pairs per shard file.
        device: where to run (default CUDA when available).
    """
    for key, value in (("n", n), ("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise GenkitError(f"{key} must be >= 1, got {value}")
    run, out = Path(run), Path(out)
    family = load(run, device=device)
    if not isinstance(family, RectifiedFlow):
        raise GenkitError(f"'{run}' is a {family.name} run: reflow pairs couple a rectified flow's noise with its "
                          "ODE's images to train a straighter rectified flow; train rf_digits (or another "
                          "rectified_flow recipe) first")
    manifest = _manifest(run, family, n, sampler, steps, seed, shard_size, options)
    _check_resume(out, manifest)
    todo = [k for k in range(num_shards(n, shard_size)) if not (out / shard_name(k)).exists()]
    done = n - sum(shard_rows(k, n, shard_size) for k in todo)
    with Progress(n, "reflow pairs", "pair", initial=done) as bar:
        for k in todo:
            noise = _shard_noise(seed, k, shard_rows(k, n, shard_size), family.sample_shape)  # (B, C, H, W)
            images = torch.cat([transport(family, chunk, manifest["sampler"], manifest["steps"], **options).cpu()
                                for chunk in noise.split(batch_size)])
            save_tensors(out / shard_name(k), {"noise": noise, "image": images},
                         metadata={"shard": str(k), "seed": str(seed), "genkit_version": __version__})
            bar.update(len(noise))
    return out


def straightness(run: str | Path, n: int = 256, steps: int = 50, seed: int = 0,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """The paper's straightness S(Z) of a run's flow over n Euler paths of `steps` steps."""
    if n < 1 or steps < 1:
        raise GenkitError(f"n and steps must be >= 1, got n={n}, steps={steps}")
    family = load(run, device=device)
    if not isinstance(family, RectifiedFlow):
        raise GenkitError(f"family '{family.name}' has no straightness (rectified_flow has)")
    t0 = time.perf_counter()
    value = family.straightness(n, torch.Generator().manual_seed(seed), steps=steps)
    return {"straightness": value, "n": n, "steps": steps, "seed": seed, "run": str(run),
            "seconds": time.perf_counter() - t0, "genkit_version": __version__}
