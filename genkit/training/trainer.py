"""THE trainer: one Accelerate loop for every family (after minGPT's model-agnostic trainer).

The family owns its update order through `train_step(batch, step, opt)`; the trainer owns
devices, mixed precision, accumulation, clipping, EMA, logging, sample grids, atomic
checkpoints and exact resume. Multi-GPU / multi-node is `accelerate launch` (or torchrun).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, broadcast, send_to_device, set_seed
from torch import nn
from torch.utils.data import DataLoader

from genkit.config import OptimConfig, Recipe, dump_recipe, recipe_to_dict
from genkit.data import build_dataset
from genkit.data.position import DataPosition, GlobalBatchSampler
from genkit.errors import ConfigError, DataError, GenkitError, Interrupted, RunError
from genkit.eval.in_training import TrainingEvaluator
from genkit.families.base import Codec
from genkit.families.sampling import sample, sampler_options
from genkit.io import atomic_dir, load_tensors, save_grid, save_tensors, write_json, write_text
from genkit.runs import (
    CONFIG,
    build_family,
    family_class,
    init_from_run,
    list_checkpoints,
    load_stages,
    record_resume,
    relative_links,
)
from genkit.training.budget import Budget
from genkit.training.checkpoint import load_checkpoint, quarantine, save_checkpoint, verify_checkpoint
from genkit.training.ema import EMA
from genkit.training.handle import OptimHandle, build_optimizer, check_groups
from genkit.training.launch import launch_warnings
from genkit.training.logger import TrainLogger, truncate_metrics
from genkit.training.phema import PHEMA, PowerEMA
from genkit.training.sharding import (
    all_finite,
    check_shardable,
    full_model_state,
    full_tensors,
    shard_nets,
    sharding_requested,
)
from genkit.training.signals import StopSignals
from genkit.version import __version__


def clock() -> float:
    """Seconds of the training-time clock (monotonic); tests replace it to make time budgets exact."""
    return time.monotonic()


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """A fresh Accelerator for this run (CPU when CUDA is absent, as DDP on gloo needs)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cfg = recipe.train
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("train.precision=fp16 without CUDA: Accelerate runs fp32 on CPU; use bf16 there",
                      stacklevel=2)
    for warning in launch_warnings(cfg.precision):  # docs/accelerate.md: the recipe's precision wins
        warnings.warn(warning, stacklevel=2)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        log_with="tensorboard", project_dir=str(run_dir),
    )


class Trainer:
    """Trains `recipe` into `run_dir`; `fit()` returns the run folder.

    `stages` are the family's loaded frozen stages (`genkit.training.stages` resolves and trains
    them); None loads those the recipe names. Paths to other runs in `recipe` are absolute; the
    run folder's config.yaml stores them relative to it. `changed` ({key: [old, new]}) is what a
    resume changed in the run's recipe, recorded in resumes.jsonl; `label` names the progress bar.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: bool = False,
                 stages: dict[str, Any] | None = None, changed: dict[str, list[Any]] | None = None,
                 label: str = "train"):
        self.recipe, self.run_dir, self.resume, self.stages = recipe, Path(run_dir), resume, stages
        self.changed, self.label = changed or {}, label
        self.ckpt_root = self.run_dir / "checkpoints"
        self.evaluator: TrainingEvaluator | None = None

    def fit(self) -> Path:
        """Train for `train.steps` steps or `train.max_time`, whichever ends first (from the latest
        checkpoint when resuming)."""
        cfg = self.recipe.train
        self.acc = make_accelerator(self.recipe, self.run_dir)
        self.sharded = sharding_requested()  # an FSDP launch (genkit.training.sharding)
        self._setup()
        start = self._restore() if self.resume else 0
        self._write_config()
        if self.resume and self.acc.is_main_process:
            record_resume(self.run_dir, start, self.changed)
        self.acc.init_trackers("tensorboard")
        log = TrainLogger(self.acc, self.run_dir, cfg.log_every, cfg.steps, start,
                          self.global_batch * cfg.grad_accum, stop_on_nan=cfg.on_nan == "stop",
                          label=self.label, kept=self.kept)
        self.log = log
        if start == 0:
            log.hparams(recipe_to_dict(relative_links(self.recipe, self.run_dir)))
        batches = self._batches()
        budget, step = self.budget, start
        budget.start()
        with StopSignals() as stop:
            while not budget.exhausted:  # train.steps, or train.max_time first
                log.add(self._train_step(step, batches), step)
                step += 1
                log.step(step, self.lr(), self._skipped(), last=budget.exhausted, total=budget.estimated_steps())
                if self.phema is not None and self.acc.is_main_process:  # before a stop's checkpoint at this step
                    self.phema.snapshot(step, final=budget.exhausted)
                if stop.received(self.acc):
                    self._interrupted(step, stop.name)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._evaluate(step, log)
                if budget.exhausted:
                    break
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self._sample_grid(step)
                if step % cfg.checkpoint_every == 0:
                    self._checkpoint(step, final=False)
        log.close()
        self._checkpoint(step)
        self._export()
        grid = self._sample_grid(step)
        self.acc.end_training()
        if grid is not None:
            log.message(f"samples: {grid}")
        return self.run_dir

    # -- setup -------------------------------------------------------------------------
    def _setup(self) -> None:
        recipe, acc = self.recipe, self.acc
        if self.sharded:
            self._check_sharding()
        set_seed(recipe.train.seed)
        self.dataset = build_dataset(recipe.data, "train")
        self.shape = (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)
        stages = self.stages if self.stages is not None else load_stages(recipe)
        recipe = self.recipe = dataclasses.replace(
            recipe, model=family_class(recipe).configure(recipe.model, stages, self.dataset))
        self.family = build_family(recipe, self.shape, self.dataset.num_classes, stages)
        self.budget = Budget(recipe.train, clock, self._main_time)
        self.family.nets.to(acc.device)          # data-dependent init (ActNorm) before prepare; a resumed
        self.family.initialize(self._init_batch())  # run's checkpoint, loaded later, overwrites it
        if recipe.model.init_from is not None:
            init_from_run(self.family, recipe.model.init_from)
        if recipe.train.gradient_checkpointing:
            self.family.enable_gradient_checkpointing()
        self.raw = nn.ModuleDict(dict(self.family.nets))  # unwrapped view for EMA and checkpoints
        if self.sharded:  # in place: raw holds the sharded networks; the main process keeps a full copy to sample
            self.plain = copy.deepcopy(self.raw).cpu() if acc.is_main_process else None
            shard_nets(self.family.nets, recipe.train.precision, acc.device, acc.num_processes)
        else:
            for name in list(self.family.nets):
                self.family.nets[name] = acc.prepare(self.family.nets[name])
        self._setup_optimizers()
        self.global_batch = self._check_batch()
        self.position = DataPosition()  # a resume restores it
        # the nets the EMA averages: all, or those the family names (a GAN's generator)
        self.ema_nets = nn.ModuleDict({k: self.raw[k] for k in self.family.ema_nets()})
        decay = recipe.train.ema_decay
        ramp = self.budget.ema_updates if self.budget.timed else None
        self.ema = EMA(self.ema_nets, decay, recipe.train.ema_warmup, ramp) if decay else None
        phema = recipe.train.posthoc_ema
        self.phema = PowerEMA(self.ema_nets, phema, self.run_dir / PHEMA) if phema else None

    def _check_sharding(self) -> None:
        """Refuse what sharded training does not support, before anything is built."""
        cfg = self.recipe.train
        check_shardable(self.recipe.model.family)
        for key, value in (("train.eval_every", cfg.eval_every), ("train.posthoc_ema", cfg.posthoc_ema)):
            if value:
                raise ConfigError(f"{key}: not supported with sharded (FSDP2) training yet; set it to "
                                  f"{0 if key == 'train.eval_every' else 'null'} (evaluate afterwards with genkit eval)")

    def _setup_optimizers(self) -> None:
        groups = self.family.param_groups()
        check_groups(groups, self.recipe.optim, self.recipe.model.family)
        if self.sharded and len(groups) > 1:
            raise ConfigError(f"family '{self.recipe.model.family}' cannot be trained sharded (FSDP2): its parameter "
                              f"groups {', '.join(groups)} each need a backward of their own loss, which sharded "
                              "parameters cannot restrict; launch it with DDP (configs/accelerate/multi_gpu.yaml)")
        self.optimizers, self.schedulers = {}, {}
        for group, params in groups.items():
            opt = build_optimizer(params, self.recipe.optim.get(group, OptimConfig()))
            self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(opt, self.budget.lr_lambda())
            self.optimizers[group] = self.acc.prepare(opt)
        self.handle = OptimHandle(self.acc, self.optimizers, self.schedulers, groups,
                                  self.recipe.train.clip_grad, self.recipe.train.seed,
                                  skip_nonfinite=self.recipe.train.on_nan == "skip", budget=self.budget,
                                  sharded=self.sharded)

    def _main_time(self, seconds: float) -> float:
        """The main process's clock reading on every process (one broadcast; alone: as is)."""
        if self.acc.num_processes == 1:
            return seconds
        return float(broadcast(torch.tensor([seconds], dtype=torch.float64, device=self.acc.device))[0])

    def _init_batch(self) -> dict[str, torch.Tensor]:
        """The first global batch in dataset order: the same on every process, no RNG drawn."""
        n = min(len(self.dataset), self.recipe.data.batch_size * self.acc.num_processes)
        items = [self.dataset[i] for i in range(n)]
        return {key: torch.stack([item[key] for item in items]) if torch.is_tensor(items[0][key])
                else [item[key] for item in items] for key in items[0]}  # captions stay a list

    def _check_batch(self) -> int:
        """The global micro-batch (per-process batch x processes), refused when the data holds fewer images."""
        data, world = self.recipe.data, self.acc.num_processes
        if len(self.dataset) < data.batch_size * world:
            raise DataError(f"data: {len(self.dataset)} images, fewer than one global batch "
                            f"({data.batch_size} x {world} processes): lower data.batch_size")
        return data.batch_size * world

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of this process from `self.position` on (genkit.data.position), on its device."""
        acc, data = self.acc, self.recipe.data
        sampler = GlobalBatchSampler(len(self.dataset), data.batch_size, acc.process_index, acc.num_processes,
                                     self.recipe.train.seed, self.position)
        for batch in DataLoader(self.dataset, batch_sampler=sampler, num_workers=data.num_workers):
            yield send_to_device(batch, acc.device)

    # -- one step ----------------------------------------------------------------------
    def _train_step(self, step: int, batches: Iterator) -> dict[str, torch.Tensor]:
        """grad_accum micro-batches through the family's train_step, then EMA."""
        self.handle.stepped.clear()
        logs = {}
        for micro in range(self.recipe.train.grad_accum):
            with torch.random.fork_rng(devices=[]):  # loaders draw seeds from the global RNG on
                batch = next(batches)                # (re)start; keep it for dropout, resume-exact
            self.position = self.position.advance(self.global_batch, len(self.dataset))
            self.handle.begin(step, micro)
            if self.recipe.data.hflip:
                batch = dict(batch, image=self._hflip(batch["image"]))
            with self.acc.accumulate(*self.family.nets.values()):
                logs = self.family.train_step(batch, step, self.handle)
        if not self.handle.stepped:
            raise GenkitError(f"family '{self.recipe.model.family}' stepped no optimizer at step {step}")
        self.budget.tick(step)  # done (already read if an optimizer stepped: the LR followed it)
        if self.ema is not None:
            self.ema.update(self.ema_nets)
        if self.phema is not None:
            self.phema.update(self.ema_nets)
        return logs

    def _hflip(self, images: torch.Tensor) -> torch.Tensor:
        """Random horizontal flips drawn from the global-batch stream (resume- and rank-exact)."""
        flip = (self.handle.rand(images.shape[0]) < 0.5).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)

    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return next(iter(self.schedulers.values())).get_last_lr()[0]

    # -- run folder --------------------------------------------------------------------
    def _stored_recipe(self) -> str:
        """The recipe as the run folder stores it: YAML, paths to other runs relative to the folder."""
        return dump_recipe(relative_links(self.recipe, self.run_dir))

    def _write_config(self) -> None:
        if self.acc.is_main_process:
            write_text(self.run_dir / CONFIG, self._stored_recipe())

    def _message(self, text: str) -> None:
        if self.acc.is_main_process:
            print(text, flush=True)

    def _state(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "num_classes": self.dataset.num_classes,
                "family": self.recipe.model.family,
                "ema_updates": self.ema.updates if self.ema else 0, "train_seconds": self.budget.elapsed,
                **({"phema_updates": self.phema.updates, "phema_every": self.phema.every} if self.phema else {})}

    def _skipped(self) -> dict[str, float]:
        return {f"skipped_steps_{group}": float(n) for group, n in self.handle.skipped.items()}

    def _checkpoint(self, step: int, final: bool = True) -> None:
        """Save checkpoints/step-N after checking that the logged terms are finite.

        A mid-run save that fails (disk full, folder gone) is reported and training goes on
        with its state in memory, to retry at the next checkpoint; a final save raises.
        """
        self.log.check()          # never checkpoint past a non-finite loss
        self._check_finite(step)                          # ... or non-finite weights
        state = dict(self._state(), data=self.position.state(),
                     samples_per_step=self.global_batch * self.recipe.train.grad_accum)
        try:
            save_checkpoint(self.ckpt_root, step, self.acc, self.raw, self.ema, self.optimizers,
                            self.schedulers, state, self.recipe.train.keep_last,
                            extra={PHEMA: self.phema.state_dict()} if self.phema else None)
        except OSError as error:
            where = f"cannot write checkpoint '{self.ckpt_root / f'step-{step}'}': {error.strerror or error}"
            if final:
                raise RunError(where) from error
            self.log.message(f"warning: {where}; training continues, the state is kept in memory "
                             f"and the next checkpoint retries")

    def _interrupted(self, step: int, signal_name: str) -> None:
        """SIGTERM / SIGINT: write a checkpoint at this step, then stop with a resume hint."""
        self._checkpoint(step)
        self.log.close()
        raise Interrupted(f"{signal_name} at step {step}: checkpoint '{self.ckpt_root / f'step-{step}'}' "
                          f"written; continue with `genkit train --resume {self.run_dir}`")

    def _check_finite(self, step: int) -> None:
        """Never checkpoint non-finite weights (a NaN between two logging steps): stop, keep the last good one."""
        params = dict(self.raw.named_parameters())
        if not all_finite(list(params.values())):  # sharded: each process checks its shards
            name = next(k for k, p in params.items() if not all_finite([p]))
            raise GenkitError(f"parameter '{name}' is not finite at step {step}: training stopped; "
                              f"{self.kept()} (lower the lr or enable train.clip_grad)")

    def kept(self) -> str:
        """What a stopped run leaves to resume from, for the message that stops it."""
        latest = list_checkpoints(self.ckpt_root)
        if latest:
            return f"the last good checkpoint, {latest[-1].name}, is kept (`genkit train --resume {self.run_dir}`)"
        return "no checkpoint was written, so nothing is kept: fix the cause and run the same command again"

    def _restore(self) -> int:
        """Load the newest checkpoint that verifies; damaged newer ones are quarantined with a warning.

        A run folder whose start never reached a checkpoint (killed outright) resumes from step 0.
        """
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            self._message(f"no checkpoint under '{self.ckpt_root}' yet: training from step 0")
            if self.phema is not None and self.acc.is_main_process:
                self.phema.drop_after(0)
            return 0
        damaged: list[tuple[Path, RunError]] = []
        for path in reversed(ckpts):
            try:
                verify_checkpoint(path)
                break
            except RunError as error:
                damaged.append((path, error))
                warnings.warn(f"{error}; moved aside as {path.name}.damaged, resuming from an earlier one",
                              stacklevel=2)
        else:
            self._quarantine(damaged)
            raise RunError(f"cannot resume: every checkpoint is damaged (moved aside as step-N.damaged); "
                           f"the newest: {damaged[0][1]}; train into a new --out")
        state = load_checkpoint(path, self.acc, self.raw, self.ema, self.optimizers, self.schedulers,
                                self.recipe.train.seed)
        self.position = self._restored_position(path, state)
        self._quarantine(damaged)  # after every process has read the one it resumes from
        if self.acc.is_main_process:
            truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
        self.budget.restore(state["step"], state.get("train_seconds", 0.0))  # older checkpoints: time unknown
        if self.phema is not None:
            self._restore_phema(path, state)
        return state["step"]

    def _restored_position(self, path: Path, state: dict[str, Any]) -> DataPosition:
        """The checkpoint's data position (older ones: per-process micro-batches); a warning when the samples
        per step differ from the checkpoint's (another number of processes, batch or accumulation)."""
        cfg, n = self.recipe.train, len(self.dataset)
        if "data" in state:
            position, before = DataPosition.from_state(state["data"]), state["samples_per_step"]
        else:  # the batch of those runs could not change on resume
            position = DataPosition.from_batches(state["position"], self.recipe.data.batch_size * state["world_size"], n)
            before = self.recipe.data.batch_size * state["world_size"] * cfg.grad_accum
        now = self.global_batch * cfg.grad_accum
        if before != now:
            world = self.acc.num_processes
            keep = (f"; to keep {before}, set data.batch_size={before // (world * cfg.grad_accum)}"
                    if before % (world * cfg.grad_accum) == 0 else "")
            warnings.warn(f"checkpoint '{path}' trained {before} samples per step, this resume trains {now} "
                          f"({world} processes x data.batch_size={self.recipe.data.batch_size} x train.grad_accum="
                          f"{cfg.grad_accum}): it continues at sample {position.samples} with the new batch{keep}",
                          stacklevel=2)
        return position

    def _restore_phema(self, path: Path, state: dict[str, Any]) -> None:
        """The post-hoc EMA profiles of the checkpoint; snapshots written after it are dropped (written again)."""
        if not (path / f"{PHEMA}.safetensors").exists():
            raise RunError(f"checkpoint '{path}' has no post-hoc EMA state: train.posthoc_ema cannot be turned on "
                           "in a resumed run")
        self.phema.load_state_dict(load_tensors(path / f"{PHEMA}.safetensors"), state["phema_updates"],
                                   state["phema_every"])
        if self.acc.is_main_process:
            self.phema.drop_after(state["step"])

    def _quarantine(self, damaged: list[tuple[Path, RunError]]) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for path, error in damaged:
                quarantine(path, str(error))
        self.acc.wait_for_everyone()

    @contextlib.contextmanager
    def _eval_weights(self, full: dict[str, torch.Tensor] | None = None):
        """Unwrapped networks carrying the EMA weights, for sampling on one process; sharded, the main
        process's full copy loaded with `full` (`_full_weights`, gathered by every process)."""
        wrapped = dict(self.family.nets)
        nets = self.raw
        if self.sharded:
            nets = self.plain
            nets.load_state_dict(full)
            nets.to(self.acc.device)
        for name, net in nets.items():
            self.family.nets[name] = net
        try:
            with self.ema.applied(self.ema_nets) if self.ema and not self.sharded else contextlib.nullcontext():
                yield
        finally:
            for name, net in wrapped.items():
                self.family.nets[name] = net
            if self.sharded:
                nets.cpu()

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The networks' weights with the EMA's over them (model/'s layout); every process calls it when
        sharded (gathered to the main process), the main process alone otherwise."""
        weights = dict(full_model_state(self.raw))
        if self.ema is not None:
            weights.update(full_tensors(self.ema.state_dict()))
        return weights

    def _sample_grid(self, step: int) -> Path | None:
        s = self.recipe.sample
        path = None
        full = self._full_weights() if self.sharded else None
        if self.acc.is_main_process:
            with self._eval_weights(full):
                if isinstance(self.family, Codec):  # the first n training images, reconstructed
                    x = torch.stack([self.dataset[i]["image"] for i in range(min(s.n, len(self.dataset)))])
                    images = torch.cat([x, self.family.reconstruct(x).cpu()])
                else:
                    generator = torch.Generator().manual_seed(s.seed)
                    images = sample(self.family, s.n, generator=generator, sampler=s.sampler, steps=s.steps,
                                    **sampler_options(self.family, s)).images
            path = save_grid(images, self.run_dir / "samples" / f"step-{step}.png")
            self.log.image(step, "samples", images)
        self.acc.wait_for_everyone()
        return path

    def _export(self) -> None:
        """model/: final (EMA) weights as safetensors with the resolved recipe, plus genkit.json."""
        full = self._full_weights() if self.sharded else None
        if self.acc.is_main_process:
            self._write_weights(self.run_dir / "model", full)
        self.acc.wait_for_everyone()

    def _write_weights(self, folder: Path, weights: dict[str, torch.Tensor] | None = None, **info: Any) -> None:
        weights = self._full_weights() if weights is None else weights
        with atomic_dir(folder) as tmp:
            save_tensors(tmp / "weights.safetensors", weights,
                         metadata={"genkit_config": self._stored_recipe(), "genkit_version": __version__})
            write_json(tmp / "genkit.json", dict(self._state(), genkit_version=__version__,
                                                 ema=self.ema is not None, **info))

    def _evaluate(self, step: int, log: TrainLogger) -> None:
        """FD vs the training data (recipe's eval section); best/ keeps the lowest-FD weights.

        Every process generates its share of `eval.n` and the statistics are all-reduced; the
        main process logs, and writes best/.
        """
        if self.evaluator is None:
            self.evaluator = TrainingEvaluator(self.recipe, self.run_dir, self.dataset, self.acc.device)
        with self._eval_weights():
            fd = self.evaluator.frechet(self.family, seed=self.recipe.sample.seed, accelerator=self.acc)
        if self.acc.is_main_process:
            log.write(step, {self.evaluator.key: fd})
            log.message(f"step {step}: {self.evaluator.key} {fd:.5g}")
            best = self.run_dir / "best" / "genkit.json"
            best_fd = json.loads(best.read_text())["fd"] if best.exists() else float("inf")
            if self.recipe.eval.best and fd < best_fd:
                self._write_weights(self.run_dir / "best", fd=fd, step=step, fd_key=self.evaluator.key)
        self.acc.wait_for_everyone()
