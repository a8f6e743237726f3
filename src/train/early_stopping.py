"""Early stopping as a pure function of the validation-loss history.

`val_losses[0]` is epoch 1. The best epoch is the one with the lowest validation loss; an
improvement is strictly lower than the best so far (on a tie the earlier epoch stays best),
and a loss that is not finite (NaN, inf) never improves. Patience 0 turns early stopping
off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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


def _improves(loss: float, best: float) -> bool:
    # A diverged epoch (NaN or inf) must never become the best one to restore.
    return math.isfinite(loss) and loss < best


def early_stopping_state(val_losses: Sequence[float], patience: int) -> EarlyStoppingState:
    """The state after epochs 1..len(val_losses), one validation loss per epoch.

    `patience` is how many epochs without a strict improvement end training; 0 never stops.
    """
    if patience < 0:
        raise ValueError(f"patience must be 0 (off) or a positive number of epochs, not {patience}")
    best_epoch, best_loss, bad_epochs = 0, math.inf, 0
    for epoch, loss in enumerate(val_losses, start=1):
        loss = float(loss)
        if _improves(loss, best_loss):
            best_epoch, best_loss, bad_epochs = epoch, loss, 0
        else:
            bad_epochs += 1
    return EarlyStoppingState(
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        bad_epochs=bad_epochs,
        stopped=patience > 0 and bad_epochs >= patience,
    )


def improved_at_last_epoch(val_losses: Sequence[float]) -> bool:
    """True when the last epoch is the new best (strictly lower than every earlier epoch);
    False for an empty history or a NaN last loss."""
    if len(val_losses) == 0:
        return False
    return early_stopping_state(val_losses, patience=0).best_epoch == len(val_losses)
