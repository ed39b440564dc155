"""One- and two-step generation on digits (issue 23): consistency training, ECT from ddpm_digits, MeanFlow and
the distilled 2-RF, FD at 1 and 2 NFE with each model's total training cost, next to 1000-step DDPM.

Run: `python -m benchmarks onestep`, or
`python -m benchmarks.bench_onestep [--root runs] [--n 1000] [--reference fewstep-rows.json]`.

It trains whatever run is missing under --root (each a shipped recipe at its own budget):

    ddpm_digits                      the DDPM (2000 steps); ECT's teacher and the reference
    cm_digits                        consistency training from scratch (iCT), 2000 steps
    ect_digits                       consistency fine-tuning of ddpm_digits (ECT), 1000 steps
    meanflow_digits                  MeanFlow, 2000 steps
    rf_digits -> rf_digits_reflow -> rf_digits_distill    (benchmarks.bench_reflow's pipeline)

FD: the shipped `digits` features of n samples against the digits training split, every model started from
the same noise (seed 0, the few-step benchmark's first n draws), so the rows are comparable with
`bench_fewstep`'s; the 1000-step ancestral DDPM reference is that benchmark's `ancestral` row (pass its JSON
with --reference, else it is sampled here, 1000 evaluations per sample).

Training cost: FLOPs (torch.utils.flop_counter: matmuls, convolutions, attention, forward and backward) of the
trainer's step, counted over a few steps of each recipe in a scratch run and multiplied by the recipe's steps;
reflow pairs: the FLOPs of generating one batch of pairs, scaled to the pairs generated. FLOPs do not depend on
the load of the machine, which wall time on 2 shared cores does; both are given, each model's cost also as a
multiple of `ddpm_digits`'. Targets: a one-step model within 1.5x of the 1000-step DDPM's FD and a two-step
model within 1.2x, each at no more than 2x the training budget of ddpm_digits plus any teacher it starts from.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_fewstep import Scorer
from benchmarks.bench_reflow import _train
from benchmarks.bench_reflow import pipeline as reflow_pipeline


@dataclass(frozen=True)
class Model:
    label: str
    run: str                   # run folder name under --root
    sampler: str               # 1 and 2 NFE with this sampler
    own: tuple[str, ...]       # the recipes whose training this model's cost counts
    teacher: tuple[str, ...]   # the runs it starts from (not its own budget)


MODELS = (
    Model("consistency training (iCT)", "cm_digits", "consistency", ("cm_digits",), ()),
    Model("ECT from ddpm_digits", "ect_digits", "consistency", ("ect_digits",), ("ddpm_digits",)),
    Model("MeanFlow", "meanflow_digits", "consistency", ("meanflow_digits",), ()),
    Model("distilled 2-RF", "rf_digits_distill", "ddim",
          ("rf_digits", "pairs 1-RF", "rf_digits_reflow", "pairs 2-RF", "rf_digits_distill"), ()),
)
NFES = (1, 2)


def overrides(name: str, root: Path) -> list[str]:
    """The links a recipe needs to find its earlier runs under `root`."""
    return {"ect_digits": [f"model.init_from={root / 'ddpm_digits'}"],
            "rf_digits_reflow": [f"data.root={root / 'rf_digits' / 'pairs'}", f"model.init_from={root / 'rf_digits'}"],
            "rf_digits_distill": [f"data.root={root / 'rf_digits_reflow' / 'pairs'}",
                                  f"model.init_from={root / 'rf_digits_reflow'}"]}.get(name, [])


def train_all(root: Path, pairs: int, models: tuple[Model, ...]) -> dict[str, float]:
    """Train what the models need and is missing; seconds per stage (0 for a run that was already there)."""
    seconds = {"ddpm_digits": _train("ddpm_digits", root, [])}
    for m in models:
        if m.run == "rf_digits_distill":
            seconds.update(reflow_pipeline(root, pairs))
        else:
            seconds[m.run] = _train(m.run, root, overrides(m.run, root))
    return seconds


def step_flops(name: str, root: Path, steps: int = 3) -> float:
    """FLOPs of one training step of a shipped recipe: the trainer's steps counted over a scratch run."""
    import genkit
    from genkit.training.trainer import Trainer

    counter = FlopCounterMode(display=False)
    original = Trainer._train_step

    def counted(self: Trainer, step: int, batches: Any) -> Any:
        with counter:
            return original(self, step, batches)

    Trainer._train_step = counted  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            genkit.train(name, overrides=[f"train.steps={steps}", "train.sample_every=0", "train.log_every=1000",
                                          "train.checkpoint_every=1000", *overrides(name, root)],
                         out=Path(tmp) / name)
    finally:
        Trainer._train_step = original  # type: ignore[method-assign]
    return counter.get_total_flops() / steps


def pair_flops(run: Path, pairs: int, batch: int = 256) -> float:
    """FLOPs of generating `pairs` reflow pairs with rk45: one batch counted, scaled to the count."""
    from genkit.reflow import generate_pairs

    with tempfile.TemporaryDirectory() as tmp, FlopCounterMode(display=False) as counter:
        generate_pairs(run, Path(tmp) / "pairs", batch, sampler="rk45", batch_size=batch)
    return counter.get_total_flops() * pairs / batch


def recipe_steps(name: str) -> int:
    from genkit.runs import load_recipe

    return load_recipe(name).train.steps


def costs(root: Path, pairs: int, models: tuple[Model, ...]) -> dict[str, float]:
    """Training FLOPs per stage: each recipe's step FLOPs times its steps, each pair set's generation."""
    stages = dict.fromkeys(["ddpm_digits", *(s for m in models for s in (*m.teacher, *m.own))])
    out = {}
    for stage in stages:
        if stage.startswith("pairs"):
            out[stage] = pair_flops(root / ("rf_digits" if stage == "pairs 1-RF" else "rf_digits_reflow"), pairs)
        else:
            out[stage] = step_flops(stage, root) * recipe_steps(stage)
    return out


def run(root: str = "runs", n: int = 1000, pairs: int = 4096, reference: str | None = None,
        models: tuple[str, ...] = tuple(m.run for m in MODELS)) -> dict[str, Any]:
    from genkit.api import load
    from genkit.families.sampling import sample

    root_path = Path(root)
    chosen = tuple(m for m in MODELS if m.run in models)
    seconds = train_all(root_path, pairs, chosen)
    flops = costs(root_path, pairs, chosen)
    scorer = Scorer(n)
    noise = torch.randn(2000, 1, 16, 16, generator=torch.Generator().manual_seed(0))[:n]  # bench_fewstep's draws
    rows = []
    for m in chosen:
        family = load(root_path / m.run)
        for nfe in NFES:
            t0 = time.perf_counter()
            out = sample(family, n, sampler=m.sampler, nfe=nfe, noise=noise, batch_size=500)
            rows.append({"model": m.label, "run": m.run, "sampler": m.sampler, "nfe": out.nfe,
                         "fd": scorer.fd(out.images), "seconds": time.perf_counter() - t0,
                         "flops": sum(flops[s] for s in m.own), "teacher_flops": sum(flops[s] for s in m.teacher),
                         "train_seconds": sum(seconds.get(s, 0.0) for s in m.own)})
    ref = _reference(root_path, scorer, noise, reference)
    return {"rows": rows, "reference": ref, "flops": flops, "seconds": seconds, "n": n, "pairs": pairs}


def _reference(root: Path, scorer: Scorer, noise: torch.Tensor, path: str | None) -> dict[str, Any]:
    """The 1000-step ancestral DDPM FD on the same noise and n: from bench_fewstep's JSON rows, or sampled."""
    if path is not None:
        for r in json.loads(Path(path).read_text()):
            if r["name"].startswith("ancestral") and r["family"] == "ddpm_digits" and r["n"] == len(noise):
                return {"fd": r["fd"], "nfe": r["nfe"], "source": path}
        raise SystemExit(f"{path}: no ancestral ddpm_digits row with n = {len(noise)}")
    from genkit.api import load
    from genkit.families.sampling import sample

    out = sample(load(root / "ddpm_digits"), len(noise), sampler="ancestral", steps=1000, noise=noise,
                 batch_size=500, generator=torch.Generator().manual_seed(2))
    return {"fd": scorer.fd(out.images), "nfe": out.nfe, "source": "sampled here"}


def markdown(result: dict[str, Any]) -> str:
    flops, ref = result["flops"], result["reference"]
    base = flops["ddpm_digits"]
    lines = ["| model | NFE | FD | / DDPM 1000 | own training (GFLOP) | x ddpm_digits | teacher (x ddpm_digits) | "
             "own training wall s |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in result["rows"]:
        ratio, budget = r["fd"] / ref["fd"], r["flops"] / base
        lines.append(f"| {r['model']} | {r['nfe']} | {r['fd']:.3f} | {ratio:.2f}x | {r['flops'] / 1e9:,.0f} | "
                     f"{budget:.2f}x | {r['teacher_flops'] / base:.2f}x | {r['train_seconds'] or math.nan:.0f} |")
        target = {1: 1.5, 2: 1.2}[r["nfe"]]
        verdicts.append((r["nfe"], r["model"], ratio, budget, ratio <= target and budget <= 2.0))
    lines.append(f"| DDPM ancestral (ddpm_digits) | {ref['nfe']} | {ref['fd']:.3f} | 1.00x | {base / 1e9:,.0f} | "
                 f"1.00x | - | - |")
    text = "\n".join(lines)
    for nfe, target in ((1, 1.5), (2, 1.2)):
        met = [f"{m} ({ratio:.2f}x at {budget:.2f}x budget)" for k, m, ratio, budget, ok in verdicts if k == nfe and ok]
        text += (f"\n\n{nfe}-step target (FD <= {target}x the 1000-step DDPM's {ref['fd']:.3f}, own budget <= 2x "
                 f"ddpm_digits'): " + ("met by " + ", ".join(met) if met else "not met"))
    stages = ", ".join(f"{k} {v:,.0f} GFLOP" for k, v in ((k, v / 1e9) for k, v in flops.items()))
    return (text + f"\n\nn = {result['n']} samples per row, the reference from {ref['source']}; reflow pairs "
            f"{result['pairs']} per stage. Training FLOPs per stage: {stages}.")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--reference", help="bench_fewstep JSON rows holding the ancestral ddpm_digits row")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--models", default=",".join(m.run for m in MODELS),
                   help="comma-separated runs to train and measure (default all: " + ", ".join(m.run for m in MODELS)
                   + "; rf_digits_distill trains the whole reflow chain, about 1.5 h on 2 cores)")
    a = p.parse_args()
    result = run(a.root, a.n, a.pairs, a.reference, tuple(a.models.split(",")))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))
