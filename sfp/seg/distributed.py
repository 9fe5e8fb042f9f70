"""Process groups for multi-GPU / multi-node evaluation (``torchrun ... -m sfp eval``).

Nothing is initialised unless ``WORLD_SIZE > 1`` (set by torchrun); then the default group is
created from the ``env://`` variables with backend ``nccl`` when the ranks run on CUDA, else
``gloo``. A single process gets a :class:`DistContext` with ``world_size == 1`` and every
collective below is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "rank_device", "shard"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``; ``backend`` None when alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of an int64/float64 array (same shape on every rank)."""
        if not self.enabled:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group (if this context created one)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes, or return a single-process context.

    With ``WORLD_SIZE > 1``: backend ``nccl`` when CUDA is available and ``device`` is None
    or a CUDA device (each rank then uses ``cuda:LOCAL_RANK``), else ``gloo``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def rank_device(ctx: DistContext, device: str | None) -> str | None:
    """The device a rank should load the model on: ``cuda:LOCAL_RANK`` under nccl when no
    explicit device index was asked for, else ``device`` unchanged."""
    if ctx.backend == "nccl" and (device is None or device == "cuda"):
        return f"cuda:{ctx.local_rank}"
    return device


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share: items ``rank, rank + world_size, ...``."""
    return list(items[ctx.rank :: ctx.world_size])
