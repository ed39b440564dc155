"""Peak memory (RSS) of a DDPM training step and of DDIM sampling: genkit vs its peers, same batch.

Run: `python -m benchmarks memory` (or `python -m benchmarks.bench_memory`).

Every measurement runs in a fresh Python process on one thread: build the contender, read the
resident set size (psutil) after setup, run 3 training steps (or one 50-step DDIM batch), then
read the process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`). The table gives the
peak and the growth over the post-setup RSS, which is what the step itself costs. Training:
genkit's Trainer and the minimal diffusers loop of `bench_train` on the same UNet2DModel, each
with and without gradient checkpointing (genkit: `train.gradient_checkpointing=true`; diffusers:
`unet.enable_gradient_checkpointing()`), and denoising-diffusion-pytorch's Trainer (no such
option; its DataLoader worker processes are not counted). Sampling: genkit `ddim` (fp32 and
bf16 autocast) vs DDIMPipeline on the same UNet, and denoising-diffusion-pytorch's DDIM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    "train": ["genkit", "genkit +checkpointing", "diffusers loop", "diffusers loop +checkpointing",
              "denoising-diffusion-pytorch"],
    "sample": ["genkit ddim", "genkit ddim bf16", "diffusers DDIMPipeline", "denoising-diffusion-pytorch ddim"],
}
CONFIGS = {"digits16": 16, "digits32": 32}


def _rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _digits(size: int) -> torch.Tensor:
    from genkit.data import build_dataset
    from genkit.runs import load_recipe

    return build_dataset(load_recipe("ddpm_digits", [f"data.image_size={size}"]).data, "train").images


def _train_case(case: str, size: int, root: Path):
    from benchmarks import bench_sample as bs
    from benchmarks import bench_train as bt
    from benchmarks.common import write_png_folder

    if case.startswith("genkit"):
        gc = ("train.gradient_checkpointing=true",) if "checkpointing" in case else ()
        return bt.GenkitSteps(size, root, gc)
    if case.startswith("diffusers"):
        loop = bt.DiffusersLoop(dict(bs.build_family(size).nets["unet"].config), _digits(size))
        if "checkpointing" in case:
            loop.unet.enable_gradient_checkpointing()
        return loop
    return bt.DDPTrainer(size, write_png_folder(_digits(size), root / "png"), root)


def _sample_case(case: str, size: int):
    from benchmarks import bench_sample as bs

    if case.startswith("denoising"):
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet

        from benchmarks.bench_train import DDP_UNET

        diffusion = GaussianDiffusion(Unet(channels=1, flash_attn=False, **DDP_UNET), image_size=size,
                                      timesteps=1000, sampling_timesteps=bs.STEPS, beta_schedule="cosine")
        return lambda: diffusion.sample(batch_size=bs.BATCH)
    family = bs.build_family(size)
    if case.startswith("diffusers"):
        pipe = bs.pipeline(family)
        return lambda: bs.diffusers_images(pipe, 0)
    return lambda: bs.genkit_images(family, 0, "bf16" if "bf16" in case else "no")


def child(kind: str, case: str, size: int) -> dict:
    """In a fresh process: set up, measure RSS, run the step(s), return peak RSS and seconds."""
    from benchmarks.common import single_thread

    single_thread()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="genkit-mem-") as tmp:
        if kind == "train":
            c = _train_case(case, size, Path(tmp))
            fn = lambda: c(3)  # noqa: E731
        else:
            fn = _sample_case(case, size)
        setup = _rss()
        t0 = time.perf_counter()
        with torch.inference_mode(kind == "sample"):
            fn()
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"setup_mib": setup, "peak_mib": peak, "seconds": seconds}


def run(configs: tuple[str, ...] = ("digits16", "digits32")) -> dict:
    """Every case of CASES in its own subprocess, per config."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results: dict = {}
    for name in configs:
        for kind, cases in CASES.items():
            for case in cases:
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", kind, case,
                                      str(CONFIGS[name])], env=env, cwd=root, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"memory case '{kind}: {case}' failed: {out.stderr.strip()[-500:]}")
                results.setdefault(name, {}).setdefault(kind, {})[case] = json.loads(out.stdout.splitlines()[-1])
    return results


def markdown(results: dict) -> str:
    """Tables: peak RSS, growth over post-setup RSS, seconds of the measured call."""
    lines = ["Fresh process per row, one thread, batch 64; training: 3 steps; sampling: one batch of 64, "
             "DDIM 50 steps. Peak = ru_maxrss; step = peak minus the RSS after setup.", "",
             "| config | what | contender | peak RSS (MiB) | step (MiB) | seconds |", "|---|---|---|---|---|---|"]
    for name, kinds in results.items():
        for kind, rows in kinds.items():
            for case, r in rows.items():
                lines.append(f"| {name} | {kind} | {case} | {r['peak_mib']:.0f} | "
                             f"{r['peak_mib'] - r['setup_mib']:.0f} | {r['seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=3, metavar=("KIND", "CASE", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]))))
    else:
        print(markdown(run(tuple(a.configs))))
