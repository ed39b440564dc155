"""Quality per compute (issue 21): FD after the same wall-clock training budget for today's DDPM recipe, Min-SNR
DDPM and EDM, then the best post-hoc EMA and autoguidance (an early checkpoint of the same run as the guide).

Run: `python -m benchmarks budget`, or
`python -m benchmarks.bench_budget [--budget 7m] [--root runs/budget] [--n 2000] [--nfe 20]`.

Each contender trains its shipped digits recipe with `train.max_time=BUDGET` (the learning-rate schedule and the
EMA warm-up follow the budget's fraction, `genkit.training.budget`), one after another, each on the whole machine:
time them on an otherwise idle machine, as docs/benchmarks.md says. Every run records post-hoc EMA snapshots
(`train.posthoc_ema`) and keeps a checkpoint every `--checkpoint-every` steps for the guide.

Sampling is at equal NFE for every row (`--nfe`, the guide's evaluations counted: a guided step costs two), with
one sampler for every contender (`--sampler`, on its recommended grid: EDM's default Heun spends only odd NFE),
from the same noise (seed 0). FD: the shipped `digits` features of n
samples against the digits training split (`bench_fewstep.Scorer`). The post-hoc EMA length and the guidance
scale are chosen on a screen of `--screen-n` samples from other noise (seed 1), then reported on the n samples
of seed 0, so the reported rows carry no selection bias; the screens are printed.
Target: the best combination's FD at least 35% below today's `ddpm_digits` at the same training time and NFE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_fewstep import Scorer

CONTENDERS = {  # label -> (shipped recipe, overrides)
    "DDPM (ddpm_digits, today)": ("ddpm_digits", []),
    "Min-SNR DDPM": ("ddpm_digits", ["model.loss_weighting=min-snr"]),
    "EDM (edm_digits)": ("edm_digits", []),
}
SIGMA_RELS = (0.03, 0.05, 0.075, 0.10, 0.15, 0.20)
GUIDANCE = (1.5, 2.0, 2.5)


def train(label: str, root: Path, budget: str, checkpoint_every: int) -> tuple[Path, float]:
    import genkit

    recipe, extra = CONTENDERS[label]
    out = root / label.split(" ")[0].lower().replace("-", "_")
    if (out / "model" / "genkit.json").exists():
        return out, 0.0
    t0 = time.perf_counter()
    genkit.train(recipe, out=out, overrides=[*extra, f"train.max_time={budget}", "train.steps=1000000",
                                             "train.posthoc_ema.every=50", "train.sample_every=0",
                                             f"train.checkpoint_every={checkpoint_every}", "train.keep_last=1000"])
    return out, time.perf_counter() - t0


def steps_done(run: Path) -> int:
    from genkit.runs import latest_checkpoint

    return int(latest_checkpoint(run / "checkpoints").name.split("-")[1])


def fd_of(family: Any, scorer: Scorer, noise: torch.Tensor, nfe: int, sampler: str, **kw: Any) -> float:
    from genkit.families.sampling import sample

    out = sample(family, len(noise), sampler=sampler, nfe=nfe, noise=noise, batch_size=500, **kw)
    return scorer.fd(out.images)


def run(budget: str = "7m", root: str = "runs/budget", n: int = 2000, nfe: int = 20,
        checkpoint_every: int = 100, sampler: str = "dpmpp-2m", screen_n: int = 500) -> dict[str, Any]:
    from genkit.api import load
    from genkit.training.phema import posthoc_family

    root_path = Path(root)
    scorer = Scorer(n)
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    screen = torch.randn(screen_n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rows, sweeps = [], []
    for label in CONTENDERS:
        path, seconds = train(label, root_path, budget, checkpoint_every)
        steps = steps_done(path)
        rows.append({"contender": label, "run": str(path), "steps": steps, "train_seconds": seconds,
                     "nfe": nfe, "fd": fd_of(load(path), scorer, noise, nfe, sampler)})
        print(rows[-1], flush=True)
        ema, families = [], {s: posthoc_family(path, s) for s in SIGMA_RELS}
        for sigma_rel, family in families.items():
            ema.append({"sigma_rel": sigma_rel, "fd": fd_of(family, scorer, screen, nfe, sampler)})
        sweeps.append({"contender": label, "what": f"post-hoc EMA sigma_rel (screen, n = {screen_n})", "rows": ema})
        best = min(ema, key=lambda r: r["fd"])
        good = families[best["sigma_rel"]]
        rows.append({"contender": f"{label} + post-hoc EMA (sigma_rel {best['sigma_rel']})", "run": str(path),
                     "steps": steps, "train_seconds": seconds, "nfe": nfe, "fd": fd_of(good, scorer, noise, nfe,
                                                                                          sampler)})
        print(rows[-1], flush=True)
        # autoguidance: the good model is the best post-hoc EMA, the guide the checkpoint nearest a quarter of the run
        guide_step = max(checkpoint_every, round(steps / 4 / checkpoint_every) * checkpoint_every)
        guide = load(path, step=guide_step)
        guided = [{"guidance": w, "fd": fd_of(good, scorer, screen, nfe, sampler, guide=guide, guidance=w)}
                  for w in GUIDANCE]
        sweeps.append({"contender": label, "what": f"autoguidance scale (guide: step {guide_step}; screen)",
                       "rows": guided})
        g = min(guided, key=lambda r: r["fd"])
        rows.append({"contender": f"{label} + post-hoc EMA + autoguidance (w {g['guidance']}, guide step "
                                  f"{guide_step})", "run": str(path), "steps": steps, "train_seconds": seconds,
                     "nfe": nfe, "fd": fd_of(good, scorer, noise, nfe, sampler, guide=guide, guidance=g["guidance"])})
        print(rows[-1], flush=True)
    return {"rows": rows, "sweeps": sweeps, "budget": budget, "n": n, "nfe": nfe, "sampler": sampler,
            "screen_n": screen_n}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows[0]["fd"]
    lines = ["| contender | steps in budget | train s | NFE | FD | / today's DDPM |", "|---|---|---|---|---|---|"]
    seconds = [f"{r['train_seconds']:.0f}" if r["train_seconds"] else "(existing run)" for r in rows]
    lines += [f"| {r['contender']} | {r['steps']} | {t} | {r['nfe']} | {r['fd']:.3f} | {r['fd'] / base:.2f}x |"
              for r, t in zip(rows, seconds)]
    best = min(rows, key=lambda r: r["fd"])
    ratio = best["fd"] / base
    sweeps = "\n".join(f"- {s['contender']}, {s['what']}: " + ", ".join(
        f"{next(v for k, v in r.items() if k != 'fd')} -> {r['fd']:.3f}" for r in s["rows"]) for s in result["sweeps"])
    return ("\n".join(lines) + f"\n\nBudget {result['budget']} of training per contender; n = {result['n']} samples "
            f"per row, sampler {result['sampler']}.\n\nBest: {best['contender']}, FD {best['fd']:.3f} = "
            f"{ratio:.2f}x today's DDPM (target <= 0.65x: {'met' if ratio <= 0.65 else 'not met'})."
            f"\n\nScreens (n = {result['screen_n']}, other noise; the rows above report the choice on n = "
            f"{result['n']}):\n{sweeps}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="7m", help="train.max_time of every contender (default 7m)")
    p.add_argument("--root", default="runs/budget")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--sampler", default="dpmpp-2m", help="the one sampler of every row (its recommended grid)")
    p.add_argument("--screen-n", type=int, default=500, help="samples of the EMA-length and guidance screens")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = run(a.budget, a.root, a.n, a.nfe, a.checkpoint_every, a.sampler, a.screen_n)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))
