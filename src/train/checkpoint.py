"""Checkpoints written atomically and read back with `weights_only=True`, and the run's lock.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so loading it never
runs pickled code. `last.pt` carries everything a resumed run needs; `best.pt` the best
weights and the epoch they come from.

`BackgroundWriter` takes the writing off the training's critical path: the caller hands it a
copy (`cpu_copy`) and a background thread does `torch.save`, fsync and rename.

`run_lock`: one process per run at a time. A run holds a lock on its results folder from
start (or resume) to end, so the same run resumed twice at once, or resumed while it still
trains, is refused in one line instead of two processes writing the same `last.pt` and
logging every epoch twice. The lock is the kernel's (`flock`): a process that dies, even by
SIGKILL, lets it go.
"""

from __future__ import annotations

import copy
import fcntl
import os
import random
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from load_dataset.utils import atomic_file
from src.errors import CheckpointError

LOCK_NAME = ".lock"


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` with `torch.save` through `atomic_file`: a crash at any moment leaves
    either the old file or the new one, never half of one; the mode follows the umask. A write
    that fails (disk full, folder gone) is one line naming the file, the old file kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed while writing leaves its temporary file; only one process (rank 0)
        # writes a run's checkpoints, so any such file here is stale.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_file(path) as f:
            torch.save(obj, f)
    except Exception as e:
        # torch.save reports a write that failed as a RuntimeError raised while handling it.
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        raise CheckpointError(
            f"The checkpoint {path} could not be written ({error.strerror}); its folder needs "
            "room on its disk and must be writable."
        ) from None


def writable_folder(folder: Path) -> Path:
    """`folder`, made if missing, once a file could be made in it; else one line naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        problem = f"{file} is a file, not a folder" if file else e.strerror
        raise CheckpointError(
            f"The results folder {folder} cannot be written ({problem}); pass another "
            "--results-dir, or make that one a folder you can write to."
        ) from None
    return folder


def cpu_copy(obj: Any) -> Any:
    """A copy of `obj` that nothing the training does afterwards can change: tensors copied to
    the CPU (a CUDA tensor's copy waits for the GPU), the rest deep-copied, a state dict's
    `_metadata` (module versions, which `load_state_dict` reads) with it; an object reached
    twice (the weights of best.pt and last.pt) is copied once."""
    memo: dict[int, Any] = {}
    todo = [obj]
    while todo:  # the tensors' copies first: `deepcopy` takes what `memo` holds as the copy
        item = todo.pop()
        if isinstance(item, torch.Tensor) and id(item) not in memo:
            memo[id(item)] = item.detach().to("cpu", copy=True)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return copy.deepcopy(obj, memo)


class BackgroundWriter:
    """`save_atomic` of a list of (object, path) in a background thread, one list at a time.

    `submit` first waits for the previous list, so at most one write is in flight and the
    files appear in the order given. A write's error (disk full, folder gone) is raised in the
    caller's thread by the next `submit` or `wait`, the exception `save_atomic` would have
    raised. The thread is no daemon: an interpreter that exits still finishes the write; a
    killed process leaves the old file (`atomic_file`). The objects must not change while
    they are written: pass copies (`cpu_copy`).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, files: list[tuple[dict[str, Any], Path]]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(files,), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()  # Ctrl-C may interrupt this: the thread stays to be waited for
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, files: list[tuple[dict[str, Any], Path]]) -> None:
        try:
            for obj, path in files:
                save_atomic(obj, path)
        except BaseException as e:  # handed to the caller's thread
            self._error = e


def resolve_checkpoint(path: str | Path, name: str = "last.pt") -> Path:
    """`path` itself if it is a file, else `path/name` (a run's results folder)."""
    path = Path(path).expanduser()
    candidate = path / name if path.is_dir() else path
    if not candidate.is_file():
        raise CheckpointError(
            f"No checkpoint at {candidate}; pass a run's results folder or its {name} file."
        )
    return candidate


def load_checkpoint(path: str | Path, name: str = "last.pt") -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`) onto the CPU."""
    path = resolve_checkpoint(path, name)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint of this repository ({type(e).__name__}); "
            "pass the last.pt or best.pt that a run wrote."
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this repository.")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as tensors and plain values."""
    name, keys, *numbers = np.random.get_state()
    numpy = [name, torch.from_numpy(keys.copy()), *map(float, numbers)]
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators of `rng_state`; ValueError naming the part when one is not a
    generator state, before any generator is changed."""
    python, numpy, cpu, cuda = checked_rng_state(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    # A checkpoint from a machine with more GPUs: the generators this one has.
    for index, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


def checked_rng_state(state: Any) -> tuple[tuple, tuple, torch.Tensor, list[torch.Tensor]]:
    """The states of `rng_state` as each generator's setter takes them, each tried on a
    generator of its own first; ValueError naming the part that is missing or malformed.
    Whatever a setter raises means the same (the state is not one), hence `except Exception`."""
    if not isinstance(state, dict):
        raise ValueError(f"'rng' is a {type(state).__name__}, not a dict of generator states")
    for part in ("python", "numpy", "torch"):
        if part not in state:
            raise ValueError(f"'rng' has no {part!r} state")
    python, cuda = state["python"], state.get("cuda", [])
    part = "python", "a state of Python's random generator"
    try:
        random.Random().setstate(python)
        part = "numpy", "a state of NumPy's random generator"
        name, keys, pos, has_gauss, cached = state["numpy"]
        keys = keys.numpy().astype(np.uint32, casting="no")  # NumPy itself would cast
        numpy = (name, keys, int(pos), int(has_gauss), float(cached))
        np.random.RandomState().set_state(numpy)
        part = "torch", "torch's random state (a uint8 tensor)"
        torch.Generator().set_state(state["torch"])  # which refuses any other dtype
        part = "cuda", "a list of CUDA random states (uint8 tensors)"
        if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda
        ):
            raise TypeError  # the same as a setter's refusal: not a state of that generator
    except Exception:
        raise ValueError(f"'rng.{part[0]}' is not {part[1]}") from None
    return python, numpy, state["torch"], list(cuda)


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    with open(writable_folder(folder) / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CheckpointError(
                f"The run in {folder} is in use by {holder}; wait for it to end (or stop it) "
                "before resuming it."
            ) from None
        except OSError:  # a file system without locks (some NFS mounts): run unguarded
            pass
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
