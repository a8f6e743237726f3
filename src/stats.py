"""How sure a run's AUROC and AP are: 95% intervals. Whether run B is really better than run A
is src/tools/compare_stats.py's, from the same parts.

All functions take plain NumPy arrays: `labels` [N, K] of 0/1 and `scores` [N, K] (a run's
probabilities), one row per image, one column per class; two runs compared hold their scores
for the same images in the same rows. Every interval is a 95% one; everything random draws
from `np.random.default_rng(seed)`, so the same inputs give the same figures.

- AUROC: DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988), computed with the midranks
  of Sun & Xu (2014) in O(N log N), ties counted as half. `delong` gives each image's
  structural components, scaled so that the covariance matrix of the K AUROCs is
  `components.T @ components`: the classes of a multi-label run share their images, so the
  mean AUROC over classes has the variance of the mean of the columns.
- AP: a bootstrap over images (the same resampled images for every class, and for both runs of
  a comparison), percentile intervals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as sps

LEVEL = 0.95
Z = float(sps.norm.ppf(0.5 + LEVEL / 2))  # 1.95996...
SEED = 0
# Resamples of the AP bootstrap of every run: 500 put the ends of the 95% interval within
# about +-0.004 of AP of where endless resampling would (their sd between seeds at PASCAL's
# size), in 0.3 s of one core for its 1,449 images x 20 classes (benchmarks/stats_coverage.py
# prints both figures).
RUN_RESAMPLES = 500
# Resamples at a time: 50 x 1,449 weights stay in the processor's cache (500 resamples of
# PASCAL's size take 0.29 s so, against 0.75 s all at once).
CHUNK = 50

# A metric of resampled images: (labels [N, K], scores [N, K], weights [B, N]) -> [B, K].
WeightedMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """An estimate and its 95% interval: arrays of K (one per class) or floats (the mean over
    classes). `p`: for a difference between two runs, the two-sided p-value of 'no
    difference'; None for a single run."""

    value: np.ndarray | float
    low: np.ndarray | float
    high: np.ndarray | float
    p: np.ndarray | float | None = None


def as_matrices(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    labels = labels[:, None] if labels.ndim == 1 else labels  # one class
    scores = scores[:, None] if scores.ndim == 1 else scores
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be [N, K]")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite numbers")
    return labels, scores


def defined_classes(labels: np.ndarray) -> np.ndarray:
    """[K] bool: the classes with a positive and a negative image (AUROC and AP exist)."""
    positives = np.asarray(labels).sum(axis=0)
    return (positives > 0) & (positives < len(labels))


# ------------------------------------------------------------------ AUROC: DeLong


@dataclass(frozen=True)
class DeLong:
    """The AUROC of each class [K] (NaN without a positive or a negative image) and DeLong's
    structural components [N, K], centred and scaled: cov(AUROC_k, AUROC_l) is
    `components[:, k] @ components[:, l]` (0 for a class without an AUROC)."""

    auroc: np.ndarray
    components: np.ndarray

    @property
    def variance(self) -> np.ndarray:
        return (self.components**2).sum(axis=0)

    @property
    def covariance(self) -> np.ndarray:
        return self.components.T @ self.components


def delong(labels: np.ndarray, scores: np.ndarray) -> DeLong:
    """DeLong's AUROC and its structural components for each column, by Sun & Xu's midranks.

    For class k with m positives and n negatives: Tz, the midrank of each image among all N,
    Tx among the positives, Ty among the negatives. A positive's component V10 = (Tz - Tx) / n
    is the share of negatives it outranks (a tie counts half), a negative's V01 =
    1 - (Tz - Ty) / m the share of positives that outrank it; AUROC is the mean of either.
    DeLong's variance S10 / m + S01 / n (S: the sample variances of V10 and V01) is the sum of
    the squares of (V10 - AUROC) / sqrt(m (m - 1)) and (V01 - AUROC) / sqrt(n (n - 1)), the
    components returned. Two columns with the same labels (a class scored by two runs) get
    DeLong's covariance exactly; columns with different labels (the classes of a multi-label
    run) get the per-image covariance of their components.
    """
    labels, scores = as_matrices(labels, scores)
    positive = labels > 0.5
    m = positive.sum(axis=0).astype(np.float64)
    n = len(labels) - m
    tz = sps.rankdata(scores, axis=0)
    # Ranks within the positives: the negatives moved above every score (and the reverse).
    tx = sps.rankdata(np.where(positive, scores, np.inf), axis=0)
    ty = sps.rankdata(np.where(positive, np.inf, scores), axis=0)
    defined = (m > 0) & (n > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = np.where(defined, (tz * positive).sum(axis=0) / (m * n) - (m + 1) / (2 * n), np.nan)
        v10 = (tz - tx) / n
        v01 = 1 - (tz - ty) / m
        # One positive (or negative): its component equals the AUROC, whatever the divisor.
        pos_scale = np.sqrt(m * np.maximum(m - 1, 1))
        neg_scale = np.sqrt(n * np.maximum(n - 1, 1))
        components = np.where(positive, (v10 - auroc) / pos_scale, (v01 - auroc) / neg_scale)
    components[:, ~defined] = 0.0
    return DeLong(auroc, components)


def logit_interval(value, variance) -> tuple[np.ndarray, np.ndarray]:
    """The 95% interval of a quantity in (0, 1) with the given variance, made on the logit
    scale (delta method: var(logit A) = var(A) / (A (1 - A))^2) and turned back, so it stays
    inside (0, 1) and is longer on the side away from the bound."""
    value, variance = np.asarray(value, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = Z * np.sqrt(variance) / (value * (1 - value))
        centre = special.logit(value)
        return special.expit(centre - half), special.expit(centre + half)


def auroc_intervals(labels: np.ndarray, scores: np.ndarray) -> tuple[Interval, Interval]:
    """Each class's AUROC and the mean over the classes that have one, with 95% intervals.

    DeLong's variance (the mean's from the covariance across classes) on the logit scale.
    DeLong's plain Wald interval, A +- 1.96 sd, covers the true AUROC less often than it says
    when images are few and the AUROC high: at Demo-2's size (50 images, 25 positive) and
    AUROC 0.95, in 20,000 simulated validation sets (binormal scores,
    benchmarks/stats_coverage.py), the Wald interval held the true AUROC 85.4% of the time and
    this logit interval 94.0%; at 200 images and AUROC 0.8, 94.5% and 95.5%.

    A class whose every pair is ranked right (AUROC 1, DeLong's variance 0) would get [1, 1];
    it gets the lower end of an AUROC with one pair of its m x n ranked wrong, 1 - 1 / (m n),
    whose DeLong variance is 2 / (m n)^2 (0.975 for 25 positives and 25 negatives), and 1
    (the same for an AUROC of 0, mirrored). If every class is perfect, the mean's interval is
    the mean of theirs.
    """
    labels, scores = as_matrices(labels, scores)
    d = delong(labels, scores)
    defined = ~np.isnan(d.auroc)
    pairs = labels.sum(axis=0) * (len(labels) - labels.sum(axis=0))
    perfect, reversed_ = d.auroc == 1, d.auroc == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(perfect, 1 - 1 / pairs, np.where(reversed_, 1 / pairs, d.auroc))
        variance = np.where(perfect | reversed_, 2 / pairs**2, d.variance)
    low, high = logit_interval(value, variance)
    low, high = np.where(reversed_, 0.0, low), np.where(perfect, 1.0, high)
    per_class = Interval(d.auroc, np.where(defined, low, np.nan), np.where(defined, high, np.nan))
    if not defined.any():
        return per_class, Interval(np.nan, np.nan, np.nan)
    mean = float(d.auroc[defined].mean())
    mean_var = float((d.components[:, defined].mean(axis=1) ** 2).sum())
    if mean_var == 0:
        mean_low, mean_high = float(low[defined].mean()), float(high[defined].mean())
    else:
        mean_low, mean_high = (float(x) for x in logit_interval(mean, mean_var))
    return per_class, Interval(mean, mean_low, mean_high)


# ------------------------------------------------------------------ the bootstrap over images


def resample_weights(n: int, n_resamples: int, seed: int = SEED) -> np.ndarray:
    """[n_resamples, n] float: how many times each image is drawn in each bootstrap resample
    (n images drawn with replacement: multinomial counts)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(np.float64)


def weighted_average_precision(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """[B, K]: each class's average precision with the images counted `weights` [B, N] times
    (a bootstrap resample), as scikit-learn's `average_precision_score` computes it (the sum
    over thresholds, each distinct score, of the recall gained times the precision there);
    NaN where a resample holds no positive of the class.

    Vectorized over the resamples: scikit-learn, called once per resample and class, takes
    ~1 ms a call, 4 s for 200 resamples of PASCAL's 20 classes."""
    labels, scores = as_matrices(labels, scores)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    out = np.full((len(weights), labels.shape[1]), np.nan)
    for k in range(labels.shape[1]):
        order = np.argsort(-scores[:, k], kind="stable")
        s, y = scores[order, k], labels[order, k]
        # A threshold at each distinct score: the last image of a run of tied scores.
        last = np.append(s[1:] != s[:-1], True)
        for start in range(0, len(weights), CHUNK):
            w = weights[start : start + CHUNK, order]
            tp = np.cumsum(w * y, axis=1)[:, last]
            called = np.cumsum(w, axis=1)[:, last]
            precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
            gained = np.diff(tp, axis=1, prepend=0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[start : start + CHUNK, k] = (gained * precision).sum(axis=1) / tp[:, -1]
    return out


def weighted_accuracy(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, K]: each class's accuracy at the threshold 0.5 under the weights [B, N]."""
    labels, scores = as_matrices(labels, scores)
    right = ((scores >= 0.5) == (labels >= 0.5)).astype(np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return (weights @ right) / weights.sum(axis=1, keepdims=True)


def mean_over(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """[B]: the mean over the `defined` classes of each row (NaN of a resample skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row without any value: NaN
        return np.nanmean(values[:, defined], axis=1)


def percentiles(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - LEVEL) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class without any value: NaN
        low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap_intervals(
    labels: np.ndarray,
    scores: np.ndarray,
    metric: WeightedMetric = weighted_average_precision,
    n_resamples: int = RUN_RESAMPLES,
    seed: int = SEED,
) -> tuple[Interval, Interval]:
    """Each class's `metric` and the mean over the classes that have a positive and a
    negative, with 95% percentile intervals of a bootstrap over images."""
    labels, scores = as_matrices(labels, scores)
    defined = defined_classes(labels)
    value = metric(labels, scores, np.ones((1, len(labels))))[0]
    value = np.where(defined, value, np.nan)
    draws = metric(labels, scores, resample_weights(len(labels), n_resamples, seed))
    low, high = percentiles(draws)
    per_class = Interval(value, np.where(defined, low, np.nan), np.where(defined, high, np.nan))
    if not defined.any():
        return per_class, Interval(np.nan, np.nan, np.nan)
    mean_low, mean_high = percentiles(mean_over(draws, defined))
    return per_class, Interval(float(value[defined].mean()), float(mean_low), float(mean_high))
