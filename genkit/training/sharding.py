"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) on a family's networks, and the
gathering that keeps genkit's checkpoints full tensors in the unsharded layout.

Selected by the launch, as DDP is: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
sets ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 in every process (under torchrun, set them
yourself). genkit then applies `fully_shard` itself, before the optimizers are built, to each
network's blocks (children with parameters; the members of a ModuleList) and to the network: on GPUs, where Accelerate's
state is FSDP, its `prepare` leaves an FSDP module as it is; on CPU (gloo), where Accelerate reports
MULTI_CPU and has no FSDP path, the same code runs, which is what the CPU tests exercise.

Mixed precision follows `train.precision` (FSDP2's MixedPrecisionPolicy: parameters cast to bf16 or
fp16 for compute, gradients reduced in fp32, fp32 master weights). Checkpoints and model/ hold full
tensors gathered with torch.distributed.checkpoint's `get_model_state_dict` /
`get_optimizer_state_dict` (full_state_dict, offloaded to the CPU of rank 0), optimizer state in
`torch.optim`'s own layout, so a sharded run's folder samples, exports, evaluates and resumes
(sharded or not, any number of processes) as an unsharded run's does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn

from genkit.errors import ConfigError

# family -> why its networks cannot be sharded. Empty: every family with one parameter group trains sharded
# (each probed under torchrun with fully_shard on 2 CPU processes against one process at twice the batch,
# tests/reliability/test_distributed.py); families with two groups (gan, vqgan) are refused by the trainer,
# which sees the groups (`Trainer._setup_optimizers`).
NOT_SHARDABLE: dict[str, str] = {}


def sharding_requested(env: dict[str, str] | None = None) -> bool:
    """Whether the launch asks for FSDP (ACCELERATE_USE_FSDP); FSDP1 (FSDP_VERSION=1) is refused."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").strip().lower() not in ("1", "true", "yes"):
        return False
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"the launch asks for FSDP version {version} (FSDP_VERSION): genkit shards with FSDP2 "
                          "only; set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)")
    return True


def check_shardable(family: str) -> None:
    """Refuse a family whose networks cannot be sharded, naming it and why."""
    if family in NOT_SHARDABLE:
        raise ConfigError(f"family '{family}' cannot be trained sharded (FSDP2): {NOT_SHARDABLE[family]}; "
                          "launch it with DDP (configs/accelerate/multi_gpu.yaml)")


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy for `train.precision`: compute in bf16/fp16, reduce gradients in fp32; `no`: fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def shard_nets(nets: nn.ModuleDict, precision: str, device: torch.device, world: int) -> None:
    """`fully_shard` each network of `nets` in place: its blocks (`_blocks`), then the network."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = mixed_precision_policy(precision)
    for net in nets.values():
        net.to(device)
        for block in _blocks(net):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)


def _blocks(net: nn.Module) -> list[nn.Module]:
    """The units sharded on their own: a network's children with trainable parameters, looking inside
    containers without a forward (ModuleList, ModuleDict) to their members."""
    blocks = []
    for child in net.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            blocks += _blocks(child)
        elif any(p.requires_grad for p in child.parameters()):
            blocks.append(child)
    return blocks


def is_sharded(module: nn.Module) -> bool:
    """Whether any submodule of `module` was sharded with fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(nets: nn.Module) -> dict[str, Tensor]:
    """Every process: the full state dict of `nets` (sharded or not); on rank 0 only when sharded."""
    if not is_sharded(nets):
        return nets.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(nets, options=_options())


def load_full_model_state(nets: nn.Module, state: dict[str, Tensor]) -> None:
    """Load full tensors (every process holds them) into `nets`, sharding them where `nets` is sharded."""
    if not is_sharded(nets):
        nets.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(nets, dict(state), options=StateDictOptions(full_state_dict=True))  # it shards the dict in place


def _param_names(nets: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the indices of torch.optim's state dict)."""
    names = {id(p): name for name, p in nets.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Accelerate's AcceleratedOptimizer."""
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def full_optimizer_state(nets: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Every process: `optimizer`'s state dict in torch.optim's layout (parameters by index), gathered to
    full tensors when sharded (on rank 0 only; {} elsewhere)."""
    inner = _unwrapped(optimizer)
    if not is_sharded(nets):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(nets, inner, options=_options())
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_param_names(nets, inner))}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]}


def load_full_optimizer_state(nets: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state dict in torch.optim's layout (full tensors, on every process) into `optimizer`."""
    inner = _unwrapped(optimizer)
    if not is_sharded(nets):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(nets, inner)
    by_name = {"state": {names[i]: dict(value) for i, value in state["state"].items()},  # sharded in place
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(nets, inner, by_name, options=StateDictOptions(full_state_dict=True))


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every process: sharded tensors (DTensors, e.g. EMA shadows of sharded networks) gathered, on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def local_parts(tensors: list[Tensor]) -> list[Tensor]:
    """This process's shard of each DTensor (sharing its storage, so in-place ops update it), other tensors as
    they are: one list that foreach ops take, where sharded parameters sit next to unsharded buffers."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copy a full tensor into `target`, or into this process's shard of it when `target` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):  # every process holds `full`: take this process's shard, no communication
        local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite; a sharded one's shards are checked on each process and the answer agreed."""
    from torch.distributed.tensor import DTensor

    if not tensors:
        return True
    local = local_parts(tensors)
    flags = torch.stack([torch.isfinite(t).all() for t in local])
    ok = flags.all().to(torch.int32).reshape(1)
    if any(isinstance(t, DTensor) for t in tensors) and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
