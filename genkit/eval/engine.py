"""The evaluation engine: SPECs -> features -> FD, KID, IS, PRDC, with the protocol recorded.

Every result is a JSON-able dict holding the value(s) and everything needed to reproduce
them: feature extractor, protocol, weights SHA-256, resize method, image counts, sampler
settings for generated images, seed and genkit version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from genkit.errors import GenkitError
from genkit.eval.cmmd import cmmd_values
from genkit.eval.features import FD_DINOV2_PROTOCOL, FeatureExtractor, build_features
from genkit.eval.frechet import GaussianStats, frechet_distance
from genkit.eval.likelihood import family_bits_per_dim
from genkit.eval.metrics import inception_score, kid, kid_subset_size, prdc
from genkit.eval.specs import SampleSettings, check_exists, describe, iter_images, subset_record
from genkit.eval.stats import RefStats, check_same_protocol, is_stats_file, load_stats, save_stats
from genkit.families.base import Family, Likelihood
from genkit.families.sampling import sample
from genkit.io import to_uint8
from genkit.progress import Progress
from genkit.rng import seeded
from genkit.runs import load, resolve_device, run_recipe
from genkit.samplers.likelihood import HUTCHINSON_PROBES
from genkit.version import __version__


@dataclass
class EvalSettings:
    """What a metric is computed with (the CLI's options)."""

    features: str | None = "inception"  # None: the command's default (fid of two statistics files: theirs)
    protocol: str | None = None
    weights: str | None = None
    n: int | None = None            # images per side (None: all real images; required for runs)
    batch_size: int = 100
    device: str | None = None
    seed: int = 0
    sample: SampleSettings = field(default_factory=SampleSettings)
    progress: bool = False          # report images done, images/s and ETA (genkit.progress) while featurising
    kid_subset_size: int | None = None  # None: 1000, or n // 2 when a set holds <= 1000 (metrics.kid_subset_size)
    kid_subsets: int = 100


def default_features(run: str | Path) -> str:
    """The features a run is evaluated with by default: `digits` (shipped weights) for runs trained on the
    digits, `inception` (local Inception weights) otherwise."""
    return "digits" if run_recipe(run).data.source == "digits" else "inception"


def build_extractor(s: EvalSettings) -> FeatureExtractor:
    """The feature extractor the settings name (None: inception), on their device (CUDA when available)."""
    return build_features(s.features or "inception", protocol=s.protocol, weights=s.weights,
                          device=resolve_device(s.device))


@torch.inference_mode()
def _features(spec: str, extractor: FeatureExtractor, s: EvalSettings, logits: bool = False) -> Iterator[Tensor]:
    device = next(extractor.parameters()).device
    sample = SampleSettings(**{**asdict(s.sample), "seed": s.seed, "device": s.sample.device or str(device)})
    every = None if s.n else 10 * s.batch_size  # without a count: a line every 10 batches
    with Progress(s.n, f"features {spec}", "image", every=every, disable=not s.progress) as bar:
        for batch in iter_images(spec, s.n, s.batch_size, sample, seed=s.seed):
            x = batch.to(device)
            feats = (extractor.logits(x) if logits else extractor(x)).double().cpu()
            bar.update(len(batch))
            yield feats


def all_features(spec: str, extractor: FeatureExtractor, s: EvalSettings, logits: bool = False) -> Tensor:
    """Every feature (or logit) vector of a SPEC's images, float64 on the CPU: (N, dim)."""
    feats = list(_features(spec, extractor, s, logits))
    if not feats:
        raise GenkitError(f"no images in '{spec}'")
    return torch.cat(feats)


def reference_stats(spec: str, extractor: FeatureExtractor, s: EvalSettings) -> RefStats:
    """Gaussian statistics of a SPEC: read from a statistics file, or computed from its images."""
    if is_stats_file(spec):
        stats = load_stats(spec)
        check_same_protocol(stats.protocol, extractor.protocol_dict(), f"'{spec}' and --features {extractor.name}")
        return stats
    acc = None
    for feats in _features(spec, extractor, s):
        acc = acc or GaussianStats(feats.shape[1])
        acc.update(feats)
    if acc is None:
        raise GenkitError(f"no images in '{spec}'")
    mu, sigma = acc.mean_cov()
    return RefStats(mu, sigma, acc.count, extractor.protocol_dict(), source=spec)


@torch.inference_mode()
def generated_stats(family: Family, extractor: FeatureExtractor, n: int, batch_size: int, seed: int = 0, *,
                    rank: int = 0, world: int = 1, progress: bool = False,
                    **sampling: Any) -> tuple[GaussianStats, int, float]:
    """Feature statistics of n generated images (quantized to uint8), with the sampler's NFE and time.

    Batch k is generated from its own generator, seeded by (seed, k), so the n images are the
    same however they are split: process `rank` of `world` takes batches rank, rank + world, ...
    and the per-process statistics sum (`GaussianStats.all_reduce`) to the single-process ones.
    `sampling` goes to `genkit.families.sampling.sample` (sampler, steps, schedule, sampler options).
    `progress` reports this process's images (generated and featurised), images/s and the ETA.
    """
    acc, nfe, seconds = GaussianStats(extractor.dim), 0, 0.0
    device = next(extractor.parameters()).device
    batches = [(k, min(batch_size, n - start)) for k, start in enumerate(range(0, n, batch_size)) if k % world == rank]
    with Progress(sum(b for _, b in batches), "generate + features", "image", disable=not progress) as bar:
        for k, b in batches:
            out = sample(family, b, generator=seeded(seed, k), **sampling)
            nfe, seconds = out.nfe, seconds + out.seconds
            acc.update(extractor(to_uint8(out.images).to(device)).double().cpu())
            bar.update(b)
    return acc, nfe, seconds


def subsets(s: EvalSettings, **specs: str | None) -> dict[str, dict[str, int]]:
    """The subsets --n drew, by side (`real=SPEC, fake=SPEC`): {"real": {"n", "of", "seed"}}; a side that used
    every image, was generated (a run folder) or is a statistics file is absent."""
    return {side: info for side, spec in specs.items()
            if spec is not None and (info := subset_record(spec, s.n, s.seed)) is not None}


def _record(metric: str, s: EvalSettings, protocol: dict[str, Any], real: str | None, fake: str, **values) -> dict:
    record = {"metric": metric, **values, "protocol": protocol, "subset": subsets(s, real=real, fake=fake),
              "real": real, "fake": fake, "seed": s.seed, "genkit_version": __version__}
    if describe(fake) == "run":
        record["sampling"] = {"sampler": s.sample.sampler, "steps": s.sample.steps, **(s.sample.options or {})}
    return record


def compute_fid(real: str, fake: str, s: EvalSettings, extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """Frechet distance between the feature Gaussians of two SPECs (FID with inception).

    Two statistics files and no extractor named (`s.features`, `s.protocol` and `s.weights` None, as the CLI
    leaves them): the protocol is theirs (they must agree) and no extractor is built, so nothing needs weights.
    """
    for spec in (real, fake):
        check_exists(spec)
    named = (s.features, s.protocol, s.weights) != (None, None, None)  # an extractor asked for: checked as ever
    if extractor is None and not named and is_stats_file(real) and is_stats_file(fake):
        a, b = load_stats(real), load_stats(fake)
    else:
        extractor = extractor or build_extractor(s)
        a, b = reference_stats(real, extractor, s), reference_stats(fake, extractor, s)
    check_same_protocol(a.protocol, b.protocol, f"'{real}' and '{fake}'")
    protocol = extractor.protocol_dict() if extractor is not None else a.protocol
    value = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    name = "fid" if protocol["features"] == "inception" else f"fd_{protocol['features']}"
    return _record("fid", s, protocol, real, fake, **{name: value, "value": value, "n_real": a.n, "n_fake": b.n})


def compute_fd_dinov2(real: str, fake: str, s: EvalSettings,
                      extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """FD-DINOv2 (Stein et al. 2023): the Frechet distance on DINOv2 features, ViT-L/14 by default (dgm-eval's
    protocol, `genkit.eval.features.FD_DINOV2_PROTOCOL`); the result is `fd_dinov2`."""
    if s.features not in (None, "dinov2"):
        raise GenkitError(f"FD-DINOv2 is the Frechet distance on DINOv2 features: leave out --features or give "
                          f"--features dinov2 (got --features {s.features})")
    if extractor is None and (s.features, s.protocol, s.weights) == (None, None, None) and \
            is_stats_file(real) and is_stats_file(fake):  # two statistics files: their protocol, no weights
        result = compute_fid(real, fake, s)
        if result["protocol"].get("features") != "dinov2":
            raise GenkitError(f"'{real}' and '{fake}' hold {result['protocol'].get('features')} statistics, "
                              f"FD-DINOv2 needs DINOv2 ones (genkit eval stats --features dinov2)")
    else:
        s = replace(s, features="dinov2", protocol=s.protocol or FD_DINOV2_PROTOCOL)
        result = compute_fid(real, fake, s, extractor)
    return {**result, "metric": "fd-dinov2"}


def _raw_pair(real: str, fake: str, s: EvalSettings, extractor: FeatureExtractor) -> tuple[Tensor, Tensor]:
    for spec in (real, fake):
        if is_stats_file(spec):
            raise GenkitError(f"'{spec}' holds only statistics; this metric needs images")
    return all_features(real, extractor, s), all_features(fake, extractor, s)


def compute_is(fake: str, s: EvalSettings, extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """Inception Score of a SPEC's images (classifier logits; `digits` uses its own classes)."""
    check_exists(fake)
    extractor = extractor or build_extractor(s)
    if not extractor.has_logits:
        extractor.logits(torch.zeros(0))  # its one-line error: no classifier head
    logits = all_features(fake, extractor, s, logits=True)
    mean, std = inception_score(logits, splits=IS_SPLITS, shuffle_seed=s.seed)
    return _record("is", s, extractor.protocol_dict(), None, fake, inception_score=mean, inception_score_std=std,
                   value=mean, n_fake=len(logits), splits=IS_SPLITS, shuffle_seed=s.seed)


IS_SPLITS = 10  # torch-fidelity's isc_splits, over rows shuffled by the seed as torch-fidelity shuffles them


def kid_values(real: Tensor, fake: Tensor, s: EvalSettings) -> dict[str, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased polynomial-kernel MMD^2 over subsets drawn
    as torch-fidelity draws them (its rng_seed = the seed), with the subset size and count used."""
    size = kid_subset_size(len(real), len(fake), s.kid_subset_size)
    mean, std = kid(real, fake, subsets=s.kid_subsets, subset_size=size, seed=s.seed)
    return {"kid": mean, "kid_std": std, "value": mean, "kid_subset_size": size, "kid_subsets": s.kid_subsets}


def prdc_values(real: Tensor, fake: Tensor, s: EvalSettings) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020), k = 5 nearest neighbours."""
    return {**prdc(real, fake, k=5), "k": 5}


# Metrics of two feature sets, `genkit eval NAME --real SPEC --fake SPEC`: name -> fn(real (N, d), fake (M, d)
# float64 features, settings) -> the values of the result. FID (`compute_fid`) works on Gaussian statistics, so
# statistics files serve too, and IS (`compute_is`) on one set's logits; W1 (`genkit.eval.w1`) fits a critic.
FEATURE_METRICS: dict[str, Callable[[Tensor, Tensor, EvalSettings], dict[str, float]]] = {
    "kid": kid_values,
    "prdc": prdc_values,
    "cmmd": cmmd_values,
}


def compute_metric(name: str, real: str, fake: str, s: EvalSettings,
                   extractor: FeatureExtractor | None = None) -> dict[str, Any]:
    """A metric of FEATURE_METRICS between the features of two SPECs, with the protocol recorded."""
    if name not in FEATURE_METRICS:
        raise GenkitError(f"unknown metric '{name}'; feature metrics: {', '.join(FEATURE_METRICS)}")
    for spec in (real, fake):
        check_exists(spec)
    extractor = extractor or build_extractor(s)
    fr, ff = _raw_pair(real, fake, s, extractor)
    return _record(name, s, extractor.protocol_dict(), real, fake, **FEATURE_METRICS[name](fr, ff, s), n_real=len(fr),
                   n_fake=len(ff))


def write_stats(spec: str, out: str | Path, s: EvalSettings) -> dict[str, Any]:
    """Compute a SPEC's reference statistics and save them (with their protocol) to `out`."""
    check_exists(spec)
    extractor = build_extractor(s)
    stats = reference_stats(spec, extractor, s)
    path = save_stats(out, stats)
    return {"stats": str(path), "n": stats.n, "protocol": stats.protocol, "source": spec,
            "genkit_version": __version__}


def compute_bpd(run: str | Path, data: str | None, s: EvalSettings, *, divergence: str = "hutchinson",
                probes: int = HUTCHINSON_PROBES, rtol: float = 1e-5, atol: float = 1e-5) -> dict[str, Any]:
    """Bits/dim of held-out data under a run's model (ODE likelihood; flows: their exact log_prob), with the
    standard error of the mean over images (`bits_per_dim_se`).

    Both go through `family_bits_per_dim`: one dequantization and one bits/dim formula. Denoising families
    integrate the unclipped probability-flow ODE; the divergence is Hutchinson's with `probes` Rademacher
    probes per image (default 4), or exact on request (`divergence="exact"`: D vector-Jacobian products per
    evaluation instead of `probes`). Measured: 16 digits at 16 px in 105 s with 4 probes (674 NFE, the
    1.1M-parameter ddpm_digits UNet, 2 CPU cores), standard error 0.02 bits/dim.
    """
    if divergence not in ("hutchinson", "exact"):
        raise GenkitError(f"--divergence must be hutchinson or exact, got {divergence!r}")
    run = Path(run)
    data = data or f"recipe:{run / 'config.yaml'}:test"
    family = load(run, device=s.device)
    images = torch.cat(list(iter_images(data, s.n, s.batch_size, seed=s.seed)))
    generator = torch.Generator().manual_seed(s.seed)
    if isinstance(family, Likelihood):  # a flow: exact log-likelihood, no solver
        out = family_bits_per_dim(family, images, batch_size=s.batch_size, generator=generator, progress=s.progress)
        solver = {}
    else:
        out = family_bits_per_dim(family, images, batch_size=s.batch_size, generator=generator, progress=s.progress,
                                  exact_divergence=divergence == "exact", hutchinson_samples=probes, rtol=rtol,
                                  atol=atol)
        solver = {"rtol": rtol, "atol": atol}
    return {"metric": "bpd", **out, "value": out["bits_per_dim"], "data": data, "run": str(run), **solver,
            "subset": subsets(s, data=data), "dequantization": "uniform", "seed": s.seed,
            "genkit_version": __version__}
