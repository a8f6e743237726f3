"""The training state: one object that saves itself (`state_dict`) and resumes (`load_state_dict`).

Each part (model, optimizer, learning-rate schedule, gradient scaler, random generators) has
`state_dict` / `load_state_dict`, as in torch.distributed.checkpoint's `Stateful`, so a
checkpoint is the list of parts read in one direction and a resume the same list read in the
other. The per-epoch history is stored; what follows from it is not: the last epoch, the best
epoch, the count of bad epochs and whether early stopping has stopped the run.

Epochs count from 1 everywhere a person reads them (printed lines, MLflow steps, `best_epoch`,
plot axes, checkpoints); checkpoints say so with `first_epoch = 1`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from src import checkpoint as ckpt_io
from src.config import (
    RESUME_MAY_CHANGE,
    TRAINING_SECTIONS,
    ExperimentConfig,
    config_mismatch,
    flatten,
)
from src.early_stopping import EarlyStoppingState, early_stopping_state
from src.errors import CheckpointError

FIRST_EPOCH = 1


class RandomState:
    """Python's, NumPy's and torch's random generators as one checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return ckpt_io.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt_io.set_rng_state(state)


class TrainingState:
    """Model, optimizer, scheduler, scaler, random state and history of one training run.

    `parts` maps a checkpoint key to an object with `state_dict` / `load_state_dict`; a part
    that a run does not use (no schedule, no fp16 scaler) is simply absent.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        scheduler: Any | None,
        scaler: Any | None,
        patience: int,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self.run_id = ""
        self.parts: dict[str, Any] = {"model": model, "optimizer": optimizer}
        if scheduler is not None:
            self.parts["scheduler"] = scheduler
        if scaler is not None:
            self.parts["scaler"] = scaler
        self.parts["rng"] = RandomState()

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
        return self.early.best_epoch == self.epoch

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in self.parts if key not in state]
        if missing:
            raise CheckpointError(
                f"The checkpoint has no {missing[0]!r} state although this config needs one; "
                "resume with the config of the run that wrote it."
            )
        for key, part in self.parts.items():
            part.load_state_dict(state[key])
        self.history = list(state["history"])
        self.run_id = state["run_id"]

    def best_state_dict(self, config: dict[str, Any]) -> dict[str, Any]:
        """What `best.pt` holds: the weights of the last epoch (when it is the best one)."""
        return {
            "kind": "best",
            "first_epoch": FIRST_EPOCH,
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "config": config,
            "run_id": self.run_id,
            "metrics": self.history[-1],
        }

    def save(self, results_dir: Path, config: dict[str, Any], improved: bool) -> None:
        """`best.pt` when the epoch improved, then `last.pt`; each written atomically."""
        if improved:
            ckpt_io.save_atomic(self.best_state_dict(config), results_dir / "best.pt")
        ckpt_io.save_atomic(self.state_dict(config), results_dir / "last.pt")


def weights_epoch(state: dict[str, Any]) -> int:
    """The epoch (counted from 1) a checkpoint's weights come from, also in older checkpoints
    that counted from 0."""
    return int(state["epoch"]) + (0 if state.get("first_epoch") == FIRST_EPOCH else 1)


def check_resumable(state: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """CheckpointError unless `state` is a last.pt of this experiment, made with the config
    keys that shape training (epochs and patience may grow: "train longer")."""
    if state.get("kind") != "last" or "run_id" not in state:
        raise CheckpointError(
            f"{path} is not a resumable checkpoint (a run's last.pt); pass the run's results "
            "folder or its last.pt."
        )
    if state.get("first_epoch") != FIRST_EPOCH:
        raise CheckpointError(
            f"{path} was written by an earlier version of this repository that counted epochs "
            "from 0; it cannot be resumed here. Start a new run (its best.pt still predicts)."
        )
    saved_name = state.get("config", {}).get("run", {}).get("experiment_name")
    if saved_name != config.run.experiment_name:
        raise CheckpointError(
            f"{path} is a checkpoint of another experiment ({saved_name!r}, the config says "
            f"{config.run.experiment_name!r}); pass the config it was made with."
        )
    _check_fits(state, config, path, TRAINING_SECTIONS, RESUME_MAY_CHANGE)


def check_weights_fit(state: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    """CheckpointError unless the checkpoint's model section equals the config's."""
    _check_fits(state, config, path, ("model",))


def _check_fits(state, config, path, sections, may_differ=()) -> None:
    mismatch = config_mismatch(flatten(state.get("config", {})), config, sections, may_differ)
    if mismatch is not None:
        key, saved, now = mismatch
        raise CheckpointError(
            f"{path} does not fit this experiment: it was made with {key} = {saved!r}, the "
            f"config says {now!r}; use the config and flags of the run that wrote it."
        )
