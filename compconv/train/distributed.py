"""Process-group helpers for ``torchrun`` (nccl on GPU, gloo on CPU); single-process runs need nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group exists (torchrun / SLURM), even with a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistContext:
    """Joins the process group of torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), exported first from SLURM's
    under submitit; a torchrun process joins a group even when alone, as a multi-GPU run does.
    """
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, enabled=True)


def resolve_device(choice: str, ctx: DistContext) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` on GPUs (one process per GPU), else the CPU.

    Raises:
        ValueError: ``choice`` is ``cuda`` but no GPU is visible.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def wrap_ddp(model: nn.Module, device: torch.device, ctx: DistContext, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel`` for this rank, or the model itself; ``sync_bn`` converts BatchNorms to
    ``nn.SyncBatchNorm`` first (GPUs only). The model must already be on ``device``.
    """
    if not ctx.enabled:
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)


def all_reduce_max(flags: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of a few flags over all ranks (one small collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a list of numbers over all ranks (float64, so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj, ctx: DistContext):
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
