"""THE trainer: one Accelerate loop for every family (after minGPT's model-agnostic trainer).

The family owns its update order through `train_step(batch, step, opt)`; the trainer owns
devices, mixed precision, accumulation, clipping, EMA, logging, sample grids, atomic
checkpoints and exact resume. Multi-GPU / multi-node is `accelerate launch` (or torchrun).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch import nn
from torch.utils.data import DataLoader

from genkit import __version__
from genkit.config import OptimConfig, Recipe, dump_recipe
from genkit.data import build_dataset
from genkit.errors import ConfigError, DataError, GenkitError, RunError
from genkit.families import FAMILIES
from genkit.reflow import init_from_run
from genkit.samplers import sampler_options
from genkit.io import atomic_dir, save_grid, save_tensors, write_json, write_text
from genkit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from genkit.training.ema import EMA
from genkit.training.handle import OptimHandle, build_optimizer, check_groups, lr_lambda
from genkit.training.logger import TrainLogger, truncate_metrics


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    """A fresh Accelerator for this run (CPU when CUDA is absent, as DDP on gloo needs)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cfg = recipe.train
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("train.precision=fp16 without CUDA: Accelerate runs fp32 on CPU; use bf16 there",
                      stacklevel=2)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
        log_with="tensorboard", project_dir=str(run_dir),
    )


def build_family(recipe: Recipe, shape: tuple[int, int, int], num_classes: int) -> Any:
    """Instantiate `model.family` with the sizes only the dataset knows."""
    cls, _ = FAMILIES[recipe.model.family]
    return cls(recipe.model, shape=tuple(shape), num_classes=num_classes)


class Trainer:
    """Trains `recipe` into `run_dir`; `fit()` returns the run folder."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: bool = False):
        self.recipe, self.run_dir, self.resume = recipe, Path(run_dir), resume
        self.ckpt_root = self.run_dir / "checkpoints"
        self.evaluator = None

    def fit(self) -> Path:
        """Train for `train.steps` steps (from the latest checkpoint when resuming)."""
        family_cls = FAMILIES[self.recipe.model.family][0]
        if hasattr(family_cls, "prepare_stages"):  # earlier stages (LDM: first stage, latent scale)
            self.recipe = family_cls.prepare_stages(self.recipe, self.run_dir, self.resume)
        cfg = self.recipe.train
        self.acc = make_accelerator(self.recipe, self.run_dir)
        self._setup()
        start = self._restore() if self.resume else 0
        self._write_config()
        self.acc.init_trackers("tensorboard")
        log = TrainLogger(self.acc, self.run_dir, cfg.log_every, cfg.steps, start,
                          self.dl.total_batch_size * cfg.grad_accum)
        batches = self._batches(start * cfg.grad_accum)
        for step in range(start, cfg.steps):
            log.add(self._train_step(step, batches))
            done = step + 1
            log.step(done, self.lr())
            if cfg.eval_every and done % cfg.eval_every == 0:
                self._evaluate(done, log)
            if done == cfg.steps:
                break
            if cfg.sample_every and done % cfg.sample_every == 0:
                self._sample_grid(done)
            if done % cfg.checkpoint_every == 0:
                self._checkpoint(done)
        log.close()
        self._checkpoint(max(cfg.steps, start))
        self._export()
        grid = self._sample_grid(max(cfg.steps, start))
        self.acc.end_training()
        if grid is not None:
            log.message(f"samples: {grid}")
        return self.run_dir

    # -- setup -------------------------------------------------------------------------
    def _setup(self) -> None:
        recipe, acc = self.recipe, self.acc
        set_seed(recipe.train.seed)
        self.dataset = build_dataset(recipe.data, "train")
        self.shape = (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)
        self.family = build_family(recipe, self.shape, self.dataset.num_classes)
        if getattr(recipe.model, "init_from", None):
            init_from_run(self.family, recipe.model.init_from)
        if recipe.train.gradient_checkpointing:
            if not hasattr(self.family, "enable_gradient_checkpointing"):
                raise ConfigError(f"train.gradient_checkpointing: family '{recipe.model.family}' does not support it")
            self.family.enable_gradient_checkpointing()
        self.raw = nn.ModuleDict(dict(self.family.nets))  # unwrapped view for EMA and checkpoints
        for name in list(self.family.nets):
            self.family.nets[name] = acc.prepare(self.family.nets[name])
        self._setup_optimizers()
        self.dl = acc.prepare(self._dataloader())
        decay = recipe.train.ema_decay
        self.ema = EMA(self.raw, decay, recipe.train.ema_warmup) if decay else None

    def _setup_optimizers(self) -> None:
        groups = self.family.param_groups()
        check_groups(groups, self.recipe.optim, self.recipe.model.family)
        self.optimizers, self.schedulers = {}, {}
        for group, params in groups.items():
            opt = build_optimizer(params, self.recipe.optim.get(group, OptimConfig()))
            self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.recipe.train))
            self.optimizers[group] = self.acc.prepare(opt)
        self.handle = OptimHandle(self.acc, self.optimizers, self.schedulers, groups,
                                  self.recipe.train.clip_grad, self.recipe.train.seed)

    def _dataloader(self) -> DataLoader:
        data, world = self.recipe.data, self.acc.num_processes
        if len(self.dataset) < data.batch_size * world:
            raise DataError(f"data: {len(self.dataset)} images, fewer than one global batch "
                            f"({data.batch_size} x {world} processes): lower data.batch_size")
        return DataLoader(self.dataset, batch_size=data.batch_size, shuffle=True, drop_last=True,
                          num_workers=data.num_workers)

    def _batches(self, position: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches from micro-batch `position` on: epoch = position // len, then skip."""
        epoch, offset = divmod(position, len(self.dl))
        while True:
            self.dl.set_epoch(epoch)
            yield from (self.acc.skip_first_batches(self.dl, offset) if offset else self.dl)
            epoch, offset = epoch + 1, 0

    # -- one step ----------------------------------------------------------------------
    def _train_step(self, step: int, batches: Iterator) -> dict[str, torch.Tensor]:
        """grad_accum micro-batches through the family's train_step, then EMA."""
        self.handle.stepped.clear()
        logs = {}
        for micro in range(self.recipe.train.grad_accum):
            with torch.random.fork_rng(devices=[]):  # loaders draw seeds from the global RNG on
                batch = next(batches)                # (re)start; keep it for dropout, resume-exact
            self.handle.begin(step, micro)
            if self.recipe.data.hflip:
                batch = dict(batch, image=self._hflip(batch["image"]))
            with self.acc.accumulate(*self.family.nets.values()):
                logs = self.family.train_step(batch, step, self.handle)
        if not self.handle.stepped:
            raise GenkitError(f"family '{self.recipe.model.family}' stepped no optimizer at step {step}")
        if self.ema is not None:
            self.ema.update(self.raw)
        return logs

    def _hflip(self, images: torch.Tensor) -> torch.Tensor:
        """Random horizontal flips drawn from the global-batch stream (resume- and rank-exact)."""
        flip = (self.handle.rand(images.shape[0]) < 0.5).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)

    def lr(self) -> float:
        return next(iter(self.schedulers.values())).get_last_lr()[0]

    # -- run folder --------------------------------------------------------------------
    def _write_config(self) -> None:
        if self.acc.is_main_process:
            write_text(self.run_dir / "config.yaml", dump_recipe(self.recipe))

    def _state(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "num_classes": self.dataset.num_classes,
                "family": self.recipe.model.family,
                "ema_updates": self.ema.updates if self.ema else 0}

    def _checkpoint(self, step: int) -> None:
        state = dict(self._state(), position=step * self.recipe.train.grad_accum)
        save_checkpoint(self.ckpt_root, step, self.acc, self.raw, self.ema, self.optimizers,
                        self.schedulers, state, self.recipe.train.keep_last)

    def _restore(self) -> int:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            raise RunError(f"cannot resume: no checkpoint under '{self.ckpt_root}'")
        state = load_checkpoint(path, self.acc, self.raw, self.ema, self.optimizers, self.schedulers)
        if self.acc.is_main_process:
            truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
        return state["step"]

    @contextlib.contextmanager
    def _eval_weights(self):
        """Unwrapped networks carrying the EMA weights, for sampling on one process."""
        wrapped = dict(self.family.nets)
        for name, net in self.raw.items():
            self.family.nets[name] = net
        try:
            with self.ema.applied(self.raw) if self.ema else contextlib.nullcontext():
                yield
        finally:
            for name, net in wrapped.items():
                self.family.nets[name] = net

    def _sample_grid(self, step: int) -> Path | None:
        s = self.recipe.sample
        path = None
        if self.acc.is_main_process:
            with self._eval_weights():
                generator = torch.Generator().manual_seed(s.seed)
                images = self.family.generate(s.n, generator=generator, sampler=s.sampler, steps=s.steps,
                                              **sampler_options(self.family, s))
            path = save_grid(images, self.run_dir / "samples" / f"step-{step}.png")
        self.acc.wait_for_everyone()
        return path

    def _export(self) -> None:
        """model/: final (EMA) weights as safetensors with the resolved recipe, plus genkit.json."""
        if self.acc.is_main_process:
            self._write_weights(self.run_dir / "model")
        self.acc.wait_for_everyone()

    def _write_weights(self, folder: Path, **info: Any) -> None:
        weights = dict(self.raw.state_dict())
        if self.ema is not None:
            weights.update(self.ema.state_dict())
        with atomic_dir(folder) as tmp:
            save_tensors(tmp / "weights.safetensors", weights,
                         metadata={"genkit_config": dump_recipe(self.recipe), "genkit_version": __version__})
            write_json(tmp / "genkit.json", dict(self._state(), genkit_version=__version__,
                                                 ema=self.ema is not None, **info))

    def _evaluate(self, step: int, log: TrainLogger) -> None:
        """FD vs the training data (recipe's eval section); best/ keeps the lowest-FD weights."""
        if self.acc.is_main_process:
            from genkit.eval.in_training import TrainingEvaluator

            if self.evaluator is None:
                self.evaluator = TrainingEvaluator(self.recipe, self.run_dir, self.dataset, self.acc.device)
            with self._eval_weights():
                fd = self.evaluator.frechet(self.family, seed=self.recipe.sample.seed)
            log.write(step, {self.evaluator.key: fd})
            log.message(f"step {step}: {self.evaluator.key} {fd:.5g}")
            best = self.run_dir / "best" / "genkit.json"
            best_fd = json.loads(best.read_text())["fd"] if best.exists() else float("inf")
            if self.recipe.eval.best and fd < best_fd:
                self._write_weights(self.run_dir / "best", fd=fd, step=step, fd_key=self.evaluator.key)
        self.acc.wait_for_everyone()
