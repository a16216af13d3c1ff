"""Several processes (``torchrun``): PyTorch DistributedDataParallel, NCCL on GPUs, gloo on CPU.

Every process holds the data and draws the same global batch; each takes its shard of it. Per-class
and per-group statistics are summed across processes, so a distributed run computes what one
process with the same global batch computes. Model buffers (BatchNorm running statistics) are the
first process's, which every process takes after each step. Helpers here are no-ops in a single
process."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def all_reduce_max(t: Tensor) -> Tensor:
    """Elementwise maximum of a tensor over processes (in place, and returned); identity in one
    process."""
    if active():
        dev = t.device
        x = t if (dist.get_backend() != "nccl" or dev.type == "cuda") else t.cuda()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        if x is not t:
            t.copy_(x.to(dev))
    return t


def broadcast_from_first(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` (the same list, in the same order, in every process) with the first
    process's values; one broadcast per dtype and device. A no-op in one process."""
    if not active() or not tensors:
        return
    nccl = dist.get_backend() == "nccl"
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for (_, dev), group in groups.items():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            if nccl and dev.type != "cuda":
                flat = flat.cuda()
            dist.broadcast(flat, src=0)
            flat = flat.to(dev)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def gather_into_first(tensors: list[Tensor]) -> None:
    """Sums kept in parts by every process: move each whole sum into the first process and zero
    the other processes' parts (their sum over processes is unchanged). A checkpoint, written by
    the first process, then holds the whole sums; a no-op in one process."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            all_reduce_sum(t)
            if rank() != 0:
                t.zero_()


def barrier() -> None:
    if active():
        dist.barrier()


def shard(idx: Tensor) -> Tensor:
    """This process's share of a global batch of indices."""
    return idx[rank() :: world_size()] if active() else idx


class _SumOverProcesses(torch.autograd.Function):
    """Sum over processes whose backward pass sums the gradients over processes too."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # noqa: ANN401
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ANN401
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are taken over the whole global batch, for CPU
    processes (gloo), where ``torch.nn.SyncBatchNorm`` does not run. The per-channel sums, sums of
    squares and counts are summed over processes by a differentiable all-reduce, so the backward
    pass also spans every process, as in one process with the global batch. Parameter and buffer
    names are those of ``BatchNorm``: checkpoints load in either."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (got {x.dim()})")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.size(1)
        dims = [0] + list(range(2, x.dim()))
        n_local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = _SumOverProcesses.apply(torch.cat([x.sum(dims), (x * x).sum(dims), n_local]))
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1  # type: ignore[operator]
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)  # type: ignore[union-attr]
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``model`` synchronised across processes: ``torch.nn.SyncBatchNorm``
    on GPUs, :class:`CPUSyncBatchNorm` on CPU (gloo). Weights and buffers are kept."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not on_cpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
