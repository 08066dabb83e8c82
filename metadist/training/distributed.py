"""What a worker needs to know about its peers: its rank, how the meta-batch is split, and
the one bucketed all-reduce of meta-gradients per step. Plain ``torch.distributed``: the
process group is started by Ray Train, by ``torchrun``, or not at all (one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 25 * 2**20  # the DDP default bucket size


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n_tasks: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n_tasks`` tasks that worker ``rank`` takes.

    As even as possible: the first ``n_tasks % world_size`` ranks take one task more. A
    rank takes no task (``lo == hi``) when ``n_tasks < world_size`` and ``rank >= n_tasks``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 0:
        raise ValueError(f"n_tasks must be an integer >= 0, got {n_tasks!r}")
    base, extra = divmod(n_tasks, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce_sum(tensors: list[Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[Tensor]:
    """Sum ``tensors`` across workers, packed into flat buckets (one collective per
    ``bucket_bytes``, not one per tensor; a bucket holds one dtype, so every tensor is
    summed in its own). A no-op in a single process."""
    if rank_and_world()[1] == 1:
        return tensors
    buckets: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and (size + nbytes > bucket_bytes or t.dtype != buckets[-1][0].dtype):
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    device = collective_device()
    out: list[Tensor] = []
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
        dist.all_reduce(flat)
        parts = flat.split([t.numel() for t in bucket])
        out.extend(p.view_as(t).to(t.device) for p, t in zip(parts, bucket))
    return out


def collective_device() -> torch.device:
    """Where this process group's collectives run: NCCL reduces CUDA tensors only (so a
    step's loss sums and the evaluation scores, kept on the CPU, travel through the rank's
    GPU), gloo is given CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(tensors: list[Tensor]) -> None:
    """Start every worker from rank 0's parameters, whatever their own seeds gave."""
    if rank_and_world()[1] == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)
