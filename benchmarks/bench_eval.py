"""Feature extraction + statistics throughput: genkit's engine vs torchmetrics' FID, same extractor.

Run: `python -m benchmarks.bench_eval [--n 256] [--threads 2]`. Both tools get the same
network instance and the same uint8 images (the CIFAR-sized 32x32 case): torchmetrics'
`FrechetInceptionDistance(feature=module)` calls `update` per batch and `compute` once;
genkit streams the same batches through `GaussianStats` and `frechet_distance`. Rows report
images/s of the whole pipeline (both sides' statistics + FD), the ratio, and the two FD
values. The network is torch-fidelity's InceptionV3 (the `tf` protocol's network) with random
weights: speed does not depend on the weights, and no download is needed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from genkit.eval.frechet import GaussianStats, frechet_distance


class Pool3(nn.Module):
    """torch-fidelity's InceptionV3 pool3 features (2048) as a plain module for both tools."""

    def __init__(self, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights))
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


def random_inception(folder: Path) -> Path:
    """A file of random weights for torch-fidelity's InceptionV3 (throughput needs no real ones)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = folder / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def genkit_fid(net: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch: int) -> float:
    stats = []
    for x in (real, fake):
        acc = GaussianStats(net.num_features)
        for i in range(0, len(x), batch):
            acc.update(net(x[i:i + batch]))
        stats.append(acc.mean_cov())
    return frechet_distance(*stats[0], *stats[1])


@torch.inference_mode()
def torchmetrics_fid(net: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch: int) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=net)
    for x, is_real in ((real, True), (fake, False)):
        for i in range(0, len(x), batch):
            fid.update(x[i:i + batch], real=is_real)
    return float(fid.compute())


def run(n: int = 256, batch: int = 64, threads: int = 2) -> list[dict]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        net = Pool3(random_inception(Path(tmp))).eval()
    real, fake = images(n, 0), images(n, 1)
    rows = []
    for name, fn in (("torchmetrics", torchmetrics_fid), ("genkit", genkit_fid)):
        fn(net, real[:batch], fake[:batch], batch)  # warm-up
        t0 = time.perf_counter()
        value = fn(net, real, fake, batch)
        seconds = time.perf_counter() - t0
        rows.append({"tool": name, "images": 2 * n, "seconds": seconds, "images_per_s": 2 * n / seconds,
                     "fd": value})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_vs_torchmetrics"] = row["images_per_s"] / base
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| tool | images | seconds | images/s | vs torchmetrics | FD (random net) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tool']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['ratio_vs_torchmetrics']:.2f}x | {r['fd']:.6g} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    print(markdown(run(a.n, a.batch, a.threads)))
