"""Run benchmarks and append their tables to docs/benchmarks.md with the machine, versions and date.

    python -m benchmarks                 # all
    python -m benchmarks frechet eval    # some (names below)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
from pathlib import Path

BENCHMARKS = {
    "frechet": ("benchmarks.bench_frechet", "Frechet distance: eigh trace vs scipy sqrtm (pytorch-fid)"),
    "eval": ("benchmarks.bench_eval", "FID pipeline throughput: genkit vs torchmetrics, same network"),
    "samplers": ("benchmarks.bench_samplers", "FD vs NFE of the shared samplers on the digits default"),
    "fewstep": ("benchmarks.bench_fewstep", "Few-step sampling: FD vs NFE of every sampler/grid pair vs the converged "
                "ODE, k-diffusion and diffusers"),
    "budget": ("benchmarks.bench_budget", "Quality per compute: FD after one wall-clock budget for DDPM, Min-SNR, "
               "EDM, post-hoc EMA and autoguidance"),
    "onestep": ("benchmarks.bench_onestep", "One- and two-step generation on digits: consistency training, ECT, "
                "MeanFlow, distilled 2-RF vs 1000-step DDPM, with training FLOPs"),
    "reflow": ("benchmarks.bench_reflow", "Rectified flow, reflow and 1-step distillation on digits: FD vs Euler steps"),
    "flows": ("benchmarks.bench_flows", "NICE and Glow on digits: held-out bits/dim; Glow step time and equal-budget bits/dim vs normflows"),
    "ar": ("benchmarks.bench_ar", "AR prior sampling at 256 tokens: tokens/s with vs without the KV cache"),
    "ldm": ("benchmarks.bench_ldm", "Latent diffusion on captioned digits: prompt accuracy and FD vs guidance; latent vs pixel step cost"),
    "train": ("benchmarks.bench_train", "DDPM training throughput: genkit Trainer vs a plain diffusers loop vs "
              "denoising-diffusion-pytorch"),
    "sample": ("benchmarks.bench_sample", "DDIM sampling throughput: genkit vs diffusers.DDIMPipeline, same UNet"),
    "quality": ("benchmarks.bench_quality", "Quality per compute: digits FD after equal training time, genkit vs "
                "denoising-diffusion-pytorch, rectified-flow-pytorch and torchcfm"),
    "memory": ("benchmarks.bench_memory", "Peak memory of training and sampling: genkit vs peers, gradient "
               "checkpointing"),
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def environment() -> str:
    import diffusers
    import torch
    import torchmetrics

    import genkit

    cpu = platform.processor() or platform.machine()
    return (f"{datetime.date.today().isoformat()} · {platform.system()} {cpu}, {os.cpu_count()} cores, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'} · "
            f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"torchmetrics {torchmetrics.__version__}, genkit {genkit.__version__}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run the named benchmarks (all by default), print each table, append it unless --no-write."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", choices=list(BENCHMARKS), help="benchmarks to run (default: all)")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    env = environment()
    for name in names:
        module, title = BENCHMARKS[name]
        bench = importlib.import_module(module)
        text = bench.markdown(bench.run())
        section = f"\n### {title}\n\n_{env}_ · `python -m benchmarks {name}`\n\n{text}\n"
        print(section)
        if not args.no_write:
            DOC.parent.mkdir(exist_ok=True)
            with open(DOC, "a") as f:
                f.write(section)


if __name__ == "__main__":
    main()
