"""The training state: one object that saves itself (`state_dict`) and resumes (`load_state_dict`).

Each part (model, optimizer, learning-rate schedule, gradient scaler, random generators) has
`state_dict` / `load_state_dict`, as in torch.distributed.checkpoint's `Stateful`, so a
checkpoint is the list of parts read in one direction and a resume the same list read in the
other. The per-epoch history is stored; what follows from it is not: the last epoch, the best
epoch, the count of bad epochs and whether early stopping has stopped the run.

Early stopping is a pure function of the validation-loss history (`early_stopping_state`):
`val_losses[0]` is epoch 1. The best epoch is the one with the lowest validation loss; an
improvement is strictly lower than the best so far (on a tie the earlier epoch stays best),
and a loss that is not finite (NaN, inf) never improves. Patience 0 turns early stopping
off.

Inside `saves_in_background` a save copies the state and a background thread writes it (at
most one save in flight); leaving that block waits for the last save, so nothing reads a
checkpoint that is still being written.

Epochs count from 1 everywhere a person reads them (printed lines, MLflow steps, `best_epoch`,
plot axes, checkpoints); checkpoints say so with `first_epoch = 1`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

import src.train.checkpoint as ckpt_io
from src.config import (
    RESUME_MAY_CHANGE,
    TRAINING_SECTIONS,
    ExperimentConfig,
    config_mismatch,
    flatten,
)
from src.errors import CheckpointError

FIRST_EPOCH = 1


@dataclass(frozen=True)
class EarlyStoppingState:
    """Where early stopping stands after the epochs seen so far.

    best_epoch: 1-based epoch with the lowest validation loss; 0 when there is none yet
        (no epoch, or no finite loss).
    best_val_loss: that epoch's loss; `math.inf` when there is none.
    bad_epochs: epochs since the best one (0 right after an improvement; every epoch when
        there is no best yet).
    stopped: patience > 0 and bad_epochs >= patience.
    """

    best_epoch: int
    best_val_loss: float
    bad_epochs: int
    stopped: bool


def early_stopping_state(val_losses: Sequence[float], patience: int) -> EarlyStoppingState:
    """The state after epochs 1..len(val_losses), one validation loss per epoch.

    `patience` is how many epochs without a strict improvement end training; 0 never stops.
    """
    if patience < 0:
        raise ValueError(f"patience must be 0 (off) or a positive number of epochs, not {patience}")
    best_epoch, best_loss, bad_epochs = 0, math.inf, 0
    for epoch, loss in enumerate(map(float, val_losses), start=1):
        # A diverged epoch (NaN or inf) must never become the best one to restore.
        if math.isfinite(loss) and loss < best_loss:
            best_epoch, best_loss, bad_epochs = epoch, loss, 0
        else:
            bad_epochs += 1
    stopped = patience > 0 and bad_epochs >= patience
    return EarlyStoppingState(best_epoch, best_loss, bad_epochs, stopped)


def improved_at_last_epoch(val_losses: Sequence[float]) -> bool:
    """True when the last epoch is the new best (strictly lower than every earlier epoch);
    False for an empty history or a NaN last loss."""
    n = len(val_losses)
    return n > 0 and early_stopping_state(val_losses, patience=0).best_epoch == n


class TrainingState:
    """Model, optimizer, scheduler, scaler, random state and history of one training run.

    `parts` maps a checkpoint key to an object with `state_dict` / `load_state_dict`; a part
    that a run does not use (no schedule, no fp16 scaler) is simply absent.
    """

    def __init__(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, patience: int
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self.run_id = ""
        parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        # Python's, NumPy's and torch's random generators as one checkpoint part.
        rng = SimpleNamespace(state_dict=ckpt_io.rng_state, load_state_dict=ckpt_io.set_rng_state)
        self.parts = {k: v for k, v in parts.items() if v is not None} | {"rng": rng}
        self._writer: ckpt_io.BackgroundWriter | None = None  # set by `saves_in_background`

    # ------------------------------------------------------------ derived from the history

    @property
    def epoch(self) -> int:
        """The last complete epoch (0 before the first)."""
        return int(self.history[-1]["epoch"]) if self.history else FIRST_EPOCH - 1

    @property
    def early(self) -> EarlyStoppingState:
        """Best epoch (lowest val_loss), bad epochs and whether to stop, from the history."""
        return early_stopping_state([h["val_loss"] for h in self.history], self.patience)

    def end_epoch(self, metrics: dict[str, float]) -> bool:
        """Record the metrics of the next epoch; True when it is the new best epoch."""
        self.history.append({"epoch": self.epoch + 1, **metrics})
        return improved_at_last_epoch([h["val_loss"] for h in self.history])

    # ------------------------------------------------------------ checkpoints

    def state_dict(self, config: dict[str, Any]) -> dict[str, Any]:
        """What `last.pt` holds: every part's state, the history, the run id and the config."""
        return {
            "kind": "last",
            "first_epoch": FIRST_EPOCH,
            **{key: part.state_dict() for key, part in self.parts.items()},
            "epoch": self.epoch,
            "history": self.history,
            "run_id": self.run_id,
            "config": config,
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "The checkpoint") -> None:
        """Every part restored from `state` (a last.pt read from `source`); CheckpointError
        naming the key when a part does not fit. What a part's own `load_state_dict` would take
        silently and fail on later (weights or buffers of another shape, a garbled schedule) is
        checked before any part changes; `check_resumable` has checked the rest before."""
        for key, part in self.parts.items():
            if key not in state:
                raise CheckpointError(
                    f"{source} has no {key!r} state although this config needs one; "
                    "resume with the config of the run that wrote it."
                )
            if key in _CHECKS and (problem := _CHECKS[key](part, state[key])):
                raise _unusable(source, problem)
        for key, part in self.parts.items():
            try:
                part.load_state_dict(state[key])
            except Exception as e:  # what a part's own check refuses (the scaler's keys, ...)
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                raise _unusable(source, f"{key!r} state does not fit this run ({reason})") from None
        self.history = list(state["history"])
        self.run_id = state["run_id"]

    def save(self, results_dir: Path, config: dict[str, Any], improved: bool) -> None:
        """`best.pt` when the epoch improved, then `last.pt`; each written atomically.

        `best.pt` holds the weights of the last epoch (the best one), its epoch, metrics,
        config and run id. Inside `saves_in_background`: waits for the previous save (raising
        its error), copies the state (tensors to the CPU) and leaves the writing to a background
        thread; the random states are taken here, as they are now, either way."""
        if self._writer is not None:
            self._writer.wait()  # one copy in memory at a time; a failed write is raised here
        last = self.state_dict(config)
        files = [(last, results_dir / "last.pt")]
        if improved:  # the same weights: copied once
            best = {k: last[k] for k in ("first_epoch", "model", "epoch", "config", "run_id")}
            best |= {"kind": "best", "metrics": self.history[-1]}
            files.insert(0, (best, results_dir / "best.pt"))
        if self._writer is None:
            for obj, path in files:
                ckpt_io.save_atomic(obj, path)
        else:
            self._writer.submit(ckpt_io.cpu_copy(files))

    @contextmanager
    def saves_in_background(self) -> Iterator[None]:
        """Within the block, `save` writes in a background thread. Leaving it waits for the
        last save, also when an error or Ctrl-C ends the block: `last.pt` and `best.pt` are
        then complete. A failed write is raised on the way out; when another exception ends
        the block, that one goes on and the failed write is said on stderr. (A second Ctrl-C
        ends that wait; the writer thread is no daemon, so the write still completes before the
        process exits.)"""
        writer = self._writer = ckpt_io.BackgroundWriter()
        try:
            yield
            writer.wait()  # a failed write is raised here; nothing is left to report below
        except BaseException:  # (a signal during that wait too: the write completes first)
            try:
                writer.wait()
            except Exception as e:
                reason = f"{type(e).__name__}: {' '.join(str(e).split()) or type(e).__name__}"
                print(
                    f"warning: the last checkpoint was not written ({reason}); last.pt holds "
                    "an earlier epoch.",
                    file=sys.stderr,
                    flush=True,
                )
            raise
        finally:
            self._writer = None


def check_resumable(state: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """CheckpointError unless `state` is a last.pt made with the config keys that shape
    training (epochs and patience may grow: "train longer"; the MLflow run's params, checked
    when it is reopened, cover the rest). A last.pt of an earlier version that counted epochs
    from 0 is refused by its history (epoch 0 first)."""
    if state.get("kind") != "last" or "run_id" not in state:
        raise CheckpointError(
            f"{path} is not a resumable checkpoint (a run's last.pt); pass the run's results "
            "folder or its last.pt."
        )
    _check_fits(state, config, path, TRAINING_SECTIONS, RESUME_MAY_CHANGE)
    # Before the datasets are read and the MLflow run is reopened: what needs no model.
    try:
        ckpt_io.checked_rng_state(state.get("rng"))
        _check_history(state.get("history"), state.get("run_id"))
    except ValueError as e:
        raise _unusable(path, str(e)) from None


def load_weights(
    model: nn.Module, state: dict[str, Any], config: ExperimentConfig, path: Path
) -> None:
    """The weights of the checkpoint `state` (read from `path`) loaded into `model`;
    CheckpointError unless they were made with the config's model section and load as they
    are."""
    _check_fits(state, config, path, ("model",))
    if problem := _weights_problem(model, state.get("model")):
        raise CheckpointError(
            f"{path} does not fit this model: its {problem}; predict with the config of the run "
            "that wrote it."
        )
    model.load_state_dict(state["model"])


def _check_fits(state, config, path, sections, may_differ=()) -> None:
    saved = state.get("config", {})
    if not (isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values())):
        raise CheckpointError(
            f"{path} is not a checkpoint written by this repository: its 'config' is not the "
            "config sections of a run."
        )
    mismatch = config_mismatch(flatten(saved), config, sections, may_differ)
    if mismatch is not None:
        key, theirs, now = mismatch
        raise CheckpointError(
            f"{path} does not fit this experiment: it was made with {key} = {theirs!r}, the "
            f"config says {now!r}; use the config and flags of the run that wrote it."
        )


# ------------------------------------------------------------ a checkpoint that does not fit


def _unusable(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be resumed: its {problem}. The file is not as this code would write "
        "it (edited, or written by another version of the code); resume with the code of the "
        "run that wrote it, or start a new run."
    )


def _weights_problem(model: nn.Module, weights: Any) -> str | None:
    """What keeps `weights` from loading into `model` as they are (names, shapes, dtypes)."""
    if not isinstance(weights, dict):
        return f"'model' is a {type(weights).__name__}, not a dict of tensors"
    own = model.state_dict()
    for name, tensor in own.items():
        value = weights.get(name)
        if not isinstance(value, torch.Tensor):
            return f"'model' has no tensor {name!r}" + (
                "" if value is None else f" (a {type(value).__name__})"
            )
        if value.shape != tensor.shape or value.dtype != tensor.dtype:
            return (
                f"'model' tensor {name!r} is {value.dtype} {list(value.shape)}, the model's "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
    extra = sorted(str(k) for k in weights if k not in own)
    return f"'model' has a tensor {extra[0]!r} the model does not" if extra else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optimizer_problem(optimizer: Any, saved: Any) -> str | None:
    """What `optimizer.load_state_dict(saved)` would take but the next step would fail on:
    per-parameter buffers of another shape, hyperparameters that are no numbers."""
    try:
        groups = list(zip(saved["param_groups"], optimizer.param_groups, strict=True))
        params = [
            pair for g, own in groups for pair in zip(g["params"], own["params"], strict=True)
        ]
        buffers = {pid: dict(saved["state"].get(pid, {})) for pid, _ in params}
    except Exception:  # not a dict of 'state' and 'param_groups' holding the model's parameters
        return "'optimizer' is not a state of this optimizer (its parameter groups differ)"
    for group, own in groups:
        if problem := _numbers_problem("optimizer", own, group):
            return problem
    for pid, param in params:
        for name, value in buffers[pid].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                return (
                    f"'optimizer' {name!r} of parameter {pid} has shape {list(value.shape)}, "
                    f"the parameter {list(param.shape)}"
                )
    return None


def _numbers_problem(part: str, own: dict[str, Any], saved: Any) -> str | None:
    """A learning-rate schedule takes any dict (`__dict__.update`), an optimizer any group:
    where this run's state holds a finite number, or a list of them, so must `saved`."""
    if not isinstance(saved, dict):
        return f"'{part}' is a {type(saved).__name__}, not a dict"
    for key, value in own.items():
        theirs = saved.get(key, value)
        if _is_number(value) and not _is_number(theirs):
            return f"'{part}' {key} = {theirs!r} is not a finite number"
        if isinstance(value, list) and not (
            isinstance(theirs, list) and len(theirs) == len(value) and all(map(_is_number, theirs))
        ):
            return f"'{part}' {key} = {theirs!r} is not {len(value)} finite number(s)"
    return None


def _check_history(history: Any, run_id: Any) -> None:
    """ValueError unless the per-epoch history counts epochs 1, 2, ... with a val_loss each
    (early stopping and the epoch to resume from follow from it) and the run id is one."""
    if not isinstance(run_id, str) or not run_id.isalnum():
        raise ValueError(f"'run_id' = {run_id!r} is not an MLflow run id")
    if not isinstance(history, list):
        raise ValueError(f"'history' is a {type(history).__name__}, not a list of epochs")
    for i, h in enumerate(history):
        if not (
            isinstance(h, dict)
            and h.get("epoch") == FIRST_EPOCH + i
            and isinstance(h.get("val_loss"), (int, float))
        ):
            raise ValueError(f"'history' entry {i} is not epoch {FIRST_EPOCH + i} with a val_loss")


# What each part's own `load_state_dict` would take silently and fail on later.
_CHECKS = {
    "model": _weights_problem,
    "optimizer": _optimizer_problem,
    "scheduler": lambda scheduler, saved: _numbers_problem(
        "scheduler", scheduler.state_dict(), saved
    ),
}
