"""The trainer's contracts: accumulation, per-group optimizers, exact resume, atomic checkpoints."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from conftest import TINY_UNET
from toy_family import Toy, ToyConfig

import genkit
from genkit.data import build_dataset
from genkit.errors import GenkitError, RunError
from genkit.io import load_tensors, load_torch
from genkit.runs import latest_checkpoint, list_checkpoints, load_recipe, recipe_from_dict


def toy_recipe(batch=8, accum=1, steps=2, two_groups=False, optim="sgd", lr=0.1, **train):
    groups = ["a", "b"] if two_groups else ["model"]
    return recipe_from_dict({
        "name": "toy",
        "model": {"family": "toy", "two_groups": two_groups},
        "data": {"source": "digits", "image_size": 8, "batch_size": batch},
        "optim": {g: {"name": optim, "lr": lr, "betas": [0.0, 0.999]} for g in groups},
        "train": {"steps": steps, "grad_accum": accum, "clip_grad": None, "ema_decay": None,
                  "checkpoint_every": 100, "log_every": 1, **train},
        "sample": {"n": 4},
    })


def final_weights(run):
    return load_tensors(run / "model" / "weights.safetensors")


def test_accumulation_equals_larger_batch(tmp_path, toy_family):
    a = genkit.train(toy_recipe(batch=8, accum=2, steps=3), out=tmp_path / "accum")
    b = genkit.train(toy_recipe(batch=16, accum=1, steps=3), out=tmp_path / "big")
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # and accumulation is not a no-op: one micro-batch of 8 trains differently
    c = genkit.train(toy_recipe(batch=8, accum=1, steps=3), out=tmp_path / "small")
    assert any(not torch.allclose(wa[k], final_weights(c)[k], atol=1e-6) for k in wa)


def _expected_two_group_update(recipe, lr):
    """One SGD step per group on the mean gradient of two micro-batches, each group's own loss."""
    set_seed(recipe.train.seed)
    fam = Toy(ToyConfig(two_groups=True), (1, 8, 8))
    data = build_dataset(recipe.data, "train")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(recipe.train.seed))
    B = recipe.data.batch_size
    grads = {name: [torch.zeros_like(p) for p in fam.nets[name].parameters()] for name in ("a", "b")}
    for micro in range(2):
        x = torch.stack([data[int(i)]["image"] for i in perm[micro * B:(micro + 1) * B]])
        losses = fam.losses(x)
        for name, loss in (("a", losses["loss_a"]), ("b", losses["loss_b"])):
            params = list(fam.nets[name].parameters())
            for g, dg in zip(grads[name], torch.autograd.grad(loss, params, retain_graph=True)):
                g += dg / 2
    return {f"{name}.{k}": p - lr * grads[name][i]
            for name in ("a", "b") for i, (k, p) in enumerate(fam.nets[name].named_parameters())}


def test_two_groups_step_once_per_accumulation_on_their_own_loss(tmp_path, toy_family):
    recipe = toy_recipe(batch=8, accum=2, steps=1, two_groups=True, lr=0.5)
    run = genkit.train(recipe, out=tmp_path / "two")
    got = final_weights(run)
    want = _expected_two_group_update(recipe, 0.5)
    for k in want:
        torch.testing.assert_close(got[k], want[k].detach(), rtol=1e-5, atol=1e-6)


def test_each_optimizer_steps_once_per_trainer_step(tmp_path, toy_family):
    recipe = toy_recipe(batch=8, accum=3, steps=2, two_groups=True, optim="adam", lr=1e-3, warmup=4)
    run = genkit.train(recipe, out=tmp_path / "adam")
    ckpt = latest_checkpoint(run / "checkpoints")
    for group in ("a", "b"):
        state = load_torch(ckpt / f"optim-{group}.pt")["state"]
        assert all(int(s["step"]) == 2 for s in state.values())
    # the LR schedule advanced once per optimizer step: warmup factor (2 + 1) / 4 after 2 steps
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["lr"] == pytest.approx(1e-3 * 3 / 4)


def ddpm_recipe(steps, **extra):
    overrides = [*TINY_UNET, "data.image_size=8", "data.batch_size=8", "data.hflip=true",
                 "model.unet.dropout=0.1", f"train.steps={steps}", "train.checkpoint_every=3",
                 "train.keep_last=10", "train.lr_schedule=constant", "train.warmup=2",
                 "train.sample_every=0", "train.log_every=1", "sample.n=4", "sample.steps=2",
                 "model.timesteps=50", *[f"{k}={v}" for k, v in extra.items()]]
    return load_recipe("ddpm_digits", overrides)


def test_resume_equals_uninterrupted(tmp_path):
    straight = genkit.train(ddpm_recipe(6), out=tmp_path / "straight")
    genkit.train(ddpm_recipe(3), out=tmp_path / "stopped")
    resumed = genkit.train(ddpm_recipe(6), out=tmp_path / "stopped", resume=True)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (latest_checkpoint(r / "checkpoints") for r in (straight, resumed))
    for k, v in load_tensors(sa / "nets.safetensors").items():
        assert torch.equal(v, load_tensors(sb / "nets.safetensors")[k]), k
    # the resumed run's log has each step once
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_resume_from_a_copied_mid_run_checkpoint(tmp_path):
    straight = genkit.train(ddpm_recipe(6), out=tmp_path / "straight")
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    shutil.rmtree(copy / "checkpoints" / "step-6")
    shutil.rmtree(copy / "model")
    genkit.train(ddpm_recipe(6), out=copy, resume=True)
    a, b = final_weights(straight), final_weights(copy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_checkpoint_saves_keep_training_and_the_last_good_one(tmp_path, monkeypatch, toy_family):
    import genkit.training.checkpoint as ckpt

    real = ckpt.save_tensors

    def dying_at(step):
        def save(path, tensors, metadata=None):
            if f"step-{step}" in str(path):
                raise OSError(28, "No space left on device (simulated)")
            return real(path, tensors, metadata)
        return save

    recipe = lambda: toy_recipe(steps=6, checkpoint_every=2, keep_last=5)  # noqa: E731
    # a failed mid-run save warns, leaves no partial folder, and training goes on from memory
    monkeypatch.setattr(ckpt, "save_tensors", dying_at(4))
    run = genkit.train(recipe(), out=tmp_path / "mid")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-6"]
    monkeypatch.setattr(ckpt, "save_tensors", real)
    clean = genkit.train(recipe(), out=tmp_path / "clean")
    a, b = (load_tensors(r / "checkpoints" / "step-6" / "nets.safetensors") for r in (run, clean))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # a failed final save is an error naming the folder; the last good checkpoint stays whole
    monkeypatch.setattr(ckpt, "save_tensors", dying_at(6))
    with pytest.raises(RunError, match=r"cannot write checkpoint '.*step-6'.*simulated"):
        genkit.train(recipe(), out=tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "final" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    monkeypatch.setattr(ckpt, "save_tensors", real)
    genkit.train(toy_recipe(steps=6, checkpoint_every=2, keep_last=5), out=tmp_path / "final", resume=True)
    assert [p.name for p in list_checkpoints(tmp_path / "final" / "checkpoints")] == ["step-2", "step-4", "step-6"]


def test_keep_last_prunes_old_checkpoints(tmp_path, toy_family):
    run = genkit.train(toy_recipe(steps=5, checkpoint_every=1, keep_last=2), out=tmp_path / "k")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-4", "step-5"]


def test_run_folder_is_not_overwritten(tmp_path, toy_family):
    run = genkit.train(toy_recipe(steps=1), out=tmp_path / "r")
    with pytest.raises(RunError, match="--resume"):
        genkit.train(toy_recipe(steps=1), out=run)
    with pytest.raises(RunError, match="does not exist"):
        genkit.train(toy_recipe(steps=1), out=tmp_path / "missing", resume=True)


def test_non_finite_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(tmp_path, toy_family):
    # lr 1e6 without clipping diverges within a few steps; log only every 50 steps, checkpoint every 1:
    # the check before each checkpoint still catches the first non-finite step
    recipe = toy_recipe(steps=30, lr=1e6, clip_grad=None, log_every=50, checkpoint_every=1, keep_last=100)
    with pytest.raises(GenkitError, match=r"loss term 'loss' is not finite \(nan/inf\) at step (\d+)") as info:
        genkit.train(recipe, out=tmp_path / "nan")
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    ckpts = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert ckpts and int(ckpts[-1].name.split("-")[1]) == bad - 1  # every kept checkpoint is before it
    weights = load_tensors(ckpts[-1] / "nets.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_on_nan_skip_skips_the_bad_steps_and_counts_them(tmp_path, toy_family, monkeypatch):
    real_step = Toy.train_step

    def poisoned(self, batch, step, opt):  # a NaN loss at steps 2 and 3 only
        if step in (2, 3):
            batch = dict(batch, image=batch["image"] * float("nan"))
        return real_step(self, batch, step, opt)

    monkeypatch.setattr(Toy, "train_step", poisoned)
    run = genkit.train(toy_recipe(steps=6, on_nan="skip", log_every=1), out=tmp_path / "skip")
    weights = load_tensors(run / "model" / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps_model", 0) for r in records] == [0, 0, 1, 2, 2, 2]


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, toy_family):
    fp32 = final_weights(genkit.train(toy_recipe(steps=3), out=tmp_path / "fp32"))
    bf16 = final_weights(genkit.train(toy_recipe(steps=3, precision="bf16"), out=tmp_path / "bf16"))
    for k in fp32:
        assert bf16[k].dtype == torch.float32
        torch.testing.assert_close(bf16[k], fp32[k], rtol=0, atol=0.05)  # bf16 matmuls: close
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32)  # but autocast really ran


def test_in_training_fd_is_logged_and_best_kept(tmp_path):
    run = genkit.train(ddpm_recipe(4, **{"train.eval_every": 2, "eval.n": 16, "eval.batch_size": 8,
                                         "eval.best": "true"}), out=tmp_path / "ev")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fds = {r["step"]: r["fd_digits"] for r in records if "fd_digits" in r}
    assert sorted(fds) == [2, 4] and all(v > 0 for v in fds.values())
    best = json.loads((run / "best" / "genkit.json").read_text())
    assert best["fd"] == min(fds.values()) and best["step"] == min(fds, key=fds.get)
    assert (run / "eval" / "reference-digits.npz").exists()  # cached reference statistics


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("radam", torch.optim.RAdam), ("rmsprop", torch.optim.RMSprop),
                                       ("sgd", torch.optim.SGD)])
def test_each_optimizer_name_builds_its_torch_optimizer_with_the_recipe_settings(name, cls):
    from genkit.config import OptimConfig
    from genkit.training.handle import build_optimizer

    recipe = load_recipe("cm_digits", [f"optim.model.name={name}", "optim.model.lr=3e-4", "optim.model.betas=[0.5,0.9]",
                                       "optim.model.weight_decay=0.01"])
    cfg = recipe.optim["model"]
    assert isinstance(cfg, OptimConfig) and cfg.name == name
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    group = opt.param_groups[0]
    assert type(opt) is cls and group["lr"] == 3e-4 and group["weight_decay"] == 0.01
    assert group.get("betas", (group.get("momentum"), None))[0] == 0.5 or name == "rmsprop"
