"""Sharded training (FSDP2 `fully_shard`, genkit.training.sharding): selected by the launch, refused
where it cannot work, and checkpoints that gather to the unsharded layout.

The fast tests run `fully_shard` in this process on a one-process gloo group; the slow ones train
under torchrun with 2 CPU processes (Accelerate reports MULTI_CPU there, so genkit's own
`fully_shard` path is what runs; the Accelerate FSDP path needs GPUs, docs/accelerate.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_cli
from torch import nn

import genkit
from genkit.errors import ConfigError
from genkit.io import load_tensors, load_torch
from genkit.runs import load_recipe
from genkit.training import sharding
from genkit.training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def test_sharding_is_selected_by_the_launch_and_fsdp1_is_refused():
    assert sharding.sharding_requested(FSDP2)
    assert not sharding.sharding_requested({})
    assert not sharding.sharding_requested({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"})
    with pytest.raises(ConfigError, match="FSDP version 1 .*fsdp_version: 2"):
        sharding.sharding_requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_mixed_precision_follows_train_precision():
    bf16, fp32 = sharding.mixed_precision_policy("bf16"), sharding.mixed_precision_policy("no")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert sharding.mixed_precision_policy("fp16").param_dtype == torch.float16
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)


def test_a_family_that_cannot_be_sharded_is_refused_with_its_name_and_why(monkeypatch):
    monkeypatch.setitem(sharding.NOT_SHARDABLE, "toy", "its loss takes a JVP")
    with pytest.raises(ConfigError, match="family 'toy' cannot be trained sharded .*: its loss takes a JVP; .*DDP"):
        sharding.check_shardable("toy")
    sharding.check_shardable("ddpm")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 3)])
        self.out = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 1.5))  # a float buffer (as Glow's LU factors): never sharded

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(x) * self.scale


@pytest.fixture
def group(tmp_path):
    """A one-process gloo group (fully_shard needs one), torn down after the test."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trained(shard: bool) -> tuple[nn.ModuleDict, torch.optim.Optimizer, EMA]:
    torch.manual_seed(0)
    nets = nn.ModuleDict({"a": Net(), "b": nn.Linear(2, 1)})
    if shard:
        sharding.shard_nets(nets, "no", torch.device("cpu"), 1)
    params = [*nets["b"].parameters(), *nets["a"].parameters()]  # not in module order: indices must follow the optimizer
    opt = torch.optim.Adam(params, lr=0.1)
    ema = EMA(nets, 0.5, warmup=False)
    for k in range(2):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(k))
        nets["b"](nets["a"](x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(nets)
    return nets, opt, ema


def test_sharded_state_gathers_to_the_unsharded_layout_and_loads_back(group):
    plain, plain_opt, plain_ema = trained(False)
    nets, opt, ema = trained(True)
    assert sharding.is_sharded(nets) and not sharding.is_sharded(plain)
    assert [type(m).__name__ for m in nets["a"].blocks][0].startswith("FSDP")  # a block is a unit of its own
    full, want = sharding.full_model_state(nets), plain.state_dict()
    assert full.keys() == want.keys() and all(torch.allclose(full[k], want[k]) for k in want)
    state, want_state = sharding.full_optimizer_state(nets, opt), plain_opt.state_dict()
    assert state["param_groups"] == want_state["param_groups"]
    for i, entry in want_state["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(state["state"][i][key].cpu(), value)
    shadows = sharding.full_tensors(ema.state_dict())
    assert all(torch.allclose(shadows[k], plain_ema.state_dict()[k]) for k in shadows)
    # back into fresh sharded networks, optimizer and EMA: the same state
    fresh, fresh_opt, fresh_ema = trained(True)
    for p in fresh.parameters():
        p.data.zero_()
    sharding.load_full_model_state(fresh, want)
    sharding.load_full_optimizer_state(fresh, fresh_opt, want_state)
    fresh_ema.load_state_dict(plain_ema.state_dict(), 2)
    assert all(torch.allclose(v, want[k]) for k, v in sharding.full_model_state(fresh).items())
    again = sharding.full_optimizer_state(fresh, fresh_opt)
    torch.testing.assert_close(again["state"][0]["exp_avg"], want_state["state"][0]["exp_avg"])
    assert all(torch.allclose(v, plain_ema.state_dict()[k]) for k, v in sharding.full_tensors(fresh_ema.state_dict()).items())
    assert sharding.all_finite(list(nets.parameters()))
    with torch.no_grad():
        nets["b"].weight.to_local()[0, 0] = float("nan")
    assert not sharding.all_finite(list(nets.parameters()))


# -- torchrun, 2 processes on CPU (gloo) ---------------------------------------------------------
TINY = ["model.unet.channels=[8,16]", "model.unet.attention=[false,true]", "model.unet.layers_per_block=1",
        "model.unet.norm_groups=4", "data.image_size=8", "train.sample_every=0", "sample.steps=2", "sample.n=4",
        "model.timesteps=50", "data.hflip=true", "train.log_every=1", "train.checkpoint_every=2",
        "train.keep_last=10", "model.unet.dropout=0.0"]


def launch(procs: int, *args: str, shard: bool = True) -> subprocess.CompletedProcess:
    """`genkit ARGS` under torchrun with `procs` processes, sharded (an FSDP2 launch's environment) or not."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    for key in FSDP2:
        env.pop(key, None)
    env.update(FSDP2 if shard else {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "genkit.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train(out: Path, procs: int, batch: int, steps: int, *extra: str, shard: bool = True,
          resume: bool = False) -> Path:
    launch(procs, "train", "ddpm_digits", "--out", str(out), *TINY, f"data.batch_size={batch}", f"train.steps={steps}",
           *extra, *(["--resume"] if resume else []), shard=shard)
    return out


def checkpoint(run: Path, step: int) -> dict[str, dict]:
    folder = run / "checkpoints" / f"step-{step}"
    return {"nets": load_tensors(folder / "nets.safetensors"), "ema": load_tensors(folder / "ema.safetensors"),
            "optim": load_torch(folder / "optim-model.pt")}


@pytest.mark.slow
def test_sharded_two_processes_train_like_one_at_twice_the_batch_and_checkpoint_the_same_layout(tmp_path):
    sharded = train(tmp_path / "sharded", 2, 8, 4)
    one = train(tmp_path / "one", 1, 16, 4, shard=False)
    a, b = checkpoint(sharded, 4), checkpoint(one, 4)
    for part in ("nets", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5)
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for i, entry in b["optim"]["state"].items():
        for key, value in entry.items():  # Adam's moments, gathered to full tensors in torch.optim's layout
            torch.testing.assert_close(a["optim"]["state"][i][key], value, rtol=1e-3, atol=1e-6)
    r = run_cli("sample", str(sharded), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr  # sample works on it unchanged


@pytest.mark.slow
def test_sharded_resume_is_exact_and_portable_to_one_unsharded_process(tmp_path):
    straight = train(tmp_path / "straight", 2, 8, 6)
    stopped = train(tmp_path / "stopped", 2, 8, 4)
    train(stopped, 2, 8, 6, resume=True)
    wa, wb = (load_tensors(r / "model" / "weights.safetensors") for r in (stopped, straight))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise: nets and EMA
    moved = train(tmp_path / "moved", 2, 8, 4)
    train(moved, 1, 16, 6, "data.batch_size=16", shard=False, resume=True)  # 2 sharded -> 1 plain process
    a, b = checkpoint(moved, 6), checkpoint(straight, 6)
    for k in b["nets"]:
        torch.testing.assert_close(a["nets"][k], b["nets"][k], rtol=1e-4, atol=1e-5)


def test_sharding_refuses_in_training_evaluation_with_one_line(tmp_path, monkeypatch):
    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    recipe = load_recipe("ddpm_digits", [*TINY, "train.eval_every=2", "train.steps=2"])
    with pytest.raises(ConfigError, match="train.eval_every: not supported with sharded .FSDP2. training yet"):
        genkit.train(recipe, out=tmp_path / "e")
