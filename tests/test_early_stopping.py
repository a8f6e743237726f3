"""Early stopping (src.train.training_state): scripted validation-loss histories, hand-written
expectations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from src.train.training_state import (
    EarlyStoppingState,
    early_stopping_state,
    improved_at_last_epoch,
)

NAN = math.nan


def first_stopped_epoch(val_losses: list[float], patience: int) -> int | None:
    """The 1-based epoch after which the loop would stop, replaying the history epoch by epoch."""
    for epoch in range(1, len(val_losses) + 1):
        if early_stopping_state(val_losses[:epoch], patience).stopped:
            return epoch
    return None


def test_empty_history_has_no_best_epoch():
    state = early_stopping_state([], patience=3)
    assert state == EarlyStoppingState(
        best_epoch=0, best_val_loss=math.inf, bad_epochs=0, stopped=False
    )
    assert not improved_at_last_epoch([])


def test_monotone_decrease_improves_every_epoch():
    losses = [1.0, 0.9, 0.8, 0.7]
    assert early_stopping_state(losses, patience=1) == EarlyStoppingState(
        best_epoch=4, best_val_loss=0.7, bad_epochs=0, stopped=False
    )
    assert all(improved_at_last_epoch(losses[:n]) for n in range(1, 5))


def test_a_tie_is_not_an_improvement_and_the_earlier_epoch_stays_best():
    losses = [1.0, 0.5, 0.5, 0.5]
    # epoch 2 is best; epochs 3 and 4 only equal it, so they are bad epochs 1 and 2.
    assert early_stopping_state(losses, patience=2) == EarlyStoppingState(
        best_epoch=2, best_val_loss=0.5, bad_epochs=2, stopped=True
    )
    assert improved_at_last_epoch(losses[:2])
    assert not improved_at_last_epoch(losses[:3])
    assert not improved_at_last_epoch([0.5, 0.5])


def test_an_improvement_resets_the_count_of_bad_epochs():
    # epochs 2 and 3 are bad (1.1, 1.2 > 1.0); epoch 4 (0.9) is a new best and resets the
    # count; epoch 5 (1.0 > 0.9) is the only bad epoch since. Without the reset the count
    # would be 3 and patience 3 would stop.
    losses = [1.0, 1.1, 1.2, 0.9, 1.0]
    assert early_stopping_state(losses, patience=3) == EarlyStoppingState(
        best_epoch=4, best_val_loss=0.9, bad_epochs=1, stopped=False
    )
    assert first_stopped_epoch(losses, patience=3) is None
    # Two more bad epochs (6 and 7) make three since epoch 4: stop after epoch 7.
    assert first_stopped_epoch([*losses, 0.95, 1.3], patience=3) == 7


def test_training_stops_at_exactly_the_patience_th_bad_epoch():
    losses = [1.0, 1.1, 1.2, 1.3, 1.4]
    # best is epoch 1; epochs 2, 3, 4 are bad epochs 1, 2, 3.
    assert early_stopping_state(losses[:3], patience=3).stopped is False  # 2 bad epochs
    assert early_stopping_state(losses[:4], patience=3) == EarlyStoppingState(
        best_epoch=1, best_val_loss=1.0, bad_epochs=3, stopped=True
    )
    assert first_stopped_epoch(losses, patience=3) == 4
    assert first_stopped_epoch(losses, patience=4) == 5
    assert first_stopped_epoch(losses, patience=5) is None


def test_patience_0_never_stops():
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert early_stopping_state(losses, patience=0) == EarlyStoppingState(
        best_epoch=1, best_val_loss=1.0, bad_epochs=5, stopped=False
    )
    assert first_stopped_epoch(losses, patience=0) is None


def test_patience_1_stops_after_the_first_bad_epoch():
    assert first_stopped_epoch([1.0, 0.9, 0.8, 0.85, 0.7], patience=1) == 4
    assert early_stopping_state([1.0, 0.9], patience=1).stopped is False


def test_nan_never_improves():
    # epoch 2 is NaN: a bad epoch, not a new best; epoch 3 (0.9 < 1.0) improves.
    assert early_stopping_state([1.0, NAN, 0.9], patience=2) == EarlyStoppingState(
        best_epoch=3, best_val_loss=0.9, bad_epochs=0, stopped=False
    )
    assert early_stopping_state([1.0, NAN, NAN], patience=2) == EarlyStoppingState(
        best_epoch=1, best_val_loss=1.0, bad_epochs=2, stopped=True
    )
    assert not improved_at_last_epoch([1.0, NAN])
    assert not improved_at_last_epoch([NAN])
    assert improved_at_last_epoch([NAN, 5.0])  # the first finite loss is the first best


def test_no_finite_loss_means_no_best_epoch():
    state = early_stopping_state([NAN, math.inf], patience=3)
    assert state == EarlyStoppingState(
        best_epoch=0, best_val_loss=math.inf, bad_epochs=2, stopped=False
    )
    assert early_stopping_state([NAN, math.inf, NAN], patience=3).stopped is True
    assert early_stopping_state([math.inf, 2.0], patience=3).best_epoch == 2


def test_any_sequence_of_floats_is_accepted():
    losses = np.array([0.3, 0.2, 0.25], dtype=np.float32)
    state = early_stopping_state(losses, patience=2)
    assert (state.best_epoch, state.bad_epochs, state.stopped) == (2, 1, False)
    assert state.best_val_loss == pytest.approx(0.2)
    assert isinstance(state.best_val_loss, float)
    assert not improved_at_last_epoch(losses)
    assert early_stopping_state((2.0, 1.0), patience=2).best_epoch == 2


def test_state_is_frozen_and_negative_patience_is_refused():
    state = early_stopping_state([1.0], patience=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.bad_epochs = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="patience"):
        early_stopping_state([1.0], patience=-1)
