"""DDPM training throughput: genkit's Trainer vs a plain diffusers loop vs denoising-diffusion-pytorch.

Run: `python -m benchmarks train` (or `python -m benchmarks.bench_train --rounds 7`).

Contenders, one thread each, timed in interleaved rounds of `steps` training steps:
- genkit: the real `Trainer` after its setup (`_setup`), stepping `_train_step` and the
  logger exactly as `Trainer.fit` does per step (accelerate, EMA, clipping, LR schedule,
  logging every `train.log_every`), recipe `ddpm_digits` (UNet2DModel, 1.11M parameters).
- diffusers loop: diffusers' `train_unconditional` example written minimally on the SAME
  UNet2DModel config: DDPMScheduler.add_noise, UNet, MSE, AdamW, grad clipping, cosine LR,
  diffusers' EMAModel; batches indexed from an in-memory tensor (no trainer at all).
- denoising-diffusion-pytorch: its `Trainer` + `GaussianDiffusion` (cosine schedule, eps
  prediction) on a `Unet(dim=28, dim_mults=(1, 2, 2))` of 1.10M parameters, reading the
  same digits as PNG files (its Trainer reads a folder; its DataLoader uses cpu_count() workers).

Configs: `digits16` (the recipe's 16x16) and `digits32` (the same 1.11M-parameter UNet on the
digits at 32x32), batch 64. FLOPs per step come from torch.utils.flop_counter on one step of
each contender; achieved FLOP/s is compared with the best of a 1024^3 torch.mm in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    ShuffledBatches,
    count_flops,
    gemm_peak,
    interleaved,
    median_spread,
    single_thread,
    timed,
    write_png_folder,
)

CONFIGS = {"digits16": 16, "digits32": 32}
BATCH = 64
DDP_UNET = dict(dim=28, dim_mults=(1, 2, 2))  # 1.10M parameters, matched to the genkit UNet's 1.11M


class GenkitSteps:
    """genkit's Trainer after setup; `__call__(k)` runs k steps as `Trainer.fit` runs them."""

    def __init__(self, size: int, root: Path, overrides: tuple[str, ...] = (), recipe: str = "ddpm_digits"):
        from genkit.runs import load_recipe
        from genkit.training.logger import TrainLogger
        from genkit.training.trainer import Trainer, make_accelerator

        recipe = load_recipe(recipe, [f"data.image_size={size}", f"data.batch_size={BATCH}",
                                             "train.steps=1000000", "train.sample_every=0", *overrides])
        self.trainer = tr = Trainer(recipe, root / "genkit")
        tr.run_dir.mkdir(parents=True)
        tr.acc = make_accelerator(recipe, tr.run_dir)
        tr._setup()
        tr.acc.init_trackers("tensorboard")
        self.log = TrainLogger(tr.acc, tr.run_dir, recipe.train.log_every, recipe.train.steps, 0,
                               BATCH, stop_on_nan=True)
        self.log.bar.disable = True
        tr.log = self.log
        self.batches = tr._batches(0)
        self.step = 0
        self.params = sum(p.numel() for p in tr.raw.parameters())

    def __call__(self, k: int = 1) -> None:
        tr = self.trainer
        for _ in range(k):
            self.log.add(tr._train_step(self.step, self.batches), self.step)
            self.step += 1
            self.log.step(self.step, tr.lr(), tr._skipped())


class DiffusersLoop:
    """diffusers' train_unconditional example, minimal: no trainer, no accelerate."""

    def __init__(self, unet_config: dict[str, Any], data: torch.Tensor, seed: int = 0):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.unet = UNet2DModel.from_config(unet_config).train()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
        self.lr = get_scheduler("cosine", self.opt, num_warmup_steps=100, num_training_steps=1000000)
        self.ema = EMAModel(self.unet.parameters(), decay=0.995, use_ema_warmup=True)
        self.batch = ShuffledBatches(data, BATCH)
        self.params = sum(p.numel() for p in self.unet.parameters())

    def __call__(self, k: int = 1) -> None:
        for _ in range(k):
            clean = self.batch()
            noise = torch.randn_like(clean)
            t = torch.randint(0, 1000, (clean.shape[0],))
            noisy = self.scheduler.add_noise(clean, noise, t)
            loss = F.mse_loss(self.unet(noisy, t).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.opt.step()
            self.lr.step()
            self.opt.zero_grad(set_to_none=True)
            self.ema.step(self.unet.parameters())


class DDPTrainer:
    """denoising-diffusion-pytorch's Trainer; `__call__(k)` extends `train_num_steps` by k and trains."""

    def __init__(self, size: int, folder: Path, root: Path, sampling_steps: int | None = None):
        from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

        torch.manual_seed(0)
        unet = Unet(channels=1, flash_attn=False, **DDP_UNET)
        self.params = sum(p.numel() for p in unet.parameters())
        diffusion = GaussianDiffusion(unet, image_size=size, timesteps=1000, beta_schedule="cosine",
                                      objective="pred_noise", sampling_timesteps=sampling_steps)
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer = Trainer(diffusion, str(folder), train_batch_size=BATCH, train_lr=1e-3,
                                   train_num_steps=0, ema_decay=0.995, save_and_sample_every=10 ** 9,
                                   results_folder=str(root / "ddp"), calculate_fid=False, amp=False,
                                   augment_horizontal_flip=False)

    def __call__(self, k: int = 1) -> None:
        self.trainer.train_num_steps = self.trainer.step + k
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.trainer.train()


def contenders(size: int, root: Path, genkit_variants: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Build every contender for one config (genkit variants: name -> recipe overrides)."""
    out = {name: GenkitSteps(size, root / name.replace(" ", "_"), ov) for name, ov in genkit_variants.items()}
    first = next(iter(out.values()))
    data = first.trainer.dataset.images
    out["diffusers loop"] = DiffusersLoop(dict(first.trainer.raw["unet"].config), data)
    out["denoising-diffusion-pytorch"] = DDPTrainer(size, write_png_folder(data, root / "png"), root)
    return out


def run(configs: tuple[str, ...] = tuple(CONFIGS), rounds: int = 7, steps: int = 5,
        genkit_variants: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Interleaved step timings per config and contender, FLOPs per step, GEMM peaks."""
    single_thread()
    variants = genkit_variants or {"genkit": ()}
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    results = {"peaks": peaks, "configs": {}}
    for name in configs:
        with tempfile.TemporaryDirectory(prefix="genkit-bench-") as tmp:
            cs = contenders(CONFIGS[name], Path(tmp), variants)
            for c in cs.values():
                c(2)  # warm-up: allocator, oneDNN kernels, DataLoader workers
            flops = {k: count_flops(lambda c=c: c(1)) for k, c in cs.items()}
            times = interleaved({k: (lambda c=c: timed(lambda: c(steps))) for k, c in cs.items()}, rounds)
            results["configs"][name] = {k: {"seconds": times[k], "flops": flops[k], "params": cs[k].params}
                                        for k in cs}
    results["steps"], results["rounds"] = steps, rounds
    return results


def markdown(results: dict) -> str:
    """One table per config: images/s (median, spread), ratio to the diffusers loop, FLOP/s vs peak."""
    peaks, steps = results["peaks"], results["steps"]
    lines = [f"GEMM peak on one thread (best 1024^3 torch.mm): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
             f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s. Batch {BATCH}, {results['rounds']} interleaved rounds "
             f"of {steps} steps each; images/s median (min-max).", ""]
    for name, rows in results["configs"].items():
        base = median_spread(rows["diffusers loop"]["seconds"])[0]
        lines += [f"**{name}**", "", "| contender | params | images/s | vs diffusers loop | GFLOP/step | "
                  "GFLOP/s | % fp32 peak | % bf16 peak |", "|---|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            med, lo, hi = median_spread(r["seconds"])
            rate = steps * BATCH / med
            achieved = r["flops"] * steps / med
            lines.append(f"| {k} | {r['params'] / 1e6:.2f}M | {rate:.1f} ({steps * BATCH / hi:.1f}-"
                         f"{steps * BATCH / lo:.1f}) | {base / med:.2f}x | {r['flops'] / 1e9:.2f} | "
                         f"{achieved / 1e9:.1f} | {100 * achieved / peaks['fp32']:.0f}% | "
                         f"{100 * achieved / peaks['bf16']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE]",
                   help="extra genkit contender with recipe overrides, e.g. 'bf16=train.precision=bf16'")
    a = p.parse_args()
    variants = {"genkit": ()}
    for v in a.variant:
        name, _, ov = v.partition("=")
        variants[f"genkit {name}"] = tuple(ov.split(","))
    print(markdown(run(tuple(a.configs), a.rounds, a.steps, variants)))
