"""Process-group set-up and model wrapping for DDP and FSDP2, with torch.distributed only.

`torchrun --nproc-per-node N -m cogview.cli train ...` (or `cogview` itself under torchrun) sets
RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` then joins the group: nccl with one GPU per local
rank when CUDA is used, gloo on CPU. A single process (no WORLD_SIZE, or 1) runs without a group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "wrap_model", "unwrap_model", "all_reduce_sum",
           "all_reduce_max", "barrier", "broadcast_object"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # this process group was created by init_distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda") and not preference.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {preference}: CUDA is not available in this torch build / machine")
    if preference.startswith("cuda:"):
        return torch.device(preference)
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world_size, rank = dist.get_world_size(), dist.get_rank()
            return DistEnv(rank, world_size, local_rank, dev, dist.get_backend(), False)
        return DistEnv(0, 1, 0, dev, None, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), owns)


def shutdown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, env: DistEnv, mode: str, shard_units=()) -> nn.Module:
    """DDP(module) or FSDP2 (fully_shard each of `shard_units`, then the root) when running on several
    processes; the module itself otherwise."""
    if not env.distributed:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import warnings

        ids = [env.device.index] if env.device.type == "cuda" else None
        # Buffers (the VQ-VAE codebook) are kept identical by the modules themselves (all-reduced EMA),
        # so DDP need not broadcast them before every forward.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DDP(module, device_ids=ids, broadcast_buffers=False)
    if mode == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # The units' outputs (attention/MLP branches) are views, but every consumer (add_layer_norm) is
        # out of place, so the pre-backward hook FSDP registers on them is never bypassed.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        for unit in shard_units:
            fully_shard(unit)
        fully_shard(module)
        return module
    raise ValueError(f"--distributed must be ddp or fsdp, got {mode!r}")


def unwrap_model(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return module.module if isinstance(module, DDP) else module


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
