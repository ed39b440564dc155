"""Latent diffusion on the captioned digits: prompt accuracy and FD vs guidance; latent vs pixel step cost.

Run: `python -m benchmarks.bench_ldm [--run runs/ldm_digits_text] [--n 500]`. The run is the digits
recipe after its fixed budget (`genkit train ldm_digits_text`). For each guidance scale w, n samples
prompted "a handwritten digit <d>" (d = 0..9 in turn, same noise for every w) give the prompt
accuracy (the shipped digits classifier reads back the digit asked for; chance 0.1) and the FD in
the digits features against the training data. The step cost compares the recipe's conditional UNet
on the 4x8x8 latents with the same UNet on the 1x16x16 pixels (one training step: forward + backward,
batch 64, fp32; FLOPs from torch.utils.flop_counter), plus the frozen encoder's share in training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import genkit
from genkit.data.captions import digit_prompt
from genkit.eval.conditional import digits_accuracy
from genkit.eval.engine import EvalSettings, build_extractor, reference_stats
from genkit.eval.frechet import GaussianStats, frechet_distance
from genkit.families.sampling import sample
from genkit.io import to_uint8
from genkit.nn.cond_unet import build_cond_unet

GUIDANCE = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)


def guidance_rows(run: str, n: int, steps: int, sampler: str) -> list[dict]:
    family = genkit.load(run)
    s = EvalSettings(features="digits", n=n, batch_size=250, seed=0)
    extractor = build_extractor(s)
    ref = reference_stats(f"recipe:{Path(run) / 'config.yaml'}", extractor, s)
    labels = torch.arange(n) % 10
    prompts = [digit_prompt(int(d)) for d in labels]
    rows = []
    for w in GUIDANCE:
        out = sample(family, n, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0),
                     batch_size=250, prompts=prompts, guidance=w)
        acc = GaussianStats(extractor.dim)
        acc.update(extractor(to_uint8(out.images).to(next(extractor.parameters()).device)).double().cpu())
        mu, sigma = acc.mean_cov()
        rows.append({"guidance": w, "accuracy": digits_accuracy(out.images, labels), "nfe": out.nfe,
                     "fd": frechet_distance(ref.mu, ref.sigma, mu, sigma), "seconds": out.seconds})
    return rows


def _step_seconds(unet: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, repeats: int = 5) -> float:
    t = torch.randint(0, 1000, (len(x),)).float()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        unet(x, t, encoder_hidden_states=text).sample.pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _flops(unet: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(x, torch.zeros(len(x)), encoder_hidden_states=text).sample.sum().backward()
    return counter.get_total_flops()


def step_cost_rows(run: str, batch: int = 64) -> list[dict]:
    """One training step of the same conditional UNet on latents vs pixels (CPU/GPU as available, fp32)."""
    family = genkit.load(run)
    cfg, device = family.cfg, family.device
    text = family.embed(["a handwritten digit seven"] * batch)
    images = torch.rand(batch, *family.sample_shape, device=device) * 2 - 1
    t0 = time.perf_counter()
    family.encode_images(images)
    encode = time.perf_counter() - t0
    rows = []
    for name, shape in (("latent", family.latent_shape), ("pixel", family.sample_shape)):
        torch.manual_seed(0)
        unet = build_cond_unet(cfg.unet, shape[0], shape[1], text.shape[-1]).to(device)
        x = torch.randn(batch, *shape, device=device)
        rows.append({"space": name, "shape": "x".join(map(str, shape)), "dims": x[0].numel(),
                     "step_s": _step_seconds(unet, x, text), "gflops": _flops(unet, x, text) / 1e9,
                     "encode_s": encode if name == "latent" else 0.0})
    return rows


def run(run_dir: str = "runs/ldm_digits_text", n: int = 500, steps: int = 20, sampler: str = "ddim",
        out: str = "docs") -> dict:
    rows = guidance_rows(run_dir, n, steps, sampler)
    plot(rows, Path(out) / "ldm_guidance_digits.png", n)
    return {"guidance": rows, "cost": step_cost_rows(run_dir), "n": n, "steps": steps, "sampler": sampler}


def plot(rows: list[dict], path: Path, n: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["guidance"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [r["accuracy"] for r in rows], "o-", color="tab:blue", label="prompt accuracy")
    ax.axhline(0.1, color="grey", ls=":", label="chance")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("prompt accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(w, [r["fd"] for r in rows], "s--", color="tab:red", label="FD (digits)")
    ax2.set_ylabel("FD (digits features)", color="tab:red")
    ax.set_title(f"LDM digits: accuracy and FD vs guidance (n={n})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(result: dict) -> str:
    lines = [f"{result['sampler']}, {result['steps']} steps, n={result['n']} per scale", "",
             "| guidance | prompt accuracy | FD (digits) | NFE | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['guidance']:g} | {r['accuracy']:.3f} | {r['fd']:.4g} | {r['nfe']} | {r['seconds']:.1f} |"
              for r in result["guidance"]]
    lines += ["", "| space | shape | dims | train step (s, batch 64) | GFLOPs (fwd+bwd) | encode (s) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['space']} | {r['shape']} | {r['dims']} | {r['step_s']:.4f} | {r['gflops']:.3g} | "
              f"{r['encode_s']:.4f} |" for r in result["cost"]]
    return "\n".join(lines) + "\n\n![accuracy and FD vs guidance](ldm_guidance_digits.png)"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/ldm_digits_text")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="docs")
    a = p.parse_args()
    print(markdown(run(a.run, a.n, out=a.out)))
