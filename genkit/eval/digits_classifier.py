"""A small CNN on scikit-learn's digits: FD, IS and class accuracy on the embedded default, offline.

The network sees uint8 images of any size, resized (antialiased bilinear) to 16x16 and scaled
to [-1, 1], the resolution genkit trains digits at by default. Its 64-d penultimate layer
(before the ReLU, so no unit is constantly zero) is the feature space of `--features digits`;
its 10-way head gives the logits for IS and conditional accuracy.

Trained deterministically (fixed seed, one CPU thread, deterministic algorithms) on the fixed
train split (images 0..1499) with light random affine augmentation (rotation up to 8 degrees,
zoom up to 8 %, shifts up to 1.5 px), so that it tolerates generated digits, and scored on the
held-out split (images 1500..1796). Reproduce the shipped weights with

    python -m genkit.eval.digits_classifier --out genkit/assets
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from genkit.config import DataConfig
from genkit.data import build_dataset
from genkit.errors import GenkitError
from genkit.io import atomic_write, to_uint8, write_json

SIZE = 16  # input resolution of the network
ARCH = {"channels": [32, 64], "features": 64, "classes": 10, "input": SIZE}
METADATA_KEY = "genkit_digits_classifier"  # the safetensors metadata entry: JSON architecture, seed, epochs
EPOCHS = 40
ROTATE, SCALE, SHIFT = 8.0, 0.08, 1.5  # augmentation: up to 8 degrees, 8 % zoom, 1.5 px (at 16 px)


def preprocess(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> float (B, 1, 16, 16) in [-1, 1]; RGB averaged to grey."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise GenkitError(f"digits classifier expects uint8 (B, 1|3, H, W), got {images.dtype} "
                          f"{tuple(images.shape)}")
    x = images.float().mean(1, keepdim=True) / 255  # (B, 1, H, W) in [0, 1]
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + ReLU, then 2x2 max pooling (halves the resolution)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


class DigitsClassifier(nn.Module):
    """conv(32)x2 -> pool -> conv(64)x2 -> pool -> linear 64 (features) -> ReLU -> linear 10 (logits)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), dim: int = 64, classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(_block(1, c1), _block(c1, c2), nn.Flatten())  # (B, c2 * 4 * 4)
        self.embed = nn.Linear(c2 * (SIZE // 4) ** 2, dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(dim, classes)
        self.dim = dim

    def embed_pre(self, x: Tensor) -> Tensor:
        """Preprocessed images (B, 1, 16, 16) -> pre-activation penultimate features (B, dim)."""
        return self.embed(self.body(x))

    def classify(self, x: Tensor) -> Tensor:
        """Preprocessed images (B, 1, 16, 16) -> logits (B, classes)."""
        return self.head(self.dropout(F.relu(self.embed_pre(x))))

    def features(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) -> penultimate features (B, dim) float32."""
        return self.embed_pre(preprocess(images))

    def logits(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) -> class logits (B, 10) float32."""
        return self.classify(preprocess(images))

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) -> penultimate features (B, dim): the same as `features`."""
        return self.features(images)


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """The digits split at 16 px as uint8 images (N, 1, 16, 16) and int64 labels (N,)."""
    data = build_dataset(DataConfig(source="digits", image_size=SIZE), split)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = torch.stack([data[i]["label"] for i in range(len(data))])
    return to_uint8(images), labels


def random_affine(images: Tensor, generator: torch.Generator) -> Tensor:
    """Rotate, scale and shift each uint8 image (B, C, H, W) at random (bilinear, black fill)."""
    b, _, _, w = images.shape
    u = torch.rand(b, 4, generator=generator) * 2 - 1  # (B, 4) uniform in [-1, 1]
    angle, scale = u[:, 0] * math.radians(ROTATE), 1 + u[:, 1] * SCALE
    shift = u[:, 2:] * SHIFT * 2 / w  # pixels -> affine_grid's [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    x = images.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of uint8 images whose argmax logit equals the label (model in eval mode)."""
    model.eval()
    hits = sum(int((model.logits(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return hits / len(images)


@contextlib.contextmanager
def deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread, deterministic algorithms, seeded global RNG (for weight init); all restored after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(strict)


def _epoch(model: DigitsClassifier, opt: torch.optim.Optimizer, sched: Any, images: Tensor, labels: Tensor,
           generator: torch.Generator, batch_size: int) -> float:
    """One pass over shuffled, randomly jittered training images; returns the mean loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    for i in range(0, len(images), batch_size):
        idx = order[i:i + batch_size]
        x = preprocess(random_affine(images[idx], generator))
        loss = F.cross_entropy(model.classify(x), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total / len(images)


def train(seed: int = 0, epochs: int = EPOCHS, batch_size: int = 64, lr: float = 2e-3,
          log: bool = False) -> DigitsClassifier:
    """Train the classifier on the digits train split: AdamW, one-cycle cosine LR, random affine jitter."""
    images, labels = digits_split("train")
    with deterministic_cpu(seed):
        model = DigitsClassifier(tuple(ARCH["channels"]), ARCH["features"], ARCH["classes"])
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(len(images) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for epoch in range(epochs):
            loss = _epoch(model, opt, sched, images, labels, generator, batch_size)
            if log:
                print(f"epoch {epoch + 1}/{epochs} loss {loss:.4f}", flush=True)
    return model.eval()


def serialize(model: DigitsClassifier, seed: int, epochs: int) -> bytes:
    """The model's safetensors bytes, reproducible: tensors sorted by safetensors, ONE metadata key.

    safetensors writes its metadata map in Rust HashMap order, which changes from run to run;
    with a single key the header, and so the file's SHA-256, depends on the weights only.
    """
    meta = {METADATA_KEY: json.dumps({"architecture": ARCH, "seed": seed, "epochs": epochs}, sort_keys=True)}
    return safetensors_bytes({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def train_digits_classifier(out: Path, seed: int = 0, epochs: int = EPOCHS, log: bool = False) -> dict[str, Any]:
    """Train, write `out/digits_classifier-<sha8>.safetensors` and `out/digits_classifier.json`; return the record."""
    model = train(seed, epochs, log=log)
    test_images, test_labels = digits_split("test")
    data = serialize(model, seed, epochs)
    sha = hashlib.sha256(data).hexdigest()
    name = f"digits_classifier-{sha[:8]}.safetensors"
    (atomic_write(Path(out) / name, lambda p: p.write_bytes(data))).chmod(0o644)  # package data: world-readable
    record = {"file": name, "sha256": sha, "bytes": len(data),
              "test_accuracy": accuracy(model, test_images, test_labels), "test_images": len(test_images),
              "architecture": ARCH, "augmentation": {"rotate_deg": ROTATE, "scale": SCALE, "shift_px": SHIFT},
              "seed": seed, "epochs": epochs, "trained_on": "CPU, 1 thread, deterministic algorithms",
              "torch_version": torch.__version__, "command": command(out, seed, epochs)}
    write_json(Path(out) / "digits_classifier.json", record).chmod(0o644)
    return record


def command(out: Path, seed: int, epochs: int) -> str:
    """The command line that reproduces a training run."""
    flags = (f" --seed {seed}" if seed else "") + (f" --epochs {epochs}" if epochs != EPOCHS else "")
    return f"python -m genkit.eval.digits_classifier --out {out}{flags}"


def main(argv: list[str] | None = None) -> None:
    """Train the digits classifier and write its weights (`python -m genkit.eval.digits_classifier`)."""
    parser = argparse.ArgumentParser(description="Train genkit's digits classifier (features for FD on digits).")
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and digits_classifier.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    record = train_digits_classifier(args.out, args.seed, args.epochs, log=True)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
