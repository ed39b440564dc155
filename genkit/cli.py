"""`genkit` command line: parse, call the Python API, print. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from genkit.errors import GenkitError, Interrupted
from genkit.version import __version__


def _finite(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{value}'") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{value}'")
    return x


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{value}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `genkit sample: error: ... (see --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


SCHEDULE_HELP = ("sigma grid: family, karras[:rho=R], logsnr or time-uniform, each with ':end=sigma_min' to end "
                 "there without the final denoising call (e.g. logsnr:end=sigma_min); default: the one the "
                 "sampler recommends for the family (rk45 integrates between its ends)")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="genkit", description="Generative models: train, sample, evaluate.")
    p.add_argument("--version", action="version", version=f"genkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe into a run folder",
                       description="Train a recipe (a YAML path or a shipped recipe name). Writes "
                                   "runs/<name>/ with config.yaml, checkpoints/, model/, samples/ "
                                   "and metrics.jsonl; ends with a sample grid. `genkit train --resume RUN "
                                   "[KEY=VALUE ...]` continues a run from its own config.yaml.")
    t.add_argument("recipe", nargs="?", help="recipe YAML path, or a shipped name such as ddpm_digits (see "
                                             "`genkit recipes`); optional with --resume RUN")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.steps=500 data.batch_size=32; STAGE.KEY=VALUE sets an "
                        "earlier stage's recipe (first_stage.train.steps=100 for ldm)")
    t.add_argument("--out", type=Path, help="run folder (default: runs/<recipe name>)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue RUN (or --out) from its latest checkpoint with its own config.yaml; a recipe "
                        "or overrides may change only the steps and the logging, sampling, evaluation and "
                        "checkpoint settings (train.steps=N extends a finished run)")

    s = sub.add_parser("sample", help="generate images from a trained run",
                       description="Generate images from a run folder with a shared sampler.")
    s.add_argument("run", type=Path, help="run folder written by `genkit train`, or a diffusers folder")
    s.add_argument("--sampler", help="sampler name (default: the family's; e.g. ddim, ancestral)")
    s.add_argument("--steps", type=_positive, help="sampler steps (default: the family's)")
    s.add_argument("--nfe", type=_positive,
                   help="network evaluations to spend instead of --steps: the step count that spends exactly N")
    s.add_argument("--n", type=_positive, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--batch-size", type=_positive, help="images per network batch (default 256; lower it when "
                                                           "memory runs out)")
    s.add_argument("--eta", type=_finite, help="DDIM noise scale: 0 deterministic, 1 = DDPM posterior")
    s.add_argument("--temperature", type=_finite,
                   help="direct sampler of flows: scale of the prior's std (Glow: 0.7); autoregressive: logits / T")
    s.add_argument("--schedule", metavar="GRID", help=SCHEDULE_HELP)
    s.add_argument("--rtol", type=_finite, help="rk45 relative tolerance (default 1e-5)")
    s.add_argument("--atol", type=_finite, help="rk45 absolute tolerance (default 1e-5)")
    s.add_argument("--truncation", type=_finite, help="direct (GAN): redraw latent entries with |z| > this")
    s.add_argument("--class", dest="labels", type=_labels,
                   help="class label(s) of a class-conditional run, e.g. 7 or 0,1,2 (default: all classes in turn)")
    s.add_argument("--prompt", help="text prompt of a text-conditioned run (latent diffusion), for all images")
    s.add_argument("--prompts", type=Path, metavar="FILE",
                   help="text file of prompts, one per line, used in turn over the --n images")
    s.add_argument("--guidance", type=_finite,
                   help="classifier-free guidance scale: 1 conditional (default), 0 unconditional, >1 guided; "
                        "with --guide-with, the autoguidance scale")
    s.add_argument("--guide-with", metavar="RUN2[:STEP]",
                   help="autoguidance (Karras et al. 2024): guide with a worse model of the same data, a smaller run "
                        "or an earlier checkpoint (RUN:STEP, e.g. this run's own step-500): D2 + w (D - D2) at "
                        "--guidance w; each step evaluates both (the NFE counts both)")
    s.add_argument("--top-k", dest="top_k", type=_positive, help="autoregressive: sample among the k most likely tokens")
    s.add_argument("--top-p", dest="top_p", type=_finite, help="autoregressive: nucleus sampling, token set of mass >= p")
    s.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG grid path (default grid.png)")
    s.add_argument("--save-npz", type=Path, help="also save images as .npz: `images` uint8 N x C x H x W")
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    s.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no",
                   help="run the network under autocast (bf16: faster on CPUs with bf16 instructions)")
    _compile_arguments(s, "torch.compile the networks with frozen weights: a one-off compile, then faster "
                          "steps (worth it for many images; docs/benchmarks.md)")

    r = sub.add_parser("reflow", help="write reflow pairs (noise, ODE(noise)) of a rectified-flow run",
                       description="Solve a run's ODE from seeded noise and write the pairs as safetensors "
                                   "shards plus manifest.json (resumable: complete shards are kept). Train "
                                   "on them with data.source=pairs data.root=PAIRS model.init_from=RUN.")
    r.add_argument("run", type=Path, help="run folder written by `genkit train`")
    r.add_argument("--pairs", type=_positive, required=True, help="number of pairs")
    r.add_argument("--out", type=Path, required=True, help="pairs folder to write (or resume)")
    r.add_argument("--sampler", default="rk45", help="deterministic sampler (default rk45; ddim = Euler)")
    r.add_argument("--steps", type=_positive, help="sampler steps (not for rk45, which chooses its own)")
    r.add_argument("--rtol", type=_finite, help="rk45 relative tolerance (default 1e-5)")
    r.add_argument("--atol", type=_finite, help="rk45 absolute tolerance (default 1e-5)")
    r.add_argument("--batch-size", type=_positive, default=256, help="pairs per network batch (default 256)")
    r.add_argument("--shard-size", type=_positive, default=1024, help="pairs per shard file (default 1024)")
    r.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")

    m = sub.add_parser("ema", help="post-hoc EMA: reconstruct any EMA length of a run trained with train.posthoc_ema",
                       description="Reconstruct the weights of an EMA of length --sigma-rel from the post-hoc EMA "
                                   "snapshots of a run (Karras et al. 2024) into a new run folder, or --sweep: FD over "
                                   "a range of lengths, with a table, JSON and a PNG plot in RUN/eval/.")
    m.add_argument("run", type=Path, help="run folder trained with train.posthoc_ema")
    m.add_argument("--sigma-rel", type=_finite, help="EMA length: the profile's std relative to training time (0, 0.28)")
    m.add_argument("--out", type=Path, help="new run folder (default: RUN-ema<sigma_rel> next to RUN)")
    m.add_argument("--step", type=_positive, help="the EMA as it stood at this step (default: the last snapshot)")
    m.add_argument("--sweep", action="store_true", help="FD of the reconstructions over a range of sigma_rel, "
                                                        "with the recipe's eval features and sampler")
    m.add_argument("--n", type=_positive, help="--sweep: samples per FD (default: the recipe's eval.n)")
    m.add_argument("--sigma-rels", help="--sweep: comma-separated lengths (default 0.02 to 0.25, nine values)")
    m.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")

    x = sub.add_parser("export", help="export a run for another library (diffusers)",
                       description="Write a run as a diffusers pipeline folder that "
                                   "DDPMPipeline.from_pretrained(DIR) loads (DDPM: DDIMPipeline too): UNet2DModel "
                                   "safetensors + a scheduler matching the run's noise process.")
    x.add_argument("run", type=Path, help="run folder written by `genkit train`")
    x.add_argument("--format", choices=["diffusers"], required=True, help="target format")
    x.add_argument("--out", type=Path, required=True, help="folder to create")
    x.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="ema: the run's final EMA weights (default); raw: the latest checkpoint's")

    i = sub.add_parser("import-diffusers", help="turn a diffusers UNet folder into a genkit run folder",
                       description="Read a diffusers folder (unet/ UNet2DModel safetensors + scheduler/ "
                                   "DDPM, DDIM or FlowMatchEuler config) into a run folder every genkit "
                                   "sampler uses. `genkit sample DIR` also works on the folder directly.")
    i.add_argument("folder", type=Path, help="diffusers pipeline folder")
    i.add_argument("--out", type=Path, required=True, help="run folder to create")

    sub.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    _eval_parser(sub)
    return p


SPEC_HELP = ("a folder of images, an .npz of images (key `images`), a statistics .npz (prefix foreign "
             "ones with their protocol: pytorch-fid:ref.npz), recipe:NAME[:SPLIT], or a run folder")


# `genkit eval METRIC`: its help line. The table lives here, free of torch, so that the CLI starts at once; a
# metric of two feature sets registered in genkit.eval.engine.FEATURE_METRICS needs one line here to be a command.
METRIC_HELP = {
    "fid": "Frechet distance between the feature Gaussians of --real and --fake",
    "fd-dinov2": "FD-DINOv2 (Stein et al. 2023): the Frechet distance on DINOv2 ViT-L/14 features (dgm-eval's "
                 "preprocessing)",
    "cmmd": "CMMD (Jayasumana et al. 2024): MMD^2 of CLIP ViT-L/14@336px embeddings, Gaussian kernel",
    "kid": "Kernel Inception Distance (unbiased MMD^2, polynomial kernel)",
    "is": "Inception Score of --fake", "prdc": "precision, recall, density, coverage",
    "w1": "Wasserstein-1 distance: the dual estimate of a fresh WGAN-GP critic fitted to the features "
          "(or pixels) of --real and --fake",
    "stats": "save reference statistics of SPEC to --out",
    "curve": "FD vs NFE of a run's samplers (table, CSV and PNG plot)",
    "bpd": "bits/dim of held-out data under a run's model (exact likelihood)",
    "straightness": "the rectified-flow paper's straightness S(Z) of a run's Euler paths",
    "recon": "reconstruction PSNR, LPIPS, rFD and codebook usage of a tokenizer run (vqgan)",
}


# --features of each metric when not given: None lets the engine decide (the run's data, the statistics files' own)
FEATURES_DEFAULT = {"recon": None, "curve": None, "fid": None, "fd-dinov2": None, "cmmd": "cmmd"}
FEATURES_HELP = {"fd-dinov2": "dinov2 (the default and only choice)",
                 "cmmd": "cmmd (the default and only choice: CLIP ViT-L/14@336px, L2-normalised)"}


def _eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="evaluate: " + ", ".join(METRIC_HELP),
                       description="Evaluation metrics with the protocol recorded in the output.")
    metrics = e.add_subparsers(dest="metric", required=True, metavar="METRIC")
    for name, text in METRIC_HELP.items():
        m = metrics.add_parser(name, help=text, description=text + ". A SPEC is " + SPEC_HELP + ".")
        if name == "stats":
            m.add_argument("spec", metavar="SPEC", help="images to summarise")
            m.add_argument("--out", type=Path, required=True, help="statistics .npz to write")
            m.set_defaults(json=False)
        elif name == "bpd":
            m.add_argument("run", type=Path, help="run folder")
            m.add_argument("--data", metavar="SPEC", help="images (default: the run recipe's held-out split)")
            m.add_argument("--divergence", choices=["hutchinson", "exact"], default="hutchinson",
                           help="ODE divergence: Hutchinson's estimator (default; its noise is in bits_per_dim_se) "
                                "or the exact trace (one vector-Jacobian product per dimension: slow)")
            m.add_argument("--probes", type=_positive, default=4, help="Hutchinson probes per image (default 4)")
            m.add_argument("--rtol", type=_finite, default=1e-5, help="ODE solver relative tolerance")
            m.add_argument("--atol", type=_finite, default=1e-5, help="ODE solver absolute tolerance")
            m.add_argument("--json", action="store_true", help="print only the JSON result")
            m.add_argument("--out", type=Path, help="also write the JSON result to this file")
        elif name == "recon":
            m.add_argument("run", type=Path, help="tokenizer run folder")
            m.add_argument("--data", metavar="SPEC", help="images (default: the run recipe's held-out split)")
            m.add_argument("--lpips-weights", help="LPIPS VGG16 backbone file or folder (else $GENKIT_WEIGHTS_DIR, caches)")
            m.add_argument("--json", action="store_true", help="print only the JSON result")
            m.add_argument("--out", type=Path, help="also write the JSON result to this file")
        elif name == "straightness":
            m.add_argument("run", type=Path, help="run folder")
            m.add_argument("--steps", type=_positive, default=50, help="Euler steps per path (default 50)")
            m.add_argument("--json", action="store_true", help="print only the JSON result")
            m.add_argument("--out", type=Path, help="also write the JSON result to this file")
        elif name == "curve":
            m.add_argument("run", type=Path, help="run folder")
            m.add_argument("--samplers", default="ddim,euler,heun,dpmpp-2m", help="comma-separated samplers")
            m.add_argument("--steps-list", "--steps", dest="steps_list", default="5,10,20,50",
                           help="comma-separated step counts (default 5,10,20,50)")
            m.add_argument("--schedule", metavar="GRID", help=SCHEDULE_HELP)
            m.add_argument("--real", metavar="SPEC", help="reference (default: the run's training data)")
            m.add_argument("--out", type=Path, help="folder for curve.csv/.png/.json (default RUN/eval)")
            m.set_defaults(json=False)
        else:
            if name != "is":
                m.add_argument("--real", required=True, metavar="SPEC", help="reference images or statistics")
            m.add_argument("--fake", required=True, metavar="SPEC", help="images to evaluate")
            m.add_argument("--json", action="store_true", help="print only the JSON result")
            m.add_argument("--out", type=Path, help="also write the JSON result to this file")
        if name == "w1":
            _w1_arguments(m)
        if name == "kid":
            m.add_argument("--kid-subset-size", type=_positive, metavar="M",
                           help="images per subset (default 1000; n // 2 for sets of n <= 1000, so that subsets "
                                "differ; at most the smaller set, as torch-fidelity)")
            m.add_argument("--kid-subsets", type=_positive, default=100, metavar="K", help="subsets (default 100)")
        else:
            m.set_defaults(kid_subset_size=None, kid_subsets=100)
        if name not in ("bpd", "straightness"):
            m.add_argument("--features", default=FEATURES_DEFAULT.get(name, "inception"),
                           help=FEATURES_HELP.get(name, "feature extractor: inception (default; recon, curve: digits "
                                "for runs trained on the digits; fid of two statistics files: theirs), clip, "
                                "dinov2, cmmd, digits" + (", or pixels (flattened images in [-1, 1])"
                                                          if name == "w1" else "")))
            m.add_argument("--protocol", help="extractor protocol: inception tf (default), pytorch-fid or clean-fid; "
                                              "dinov2 vitl14 (default), vitb14, ...; clip and cmmd an "
                                              "open_clip model name")
            m.add_argument("--weights", help="weights file or folder (else $GENKIT_WEIGHTS_DIR, then the torch hub cache)")
        else:
            m.set_defaults(features="", protocol=None, weights=None)
        m.add_argument("--n", type=_positive, help="images per side (default: all; fewer than a folder, .npz or "
                                                    "dataset holds: a random subset drawn with --seed; run folders: "
                                                    "the number generated, required; straightness: paths, "
                                                    "default 256)")
        if name != "straightness":
            m.add_argument("--batch-size", type=_positive, help="images per batch (default 100; bpd 16)")
        if name not in ("curve", "bpd", "straightness", "recon"):
            m.add_argument("--sampler", help="sampler for run folders (default: the family's)")
            m.add_argument("--steps", type=_positive, help="sampler steps for run folders")
            _compile_arguments(m, "run folders: torch.compile the networks (a one-off compile, then faster "
                                  "sampling)")
        else:  # every metric's namespace has the same keys: `_eval` reads them without probing
            m.set_defaults(sampler=None, compile=False, compile_mode=None, **({} if name == "straightness" else
                                                                                {"steps": None}))
        m.add_argument("--seed", type=int, default=0,
                       help="seed for generation, the --n subset of a folder, IS splits and KID subsets (default 0)")
        m.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")


def _compile_arguments(p: argparse.ArgumentParser, help: str) -> None:
    """--compile and --compile-mode (a torch.compile mode; implies --compile)."""
    p.add_argument("--compile", action="store_true", help=help)
    p.add_argument("--compile-mode", metavar="MODE",
                   help="torch.compile mode for --compile, e.g. max-autotune (implies --compile)")


def _compile(args: argparse.Namespace) -> bool | str:
    """`sample`'s compile argument from --compile / --compile-mode."""
    return args.compile_mode or args.compile


def _w1_arguments(m: argparse.ArgumentParser) -> None:
    """The critic budget of `genkit eval w1` (defaults: genkit.eval.w1.CriticSettings)."""
    m.add_argument("--critic-steps", type=_positive, default=2000, help="critic updates (default 2000)")
    m.add_argument("--critic-batch", type=_positive, default=256, help="samples per side per update (default 256)")
    m.add_argument("--critic-hidden", type=_positive, default=256, help="critic MLP width (default 256)")
    m.add_argument("--critic-lr", type=_finite, default=1e-4, help="Adam learning rate, betas (0, 0.9) (default 1e-4)")
    m.add_argument("--gp-weight", type=_finite, default=10.0, help="gradient penalty lambda (default 10)")
    m.add_argument("--holdout", type=_finite, default=0.5,
                   help="fraction of each set held out: the critic is fitted on the rest and W1 estimated on these "
                        "(default 0.5)")


def _train(args: argparse.Namespace) -> None:
    from genkit.api import train
    from genkit.training.stages import is_main_process

    run = train(args.recipe, overrides=args.overrides, out=args.out, resume=args.resume)
    if is_main_process():
        print(f"run folder: {run}")


def _train_positionals(args: argparse.Namespace, extra: list[str]) -> None:
    """Sort `train`'s optional positionals: `--resume` may take the run folder, the recipe is optional, and
    an override may land in either slot (`genkit train --resume RUN train.steps=30`)."""
    overrides = [*args.overrides, *extra]
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        overrides, args.resume = [args.resume, *overrides], True  # `--resume key=value`: the flag, then an override
    if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).exists():
        overrides, args.recipe = [args.recipe, *overrides], None
    args.overrides = overrides


def _sample(args: argparse.Namespace) -> None:
    from genkit.api import load, sample_with_info
    from genkit.io import save_grid, save_npz

    for flag, path in (("--out", args.out), ("--save-npz", args.save_npz)):  # before minutes of sampling
        if path is not None and path.is_dir():
            raise GenkitError(f"{flag} '{path}' is a folder: give a file path")
    family = load(args.run, device=args.device)
    guide = None
    if args.guide_with is not None:
        guide_run, step = _run_and_step(args.guide_with)
        guide = load(guide_run, device=args.device, step=step)
    options = {k: v for k in ("eta", "temperature", "truncation", "top_k", "top_p", "rtol", "atol")
               if (v := vars(args)[k]) is not None}
    from genkit.families.sampling import recipe_sample_defaults
    from genkit.runs import CONFIG, run_recipe

    sampler, steps = args.sampler, args.steps
    if (args.run / CONFIG).is_file():  # a genkit run (a diffusers folder's default is its scheduler)
        sampler, steps, options = recipe_sample_defaults(family, run_recipe(args.run).sample, sampler, steps,
                                                         args.nfe, options, guided=args.guidance is not None
                                                         or args.guide_with is not None)
    guidance = options.pop("guidance", args.guidance)
    out = sample_with_info(family, args.n, sampler=sampler, steps=steps, nfe=args.nfe, seed=args.seed,
                           batch_size=args.batch_size, schedule=args.schedule, labels=args.labels,
                           guidance=guidance, prompts=_prompts(args), precision=args.precision,
                           compile=_compile(args), progress=True, guide=guide, **options)
    print(f"sampler {out.sampler}, steps {out.steps}, NFE {out.nfe}, {out.seconds:.1f} s")
    print(f"grid: {save_grid(out.images, args.out)}")
    if args.save_npz:
        path = save_npz(args.save_npz, out.images, sampler=out.sampler, steps=out.steps or 0,
                        nfe=out.nfe, seed=args.seed, schedule=out.schedule or "none")
        print(f"npz: {path}")


def _run_and_step(spec: str) -> tuple[Path, int | None]:
    """RUN or RUN:STEP (a checkpoint of RUN); a RUN folder whose name holds a colon is taken whole."""
    run, sep, step = spec.rpartition(":")
    if sep and run and step.isdigit() and not Path(spec).exists():
        return Path(run), int(step)
    return Path(spec), None


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt TEXT or --prompts FILE (one prompt per non-empty line)."""
    if args.prompt is not None and args.prompts is not None:
        raise GenkitError("give --prompt or --prompts, not both")
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts is None:
        return None
    try:
        lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise GenkitError(f"--prompts: cannot read '{args.prompts}': {e}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise GenkitError(f"--prompts: '{args.prompts}' holds no prompts (one per line)")
    return prompts


def _recipes(args: argparse.Namespace) -> None:
    from genkit.config import list_recipes

    rows = list_recipes()
    width = max((len(name) for name, _ in rows), default=0)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")


def _eval(args: argparse.Namespace) -> None:
    import json

    from genkit.eval import engine
    from genkit.eval.specs import SampleSettings
    from genkit.io import write_json

    if args.metric == "straightness":
        return _straightness(args)
    s = engine.EvalSettings(features=args.features, protocol=args.protocol, weights=args.weights,
                            n=args.n, batch_size=args.batch_size or (16 if args.metric == "bpd" else 100),
                            device=args.device, seed=args.seed, progress=True,
                            kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                            sample=SampleSettings(sampler=args.sampler, steps=args.steps,
                                                  options={"compile": mode} if (mode := _compile(args))
                                                  else None))
    if args.metric == "curve":
        return _curve(args, s)
    if args.metric == "stats":
        result = engine.write_stats(args.spec, args.out, s)
    elif args.metric == "bpd":
        result = engine.compute_bpd(args.run, args.data, s, divergence=args.divergence, probes=args.probes,
                                    rtol=args.rtol, atol=args.atol)
    elif args.metric == "recon":
        from genkit.eval.recon import compute_recon

        result = compute_recon(args.run, args.data, s, lpips_weights=args.lpips_weights)
    elif args.metric == "is":
        result = engine.compute_is(args.fake, s)
    elif args.metric == "w1":
        result = _w1(args, s)
    elif args.metric == "fid":
        result = engine.compute_fid(args.real, args.fake, s)
    elif args.metric == "fd-dinov2":
        result = engine.compute_fd_dinov2(args.real, args.fake, s)
    else:  # kid, prdc, cmmd and any other registered feature metric (genkit.eval.engine.FEATURE_METRICS)
        result = engine.compute_metric(args.metric, args.real, args.fake, s)
    if args.out and args.metric != "stats":
        write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print("  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    if args.metric == "recon" and result["lpips"] is None:
        print(f"lpips skipped: {result['lpips_skipped']}")
    if result.get("subset"):
        print(f"subset (--n of the images, --seed): {json.dumps(result['subset'])}")
    if "protocol" in result:
        print(f"protocol: {json.dumps(result['protocol'])}")
    elif "divergence" in result:
        print(f"{result['field']}, divergence: {result['divergence']} ({result['probes']} probes), "
              f"data: {result['data']}")
    else:
        print(f"method: {result['method']}, data: {result['data']}")


def _w1(args: argparse.Namespace, s: Any) -> dict[str, Any]:
    from genkit.eval.w1 import CriticSettings, compute_w1

    critic = CriticSettings(steps=args.critic_steps, batch_size=args.critic_batch, hidden=args.critic_hidden,
                            lr=args.critic_lr, gp_weight=args.gp_weight, holdout=args.holdout, seed=args.seed)
    return compute_w1(args.real, args.fake, s, critic)


def _straightness(args: argparse.Namespace) -> None:
    import json

    from genkit.io import write_json
    from genkit.reflow import straightness

    result = straightness(args.run, n=args.n or 256, steps=args.steps, seed=args.seed, device=args.device)
    if args.out:
        write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"straightness {result['straightness']:.6g}  n {result['n']}  steps {result['steps']}")


def _reflow(args: argparse.Namespace) -> None:
    from genkit.reflow import generate_pairs

    options = {k: v for k in ("rtol", "atol") if (v := vars(args)[k]) is not None}
    out = generate_pairs(args.run, args.out, args.pairs, sampler=args.sampler, steps=args.steps,
                         batch_size=args.batch_size, seed=args.seed, shard_size=args.shard_size,
                         device=args.device, **options)
    print(f"pairs: {out} (train with data.source=pairs data.root={out} model.init_from={args.run})")


def _labels(text: str) -> list[int]:
    """--class: comma-separated class labels >= 0."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels >= 0, got '{text}'")
    return values


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise GenkitError(f"{flag}: expected comma-separated positive integers, got '{text}'")
    return values


def _curve(args: argparse.Namespace, s: Any) -> None:
    from genkit.eval import curve
    from genkit.io import write_json

    s.n = s.n or 500
    samplers = [x.strip() for x in args.samplers.split(",") if x.strip()]
    rows = curve.fd_curve(args.run, samplers, _int_list(args.steps_list, "--steps"), s,
                          real=args.real, schedule=args.schedule)
    out = args.out or args.run / "eval"
    name = f"fd_{s.features}" if s.features != "inception" else "FID"
    write_json(out / "curve.json", {"rows": rows, "features": s.features, "n": s.n, "seed": s.seed})
    curve.write_csv(rows, out / "curve.csv")
    curve.plot(rows, out / "curve.png", f"{args.run.name}: {name} vs NFE ({s.n} samples)", name)
    print(curve.table(rows))
    print(f"saved {out / 'curve.csv'}, {out / 'curve.png'}, {out / 'curve.json'}")


def _ema(args: argparse.Namespace) -> None:
    import json

    from genkit.io import write_json
    from genkit.training import phema

    if args.sweep == (args.sigma_rel is not None):
        raise GenkitError("give --sigma-rel X (reconstruct) or --sweep (FD over a range), one of them")
    if not args.sweep:
        from genkit.api import posthoc_ema

        print(f"run folder: {posthoc_ema(args.run, args.sigma_rel, args.out, args.step)}")
        return
    try:
        lengths = tuple(float(v) for v in args.sigma_rels.split(",")) if args.sigma_rels else phema.SWEEP
    except ValueError:
        raise GenkitError(f"--sigma-rels: expected comma-separated numbers, got '{args.sigma_rels}'") from None
    rows = phema.sweep(args.run, lengths, device=args.device, n=args.n)
    out = args.run / "eval"
    write_json(out / "posthoc_ema.json", {"rows": rows})
    phema.plot_sweep(rows, out / "posthoc_ema.png", f"{args.run.name}: FD vs EMA length")
    print("| sigma_rel | FD |\n|---|---|")
    print("\n".join(f"| {r['sigma_rel']:g} | {r['fd']:.4g} |" for r in rows))
    best = min(rows, key=lambda r: r["fd"])
    print(f"best sigma_rel {best['sigma_rel']:g}: genkit ema {args.run} --sigma-rel {best['sigma_rel']:g}")
    print(f"saved {out / 'posthoc_ema.json'}, {out / 'posthoc_ema.png'} ({json.dumps(rows[0]['features'])})")


def _export(args: argparse.Namespace) -> None:
    from genkit.interop import export_diffusers

    out = export_diffusers(args.run, args.out, weights=args.weights)
    print(f"diffusers folder: {out} (DDPMPipeline.from_pretrained('{out}'))")


def _import_diffusers(args: argparse.Namespace) -> None:
    from genkit.interop import import_diffusers

    run = import_diffusers(args.folder, args.out)
    print(f"run folder: {run} (genkit sample {run})")


COMMANDS = {"train": _train, "sample": _sample, "reflow": _reflow, "recipes": _recipes, "eval": _eval, "ema": _ema,
            "export": _export, "import-diffusers": _import_diffusers}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `genkit` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may come before or after the options
        bad = [a for a in extra if a.startswith("-") or "=" not in a]
        if bad:
            parser.parse_args(argv)  # argparse's own message and exit 2
        _train_positionals(args, extra)
    elif extra:
        parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"genkit {args.command}: interrupted: {e}", file=sys.stderr)
        return 130
    except GenkitError as e:
        where = f"{args.command} {args.metric}" if args.command == "eval" else args.command
        print(f"genkit {where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
