"""Normalizing flows on the digits default: held-out bits/dim of NICE and Glow at the shipped budgets,
next to the ODE families' bits/dim, and Glow's train step time vs the `normflows` package's Glow.

Run: `OMP_NUM_THREADS=1 python -m benchmarks.bench_flows [--root runs] [--ode-root runs] [--ode-n 16]`.

* Bits/dim: `genkit train nice_digits` / `glow_digits` into ROOT where the run is missing (the
  recipes' budgets: NICE 3000 steps, Glow 1500 steps, batch 64, 16x16), then `genkit eval bpd` on
  the fixed held-out digits split (297 images, exact). ODE families (ddpm_digits, rf_digits under
  ODE_ROOT, if trained) go through the same command and formula; their probability-flow likelihood
  costs hundreds of network calls per image, so they are scored on the first ODE_N held-out images
  with Hutchinson's estimator (1 probe, dopri5 at rtol = atol = 1e-3): an unbiased but noisy
  estimate, reported with its standard error.
* Step time: forward (log-likelihood) + backward + Adam step on one batch, fp32, same sizes
  (levels, K, hidden channels, sigmoid-scale affine coupling, LU 1x1 convs) for genkit's Glow and
  `normflows.MultiscaleFlow` of `GlowBlock`s (its multi-scale prior is a learned diagonal Gaussian
  per scale, not Glow's conditional split prior; its coupling network has no ActNorm by default).
  Needs `pip install normflows` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

FLOW_RUNS = ("nice_digits", "glow_digits")
ODE_RUNS = ("ddpm_digits", "rf_digits")
SIZES = {  # name: (input shape, levels, K, hidden, batch)
    "digits (glow_digits)": ((1, 16, 16), 2, 4, 64, 64),
    "CIFAR-size, narrow": ((3, 32, 32), 3, 8, 128, 16),
}


def _train(name: str, root: Path) -> float:
    import genkit

    out = root / name
    if (out / "model" / "genkit.json").exists():
        return 0.0
    t0 = time.perf_counter()
    genkit.train(name, out=out)
    return time.perf_counter() - t0


def held_out_bpd(root: Path, ode_root: Path, ode_n: int) -> list[dict]:
    """`genkit eval bpd` of each flow run (exact) and each ODE run present (Hutchinson, ode_n images)."""
    from genkit.eval.engine import EvalSettings, compute_bpd

    rows = []
    for name in FLOW_RUNS:
        seconds = _train(name, root)
        t0 = time.perf_counter()
        r = compute_bpd(root / name, None, EvalSettings(batch_size=100, seed=0))
        rows.append(dict(r, model=name, train_seconds=seconds, eval_seconds=time.perf_counter() - t0))
    for name in ODE_RUNS:
        if not (ode_root / name / "config.yaml").exists():
            continue
        t0 = time.perf_counter()
        r = compute_bpd(ode_root / name, None, EvalSettings(n=ode_n, batch_size=ode_n, seed=0),
                        divergence="hutchinson", probes=1, rtol=1e-3, atol=1e-3)
        rows.append(dict(r, model=name, train_seconds=0.0, eval_seconds=time.perf_counter() - t0))
    return rows


def genkit_glow(shape, levels, k, hidden):
    from genkit.families.glow import Glow, GlowConfig

    return Glow(GlowConfig(levels=levels, steps=k, hidden=hidden, coupling="affine", lu=True), shape)


def normflows_glow(shape, levels, k, hidden):
    """normflows' own multi-scale Glow recipe (its examples/glow.ipynb), unconditional."""
    import normflows as nf

    c, h, w = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        flows.append([nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, scale=True, scale_map="sigmoid",
                                         split_mode="channel", use_lu=True) for _ in range(k)]
                     + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


class _Stepper:
    """loss -> backward -> Adam step, timed."""

    def __init__(self, loss_fn, params):
        self.loss_fn, self.params = loss_fn, params
        self.opt = torch.optim.Adam(params, lr=1e-4)
        self.times: list[float] = []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.loss_fn().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def _interleaved_medians(a: _Stepper, b: _Stepper, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median step seconds of a and b, alternating steps so that machine load hits both alike."""
    for _ in range(warmup + repeats):
        a()
        b()
    return statistics.median(a.times[warmup:]), statistics.median(b.times[warmup:])


def step_times(repeats: int = 10) -> list[dict]:
    """genkit Glow vs normflows Glow, same sizes and batch, fp32 on this machine's CPU/GPU."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for label, (shape, levels, k, hidden, batch) in SIZES.items():
        x = (torch.randint(0, 256, (batch, *shape)).float() + torch.rand(batch, *shape)) / 128 - 1
        x = x.to(device)
        ours = genkit_glow(shape, levels, k, hidden)
        ours.nets.to(device)
        ours.initialize({"image": x.clamp(-1, 1)})
        theirs = normflows_glow(shape, levels, k, hidden).to(device)
        with torch.no_grad():
            theirs.forward_kld(x)  # its ActNorm's data-dependent init happens on the first call
        dims = math.prod(shape)
        t_ours, t_theirs = _interleaved_medians(
            _Stepper(lambda: -ours.log_prob(x).mean() / dims, list(ours.nets.parameters())),
            _Stepper(lambda: theirs.forward_kld(x) / dims, list(theirs.parameters())), repeats)
        rows.append({"size": label, "shape": shape, "levels": levels, "K": k, "hidden": hidden, "batch": batch,
                     "genkit_s": t_ours, "normflows_s": t_theirs,
                     "genkit_params": sum(p.numel() for p in ours.nets.parameters()),
                     "normflows_params": sum(p.numel() for p in theirs.parameters()), "device": device,
                     "threads": torch.get_num_threads()})
    return rows


def run(root: str = "runs", ode_root: str | None = None, ode_n: int = 16, repeats: int = 10) -> dict:
    root = Path(root)
    return {"bpd": held_out_bpd(root, Path(ode_root) if ode_root else root, ode_n),
            "steps": step_times(repeats), "ode_n": ode_n}


def markdown(result: dict) -> str:
    lines = ["| model | method | held-out images | bits/dim | std. error | train s | eval s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["bpd"]:
        method = "exact (flow)" if "divergence" not in r else f"ODE, {r['divergence']} ({r['probes']} probe)"
        se = r["bits_per_dim_std"] / math.sqrt(r["n"])
        lines.append(f"| {r['model']} | {method} | {r['n']} | {r['bits_per_dim']:.3f} | {se:.3f} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.1f} |")
    lines += ["", "| Glow size | input | L | K | hidden | batch | genkit params | normflows params | "
              "genkit s/step | normflows s/step | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['size']} | {'x'.join(map(str, r['shape']))} | {r['levels']} | {r['K']} | {r['hidden']} | "
                     f"{r['batch']} | {r['genkit_params']:,} | {r['normflows_params']:,} | {r['genkit_s']:.4f} | "
                     f"{r['normflows_s']:.4f} | {r['genkit_s'] / r['normflows_s']:.2f} |")
    dev = result["steps"][0]
    return ("\n".join(lines) + f"\n\nStep = log-likelihood forward + backward + Adam step, fp32, median of "
            f"interleaved repeats on {dev['device']} with {dev['threads']} thread(s). ODE bits/dim on the first "
            f"{result['ode_n']} held-out images only (Hutchinson, rtol = atol = 1e-3).")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs")
    p.add_argument("--ode-root", default=None)
    p.add_argument("--ode-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    print(markdown(run(a.root, a.ode_root, a.ode_n, a.repeats)))
