"""torch.distributed in a few helpers: set-up under torchrun, gathering, and stopping all
ranks when a signal reached only some.

Launched by `torchrun`, each process finds RANK, WORLD_SIZE and LOCAL_RANK in its
environment; launched plainly, the run is a single process and nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import src.interrupts as interrupts

# The key that a rank stopped by Ctrl-C or SIGTERM sets in the process group's store: the signal.
STOPPED_BY = "stopped_by_signal"


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


@contextmanager
def stopping_together() -> Iterator[None]:
    """Ctrl-C or SIGTERM that reaches only some ranks stops the others the same way.

    On several machines a scheduler may signal one launcher only: its ranks stop, and the
    others fail in their next collective call when the stopped ranks' connections close
    (gloo: "Connection closed by peer"). A rank stopped by a signal leaves the signal in the
    process group's store before it goes, and a rank whose call then fails raises that
    interrupt instead of its error: the run ends KILLED with the resume hint, not FAILED.
    A rank that failed on its own (an error, not a signal) leaves nothing: its peers fail.
    """
    try:
        yield
    except BaseException as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        stop, peer = interrupts.stop_of(e), None
        try:
            store = dist.distributed_c10d._get_default_store()  # torch has no public getter
            if stop is not None:
                store.set(STOPPED_BY, str(int(interrupts.signal_of(stop))))
            elif store.check([STOPPED_BY]):
                peer = int(store.get(STOPPED_BY))
        except RuntimeError:  # a DistError: the store went with its host; nothing to tell
            pass
        if peer is None:
            raise
        raise interrupts.interrupt_of(peer) from None


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
