"""Few-step sampling (issue 20): FD vs NFE of every genkit sampler/grid pair, against the converged ODE
and against k-diffusion's samplers and diffusers' multistep schedulers around the same denoiser.

Run: `python -m benchmarks fewstep` (both parts), or
`python -m benchmarks.bench_fewstep --part proxy|network [--run runs/ddpm_digits[:STEP]] [--n 2000]`.

Two denoisers, each driven by every contender from the same initial noise (one seed):

- proxy: the exact denoiser E[x0 | z] of a 50-component diagonal Gaussian mixture fitted to the
  1500 digits (16x16), put in the DDPM digits family (cosine schedule, its grid, clipping) and in
  the rectified-flow family (grid from sigma = inf). It costs nothing to evaluate, so every
  sampler/grid pair runs at every NFE; the converged ODE is rk45 at rtol = atol = 1e-6.
- network: a trained run (`genkit train ddpm_digits` / `rf_digits`), the contenders that matter.

FD: the shipped `digits` features of the generated images (quantized to uint8) against the 1500
training images. k-diffusion's samplers get D(x; sigma) = D_genkit(x alpha; sigma) in their
variable x = z / alpha; diffusers' schedulers get the epsilon (DDPM) or velocity (flow) the same
denoiser implies and step from the same noise (the exported pipeline's scheduler config).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from genkit.config import DataConfig
from genkit.data import build_dataset
from genkit.errors import SamplerError
from genkit.eval.engine import EvalSettings, build_extractor
from genkit.eval.frechet import GaussianStats, frechet_distance
from genkit.families.base import Denoising, Family
from genkit.families.sampling import sample
from genkit.io import to_uint8
from genkit.samplers.adapters import vp_coefficients

NFES = (3, 5, 8, 10, 15, 20)
GENKIT = ("ddim", "euler", "heun", "euler-arctan", "heun-arctan", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm")
GRIDS = ("family", "karras", "karras:end=sigma_min", "logsnr", "logsnr:end=sigma_min", "time-uniform",
         "time-uniform:end=sigma_min")
# k-diffusion sampler -> NFE of n steps on a grid that ends at zero
KDIFF = {"euler": lambda n: n, "heun": lambda n: 2 * n - 1, "dpm_2": lambda n: 2 * n - 1, "lms": lambda n: n,
         "dpmpp_2m": lambda n: n, "dpmpp_3m": lambda n: n}


def k_diffusion_sampling() -> Any:
    """`k_diffusion.sampling`, also where the package's __init__ cannot import (it pulls CLIP, which needs
    pkg_resources): the module needs only torch, scipy, torchdiffeq, torchsde and the package's utils."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec  # a later importlib.util.find_spec("k_diffusion") raises on a module without one
        sys.modules["k_diffusion"] = package
        return importlib.import_module("k_diffusion.sampling")


# ---------------------------------------------------------------- the proxy denoiser

class MixtureDenoiser:
    """E[x0 | z] for x0 ~ sum_k pi_k N(mu_k, diag v_k) and the VP-scaled z = alpha x0 + s eps (exact)."""

    def __init__(self, images: Tensor, components: int = 50, seed: int = 0):
        from sklearn.mixture import GaussianMixture

        self.shape = images.shape[1:]
        gm = GaussianMixture(components, covariance_type="diag", reg_covar=1e-3, random_state=seed)
        gm.fit(images.flatten(1).double().numpy())
        self.log_pi = torch.tensor(gm.weights_).log()           # (K,)
        self.mu = torch.tensor(gm.means_)                        # (K, D)
        self.var = torch.tensor(gm.covariances_)                 # (K, D)

    def __call__(self, z: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if not bool((sigma == sigma[0]).all()):  # the samplers call with one sigma per batch
            return torch.cat([self(zi[None], si[None]) for zi, si in zip(z, sigma)])
        alpha, s = vp_coefficients(float(sigma[0]))
        x = z.double().flatten(1)                                     # (B, D)
        var = alpha**2 * self.var + s**2                              # (K, D)
        inv = 1 / var
        logp = (self.log_pi - 0.5 * (var.log().sum(1) + (alpha**2 * self.mu**2 * inv).sum(1))
                - 0.5 * (x**2) @ inv.T + x @ (alpha * self.mu * inv).T)    # (B, K)
        w = torch.softmax(logp, dim=1)
        gain = alpha * self.var * inv                                 # (K, D): E[x0|z,k] = mu + gain (x - alpha mu)
        x0 = w @ (self.mu - alpha * gain * self.mu) + (w @ gain) * x
        return x0.view(-1, *self.shape).to(z.dtype)


def proxy_families(images: Tensor) -> dict[str, Family]:
    """The digits DDPM and rectified-flow families (recipe settings) with the mixture's exact denoiser."""
    from genkit.families.ddpm import DDPM, DDPMConfig
    from genkit.families.rectified_flow import RectifiedFlow, RectifiedFlowConfig
    from genkit.nn.unet import UNetConfig

    unet = UNetConfig(channels=[8, 16], attention=[False, False], layers_per_block=1, norm_groups=4)
    denoiser = MixtureDenoiser(images)
    ddpm = DDPM(DDPMConfig(schedule="cosine", clip_sample=True, spacing="trailing", unet=unet), (1, 16, 16))
    rf = RectifiedFlow(RectifiedFlowConfig(unet=unet), (1, 16, 16))
    for family in (ddpm, rf):
        family.denoise = denoiser  # the instance's denoiser: every sampler and peer sees the same one
    return {"ddpm (proxy)": ddpm, "rectified_flow (proxy)": rf}


# ---------------------------------------------------------------- contenders

@dataclass
class Contender:
    group: str    # genkit | k-diffusion | diffusers | reference
    name: str
    grid: str
    run: Callable[[Tensor, int], Tensor | None]  # (noise, NFE) -> images in [-1, 1], None when NFE is impossible


def genkit_contender(family: Family, sampler: str, grid: str) -> Contender:
    def run(noise: Tensor, nfe: int) -> Tensor | None:
        try:
            out = sample(family, len(noise), sampler=sampler, nfe=nfe, schedule=grid, noise=noise,
                         batch_size=500, generator=torch.Generator().manual_seed(1))
        except SamplerError:
            return None  # this NFE is impossible for the sampler (heun: odd/even), or the grid is refused
        assert out.nfe == nfe, (sampler, grid, nfe, out.nfe)
        return out.images
    return Contender("genkit", sampler, grid, run)


def kdiff_contender(family: Denoising, sampler: str, grid: str) -> Contender:
    ks = k_diffusion_sampling()
    fn = {"dpmpp_3m": lambda m, x, s, **k: ks.sample_dpmpp_3m_sde(m, x, s, eta=0.0, **k)}.get(
        sampler, getattr(ks, f"sample_{sampler}", None))
    sigma_min, sigma_max = family.sigma_range()
    sigma_max = min(sigma_max, 80.0)

    def model(x: Tensor, sigma: Tensor, **_: Any) -> Tensor:  # k-diffusion's variable x = z / alpha
        alpha, _s = vp_coefficients(sigma.double().view(-1, *[1] * (x.dim() - 1)))
        # the proxy computes in float64; a trained network runs in its parameters' dtype
        dtype = x.dtype if isinstance(family.denoise, MixtureDenoiser) else next(family.nets.parameters()).dtype
        return family.denoise((x * alpha).to(dtype), sigma.to(dtype)).to(x.dtype)

    def run(noise: Tensor, nfe: int) -> Tensor | None:
        n = next((k for k in range(1, nfe + 1) if KDIFF[sampler](k) == nfe), None)
        if n is None:
            return None
        make = ks.get_sigmas_karras if grid == "karras" else ks.get_sigmas_exponential
        sigmas = make(n, sigma_min, sigma_max).double()
        x = noise.double() * math.sqrt(1 + sigma_max**2)
        with torch.inference_mode():
            return torch.cat([fn(model, xb, sigmas, disable=True) for xb in x.split(500)]).float().clamp(-1, 1)
    return Contender("k-diffusion", sampler, grid, run)


def diffusers_contender(family: Denoising, scheduler: str, options: dict[str, Any], label: str) -> Contender:
    """diffusers' DPMSolverMultistep / UniPCMultistep from the exported pipeline's scheduler config."""
    import diffusers

    from genkit.interop import ddpm_scheduler, flow_match_scheduler

    flow = family.noise_process == "flow"
    base = flow_match_scheduler(family.cfg) if flow else ddpm_scheduler(family.cfg, False)
    extra = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": family.cfg.shift} if flow \
        else {}

    def run(noise: Tensor, nfe: int) -> Tensor | None:
        sched = getattr(diffusers, scheduler).from_config(base.config, **options, **extra)
        sched.set_timesteps(nfe)
        sigmas = sched.sigmas.double()
        outs = []
        with torch.inference_mode():
            for zb in noise.split(500):
                x = zb.clone()
                for i, t in enumerate(sched.timesteps):
                    outs_i = _model_output(family, x, float(sigmas[i]), flow)
                    x = sched.step(outs_i, t, x).prev_sample
                outs.append(x)
                sched.set_timesteps(nfe)
        return torch.cat(outs).float().clamp(-1, 1)
    return Contender("diffusers", label, "its own", run)


def _model_output(family: Denoising, x: Tensor, sigma: float, flow: bool) -> Tensor:
    """What a diffusers scheduler expects from the network at its sample x and its sigma: epsilon for
    DDPM (x = x_t, VP), the velocity eps - x0 for flow matching (x = x_t = (1 - t) x0 + t eps, sigma = t)."""
    if flow:
        t = sigma
        ve = math.inf if t >= 1 else t / (1 - t)
        alpha, s = vp_coefficients(ve)
        x0 = family.denoise(x * (alpha + s), x.new_full((len(x),), ve))
        return (x - x0) / t
    alpha, s = vp_coefficients(sigma)
    x0 = family.denoise(x, x.new_full((len(x),), sigma))
    return (x - alpha * x0) / s


# genkit sampler/grid pairs run on the proxy (the 2-core machine could not run all 9 x 7 at n = 2000; these
# are each sampler's grids that won a 200-sample screen, plus the family grid)
PROXY_PAIRS = [("ddim", "family"), ("heun", "karras"), ("heun-arctan", "family"), ("dpmpp-2m", "karras"),
               ("dpmpp-3m", "logsnr:end=sigma_min"), ("unipc", "family"), ("unipc", "logsnr:end=sigma_min"),
               ("ipndm", "logsnr:end=sigma_min"), ("ipndm", "time-uniform:end=sigma_min")]
# trained networks: every pair below is screened on the first `screen_n` noises at SCREEN_NFES; the best grid
# of each sampler, and the best k-diffusion and diffusers contender, then run at every NFE on all n noises.
# (`euler` in sigma is DDIM on a VP family, Karras et al. Sec. 3, so it is not run twice.)
SCREEN_SAMPLERS = ("ddim", "heun", "dpmpp-2m", "dpmpp-3m", "unipc", "ipndm")
SCREEN_GRIDS = ("family", "karras", "karras:end=sigma_min", "logsnr", "logsnr:end=sigma_min",
                "time-uniform:end=sigma_min")
SCREEN_NFES = (5, 10)
KDIFF_PAIRS = [("dpmpp_2m", "karras"), ("dpmpp_3m", "karras"), ("dpmpp_3m", "exponential"), ("heun", "karras")]


def peers(family: Family) -> list[Contender]:
    out = [kdiff_contender(family, s, g) for s, g in KDIFF_PAIRS]
    out += [diffusers_contender(family, "DPMSolverMultistepScheduler", {}, "DPMSolverMultistep (order 2)"),
            diffusers_contender(family, "UniPCMultistepScheduler", {}, "UniPCMultistep (order 2)"),
            diffusers_contender(family, "UniPCMultistepScheduler", {"solver_order": 3}, "UniPCMultistep (order 3)")]
    if family.noise_process == "vp":  # diffusers' advice for pixel-space models: dynamic thresholding of x0_hat
        clip = {"thresholding": True, "sample_max_value": 1.0}
        out += [diffusers_contender(family, "DPMSolverMultistepScheduler", clip, "DPMSolverMultistep, thresholding"),
                diffusers_contender(family, "UniPCMultistepScheduler", clip, "UniPCMultistep, thresholding")]
    return out


def contenders(family: Family) -> list[Contender]:
    return [genkit_contender(family, s, g) for s, g in PROXY_PAIRS] + peers(family)


# ---------------------------------------------------------------- FD

class Scorer:
    def __init__(self, n: int):
        self.extractor = build_extractor(EvalSettings(features="digits", device="cpu"))
        real = build_dataset(DataConfig(source="digits", image_size=16)).images
        self.mu, self.sigma = self._stats(real)
        self.n = n

    @torch.inference_mode()
    def _stats(self, images: Tensor) -> tuple[Tensor, Tensor]:
        acc = GaussianStats(self.extractor.dim)
        for batch in images.split(500):
            acc.update(self.extractor(to_uint8(batch)).double())
        return acc.mean_cov()

    def fd(self, images: Tensor) -> float:
        mu, sigma = self._stats(images)
        return frechet_distance(self.mu, self.sigma, mu, sigma)


Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, flush=True)


def _row(label: str, c: Contender, nfe: int, fd: float, n: int, stage: str = "final") -> dict[str, Any]:
    return {"family": label, "group": c.group, "name": c.name, "grid": c.grid, "nfe": nfe, "fd": fd, "n": n,
            "stage": stage}


def _run_all(cs: list[Contender], label: str, scorer: Scorer, noise: Tensor, nfes: tuple[int, ...], stage: str,
             log: Log, t0: float) -> list[dict[str, Any]]:
    rows = []
    for c in cs:
        for nfe in nfes:
            try:
                images = c.run(noise, nfe)
            except Exception as e:  # a peer that cannot run this family: say so, keep the others
                log(f"{label}: {c.group} {c.name} failed at NFE {nfe}: {type(e).__name__}: {e}")
                break
            if images is not None:
                rows.append(_row(label, c, nfe, scorer.fd(images), len(noise), stage))
        log(f"{label} [{stage}]: {c.group} {c.name} {c.grid}: "
            + " ".join(f"{r['nfe']}:{r['fd']:.3f}" for r in rows
                       if (r["group"], r["name"], r["grid"]) == (c.group, c.name, c.grid))
            + f" ({time.perf_counter() - t0:.0f} s)")
    return rows


def _screen_score(rows: list[dict[str, Any]], c: Contender) -> float:
    """Mean log FD over the screen NFEs the contender could run (inf when none)."""
    fds = [r["fd"] for r in rows if (r["group"], r["name"], r["grid"]) == (c.group, c.name, c.grid)]
    return sum(math.log(f) for f in fds) / len(fds) if fds else math.inf


def sweep(family: Family, label: str, scorer: Scorer, noise: Tensor, nfes=NFES, log: Log = _log
          ) -> list[dict[str, Any]]:
    """Proxy: every pair in PROXY_PAIRS and every peer at every NFE, against rk45 at 1e-6."""
    t0 = time.perf_counter()
    ref = sample(family, len(noise), sampler="rk45", noise=noise, rtol=1e-6, atol=1e-6, batch_size=500)
    rows = [{"family": label, "group": "reference", "name": "converged ODE: rk45, tol 1e-6", "grid": "-",
             "nfe": ref.nfe, "fd": scorer.fd(ref.images), "n": len(noise), "stage": "final"}]
    log(f"{label}: rk45 NFE {ref.nfe} FD {rows[-1]['fd']:.4g} ({time.perf_counter() - t0:.0f} s)")
    return rows + _run_all(contenders(family), label, scorer, noise, nfes, "final", log, t0)


def network_sweep(family: Family, label: str, scorer: Scorer, noise: Tensor, nfes=NFES, screen_n: int = 500,
                  rtol: float = 1e-4, finalists: int = len(SCREEN_SAMPLERS), log: Log = _log) -> list[dict[str, Any]]:
    """A trained network: the converged ODE (rk45 from sigma = 80 on the log-SNR grid's ends, which a cosine
    schedule's sigma_max ~ 2e4 would make stiff), a screen of every sampler/grid pair and every peer on the first
    `screen_n` noises, then each sampler's best grid, the best k-diffusion and the best diffusers contender at
    every NFE on all noises (only the `finalists` samplers with the best screen scores, to save time). The
    ODE's FD is also given on the first half of the noises (the ancestral reference's n)."""
    t0 = time.perf_counter()
    ref = sample(family, len(noise), sampler="rk45", schedule="logsnr:end=sigma_min", noise=noise, rtol=rtol,
                 atol=rtol, batch_size=500)
    # how converged: the first 100 samples again at a 10x tighter tolerance, RMS difference in [-1, 1] pixels
    tight = sample(family, 100, sampler="rk45", schedule="logsnr:end=sigma_min", noise=noise[:100],
                   rtol=rtol / 10, atol=rtol / 10, batch_size=100)
    rms = float((tight.images - ref.images[:100]).pow(2).mean().sqrt())
    name = f"converged ODE: rk45, tol {rtol:g} (vs tol {rtol / 10:g}: RMS {rms:.1e}, NFE {tight.nfe})"
    rows = [{"family": label, "group": "reference", "name": name, "grid": "logsnr:end=sigma_min", "nfe": ref.nfe,
             "fd": scorer.fd(ref.images), "n": len(noise), "stage": "final"},
            {"family": label, "group": "reference", "name": name, "grid": "logsnr:end=sigma_min", "nfe": ref.nfe,
             "fd": scorer.fd(ref.images[: len(noise) // 2]), "n": len(noise) // 2, "stage": "half"}]
    log(f"{label}: rk45 NFE {ref.nfe} FD {rows[0]['fd']:.4g} (n/2: {rows[1]['fd']:.4g}) "
        f"({time.perf_counter() - t0:.0f} s)")
    ours = [genkit_contender(family, s, g) for s in SCREEN_SAMPLERS for g in SCREEN_GRIDS]
    ours.append(genkit_contender(family, "heun-arctan", "family"))
    theirs = peers(family)
    screen = _run_all(ours + theirs, label, scorer, noise[:screen_n], SCREEN_NFES, "screen", log, t0)
    best = [min((c for c in ours if c.name == sampler), key=lambda c: _screen_score(screen, c))
            for sampler in SCREEN_SAMPLERS]  # heun-arctan is screened only, next to heun in sigma
    finalists = sorted(best, key=lambda c: _screen_score(screen, c))[:finalists]
    for group in ("k-diffusion", "diffusers"):
        finalists.append(min((c for c in theirs if c.group == group), key=lambda c: _screen_score(screen, c)))
    log(f"{label}: finalists " + ", ".join(f"{c.group}:{c.name} ({c.grid})" for c in finalists))
    return rows + screen + _run_all(finalists, label, scorer, noise, nfes, "final", log, t0)


def ancestral_reference(family: Family, label: str, scorer: Scorer, noise: Tensor) -> dict[str, Any]:
    out = sample(family, len(noise), sampler="ancestral", steps=1000, noise=noise, batch_size=500,
                 generator=torch.Generator().manual_seed(2))
    return {"family": label, "group": "reference", "name": "ancestral, 1000 steps", "grid": "family",
            "nfe": out.nfe, "fd": scorer.fd(out.images), "n": len(noise), "stage": "half"}


# ---------------------------------------------------------------- tables and plot

def _final(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("stage", "final") == "final"]


def best_table(rows: list[dict[str, Any]], nfes=NFES) -> str:
    """Per family and NFE: the best genkit pair, the best k-diffusion and diffusers contender, ratios to the ODE."""
    rows = _final(rows)  # the ancestral and n/2 rows are stage "half"
    lines = ["| family | NFE | best genkit (sampler, grid) | FD | / ODE | best k-diffusion | FD | best diffusers | FD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam in dict.fromkeys(r["family"] for r in rows):
        ode = next(r["fd"] for r in rows if r["family"] == fam and r["name"].startswith("converged"))
        for nfe in nfes:
            cells = []
            for group in ("genkit", "k-diffusion", "diffusers"):
                cand = [r for r in rows if r["family"] == fam and r["group"] == group and r["nfe"] == nfe]
                best = min(cand, key=lambda r: r["fd"]) if cand else None
                cells.append(("-", math.nan) if best is None else (f"{best['name']} ({best['grid']})", best["fd"]))
            (g, gfd), (k, kfd), (d, dfd) = cells
            lines.append(f"| {fam} | {nfe} | {g} | {gfd:.3f} | {gfd / ode:.2f}x | {k} | {kfd:.3f} | {d} | {dfd:.3f} |")
    return "\n".join(lines)


def full_table(rows: list[dict[str, Any]], nfes=NFES, stage: str = "final") -> str:
    rows = [r for r in rows if r.get("stage", "final") == stage or (stage == "final" and r["group"] == "reference")]
    lines = ["| family | contender | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|---|" + "---|" * len(nfes)]
    keys = dict.fromkeys((r["family"], r["group"], r["name"], r["grid"]) for r in rows if r["group"] != "reference")
    for fam, group, name, grid in keys:
        fds = {r["nfe"]: r["fd"] for r in rows if (r["family"], r["group"], r["name"], r["grid"]) == (fam, group, name, grid)}
        label = name if group == "genkit" else f"{group}: {name}"
        lines.append(f"| {fam} | {label} | {grid} | " + " | ".join(f"{fds[n]:.3f}" if n in fds else "-" for n in nfes) + " |")
    refs = [r for r in rows if r["group"] == "reference"]
    lines += [f"| {r['family']} | {r['name']} (n = {r.get('n', '?')}) | {r['grid']} | "
              f"NFE {r['nfe']}: FD {r['fd']:.3f} |" + " |" * (len(nfes) - 1) for r in refs]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """FD vs NFE: per family, the best genkit pair per sampler, the best peer of each library, the ODE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _final(rows)
    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), dpi=110, squeeze=False)
    for ax, fam in zip(axes[0], families):
        fr = [r for r in rows if r["family"] == fam]
        for group, key in (("genkit", "name"), ("k-diffusion", "group"), ("diffusers", "group")):
            for who in dict.fromkeys(r[key] for r in fr if r["group"] == group):
                pts = {}
                for r in fr:
                    if r["group"] == group and r[key] == who and r["fd"] < pts.get(r["nfe"], (math.inf,))[0]:
                        pts[r["nfe"]] = (r["fd"], r["grid"])
                xs = sorted(pts)
                ax.plot(xs, [pts[x][0] for x in xs], marker="o" if group == "genkit" else "s",
                        linestyle="-" if group == "genkit" else "--", label=f"{who} (best grid)")
        for r in fr:
            if r["group"] == "reference":
                ax.axhline(r["fd"], color="k", linestyle=":" if "converged" in r["name"] else "-.", label=r["name"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD (digits features)")
        ax.set_title(fam)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points

DEFAULT_RUNS = ("runs/ddpm_digits", "runs/rf_digits")  # `python -m benchmarks fewstep`: train these first


def run(n: int = 2000, parts: tuple[str, ...] = ("proxy", "network", "ancestral"), runs: tuple[str, ...] = (),
        out: str = "docs", network_nfes: tuple[int, ...] = NFES, screen_n: int = 500,
        finalists: int = len(SCREEN_SAMPLERS), rtol: float = 1e-4,
        pairs: tuple[tuple[str, str], ...] = ()) -> list[dict[str, Any]]:
    """`ancestral` is the 1000-step ancestral reference of each VP run on the first n / 2 noises (it costs 1000
    evaluations per sample); run it as its own process next to `network` and `--merge` the JSON rows."""
    torch.manual_seed(0)
    scorer = Scorer(n)
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # the same for everyone
    rows: list[dict[str, Any]] = []
    if "proxy" in parts:
        images = build_dataset(DataConfig(source="digits", image_size=16)).images
        for label, family in proxy_families(images).items():
            rows += sweep(family, label, scorer, noise)
    if "network" in parts or "ancestral" in parts:
        from genkit.api import load

        for spec in runs or DEFAULT_RUNS:
            path, _, step = spec.partition(":")
            family = load(path, step=int(step) if step else None)
            label = f"{Path(path).name}" + (f" (step {step})" if step else "")
            if pairs:  # only these genkit sampler/grid pairs at every NFE (no reference, screen or peers)
                rows += _run_all([genkit_contender(family, s, g) for s, g in pairs], label, scorer, noise,
                                 network_nfes, "final", _log, time.perf_counter())
            elif "network" in parts:
                rows += network_sweep(family, label, scorer, noise, nfes=network_nfes, screen_n=screen_n,
                                      finalists=finalists, rtol=rtol)
            if "ancestral" in parts and family.noise_process == "vp":
                rows.append(ancestral_reference(family, label, scorer, noise[: n // 2]))
                _log(f"{label}: ancestral FD {rows[-1]['fd']:.4g} (n = {n // 2})")
    return rows


def ratios(rows: list[dict[str, Any]]) -> str:
    """The issue's targets, per family: best genkit at 5 and 10 NFE over the converged ODE, the ODE over
    1000-step ancestral (both on the same first n / 2 noises), genkit's best against the best peer per NFE."""
    lines = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in _final(rows) if r["family"] == fam]
        ode = next((r for r in fr if r["group"] == "reference" and r["name"].startswith("converged")), None)
        for nfe, target in ((10, 1.10), (5, 1.6)) if ode else ():
            cand = [r for r in fr if r["group"] == "genkit" and r["nfe"] == nfe]
            if not cand:
                continue
            best = min(cand, key=lambda r: r["fd"])
            ratio = best["fd"] / ode["fd"]
            lines.append(f"- {fam}, {nfe} NFE: best genkit {best['name']} ({best['grid']}) FD {best['fd']:.3f} = "
                         f"{ratio:.2f}x the converged ODE's {ode['fd']:.3f} (target <= {target}x: "
                         f"{'met' if ratio <= target else 'not met'})")
        anc = [r for r in rows if r["family"] == fam and r["name"].startswith("ancestral")]
        half = [r for r in rows if r["family"] == fam and r["name"].startswith("converged") and r["stage"] == "half"]
        if anc and half:
            ratio = half[0]["fd"] / anc[0]["fd"]
            lines.append(f"- {fam}: converged ODE FD {half[0]['fd']:.3f} vs 1000-step ancestral {anc[0]['fd']:.3f} "
                         f"(n = {anc[0]['n']} each) = {ratio:.2f}x (target <= 1.1x: "
                         f"{'met' if ratio <= 1.1 else 'not met'})")
        worse = []
        for nfe in sorted({r["nfe"] for r in fr if r["group"] == "genkit"}):
            ours = min((r["fd"] for r in fr if r["group"] == "genkit" and r["nfe"] == nfe), default=math.inf)
            theirs = min((r["fd"] for r in fr if r["group"] in ("k-diffusion", "diffusers") and r["nfe"] == nfe),
                         default=math.inf)
            if ours > theirs:
                worse.append(f"{nfe} ({ours:.3f} vs {theirs:.3f})")
        lines.append(f"- {fam}: genkit's best no worse than the best peer at every NFE: "
                     + ("met" if not worse else "not met at NFE " + ", ".join(worse)))
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], png: str = "fd_vs_nfe_fewstep.png", out: str = "docs") -> str:
    """The targets, the tables, and the FD vs NFE plot (written to out/png)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(out) / png)
    parts = [ratios(rows), best_table(rows), full_table(rows)]
    if any(r.get("stage") == "screen" for r in rows):
        parts.append("Screen (first noises only, see n):\n\n" + full_table(rows, SCREEN_NFES, stage="screen"))
    return "\n\n".join(parts + [f"![FD vs NFE, few steps]({png})"])


if __name__ == "__main__":
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", action="append", choices=["proxy", "network", "ancestral"])
    p.add_argument("--run", action="append", default=[], help="RUN or RUN:STEP (network and ancestral parts)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--screen-n", type=int, default=500)
    p.add_argument("--finalists", type=int, default=len(SCREEN_SAMPLERS),
                   help="genkit samplers (best grid each) run at every NFE after the screen, best screen scores first")
    p.add_argument("--rtol", type=float, default=1e-4, help="rk45's rtol = atol for the converged ODE (network)")
    p.add_argument("--pairs", default="", help="SAMPLER@GRID,...: run only these genkit pairs on the runs")
    p.add_argument("--out", default="docs")
    p.add_argument("--png", default="fd_vs_nfe_fewstep.png", help="plot file name under --out")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--merge", type=Path, nargs="+", help="only merge these JSON row files into tables and the plot")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="NFE of the network part (default all)")
    a = p.parse_args()
    if a.merge:
        result = [r for f in a.merge for r in json.loads(f.read_text())]
    else:
        result = run(a.n, tuple(a.part or ("proxy", "network", "ancestral")), tuple(a.run), a.out,
                     tuple(int(x) for x in a.nfes.split(",")), a.screen_n, a.finalists, a.rtol,
                     tuple(tuple(p.split("@")) for p in a.pairs.split(",") if p))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=1))
    print(markdown(result, a.png, a.out))
