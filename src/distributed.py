"""torch.distributed in two helpers' worth of code: set-up under torchrun, and gathering.

Launched by `torchrun`, each process finds RANK, WORLD_SIZE and LOCAL_RANK in its
environment; launched plainly, the run is a single process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True outside torchrun and in its rank 0 (readable before the process group exists)."""
    return "WORLD_SIZE" not in os.environ or os.environ.get("RANK", "0") == "0"


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on the CPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    if info.enabled and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` in a single process)."""
    out: list[Any] = [obj] * info.world_size
    if info.enabled:
        dist.all_gather_object(out, obj)
    return out


def sum_across_ranks(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()
