"""Checkpoints written atomically and read back with `weights_only=True`.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so loading it never
runs pickled code. `last.pt` carries everything a resumed run needs; `best.pt` the best
weights and the epoch they come from.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.errors import CheckpointError


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed while writing leaves its temporary file; only one process (rank 0)
    # writes a run's checkpoints, so any such file here is stale.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
