"""Quality per compute: FD on digits after the same training wall-clock budget, genkit vs peers.

Run: `python -m benchmarks quality` (or `python -m benchmarks.bench_quality --budget 120 --n 1000`).

Five contenders train on the digits at 16x16, batch 64, lr 1e-3, EMA decay 0.995, gradient
clipping at 1.0, one thread, each for `budget` seconds of its own training time; training
chunks of 5 steps are interleaved round-robin so load from other jobs falls on all alike.
- genkit DDPM: recipe `ddpm_digits` through genkit's Trainer (as `bench_train`), with
  `train.lr_schedule=constant` (warmup 100) since the number of steps a budget buys is unknown.
- denoising-diffusion-pytorch: its Trainer + GaussianDiffusion (cosine, eps), Unet dim 28
  (1.10M parameters vs genkit's 1.11M), its EMA (update every 10 steps).
- genkit rectified flow: recipe `rf_digits`, constant LR after warmup.
- rectified-flow-pytorch: its Trainer + RectifiedFlow (flow prediction, MSE), its Unet dim 30
  (1.15M parameters), images from an in-memory dataset.
- torchcfm: `ConditionalFlowMatcher(sigma=0)` with its UNetModelWrapper (1.11M parameters),
  the loop of its CIFAR-10 example (Adam, clipping, EMA each step) on in-memory batches.
Then `n` samples per contender at 50 network evaluations: DDIM 50 steps for both DDPMs, genkit's
`ddim` (Euler) 50 steps for its rectified flow, midpoint 25 steps for rectified-flow-pytorch
(its odeint sampler), Euler 50 steps through torchdyn's NeuralODE for torchcfm (as its
examples), all from EMA weights. FD uses the shipped `digits` features against
the 1500 training images. genkit DDPM is also sampled with `precision="bf16"` to show FD parity.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_train import BATCH, DDPTrainer, GenkitSteps
from benchmarks.common import ShuffledBatches, single_thread, train_for, write_png_folder

SIZE, CHUNK, STEPS = 16, 5, 50
RF_UNET = dict(dim=30, dim_mults=(1, 2, 2))  # 1.15M parameters


class _UnitImages(torch.utils.data.Dataset):
    """Images in [0, 1] from a [-1, 1] tensor (rectified-flow-pytorch normalizes them itself)."""

    def __init__(self, images: torch.Tensor):
        self.images = (images + 1) / 2

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class RFPTrainer:
    """rectified-flow-pytorch's Trainer; `__call__(k)` trains k more steps."""

    def __init__(self, data: torch.Tensor, root: Path):
        from rectified_flow_pytorch import RectifiedFlow, Trainer, Unet

        torch.manual_seed(0)
        unet = Unet(channels=1, **RF_UNET)
        self.params = sum(p.numel() for p in unet.parameters())
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer = Trainer(RectifiedFlow(unet), dataset=_UnitImages(data), num_train_steps=CHUNK,
                                   learning_rate=1e-3, batch_size=BATCH, ema_kwargs=dict(beta=0.995),
                                   max_grad_norm=1.0, save_results_every=10 ** 9, checkpoint_every=10 ** 9,
                                   checkpoints_folder=str(root / "rfp-ckpt"), results_folder=str(root / "rfp"))

    def __call__(self, k: int) -> None:
        self.trainer.num_train_steps = k
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer()

    @torch.no_grad()
    def images(self, n: int) -> torch.Tensor:
        out = [self.trainer.ema_model.sample(batch_size=min(250, n - i), data_shape=(1, SIZE, SIZE),
                                             steps=STEPS // 2 + 1) for i in range(0, n, 250)]
        return torch.cat(out).clamp(0, 1) * 2 - 1


TCFM_UNET = dict(num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions="4",
                 num_head_channels=32)  # 1.11M parameters, attention at 4x4 as genkit's UNet


class TorchCFMTrainer:
    """torchcfm's own training recipe (its examples/images/cifar10/train_cifar10.py), written out:
    `ConditionalFlowMatcher(sigma=0)` (the rectified-flow path), its UNetModelWrapper, Adam,
    gradient clipping, EMA after every step; torchcfm ships the loss and the nets, not a trainer.
    `__call__(k)` trains k more steps on shuffled in-memory batches."""

    def __init__(self, data: torch.Tensor):
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
        from torchcfm.models.unet.unet import UNetModelWrapper

        torch.manual_seed(0)
        self.batch = ShuffledBatches(data, BATCH)
        self.net = UNetModelWrapper(dim=(1, SIZE, SIZE), **TCFM_UNET)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.params = sum(p.numel() for p in self.net.parameters())
        self.fm = ConditionalFlowMatcher(sigma=0.0)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def __call__(self, k: int) -> None:
        for _ in range(k):
            x1 = self.batch()
            t, xt, ut = self.fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
            loss = torch.mean((self.net(t, xt) - ut) ** 2)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():  # its examples' ema(): target = decay * target + (1 - decay) * source
                for e, p in zip(self.ema.parameters(), self.net.parameters()):
                    e.mul_(0.995).add_(p, alpha=1 - 0.995)

    @torch.no_grad()
    def images(self, n: int) -> torch.Tensor:
        """Euler, 50 steps from t = 0 (noise) to 1 (data), through torchdyn's NeuralODE as its examples."""
        from torchdyn.core import NeuralODE

        node = NeuralODE(self.ema, solver="euler")
        torch.manual_seed(0)
        out = [node.trajectory(torch.randn(min(250, n - i), 1, SIZE, SIZE), t_span=torch.linspace(0, 1, STEPS + 1))[-1]
               for i in range(0, n, 250)]
        return torch.cat(out).clamp(-1, 1)


def _genkit_images(g: GenkitSteps, n: int, precision: str = "no") -> torch.Tensor:
    from genkit.families.sampling import sample

    with g.trainer._eval_weights():
        return sample(g.trainer.family, n, sampler="ddim", steps=STEPS, batch_size=250, precision=precision,
                      generator=torch.Generator().manual_seed(0)).images


def _ddp_images(d: DDPTrainer, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):  # its per-step progress bar
        chunks = [d.trainer.ema.ema_model.sample(batch_size=min(250, n - i)) for i in range(0, n, 250)]
    return torch.cat(chunks) * 2 - 1


@functools.lru_cache(maxsize=1)
def _digits_reference() -> tuple[Any, Any]:
    from genkit.eval.engine import EvalSettings, build_extractor, reference_stats

    s = EvalSettings(features="digits", batch_size=250)
    extractor = build_extractor(s)
    return extractor, reference_stats("recipe:ddpm_digits", extractor, s)


def fd_against_digits(images: torch.Tensor) -> float:
    """FD of images in [-1, 1] vs the digits training set, shipped `digits` features."""
    from genkit.eval.frechet import GaussianStats, frechet_distance
    from genkit.io import to_uint8

    extractor, ref = _digits_reference()
    acc = GaussianStats(extractor.dim)
    with torch.inference_mode():
        for chunk in images.split(250):
            acc.update(extractor(to_uint8(chunk)).double().cpu())
    mu, sigma = acc.mean_cov()
    return frechet_distance(ref.mu, ref.sigma, mu, sigma)


def run(budget: float = 120.0, n: int = 1000) -> dict:
    """Train every contender for `budget` seconds, sample n images each, FD vs digits."""
    single_thread()
    with tempfile.TemporaryDirectory(prefix="genkit-quality-") as tmp:
        root = Path(tmp)
        const = ("train.lr_schedule=constant",)
        g_ddpm = GenkitSteps(SIZE, root / "ddpm", const)
        data = g_ddpm.trainer.dataset.images
        cs = {"genkit DDPM": g_ddpm,
              "denoising-diffusion-pytorch": DDPTrainer(SIZE, write_png_folder(data, root / "png"), root, STEPS),
              "genkit rectified flow": GenkitSteps(SIZE, root / "rf", const, recipe="rf_digits"),
              "rectified-flow-pytorch": RFPTrainer(data, root),
              "torchcfm": TorchCFMTrainer(data)}
        rows = train_for(cs, budget, CHUNK)
        samplers = {"genkit DDPM": lambda: _genkit_images(g_ddpm, n),
                    "genkit DDPM, bf16 sampling": lambda: _genkit_images(g_ddpm, n, "bf16"),
                    "denoising-diffusion-pytorch": lambda: _ddp_images(cs["denoising-diffusion-pytorch"], n),
                    "genkit rectified flow": lambda: _genkit_images(cs["genkit rectified flow"], n),
                    "rectified-flow-pytorch": lambda: cs["rectified-flow-pytorch"].images(n),
                    "torchcfm": lambda: cs["torchcfm"].images(n)}
        for k, fn in samplers.items():
            t0 = time.perf_counter()
            images = fn()
            row = rows.setdefault(k, dict(rows["genkit DDPM"]))  # bf16 sampling: the same trained model
            row["sample_seconds"] = time.perf_counter() - t0
            row["fd"] = fd_against_digits(images)
    return {"rows": rows, "budget": budget, "n": n}


def markdown(results: dict) -> str:
    """Table: training steps in the budget, FD, sampling seconds."""
    lines = [f"Training budget {results['budget']:.0f} s of each contender's own time (interleaved chunks of "
             f"{CHUNK} steps, one thread), batch {BATCH}; FD of {results['n']} EMA samples at 50 NFE vs the 1500 "
             "digits training images (shipped `digits` features; lower is better).", "",
             "| contender | params | steps in budget | images/s | FD | sampling s |", "|---|---|---|---|---|---|"]
    for k, r in results["rows"].items():
        lines.append(f"| {k} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['steps'] * BATCH / r['seconds']:.0f} | "
                     f"{r['fd']:.3g} | {r['sample_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per contender")
    p.add_argument("--n", type=int, default=1000, help="samples per FD")
    a = p.parse_args()
    print(markdown(run(a.budget, a.n)))
