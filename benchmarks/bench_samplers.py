"""FD vs NFE of every shared sampler on a trained digits run, against 1000-step ancestral sampling.

Run: `python -m benchmarks.bench_samplers [--run runs/ddpm_digits] [--n 1000]`. The run is
the digits default after its fixed budget (`genkit train ddpm_digits`, 2000 steps); FD uses
the shipped `digits` features against the training data. Every sampler starts from the same
noise (same seed). Target (issue 4): at ~10 NFE the best ODE sampler's FD is within 1.25x of
the 1000-step ancestral FD. The curve is also saved as PNG next to the numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genkit.eval import curve
from genkit.eval.engine import EvalSettings

ODE = ("ddim", "euler", "heun", "dpmpp-2m")


def run(run_dir: str = "runs/ddpm_digits", n: int = 1000, steps: tuple[int, ...] = (5, 10, 20, 50),
        out: str = "docs") -> list[dict]:
    s = EvalSettings(features="digits", n=n, batch_size=250, seed=0)
    rows = curve.fd_curve(run_dir, list(ODE), list(steps), s)
    rows += curve.fd_curve(run_dir, list(ODE[2:]), list(steps), s, schedule="karras")
    rows += curve.fd_curve(run_dir, ["ancestral"], [1000], s)
    curve.plot(rows, Path(out) / "fd_vs_nfe_digits.png", f"DDPM digits: FD (digits features) vs NFE, n={n}",
               "FD (digits)")
    return rows


def summary(rows: list[dict]) -> str:
    reference = next(r for r in rows if r["sampler"] == "ancestral")["fd"]
    near10 = [r for r in rows if r["sampler"] != "ancestral" and 9 <= r["nfe"] <= 11]
    best = min(near10, key=lambda r: r["fd"])
    return (f"1000-step ancestral FD {reference:.4g}; best at ~10 NFE: {best['sampler']} "
            f"({best['schedule']} grid, {best['nfe']} NFE) FD {best['fd']:.4g} = "
            f"{best['fd'] / reference:.2f}x (target <= 1.25x)")


def markdown(rows: list[dict]) -> str:
    return curve.table(rows) + "\n\n" + summary(rows) + "\n\n![FD vs NFE](fd_vs_nfe_digits.png)"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/ddpm_digits")
    p.add_argument("--n", type=int, default=1000)
    a = p.parse_args()
    print(markdown(run(a.run, a.n)))
