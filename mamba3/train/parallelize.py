"""Distribution for training: process group, DDP / FSDP2 wrapping, collectives, full state dicts.

The only library file that imports ``torch.distributed``. Model code stays single-device; this
file applies, in order, per-block ``torch.compile`` and then either DDP or FSDP2
(``fully_shard`` on each block, then on the root; torchtitan's order).

Launch with ``torchrun --nproc_per_node N -m mamba3.cli train ...``: gloo on CPU, NCCL on CUDA.
Every rank builds the same model from the same seed, reads its own slice of each global batch
(``mamba3.data.loader.rank_indices``) and gradients are averaged, so N ranks with micro-batch
b give the same update as one process with micro-batch N * b.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_mode(mode: str, info: DistInfo) -> str:
    if mode == "auto":
        return "ddp" if info.enabled else "none"
    if mode in ("ddp", "fsdp") and not info.enabled:
        return "none"  # one process: nothing to shard or synchronise
    return mode


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks (``backbone.layers`` of a LanguageModel)."""
    return model.backbone.layers


def parallelize(model: nn.Module, mode: str, info: DistInfo, compile_blocks: bool = False) -> nn.Module:
    """Compile each block (optional), then wrap: mode "none" | "ddp" | "fsdp"."""
    if compile_blocks:
        for block in blocks_of(model):
            block.compile()  # in place: parameter names (checkpoints, decay groups) stay unchanged
    if mode == "ddp":
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks_of(model):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, mode: str, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps (sync=False)."""
    if mode == "ddp" and not sync:
        with model.no_sync():
            yield
    elif mode == "fsdp":
        model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP, where only
    rank 0 receives them."""
    if mode != "fsdp":
        return ckpt.model_state(unwrap(model)), ckpt.optimizer_state(unwrap(model), optimizer)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    # cpu_offload: the gathered tensors land on rank 0 only; the other ranks get empty dicts.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    names = set(ckpt.model_state_names(model))
    msd = {k: v.contiguous() for k, v in msd.items() if k in names}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return msd, {"state": dict(osd.get("state", {})), "param_groups": list(osd.get("param_groups", []))}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, osd: dict, mode: str) -> None:
    """Inverse of ``full_state`` (every rank passes the full dicts)."""
    if mode != "fsdp":
        ckpt.load_model_state(unwrap(model), msd)
        ckpt.load_optimizer_state(unwrap(model), optimizer, osd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
