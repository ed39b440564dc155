"""FD versus NFE for a run's samplers: the cost/quality trade-off as a table, a CSV and a PNG.

    genkit eval curve runs/ddpm_digits --samplers ddim,euler,heun,dpmpp-2m --steps 5,10,20,50

The reference is the run's own training data (its recipe), or any SPEC given as --real; the
same seed gives every sampler the same initial noise.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from genkit.eval.engine import EvalSettings, build_extractor, default_features, generated_stats, reference_stats
from genkit.eval.frechet import frechet_distance
from genkit.eval.stats import check_same_protocol
from genkit.families.sampling import resolve_grid, resolve_sampler
from genkit.io import atomic_write, write_text
from genkit.runs import load

COLUMNS = ("sampler", "steps", "schedule", "nfe", "fd", "seconds")


def fd_curve(run: str | Path, samplers: list[str], steps: list[int], s: EvalSettings,
             real: str | None = None, schedule: str | None = None) -> list[dict[str, Any]]:
    """One row per (sampler, steps): NFE, FD against the reference and sampling wall time."""
    if s.n is None:
        raise ValueError("EvalSettings.n (samples per point) is required for a curve")
    run = Path(run)
    family = load(run, device=s.device)
    s.features = s.features or default_features(run)
    extractor = build_extractor(s)
    ref = reference_stats(real or f"recipe:{run / 'config.yaml'}", extractor, s)
    check_same_protocol(ref.protocol, extractor.protocol_dict(), "the reference")
    rows = []
    for sampler in samplers:
        spec = resolve_sampler(family, sampler)[1]
        grid = "-" if spec.adaptive else str(resolve_grid(family, spec, schedule))  # the grid it really ran on
        for k in [None] if spec.adaptive else steps:
            acc, nfe, seconds = generated_stats(family, extractor, s.n, s.batch_size, s.seed, progress=s.progress,
                                                sampler=sampler, steps=k, schedule=schedule)
            mu, sigma = acc.mean_cov()
            rows.append({"sampler": sampler, "steps": k, "schedule": grid, "nfe": nfe,
                         "fd": frechet_distance(ref.mu, ref.sigma, mu, sigma), "seconds": seconds})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the curve rows as CSV (atomically); returns the path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
    return write_text(path, buf.getvalue())


def plot(rows: list[dict[str, Any]], path: Path, title: str, fd_name: str = "FD") -> Path:
    """FD (log) against NFE (log), one line per sampler, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler, schedule in dict.fromkeys((r["sampler"], r["schedule"]) for r in rows):
        pts = sorted((r["nfe"], r["fd"]) for r in rows if (r["sampler"], r["schedule"]) == (sampler, schedule))
        label = sampler if schedule == "family" else f"{sampler} ({schedule})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(fd_name)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]]) -> str:
    """The curve rows as an aligned text table."""
    lines = ["| sampler | steps | schedule | NFE | FD | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['schedule']} | {r['nfe']} | {r['fd']:.4g} | "
              f"{r['seconds']:.2f} |" for r in rows]
    return "\n".join(lines)
