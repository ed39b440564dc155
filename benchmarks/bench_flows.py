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


class NormflowsAsFamily:
    """A normflows model seen through genkit's flow interface, for `family_bits_per_dim`.

    normflows' examples train on y = (k + u) / 256 in [0, 1); genkit's flows model
    x = 2 (k + u) / 256 - 1 = 2y - 1 in [-1, 1]. So log p_x(x) = log p_y((x + 1) / 2) - D ln 2
    (the Jacobian of y -> x), and both models then go through the same dequantization and
    bits/dim formula."""

    name, n_bits = "normflows", 8

    def __init__(self, model: torch.nn.Module, shape: tuple[int, int, int]):
        self.nets = torch.nn.ModuleDict({"flow": model})
        self.sample_shape, self.dims = tuple(shape), math.prod(shape)
        self.device = next(model.parameters()).device

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats for x in [-1, 1]."""
        return self.nets["flow"].log_prob((x + 1) / 2, None) - self.dims * math.log(2)


class NormflowsLoop:
    """normflows' Glow example loop (its examples/glow.ipynb): Adamax (lr 1e-3, weight decay
    1e-5), `forward_kld` on uniformly dequantized [0, 1) batches, steps with a non-finite loss
    skipped. `__call__(k)` trains k more steps."""

    def __init__(self, levels: torch.Tensor, shape, size: tuple[int, int, int]):
        from benchmarks.common import ShuffledBatches

        torch.manual_seed(0)
        self.model = normflows_glow(shape, *size)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.Adamax(self.model.parameters(), lr=1e-3, weight_decay=1e-5)
        self.batch = ShuffledBatches(levels, BUDGET_BATCH)

    def __call__(self, k: int) -> None:
        for _ in range(k):
            levels = self.batch()
            loss = self.model.forward_kld((levels.float() + torch.rand(levels.shape)) / 256)
            if torch.isfinite(loss):
                loss.backward()
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)


BUDGET_BATCH, BUDGET_CHUNK = 64, 5


def equal_budget(budget: float = 120.0) -> dict:
    """genkit Glow (recipe glow_digits through genkit's Trainer, constant LR after warm-up) vs
    normflows' Glow at matched size, each trained `budget` seconds of its own time; held-out
    bits/dim of both through `family_bits_per_dim` (same dequantization noise, same formula)."""
    import tempfile

    from benchmarks.bench_train import GenkitSteps
    from benchmarks.common import single_thread, train_for
    from genkit.data.base import to_uint8
    from genkit.eval.likelihood import family_bits_per_dim
    from genkit.eval.specs import iter_images

    single_thread()
    shape, levels, k, hidden, _ = SIZES["digits (glow_digits)"]
    held_out = torch.cat(list(iter_images("recipe:glow_digits:test", None, 100)))

    def bpd(family) -> dict:
        return family_bits_per_dim(family, held_out, batch_size=100, generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory(prefix="genkit-flows-") as tmp:
        ours = GenkitSteps(shape[-1], Path(tmp), ("train.lr_schedule=constant",), recipe="glow_digits")
        train = to_uint8(ours.trainer.dataset.images)
        theirs = NormflowsLoop(train, shape, (levels, k, hidden))
        rows = train_for({"genkit Glow": ours, "normflows Glow": theirs}, budget, BUDGET_CHUNK)
        with ours.trainer._eval_weights():
            rows["genkit Glow"].update(bpd(ours.trainer.family), weights="EMA (recipe default)")
        rows["genkit Glow, raw weights"] = dict(rows["genkit Glow"], **bpd(ours.trainer.family), weights="raw")
        rows["normflows Glow"].update(bpd(NormflowsAsFamily(theirs.model, shape)), weights="raw (no EMA)")
    return {"rows": rows, "budget": budget, "held_out": len(held_out)}


def run(root: str = "runs", ode_root: str | None = None, ode_n: int = 16, repeats: int = 10,
        budget: float = 120.0) -> dict:
    root = Path(root)
    return {"bpd": held_out_bpd(root, Path(ode_root) if ode_root else root, ode_n),
            "steps": step_times(repeats), "ode_n": ode_n, "budget": equal_budget(budget)}


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
    text = ("\n".join(lines) + f"\n\nStep = log-likelihood forward + backward + Adam step, fp32, median of "
            f"interleaved repeats on {dev['device']} with {dev['threads']} thread(s). ODE bits/dim on the first "
            f"{result['ode_n']} held-out images only (Hutchinson, rtol = atol = 1e-3).")
    return text + "\n\n" + budget_markdown(result["budget"]) if "budget" in result else text


def budget_markdown(b: dict) -> str:
    """Table of the equal-budget comparison: steps, images/s, held-out bits/dim."""
    lines = [f"Equal training budget: {b['budget']:.0f} s of each contender's own time (interleaved chunks of "
             f"{BUDGET_CHUNK} steps, one thread), batch {BUDGET_BATCH}, digits 16x16, L=2, K=4, hidden 64; held-out "
             f"bits/dim on the {b['held_out']} held-out digits, same dequantization noise and formula for both.", "",
             "| contender | weights | params | steps in budget | images/s | held-out bits/dim | std. error |",
             "|---|---|---|---|---|---|---|"]
    for name, r in b["rows"].items():
        lines.append(f"| {name} | {r['weights']} | {r['params']:,} | {r['steps']} | "
                     f"{r['steps'] * BUDGET_BATCH / r['seconds']:.0f} | {r['bits_per_dim']:.3f} | "
                     f"{r['bits_per_dim_std'] / math.sqrt(r['n']):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs")
    p.add_argument("--ode-root", default=None)
    p.add_argument("--ode-n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per Glow (equal budget)")
    p.add_argument("--budget-only", action="store_true", help="only the equal-budget Glow comparison")
    a = p.parse_args()
    if a.budget_only:
        print(budget_markdown(equal_budget(a.budget)))
    else:
        print(markdown(run(a.root, a.ode_root, a.ode_n, a.repeats, a.budget)))
