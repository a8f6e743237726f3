"""Is run B really better than run A? The tests behind `compare_runs --paired` and `--seed-sets`.

Same conventions as src/stats.py (labels and scores [N, K], 95% intervals, seeded draws):
- Two runs on the same images: DeLong's paired test per class and for the mean AUROC, a paired
  bootstrap for AP (or any metric written as a function of per-image weights), Holm's
  correction across classes (`holm`).
- Two groups of seeds: the difference of their means with a bootstrap over seeds, and the
  probability that a seed of B beats a seed of A (`compare_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from src.stats import (
    SEED,
    Interval,
    WeightedMetric,
    Z,
    as_matrices,
    defined_classes,
    delong,
    mean_over,
    percentiles,
    resample_weights,
    weighted_average_precision,
)

# Resamples of a comparison's paired bootstrap: a comparison of two runs affords more than the
# RUN_RESAMPLES of each run's own intervals.
COMPARE_RESAMPLES = 2000


# ------------------------------------------------------------------ two runs, the same images


def paired_delong(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[Interval, Interval]:
    """DeLong's paired test of B - A, per class and for the mean AUROC over the classes that
    have one: the difference, its 95% Wald interval and the two-sided p-value.

    var(A_B - A_A) = sum over images of (component_B - component_A)^2, DeLong's
    var_A + var_B - 2 cov. Where both are 0 (the same ranking: a run against itself) the
    difference is 0 and p = 1; a difference with variance 0 has p = 0.
    """
    labels, scores_a = as_matrices(labels, scores_a)
    _, scores_b = as_matrices(labels, scores_b)
    a, b = delong(labels, scores_a), delong(labels, scores_b)
    defined = ~np.isnan(a.auroc)
    diff = b.auroc - a.auroc
    spread = b.components - a.components
    per_class = _wald(diff, (spread**2).sum(axis=0))
    if not defined.any():
        return per_class, Interval(np.nan, np.nan, np.nan, np.nan)
    mean_diff = float(diff[defined].mean())
    mean_var = float((spread[:, defined].mean(axis=1) ** 2).sum())
    mean = _wald(np.array([mean_diff]), np.array([mean_var]))
    return per_class, Interval(*(float(x[0]) for x in (mean.value, mean.low, mean.high, mean.p)))


def _wald(diff: np.ndarray, variance: np.ndarray) -> Interval:
    sd = np.sqrt(variance)
    same = (diff == 0) & (variance == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * sps.norm.sf(np.abs(diff) / sd)
    p = np.where(same, 1.0, p)
    return Interval(diff, diff - Z * sd, diff + Z * sd, np.where(np.isnan(diff), np.nan, p))


def paired_bootstrap(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric: WeightedMetric = weighted_average_precision,
    n_resamples: int = COMPARE_RESAMPLES,
    seed: int = SEED,
) -> tuple[Interval, Interval]:
    """B - A of `metric`, per class and for the mean over the classes with a positive and a
    negative, both runs scored on the same resampled images: the difference, its 95%
    percentile interval and the two-sided p-value of the percentile bootstrap (twice the
    share of resamples on the other side of 0, counting the observed one; 1 at most)."""
    labels, scores_a = as_matrices(labels, scores_a)
    _, scores_b = as_matrices(labels, scores_b)
    defined = defined_classes(labels)
    ones = np.ones((1, len(labels)))
    diff = (metric(labels, scores_b, ones) - metric(labels, scores_a, ones))[0]
    diff = np.where(defined, diff, np.nan)
    weights = resample_weights(len(labels), n_resamples, seed)
    draws_a, draws_b = metric(labels, scores_a, weights), metric(labels, scores_b, weights)
    draws = draws_b - draws_a
    per_class = Interval(diff, *percentiles(draws), _bootstrap_p(draws))
    if not defined.any():
        return per_class, Interval(np.nan, np.nan, np.nan, np.nan)
    mean_draws = mean_over(draws_b, defined) - mean_over(draws_a, defined)
    low, high = percentiles(mean_draws)
    p = _bootstrap_p(mean_draws[:, None])[0]
    return per_class, Interval(float(diff[defined].mean()), float(low), float(high), float(p))


def _bootstrap_p(draws: np.ndarray) -> np.ndarray:
    """[K]: two-sided p-values of 'no difference' from the resampled differences [B, K]."""
    valid = ~np.isnan(draws)
    count = valid.sum(axis=0)
    below = ((draws <= 0) & valid).sum(axis=0)
    above = ((draws >= 0) & valid).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * np.minimum(below + 1, above + 1) / (count + 1)
    return np.where(count > 0, np.minimum(p, 1.0), np.nan)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of p-values for testing them all (NaN stays NaN and does
    not count): the i-th smallest of m is multiplied by m - i + 1, kept from decreasing, and
    capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    order = np.argsort(p[tested], kind="stable")
    ranked = p[tested][order] * (tested.sum() - np.arange(tested.sum()))
    adjusted = np.empty_like(ranked)
    adjusted[order] = np.minimum(np.maximum.accumulate(ranked), 1.0)
    out[tested] = adjusted
    return out


# ------------------------------------------------------------------ two groups of seeds


@dataclass(frozen=True)
class GroupComparison:
    """B - A over seeds: the difference of the means with its 95% bootstrap interval, and the
    probability that a seed of B scores above a seed of A (a tie counts half)."""

    difference: Interval
    prob_b_beats_a: float
    n_a: int
    n_b: int


def compare_groups(
    values_a, values_b, n_resamples: int = 10_000, seed: int = SEED
) -> GroupComparison:
    """B's seeds against A's: each group's seeds drawn with replacement on its own (the seeds
    of two groups are not paired); the percentile interval of the difference of the means."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError("each group needs at least one value")
    rng = np.random.default_rng(seed)
    draws = b[rng.integers(0, len(b), (n_resamples, len(b)))].mean(axis=1) - a[
        rng.integers(0, len(a), (n_resamples, len(a)))
    ].mean(axis=1)
    low, high = percentiles(draws)
    beats = (b[:, None] > a[None, :]).mean() + 0.5 * (b[:, None] == a[None, :]).mean()
    diff = Interval(float(b.mean() - a.mean()), float(low), float(high))
    return GroupComparison(diff, float(beats), len(a), len(b))
