"""Time genkit's eigh-based `frechet_distance` against pytorch-fid's scipy.linalg.sqrtm version.

Run: `python -m benchmarks.bench_frechet [--threads 1]`. Both see the same (mu, Sigma) from features (4096, d);
rows report median seconds over the repeats, the speed-up and |FD_genkit - FD_pytorch_fid|.
A CUDA row is added when a GPU is present (float64 on the GPU, synchronised). Both libraries
get the same CPU thread count (torch and, through threadpoolctl, numpy/scipy's BLAS).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from threadpoolctl import threadpool_limits

from genkit.eval.frechet import frechet_distance

N_FEATURES = 4096


def random_stats(d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mu1, Sigma1, mu2, Sigma2) of two feature sets (4096, d) with non-commuting covariances."""
    g = np.random.default_rng(seed)
    x = np.abs(g.standard_normal((N_FEATURES, d)))  # non-negative like pooled Inception features
    mix = np.eye(d) + 0.5 * g.standard_normal((d, d)) / math.sqrt(d)
    y = np.abs(g.standard_normal((N_FEATURES, d)) @ mix) + 0.05
    return x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)


def median_seconds(fn: Callable[[], float], repeats: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Median wall time of fn() over repeats, and its last value."""
    times, value = [], float("nan")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        value = float(fn())
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def bench_one(d: int, device: str, repeats: int) -> dict:
    """One table row: genkit on `device` vs pytorch-fid (scipy, CPU) on the same statistics."""
    mu1, s1, mu2, s2 = random_stats(d, seed=d)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs = [torch.from_numpy(a).to(device) for a in (mu1, s1, mu2, s2)]
    frechet_distance(*inputs)  # warm-up: CUDA context, cuSOLVER handles
    t_genkit, fd_genkit = median_seconds(lambda: frechet_distance(*inputs), repeats, sync)
    t_scipy, fd_scipy = median_seconds(lambda: calculate_frechet_distance(mu1, s1, mu2, s2), repeats, lambda: None)
    return {
        "d": d, "device": device, "repeats": repeats,
        "genkit_s": t_genkit, "pytorch_fid_s": t_scipy, "speedup": t_scipy / t_genkit,
        "fd_genkit": fd_genkit, "fd_pytorch_fid": fd_scipy, "abs_diff": abs(fd_genkit - fd_scipy),
    }


def run(dims: tuple[int, ...] = (512, 2048), repeats: int = 3, threads: int = 1) -> list[dict]:
    """Benchmark rows for each d on CPU (and CUDA when available), `threads` CPU threads each."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            rows = [bench_one(d, device, repeats) for d in dims for device in devices]
    finally:
        torch.set_num_threads(previous)
    return [dict(row, threads=threads) for row in rows]


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| d | genkit device | genkit eigh (s) | pytorch-fid sqrtm (s) | speed-up | FD | abs diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['device']} | {r['genkit_s']:.3f} | {r['pytorch_fid_s']:.3f} | "
              f"{r['speedup']:.1f}x | {r['fd_pytorch_fid']:.6f} | {r['abs_diff']:.2e} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and BLAS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"N={N_FEATURES} features per set, float64, median of {args.repeats}; "
          f"{args.threads} CPU thread(s) for both; pytorch-fid runs scipy on the CPU")
    print(markdown(run(repeats=args.repeats, threads=args.threads)))
