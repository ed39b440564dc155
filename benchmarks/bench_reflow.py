"""Rectified flow, reflow and one-step distillation on the digits default: FD at 1, 2, 4, 8 Euler steps.

Run: `python -m benchmarks.bench_reflow [--root runs] [--pairs 4096] [--n 1000]`. It runs the
shipped pipeline where a stage's run folder is missing (each stage is a shipped recipe at its
fixed budget):

    genkit train rf_digits                                     1-RF   (2000 steps)
    genkit reflow runs/rf_digits --pairs P --out runs/rf_digits/pairs           (rk45)
    genkit train rf_digits_reflow                              2-RF   (+1000 steps on the pairs)
    genkit reflow runs/rf_digits_reflow --pairs P --out runs/rf_digits_reflow/pairs
    genkit train rf_digits_distill                             distilled 2-RF (+1000 steps, k=1)

then measures, from the same noise (seed 0), FD (shipped `digits` features, against the digits
training split) of n samples with the paper's Euler step (`ddim` on this family) at 1, 2, 4
and 8 steps for each model, rk45 on the 1-RF as the reference, and the paper's straightness
S(Z) of each model. Target (issue 5): distilled 2-RF at 1 step within 2x of 1-RF with rk45.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from genkit.eval import curve
from genkit.eval.engine import EvalSettings

STEPS = (1, 2, 4, 8)
MODELS = (("1-RF", "rf_digits"), ("2-RF", "rf_digits_reflow"), ("distilled 2-RF", "rf_digits_distill"))


def _train(name: str, root: Path, overrides: list[str]) -> float:
    import genkit

    out = root / name
    if (out / "model" / "genkit.json").exists():
        return 0.0
    t0 = time.perf_counter()
    genkit.train(name, overrides=overrides, out=out)
    return time.perf_counter() - t0


def _pairs(run: Path, n: int) -> float:
    from genkit.reflow import generate_pairs

    out = run / "pairs"
    t0 = time.perf_counter()
    generate_pairs(run, out, n, sampler="rk45", batch_size=256)  # resumes; a no-op when complete
    return time.perf_counter() - t0


def pipeline(root: Path, pairs: int) -> dict[str, float]:
    """Train/reflow whatever is missing under `root`; returns seconds spent per stage."""
    seconds = {"rf_digits": _train("rf_digits", root, [])}
    seconds["pairs 1-RF"] = _pairs(root / "rf_digits", pairs)
    seconds["rf_digits_reflow"] = _train("rf_digits_reflow", root, [
        f"data.root={root / 'rf_digits' / 'pairs'}", f"model.init_from={root / 'rf_digits'}"])
    seconds["pairs 2-RF"] = _pairs(root / "rf_digits_reflow", pairs)
    seconds["rf_digits_distill"] = _train("rf_digits_distill", root, [
        f"data.root={root / 'rf_digits_reflow' / 'pairs'}", f"model.init_from={root / 'rf_digits_reflow'}"])
    return seconds


def run(root: str = "runs", pairs: int = 4096, n: int = 1000, out: str = "docs") -> dict:
    from genkit.reflow import straightness

    root = Path(root)
    stage_seconds = pipeline(root, pairs)
    s = EvalSettings(features="digits", n=n, batch_size=250, seed=0)
    real = f"recipe:{root / 'rf_digits' / 'config.yaml'}"  # the digits training split, for every model
    rows = []
    for label, name in MODELS:
        samplers = ["ddim", "rk45"] if name == "rf_digits" else ["ddim"]
        straight = straightness(root / name, n=256, seed=0)["straightness"]
        for r in curve.fd_curve(root / name, samplers, list(STEPS), s, real=real):
            rows.append(dict(r, model=label, straightness=straight))
    plot_rows = [dict(r, sampler=f"{r['model']} {r['sampler']}") for r in rows if r["sampler"] == "ddim"]
    curve.plot(plot_rows, Path(out) / "fd_vs_steps_reflow_digits.png",
               f"Rectified flow on digits: FD vs Euler steps, n={n}", "FD (digits)")
    return {"rows": rows, "stages": stage_seconds, "pairs": pairs, "n": n}


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["| model | sampler | steps | NFE | FD (digits) | straightness S | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'Euler (ddim)' if r['sampler'] == 'ddim' else r['sampler']} | "
                     f"{r['steps'] or 'adaptive'} | {r['nfe']} | {r['fd']:.4g} | {r['straightness']:.4g} | "
                     f"{r['seconds']:.1f} |")
    ref = next(r for r in rows if r["sampler"] == "rk45")
    one = next(r for r in rows if r["model"] == "distilled 2-RF" and r["steps"] == 1)
    ratio = one["fd"] / ref["fd"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["stages"].items() if v)
    return ("\n".join(lines) + "\n\n"
            f"Budgets: 1-RF 2000 steps; 2-RF +{result['pairs']} rk45 pairs and 1000 steps from the 1-RF; "
            f"distilled 2-RF +{result['pairs']} pairs of the 2-RF and 1000 steps (batch 64, 16x16). "
            + (f"Stage times this run: {stages}. " if stages else "")
            + f"\n\n1-step distilled 2-RF FD {one['fd']:.4g} vs 1-RF rk45 FD {ref['fd']:.4g} ({ref['nfe']} NFE): "
            f"{ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'})"
            "\n\n![FD vs Euler steps](fd_vs_steps_reflow_digits.png)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs")
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args()
    print(markdown(run(a.root, a.pairs, a.n)))
