"""Checkpoints written atomically and read back with `weights_only=True`.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so loading it never
runs pickled code. `last.pt` carries everything a resumed run needs; `best.pt` the best
weights and the epoch they come from.

`BackgroundWriter` takes the writing off the training's critical path: the caller hands it a
copy (`cpu_copy`) and a background thread does `torch.save`, fsync and rename.
"""

from __future__ import annotations

import copy
import random
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from load_dataset.utils import atomic_file
from src.errors import CheckpointError


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` with `torch.save` through `atomic_file`: a crash at any moment leaves
    either the old file or the new one, never half of one; the mode follows the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed while writing leaves its temporary file; only one process (rank 0)
    # writes a run's checkpoints, so any such file here is stale.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


_IMMUTABLE = frozenset({int, float, bool, str, bytes, type(None)})


def cpu_copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """A copy of `obj` that nothing the training does afterwards can change: tensors copied to
    the CPU (a CUDA tensor's copy waits for the GPU), dicts, lists and tuples rebuilt, other
    values deep-copied. A state dict's `_metadata` (module versions, which `load_state_dict`
    reads) is kept; an object reached twice (the weights of best.pt and last.pt) is copied once."""
    if type(obj) in _IMMUTABLE:  # most of a state: the history's and the RNGs' numbers
        return obj
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out: Any = obj.detach().to("cpu", copy=True)
    elif type(obj) in (dict, OrderedDict):
        out = type(obj)((k, cpu_copy(v, memo)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
    elif type(obj) in (list, tuple):
        out = type(obj)(cpu_copy(v, memo) for v in obj)
    else:  # numbers, strings, and what a part's state_dict may hold besides
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out


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
        thread = threading.Thread(target=self._write, args=(files,), name="checkpoint-writer")
        thread.start()
        self._thread = thread

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
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].copy()),
            *map(float, np_state[2:]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_problem(state: Any) -> str | None:
    """What is wrong with a checkpoint's `rng` (as `rng_state` wrote it), naming the part
    (`'rng.numpy'`), or None when every generator accepts its state."""
    try:
        _checked_rng_state(state)
    except ValueError as e:
        return str(e)
    return None


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators of `rng_state`; ValueError naming the part when one is not a
    generator state, before any generator is changed."""
    python, numpy, cpu, cuda = _checked_rng_state(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    # A checkpoint from a machine with more GPUs: the generators this one has.
    for index, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


def _checked_rng_state(state: Any) -> tuple[tuple, tuple, torch.Tensor, list[torch.Tensor]]:
    """The states of `rng_state` as each generator's setter takes them, each tried on a
    generator of its own first; ValueError naming the part that is missing or malformed.
    Whatever a setter raises means the same (the state is not one), hence `except Exception`."""
    if not isinstance(state, dict):
        raise ValueError(f"'rng' is a {type(state).__name__}, not a dict of generator states")
    for part in ("python", "numpy", "torch"):
        if part not in state:
            raise ValueError(f"'rng' has no {part!r} state")
    try:
        version, internal, gauss_next = state["python"]
        python = (version, tuple(internal), gauss_next)
        random.Random().setstate(python)
    except Exception:
        raise ValueError("'rng.python' is not a state of Python's random generator") from None
    try:
        name, keys, pos, has_gauss, cached = state["numpy"]
        if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.uint32):
            raise TypeError  # what `rng_state` stores; NumPy would cast any other
        numpy = (name, keys.numpy(), int(pos), int(has_gauss), float(cached))
        np.random.RandomState().set_state(numpy)
    except Exception:
        raise ValueError("'rng.numpy' is not a state of NumPy's random generator") from None
    cpu = state["torch"]
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8):
        raise ValueError("'rng.torch' is not torch's random state (a uint8 tensor)")
    try:
        torch.Generator().set_state(cpu)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"'rng.torch' is not torch's random state ({reason})") from None
    cuda = state.get("cuda", [])
    if not (
        isinstance(cuda, (list, tuple))
        and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)
    ):
        raise ValueError("'rng.cuda' is not a list of CUDA random states (uint8 tensors)")
    return python, numpy, cpu, list(cuda)
