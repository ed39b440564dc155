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
* Equal budget (`equal_budget`): genkit's Glow (recipe `glow_digits` through genkit's Trainer,
  as bench_quality drives DDPM: `_train_step` + the logger, i.e. accelerate, gradient clipping
  at 10, EMA 0.995; `train.lr_schedule=constant` since the steps a budget buys are unknown) vs
  normflows' Glow of the matched size in normflows' usual loop (`forward_kld`, Adam, a step
  skipped when the loss is not finite, no clipping, no EMA). Both: batch 64, Adam lr 1e-3
  betas (0.9, 0.999) (the glow_digits recipe's) with its 200-step linear warmup, the 1500
  digits training images at 16x16 uniformly dequantized afresh each step, `budget` seconds of
  each one's own training time in interleaved chunks of 5 steps, one thread. Held-out bits/dim
  on the 297 test digits, one dequantization (seed 0) shared by both, one formula
  (`genkit.eval.likelihood.bits_per_dim`); genkit is scored with its EMA weights (what
  `genkit.load` gives) and with its raw weights.
  Units: normflows is fed y = (k + u) / 256 in [0, 1] (its examples' Scale + Jitter), genkit
  x = 2 y - 1 in [-1, 1]. With x = 2y - 1, p_x(x) = p_y(y) |dy/dx| = p_y(y) 2^-D, so
  -log p_x(x) = -log p_y(y) + D ln 2 and the genkit formula (NLL_x - D ln 2 + 8 D ln 2) / (D ln 2)
  becomes -log p_y(y) / (D ln 2) + 8, normflows' own bits/dim (`normflows_bits_per_dim`).
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


# -- equal wall-clock budget ---------------------------------------------------------------
DIGITS = ((1, 16, 16), 2, 4, 64)  # shape, L, K, hidden: the glow_digits recipe
BATCH, LR, WARMUP = 64, 1e-3, 200  # the glow_digits recipe's batch, Adam lr and linear warmup


def normflows_bits_per_dim(log_p_unit: torch.Tensor, dims: int, n_bits: int = 8) -> torch.Tensor:
    """Bits/dim in genkit's units from log p_y(y) of a model on y = (k + u) / 2^n in [0, 1]^D.

    genkit's model space is x = 2y - 1, so log p_x(x) = log p_y(y) - D ln 2 (the Jacobian of
    y = (x + 1) / 2); the result is genkit's `bits_per_dim` of -log p_x(x) (= NLL_y / (D ln 2) + n).
    """
    from genkit.samplers.likelihood import bits_per_dim

    return bits_per_dim(-(log_p_unit - dims * math.log(2)), dims, n_bits)


def normflows_held_out(model, images_uint8: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per-image bits/dim of a normflows model on 8-bit images: genkit's dequantization (same
    seed, so the same points as `family_bits_per_dim`), mapped to its [0, 1] input."""
    from genkit.samplers.likelihood import dequantize

    x = dequantize(images_uint8, torch.Generator().manual_seed(seed), 8)  # [-1, 1], genkit's space
    was_training = model.training
    model.eval()
    with torch.no_grad():
        log_p = model.log_prob((x + 1) / 2, None)
    model.train(was_training)
    return normflows_bits_per_dim(log_p, x[0].numel())


class NormflowsGlowLoop:
    """normflows' usual training loop on its Glow; `__call__(k)` trains k more steps."""

    def __init__(self, levels_uint8: torch.Tensor, seed: int = 0):
        torch.manual_seed(seed)
        self.model = normflows_glow(*DIGITS)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: min(1.0, (k + 1) / WARMUP))
        from benchmarks.common import ShuffledBatches

        self.gen, self.skipped = torch.Generator().manual_seed(seed), 0
        self.levels = ShuffledBatches(levels_uint8, BATCH, self.gen)

    def _batch(self) -> torch.Tensor:
        k = self.levels().float()
        return (k + torch.rand(k.shape, generator=self.gen)) / 256  # Scale(255/256) + Jitter(1/256)

    def __call__(self, k: int) -> None:
        for _ in range(k):
            loss = self.model.forward_kld(self._batch())
            if torch.isfinite(loss):
                loss.backward()
                self.opt.step()
            else:
                self.skipped += 1
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()


def equal_budget(budget: float = 120.0) -> dict:
    """genkit Glow (its Trainer) vs normflows Glow (its loop), `budget` s each; held-out bits/dim."""
    import tempfile

    from benchmarks.bench_train import GenkitSteps
    from benchmarks.common import single_thread, train_for
    from genkit.eval.likelihood import family_bits_per_dim
    from genkit.eval.specs import iter_images
    from genkit.io import to_uint8

    single_thread()
    test = torch.cat(list(iter_images("recipe:glow_digits:test", None, 297)))
    with tempfile.TemporaryDirectory(prefix="genkit-flows-") as tmp:
        ours = GenkitSteps(DIGITS[0][1], Path(tmp), ("train.lr_schedule=constant",), recipe="glow_digits")
        theirs = NormflowsGlowLoop(to_uint8(ours.trainer.dataset.images))
        rows = train_for({"genkit Glow": ours, "normflows Glow": theirs}, budget, chunk=5)
        family = ours.trainer.family
        raw = family_bits_per_dim(family, test, batch_size=len(test), generator=torch.Generator().manual_seed(0))
        with ours.trainer._eval_weights():
            ema = family_bits_per_dim(family, test, batch_size=len(test), generator=torch.Generator().manual_seed(0))
    bpd = normflows_held_out(theirs.model, test)
    out = {"genkit Glow (EMA weights)": dict(rows["genkit Glow"], bpd=ema["bits_per_dim"],
                                             se=ema["bits_per_dim_std"] / math.sqrt(ema["n"]), n=ema["n"]),
           "genkit Glow (raw weights)": dict(rows["genkit Glow"], bpd=raw["bits_per_dim"],
                                             se=raw["bits_per_dim_std"] / math.sqrt(raw["n"]), n=raw["n"]),
           "normflows Glow": dict(rows["normflows Glow"], bpd=float(bpd.mean()),
                                  se=float(bpd.std()) / math.sqrt(len(bpd)), n=len(bpd), skipped=theirs.skipped)}
    return {"rows": out, "budget": budget}


def run(root: str = "runs", ode_root: str | None = None, ode_n: int = 16, repeats: int = 10,
        budget: float = 120.0) -> dict:
    """Held-out bits/dim of the shipped recipes, step times vs normflows, and the equal-budget race."""
    root = Path(root)
    return {"bpd": held_out_bpd(root, Path(ode_root) if ode_root else root, ode_n),
            "steps": step_times(repeats), "ode_n": ode_n, "equal": equal_budget(budget)}


def markdown_equal(result: dict) -> str:
    """Table of the equal-budget race: steps, images/s, held-out bits/dim +- standard error."""
    lines = [f"Equal training budget: {result['budget']:.0f} s of each one's own time (interleaved chunks, one "
             f"thread), batch {BATCH}, Adam lr {LR:g} with {WARMUP}-step warmup (glow_digits' recipe); held-out "
             "bits/dim on the 297 test digits, same dequantization and formula.", "",
             "| contender | params | steps in budget | images/s | held-out bits/dim | std. error |",
             "|---|---|---|---|---|---|"]
    for k, r in result["rows"].items():
        lines.append(f"| {k} | {r['params']:,} | {r['steps']} | {r['steps'] * BATCH / r['seconds']:.0f} | "
                     f"{r['bpd']:.3f} | {r['se']:.3f} |")
    return "\n".join(lines)


def markdown_steps(steps: list[dict]) -> str:
    """Table of genkit vs normflows Glow step times at matched sizes."""
    lines = ["| Glow size | input | L | K | hidden | batch | genkit params | normflows params | "
             "genkit s/step | normflows s/step | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['size']} | {'x'.join(map(str, r['shape']))} | {r['levels']} | {r['K']} | {r['hidden']} | "
                     f"{r['batch']} | {r['genkit_params']:,} | {r['normflows_params']:,} | {r['genkit_s']:.4f} | "
                     f"{r['normflows_s']:.4f} | {r['genkit_s'] / r['normflows_s']:.2f} |")
    return ("\n".join(lines) + f"\n\nStep = log-likelihood forward + backward + Adam step, fp32, median of "
            f"interleaved repeats on {steps[0]['device']} with {steps[0]['threads']} thread(s).")


def markdown(result: dict) -> str:
    """All three tables: held-out bits/dim of the shipped recipes, step times, equal budget."""
    lines = ["| model | method | held-out images | bits/dim | std. error | train s | eval s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["bpd"]:
        method = "exact (flow)" if "divergence" not in r else f"ODE, {r['divergence']} ({r['probes']} probe)"
        se = r["bits_per_dim_std"] / math.sqrt(r["n"])
        lines.append(f"| {r['model']} | {method} | {r['n']} | {r['bits_per_dim']:.3f} | {se:.3f} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.1f} |")
    lines += ["", f"ODE bits/dim on the first {result['ode_n']} held-out images only (Hutchinson, "
              "rtol = atol = 1e-3).", "", markdown_steps(result["steps"]), "", markdown_equal(result["equal"])]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs")
    p.add_argument("--ode-root", default=None)
    p.add_argument("--ode-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=120.0, help="equal-budget training seconds per contender")
    p.add_argument("--only", choices=["steps", "equal"], default=None, help="run only this part")
    a = p.parse_args()
    if a.only == "steps":
        print(markdown_steps(step_times(a.repeats)))
    elif a.only == "equal":
        print(markdown_equal(equal_budget(a.budget)))
    else:
        print(markdown(run(a.root, a.ode_root, a.ode_n, a.repeats, a.budget)))
