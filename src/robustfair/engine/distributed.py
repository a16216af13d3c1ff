"""Several processes (``torchrun``): PyTorch DistributedDataParallel, NCCL on GPUs, gloo on CPU.

Every process holds the data and draws the same global batch; each takes its shard of it. Per-class
and per-group statistics are summed across processes, so a distributed run computes what one
process with the same global batch computes. Helpers here are no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def init(device_name: str) -> tuple[int, int, torch.device | None]:
    """Start the process group when launched by torchrun; return (rank, world, device or None)."""
    rank, world, local = world_from_env()
    if world <= 1:
        return 0, 1, None
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or \
        device_name.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over processes (in place, and returned); identity in one process."""
    if active():
        dev = t.device
        backend = dist.get_backend()
        x = t if (backend != "nccl" or dev.type == "cuda") else t.cuda()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        if x is not t:
            t.copy_(x.to(dev))
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def shard(idx: Tensor) -> Tensor:
    """This process's share of a global batch of indices."""
    return idx[rank() :: world_size()] if active() else idx
