"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, sec. 3 and appendix C): choose the EMA length after training.

During training two power-function EMAs are tracked (`train.posthoc_ema.sigma_rels`, the paper's
0.05 and 0.10). A power-function EMA at time t averages the weights theta_tau with the profile
p(tau) ~ tau^gamma on [0, t] (eq. 121); its relative standard deviation, the width of the profile
relative to t, is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 123). It is
tracked with the update theta_hat <- beta theta_hat + (1 - beta) theta, beta = (1 - 1/t)^(gamma + 1)
(eq. 127, t counting steps from 1). Snapshots of both at intervals (RUN/phema/step-N.safetensors)
let any other profile be reconstructed afterwards as the linear combination of snapshots whose
profile is closest in L2 to the target's (Algorithm 3): with the inner products of power-function
profiles in closed form (eq. 151), the coefficients solve A x = b, normalised to sum to 1.

Snapshots are kept within `budget_mb`: when the next one would exceed it, every other one is
dropped and the interval doubles, so a run of any length (a time budget) stays within it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from genkit.config import PostHocEMAConfig, dump_recipe
from genkit.data import build_dataset
from genkit.errors import ConfigError, RunError
from genkit.eval.in_training import TrainingEvaluator
from genkit.families.base import Family
from genkit.io import atomic_dir, load_tensors, save_tensors, write_json, write_text
from genkit.runs import (
    CONFIG,
    INFO,
    MODEL,
    WEIGHTS,
    build_loaded,
    relative_links,
    resolve_device,
    run_recipe,
    run_weights,
)
from genkit.version import __version__

PHEMA = "phema"                     # the run folder's snapshot folder
SNAPSHOT = re.compile(r"^step-(\d+)\.safetensors$")


# -- the paper's formulas (appendix C.2) -----------------------------------------------------------
def gamma_to_sigma_rel(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel of the power-function profile with exponent gamma (eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of a relative standard deviation (eq. 126): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0."""
    s = np.float64(sigma_rel)
    inv = s.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - k, 12.0 - k]).real.max() for k in inv]
    return np.float64(roots).reshape(s.shape)


def tracking_beta(gamma: float, t: int) -> float:
    """beta of the t-th update (t = 1, 2, ...) of a power-function EMA (eq. 127 with t_delta = 1)."""
    return (1 - 1 / t) ** (gamma + 1)


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> of power-function profiles ending at t_a, t_b with exponents gamma_a, gamma_b (eq. 151)."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(t_in: np.ndarray, sigma_in: np.ndarray, t_out: float, sigma_out: float) -> np.ndarray:
    """Coefficients of the snapshots (t_in, sigma_in) whose combination best matches the profile
    (t_out, sigma_out) in L2 (Algorithm 3): solve A x = b, then normalise to sum 1."""
    g_in = sigma_rel_to_gamma(np.float64(sigma_in))
    t_in = np.float64(t_in)
    A = profile_inner_products(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = profile_inner_products(t_in, g_in, np.float64(t_out), sigma_rel_to_gamma(np.float64(sigma_out)))
    x = np.linalg.solve(A, b)
    return x / x.sum()


# -- tracking during training -----------------------------------------------------------------------
class PowerEMA:
    """The power-function EMAs of `sigma_rels` over the floating-point state of `nets`, and their snapshots."""

    def __init__(self, nets: nn.Module, cfg: PostHocEMAConfig, folder: Path):
        if len(cfg.sigma_rels) < 1 or not all(0 < s < 0.28 for s in cfg.sigma_rels):
            raise ConfigError(f"train.posthoc_ema.sigma_rels: give values in (0, 0.28), got {cfg.sigma_rels}")
        if cfg.every < 1 or not cfg.budget_mb > 0:
            raise ConfigError(f"train.posthoc_ema: every must be >= 1 and budget_mb > 0, got {cfg.every}, "
                              f"{cfg.budget_mb}")
        self.cfg, self.folder, self.every, self.updates = cfg, folder, cfg.every, 0
        self.gammas = [float(sigma_rel_to_gamma(s)) for s in cfg.sigma_rels]
        live = self._floats(nets)
        self.shadows = [{k: v.detach().clone() for k, v in live.items()} for _ in cfg.sigma_rels]
        self.snapshot_bytes = sum(v.numel() * v.element_size() for v in live.values()) * len(cfg.sigma_rels)
        if self.snapshot_bytes > cfg.budget_mb * 2**20:
            raise ConfigError(f"train.posthoc_ema.budget_mb={cfg.budget_mb}: one snapshot takes "
                              f"{self.snapshot_bytes / 2**20:.1f} MB")

    @staticmethod
    def _floats(nets: nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in nets.state_dict(keep_vars=True).items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, nets: nn.Module) -> None:
        """One power-function EMA step of every profile (the t-th update uses beta(t), t from 1)."""
        self.updates += 1
        live = self._floats(nets)
        keys = list(live)
        for gamma, shadow in zip(self.gammas, self.shadows):
            weight = 1 - tracking_beta(gamma, self.updates)
            torch._foreach_lerp_([shadow[k] for k in keys], [live[k].detach() for k in keys], weight)

    def state_dict(self) -> dict[str, Tensor]:
        """Every profile's shadow weights, as `<i>.<name>` (checkpointed for exact resume)."""
        return {f"{i}.{k}": v for i, shadow in enumerate(self.shadows) for k, v in shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor], updates: int, every: int) -> None:
        """Restore the shadows, the update count and the snapshot interval of a checkpoint."""
        for i, shadow in enumerate(self.shadows):
            for k, v in shadow.items():
                v.copy_(state[f"{i}.{k}"])
        self.updates, self.every = updates, every

    def snapshot(self, step: int, final: bool = False) -> None:
        """At multiples of the interval (and the `final` step): write phema/step-N, then thin to the budget."""
        if step % self.every and not final:
            return
        save_tensors(self.folder / f"step-{step}.safetensors", self.state_dict(),
                     metadata={"step": str(step), "sigma_rels": json.dumps(list(self.cfg.sigma_rels))})
        while len(snapshots(self.folder)) * self.snapshot_bytes > self.cfg.budget_mb * 2**20:
            self.every *= 2
            for s, path in snapshots(self.folder).items():
                if s % self.every:
                    path.unlink()

    def drop_after(self, step: int) -> None:
        """Remove snapshots written after `step` (a resumed run writes them again)."""
        for s, path in snapshots(self.folder).items():
            if s > step:
                path.unlink()


def snapshots(folder: Path) -> dict[int, Path]:
    """{step: path} of the snapshots in a run's phema/ folder, by step."""
    if not folder.is_dir():
        return {}
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := SNAPSHOT.match(p.name))}
    return dict(sorted(found.items()))


# -- reconstruction after training ------------------------------------------------------------------
def reconstruct(folder: Path, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The weights of a power-function EMA of `sigma_rel` at `step` (default: the last snapshot), as the
    least-squares combination of every snapshot up to it (Algorithm 3)."""
    found = {s: p for s, p in snapshots(folder).items() if step is None or s <= step}
    if not found:
        raise RunError(f"'{folder}' holds no post-hoc EMA snapshots (train with train.posthoc_ema)")
    if not 0 < sigma_rel < 0.28:
        raise ConfigError(f"--sigma-rel must be in (0, 0.28), got {sigma_rel}")
    t_out = step if step is not None else max(found)
    sigma_rels = [json.loads(_metadata(p)["sigma_rels"]) for p in found.values()]
    t_in = np.float64([s for s, rels in zip(found, sigma_rels) for _ in rels])
    s_in = np.float64([r for rels in sigma_rels for r in rels])
    coefficients = iter(solve_coefficients(t_in, s_in, t_out, sigma_rel).tolist())
    out: dict[str, Tensor] = {}
    for path, rels in zip(found.values(), sigma_rels):  # one snapshot in memory at a time
        tensors = load_tensors(path)
        for i in range(len(rels)):
            c = next(coefficients)
            for name in {k.partition(".")[2] for k in tensors if k.partition(".")[0] == str(i)}:
                out[name] = out.get(name, 0) + c * tensors[f"{i}.{name}"].double()
    return {k: v.float() for k, v in out.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def write_run(run: Path, out: Path, weights: dict[str, Tensor], info: dict[str, Any]) -> Path:
    """A run folder at `out`: `run`'s recipe (links kept valid) and its final weights with the EMA'd
    ones replaced by `weights`; genkit.json records `info` (the sigma_rel and step reconstructed)."""
    if out.exists():
        raise RunError(f"--out '{out}' exists: give a new folder")
    final, meta = run_weights(run)
    unknown = sorted(set(weights) - set(final))
    if unknown:
        raise RunError(f"'{run}': the snapshots hold '{unknown[0]}', which its weights do not")
    recipe = dump_recipe(relative_links(run_recipe(run), out))
    with atomic_dir(out) as tmp:
        write_text(tmp / CONFIG, recipe)
        save_tensors(tmp / MODEL / WEIGHTS, {**final, **weights},
                     metadata={"genkit_config": recipe, "genkit_version": __version__})
        keep = {k: meta[k] for k in ("shape", "num_classes", "family") if k in meta}
        write_json(tmp / MODEL / INFO, dict(keep, ema=True, posthoc_ema=info, genkit_version=__version__))
    return out


# -- choosing the length: FD over sigma_rel -------------------------------------------------------------
SWEEP = (0.02, 0.035, 0.05, 0.075, 0.10, 0.13, 0.16, 0.2, 0.25)  # sigma_rel values `genkit ema --sweep` tries


def posthoc_family(run: Path, sigma_rel: float, device: str | None = None, step: int | None = None) -> Family:
    """The run's family with the EMA'd weights reconstructed for `sigma_rel` (at `step`), eval mode."""
    final, meta = run_weights(run)
    weights = {**final, **reconstruct(run / PHEMA, sigma_rel, step)}
    return build_loaded(run_recipe(run), tuple(meta["shape"]), meta.get("num_classes", 0), weights, device)


def sweep(run: Path, sigma_rels: tuple[float, ...] = SWEEP, device: str | None = None,
          n: int | None = None, seed: int = 0) -> list[dict[str, float]]:
    """FD (the recipe's `eval` features and sampler) of the reconstruction at each sigma_rel: one row each."""
    recipe = run_recipe(run)
    if n is not None:
        recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, n=n))
    device = resolve_device(device)
    evaluator = TrainingEvaluator(recipe, run, build_dataset(recipe.data, "train"), device)
    rows = []
    for sigma_rel in sigma_rels:
        fd = evaluator.frechet(posthoc_family(run, sigma_rel, str(device)), seed=seed)
        rows.append({"sigma_rel": float(sigma_rel), "fd": float(fd), "features": evaluator.key})
    return rows


def plot_sweep(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """FD against the EMA length sigma_rel, saved as PNG."""
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["sigma_rel"] for r in rows], [r["fd"] for r in rows], marker="o")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel(rows[0]["features"] if rows else "FD")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
