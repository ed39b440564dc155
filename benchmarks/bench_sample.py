"""DDIM sampling throughput: genkit `ddim` vs diffusers.DDIMPipeline, same UNet weights and batch.

Run: `python -m benchmarks sample` (or `python -m benchmarks.bench_sample --rounds 5`).

One DDPM family from the `ddpm_digits` recipe (UNet2DModel, 1.11M parameters, seeded random
weights: throughput does not depend on them) is sampled with 50 DDIM steps, eta 0, by
`genkit.families.sampling.sample` and by `DDIMPipeline` built on the very same UNet module with the
scheduler `genkit export` writes (`genkit.interop.ddpm_scheduler`; `use_clipped_model_output`
as the export documents), `output_type="pt"`. One thread, interleaved rounds, images/s median
(min-max). The max |difference| of the two outputs from the same generator is reported to
show that both compute the same thing. genkit also runs with `precision="bf16"` (autocast) and
with `compile=True` (torch.compile with frozen weights, `genkit.samplers.compiled`); the first
call's seconds, which hold the one-off compile, are reported apart from the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import torch

from benchmarks.common import interleaved, median_spread, single_thread, timed

CONFIGS = {"digits16": 16, "digits32": 32}
BATCH, STEPS = 64, 50


def build_family(size: int) -> Any:
    """The ddpm_digits family at `size` px with seeded random weights."""
    from genkit.runs import build_family as build
    from genkit.runs import load_recipe

    recipe = load_recipe("ddpm_digits", [f"data.image_size={size}"])
    torch.manual_seed(0)
    return build(recipe, (1, size, size), 0)


def pipeline(family: Any) -> Any:
    """DDIMPipeline on the family's own UNet with the exported scheduler config."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from genkit.interop import ddpm_scheduler

    scheduler = DDIMScheduler.from_config(ddpm_scheduler(family.cfg, family.cfg.clip_sample).config)
    pipe = DDIMPipeline(unet=family.nets["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def genkit_images(family: Any, seed: int, precision: str = "no", compile: bool | str = False) -> torch.Tensor:
    """BATCH images from genkit's ddim, 50 steps (bf16: under CPU/CUDA autocast; compile: torch.compile)."""
    from genkit.families.sampling import sample

    kw = {"precision": precision} if precision != "no" else {}
    return sample(family, BATCH, sampler="ddim", steps=STEPS, generator=torch.Generator().manual_seed(seed),
                  compile=compile, **kw).images


def diffusers_images(pipe: Any, seed: int) -> torch.Tensor:
    """BATCH images from DDIMPipeline, 50 steps, eta 0, in [-1, 1]."""
    out = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
               eta=0.0, use_clipped_model_output=True, output_type="pt", return_dict=False)[0]
    return out * 2 - 1  # the pipeline returns [0, 1]


def run(configs: tuple[str, ...] = tuple(CONFIGS), rounds: int = 5, bf16: bool = True,
        compile: bool = True) -> dict:
    """Interleaved timings per config: genkit ddim (fp32; bf16 autocast; torch.compile) vs DDIMPipeline.

    The first call of each contender is its warm-up (and, with compile, the one-off compile,
    whose seconds are reported apart from the steady-state rounds).
    """
    single_thread()
    results = {}
    for name in configs:
        family = build_family(CONFIGS[name])
        pipe = pipeline(family)
        contenders = {"genkit ddim": lambda: genkit_images(family, 0),
                      "diffusers DDIMPipeline": lambda: diffusers_images(pipe, 0)}
        if bf16:
            contenders["genkit ddim, bf16 autocast"] = lambda: genkit_images(family, 0, "bf16")
        if compile:
            contenders["genkit ddim, compile"] = lambda: genkit_images(family, 0, compile=True)
            contenders["genkit ddim, compile max-autotune"] = lambda: genkit_images(family, 0, compile="max-autotune")
        if compile and bf16:
            contenders["genkit ddim, compile + bf16"] = lambda: genkit_images(family, 0, "bf16", compile=True)
        outputs, first = {}, {}
        with contextlib.redirect_stderr(io.StringIO()):
            for k, fn in contenders.items():  # warm-up (compile) and parity
                first[k] = timed(lambda: outputs.__setitem__(k, fn()))
        times = interleaved({k: (lambda fn=fn: timed(fn)) for k, fn in contenders.items()}, rounds)
        ref = outputs["diffusers DDIMPipeline"]
        results[name] = {k: {"seconds": times[k], "first": first[k], "diff": float((outputs[k] - ref).abs().max())}
                         for k in contenders}
    return {"configs": results, "rounds": rounds}


def markdown(results: dict) -> str:
    """Table: images/s median (min-max), speed-up over DDIMPipeline, max |diff| to its output."""
    lines = [f"DDIM {STEPS} steps, eta 0, batch {BATCH}, one thread, {results['rounds']} interleaved rounds; "
             "images/s median (min-max); max |diff| = largest pixel difference from DDIMPipeline's output "
             "(same UNet, same generator; images in [-1, 1]); first call s = the warm-up call, which "
             "includes the one-off torch.compile.", "",
             "| config | contender | images/s | vs DDIMPipeline | max abs diff | first call s |",
             "|---|---|---|---|---|---|"]
    for name, rows in results["configs"].items():
        base = median_spread(rows["diffusers DDIMPipeline"]["seconds"])[0]
        for k, r in rows.items():
            med, lo, hi = median_spread(r["seconds"])
            lines.append(f"| {name} | {k} | {BATCH / med:.1f} ({BATCH / hi:.1f}-{BATCH / lo:.1f}) | "
                         f"{base / med:.2f}x | {r['diff']:.2g} | {r['first']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-bf16", action="store_true", help="fp32 contenders only")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile contenders")
    a = p.parse_args()
    print(markdown(run(tuple(a.configs), a.rounds, not a.no_bf16, not a.no_compile)))
