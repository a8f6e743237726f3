"""src.stats: DeLong's AUROC variance against hand-computed values, the pairwise definition and
a bootstrap; the intervals' coverage by simulation; the AP bootstrap against scikit-learn; the
paired tests; Holm's correction; two groups of seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as skm
from scipy import stats as sps

from benchmarks import stats_coverage
from src import stats
from src.tools import compare_stats


def pairwise_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(AUROC, DeLong's variance) of one class from its definition: every positive against
    every negative, a tie counting half; the structural components as row and column means."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    return kernel.mean(), v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def tied_scores(rng: np.random.Generator, labels: np.ndarray, shift: float) -> np.ndarray:
    """Binormal scores rounded to one decimal: many ties, within and across the classes."""
    return np.round(rng.standard_normal(labels.shape) + shift * labels, 1)


def test_delong_by_hand_with_a_tie():
    # Positives 0.9 and 0.4, negatives 0.4 and 0.1: pairs 1, 1, 0.5 (the tie), 1.
    d = stats.delong([1, 1, 0, 0], [0.9, 0.4, 0.4, 0.1])
    assert d.auroc[0] == 0.875
    # V10 = (1, 0.75), V01 = (0.75, 1): S10 = S01 = 0.03125; var = S10 / 2 + S01 / 2.
    assert d.variance[0] == pytest.approx(0.03125, abs=1e-15)
    assert d.covariance.shape == (1, 1) and d.covariance[0, 0] == pytest.approx(0.03125)


def test_delong_agrees_with_the_pairwise_definition_and_scikit_learn():
    rng = np.random.default_rng(3)
    labels = (rng.random((120, 4)) < [0.5, 0.2, 0.05, 0.7]).astype(float)
    scores = tied_scores(rng, labels, 1.0)
    d = stats.delong(labels, scores)
    for k in range(4):
        auroc, variance = pairwise_delong(labels[:, k], scores[:, k])
        assert d.auroc[k] == pytest.approx(auroc, abs=1e-12)
        assert d.variance[k] == pytest.approx(variance, rel=1e-10)
    assert d.auroc == pytest.approx(skm.roc_auc_score(labels, scores, average=None), abs=1e-12)
    # A class without negatives has no AUROC and adds nothing to the covariance.
    labels[:, 1] = 1
    d = stats.delong(labels, scores)
    assert math.isnan(d.auroc[1]) and not d.covariance[1].any() and not d.covariance[:, 1].any()


def test_two_scorings_of_one_class_get_delongs_covariance():
    # The same labels in both columns: DeLong's S10_12 / m + S01_12 / n, by the definition.
    rng = np.random.default_rng(4)
    y = np.repeat([1.0, 0.0], [30, 50])
    a = tied_scores(rng, y, 1.0)
    b = np.round(a + rng.standard_normal(80), 1)
    d = stats.delong(np.column_stack([y, y]), np.column_stack([a, b]))

    def components(s):
        kernel = (s[y == 1][:, None] > s[y == 0]) + 0.5 * (s[y == 1][:, None] == s[y == 0])
        return kernel.mean(axis=1), kernel.mean(axis=0)

    (a10, a01), (b10, b01) = components(a), components(b)
    expected = np.cov(a10, b10)[0, 1] / 30 + np.cov(a01, b01)[0, 1] / 50
    assert d.covariance[0, 1] == pytest.approx(expected, rel=1e-10)


def stratified_bootstrap_aurocs(y, scores_list, resamples, seed):
    """[resamples, len(scores_list)]: the AUROC of each scoring of the one class `y` on each
    resample of its positives and its negatives (each drawn with replacement on its own, as
    DeLong's variance holds the labels fixed), by the pairwise kernel: independent of
    src.stats."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wp = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), resamples)
    wn = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), resamples)
    out = []
    for s in scores_list:
        kernel = (s[pos][:, None] > s[neg]) + 0.5 * (s[pos][:, None] == s[neg])
        out.append(((wp @ kernel) * wn).sum(axis=1) / (len(pos) * len(neg)))
    return np.column_stack(out)


def test_delong_variance_and_paired_p_agree_with_a_bootstrap_to_two_decimals():
    rng = np.random.default_rng(5)
    y = np.repeat([1.0, 0.0], [100, 100])
    a = tied_scores(rng, y, 1.2)  # AUROC about 0.8, with ties
    b = np.round(a + 0.6 * rng.standard_normal(200) + 0.3 * y, 1)  # a little better: p ~ 0.09
    d = stats.delong(np.column_stack([y, y]), np.column_stack([a, b]))
    boot = stratified_bootstrap_aurocs(y, [a, b], 20_000, seed=6)
    sd_boot = boot.std(axis=0, ddof=1)
    assert np.sqrt(d.variance) == pytest.approx(sd_boot, rel=0.03)
    assert np.round(np.sqrt(d.variance), 2) == pytest.approx(np.round(sd_boot, 2))
    diff, _ = compare_stats.paired_delong(y, a, b)
    z = (d.auroc[1] - d.auroc[0]) / (boot[:, 1] - boot[:, 0]).std(ddof=1)
    p_boot = 2 * sps.norm.sf(abs(z))
    assert 0.02 < p_boot < 0.5  # a p-value that says something, for the check to mean something
    assert diff.p[0] == pytest.approx(p_boot, abs=0.01)


def test_the_mean_aurocs_variance_counts_the_covariance_of_classes_on_the_same_images():
    # Three classes that mostly come together, whose scores share a per-image term: their
    # AUROCs are correlated, and the mean's variance is not the sum of the variances over 9.
    rng = np.random.default_rng(7)
    together = rng.random((300, 1)) < 0.4
    labels = (together ^ (rng.random((300, 3)) < 0.15)).astype(float)
    scores = rng.standard_normal((300, 3)) + 1.5 * rng.standard_normal((300, 1)) + 2 * labels
    d = stats.delong(labels, scores)
    _, mean = stats.auroc_intervals(labels, scores)
    mean_var = d.covariance.sum() / 9
    assert mean.value == pytest.approx(d.auroc.mean())
    assert mean_var > 1.4 * d.variance.sum() / 9  # the classes' AUROCs covary
    # A bootstrap over images (the classes' labels drawn with them) agrees: each resample's
    # AUROC by the pairwise kernel, each image counted as often as it was drawn.
    weights = stats.resample_weights(300, 4000, seed=8)
    boot = np.zeros(4000)
    for k in range(3):
        pos, neg = labels[:, k] == 1, labels[:, k] == 0
        s = scores[:, k]
        kernel = (s[pos][:, None] > s[neg]) + 0.5 * (s[pos][:, None] == s[neg])
        wp, wn = weights[:, pos], weights[:, neg]
        boot += ((wp @ kernel) * wn).sum(axis=1) / (wp.sum(axis=1) * wn.sum(axis=1)) / 3
    assert math.sqrt(mean_var) == pytest.approx(np.std(boot, ddof=1), rel=0.05)
    # On the logit scale around the mean.
    low, high = stats.logit_interval(mean.value, mean_var)
    assert (mean.low, mean.high) == pytest.approx((float(low), float(high)))


def test_logit_interval_by_hand():
    # AUROC 0.9, sd 0.03: logit 2.1972 +- 1.96 * 0.03 / 0.09.
    low, high = stats.logit_interval(0.9, 0.03**2)
    half = stats.Z * 0.03 / (0.9 * 0.1)
    expit = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert (low, high) == pytest.approx((expit(math.log(9) - half), expit(math.log(9) + half)))
    assert 0.8240 < low < 0.8241 and 0.9453 < high < 0.9454
    assert 0.9 - low > high - 0.9  # longer away from the bound


def test_a_perfect_class_gets_the_lower_end_of_one_pair_wrong():
    y = np.repeat([1.0, 0.0], 25)
    scores = np.column_stack([np.linspace(1, 0, 50), np.linspace(0, 1, 50)])
    per_class, mean = stats.auroc_intervals(np.column_stack([y, y]), scores)
    assert list(per_class.value) == [1.0, 0.0]
    # 1 - 1/625, sd sqrt(2)/625: logit(0.9984) = ln 624, minus 1.96 sd / (0.9984 * 0.0016).
    lower = 1 / (1 + math.exp(-(math.log(624) - stats.Z * math.sqrt(2) / 625 / (0.9984 * 0.0016))))
    assert per_class.low[0] == pytest.approx(lower) and 0.9748 < lower < 0.9750
    assert per_class.high[0] == 1.0
    assert (per_class.low[1], per_class.high[1]) == pytest.approx((0.0, 1 - lower))
    assert mean.value == 0.5


def test_95_percent_intervals_cover_the_true_auroc_95_percent_of_the_time():
    # 2,000 validation sets of 200 images, half positive, binormal scores of AUROC 0.8.
    labels, scores = stats_coverage.binormal_sets(200, 0.8, 2000, seed=11)
    per_class, _ = stats.auroc_intervals(labels, scores)
    assert np.nanmean(per_class.value) == pytest.approx(0.8, abs=0.005)  # the truth is 0.8
    covered = ((per_class.low <= 0.8) & (0.8 <= per_class.high)).mean()
    assert 0.935 <= covered <= 0.965


def test_the_benchmark_prints_coverage_and_cost():
    lines = stats_coverage.coverage_lines(50, seed=1)
    assert lines[0] == "Coverage of the 95% AUROC intervals, 50 simulated sets each:"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "    50 images, AUROC 0.95", "    50 images, AUROC 0.80", "   200 images, AUROC 0.80"
    ]  # fmt: skip
    assert all(" Wald " in line and "%, logit " in line for line in lines[1:])
    cost = stats_coverage.cost_lines(seed=1, repeats=1, bootstrap_seeds=2)
    assert cost[0].startswith("A run's intervals at 1,449 images x 20 classes (AP bootstrap")
    assert cost[1].startswith("  AP interval ends between 2 bootstrap seeds: sd ")


def test_weighted_average_precision_is_scikit_learns():
    rng = np.random.default_rng(12)
    labels = (rng.random((200, 3)) < [0.1, 0.5, 0.3]).astype(float)
    scores = tied_scores(rng, labels, 1.0)  # ties: one threshold per distinct score
    ones = np.ones((1, 200))
    expected = skm.average_precision_score(labels, scores, average=None)
    assert stats.weighted_average_precision(labels, scores, ones)[0] == pytest.approx(expected)
    weights = stats.resample_weights(200, 3, seed=13)
    for w in weights:
        idx = np.repeat(np.arange(200), w.astype(int))  # the resample itself
        got = stats.weighted_average_precision(labels, scores, w[None])[0]
        assert got == pytest.approx(
            skm.average_precision_score(labels[idx], scores[idx], average=None)
        )
    # Weights that leave out every positive of a class: no AP.
    none = (labels[:, 0] == 0).astype(float)[None]
    assert math.isnan(stats.weighted_average_precision(labels, scores, none)[0, 0])
    accuracy = stats.weighted_accuracy(labels, scores, weights)
    assert accuracy[0, 1] == pytest.approx(
        skm.accuracy_score(labels[:, 1], scores[:, 1] >= 0.5, sample_weight=weights[0])
    )


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate():
    rng = np.random.default_rng(14)
    labels = (rng.random((150, 3)) < 0.4).astype(float)
    labels[:, 2] = 0  # no positive: no AP, left out of the mean
    probs = 1 / (1 + np.exp(-(rng.standard_normal((150, 3)) + 2 * labels)))
    per_class, mean = stats.bootstrap_intervals(labels, probs, n_resamples=300, seed=1)
    again, mean_again = stats.bootstrap_intervals(labels, probs, n_resamples=300, seed=1)
    other, _ = stats.bootstrap_intervals(labels, probs, n_resamples=300, seed=2)
    assert np.array_equal(per_class.low, again.low, equal_nan=True) and mean == mean_again
    assert not np.array_equal(per_class.low[:2], other.low[:2])
    ap = skm.average_precision_score(labels[:, :2], probs[:, :2], average=None)
    assert per_class.value[:2] == pytest.approx(ap) and math.isnan(per_class.value[2])
    assert (per_class.low[:2] < ap).all() and (ap < per_class.high[:2]).all()
    assert math.isnan(per_class.low[2]) and mean.value == pytest.approx(ap.mean())
    assert mean.low < mean.value < mean.high


def test_a_run_against_itself_differs_by_0_with_p_1():
    rng = np.random.default_rng(15)
    labels = (rng.random((80, 3)) < 0.4).astype(float)
    probs = tied_scores(rng, labels, 1.0)
    for per_class, mean in (
        compare_stats.paired_delong(labels, probs, probs),
        compare_stats.paired_bootstrap(labels, probs, probs, n_resamples=200),
    ):
        assert list(per_class.value) == [0, 0, 0] and list(per_class.p) == [1, 1, 1]
        assert (mean.value, mean.low, mean.high, mean.p) == (0, 0, 0, 1)


def test_a_run_against_shuffled_predictions_differs_with_a_small_p():
    rng = np.random.default_rng(16)
    labels = (rng.random((100, 3)) < 0.4).astype(float)
    good = 1 / (1 + np.exp(-(rng.standard_normal((100, 3)) + 2.5 * labels)))
    shuffled = good[rng.permutation(100)]  # each image gets another image's probabilities
    per_class, mean = compare_stats.paired_delong(labels, good, shuffled)
    assert (per_class.value < -0.2).all() and (per_class.high < 0).all()
    assert (per_class.p < 1e-4).all() and mean.p < 1e-6
    ap, ap_mean = compare_stats.paired_bootstrap(labels, good, shuffled, n_resamples=500)
    assert (ap.value < 0).all() and ap_mean.high < 0
    assert ap_mean.p == pytest.approx(2 / 501)  # no resample at or above 0: the smallest p


def test_holm_by_hand():
    # Sorted 0.005, 0.01, 0.03, 0.04 (NaN not tested): x4, x3, x2, x1 = 0.02, 0.03, 0.06,
    # 0.04 -> kept from decreasing: 0.06.
    adjusted = compare_stats.holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[[0, 1, 2, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[3])
    assert list(compare_stats.holm([0.6, 0.5])) == [1.0, 1.0]  # capped at 1


def test_two_groups_of_seeds():
    result = compare_stats.compare_groups([0.80, 0.82], [0.83, 0.81, 0.85], n_resamples=2000)
    assert result.difference.value == pytest.approx(0.83 - 0.81)
    # B's 0.83 and 0.85 beat both of A's seeds, 0.81 beats one: 5 of 6 pairs.
    assert result.prob_b_beats_a == pytest.approx(5 / 6) and (result.n_a, result.n_b) == (2, 3)
    low, high = result.difference.low, result.difference.high
    assert -0.01 < low < 0.02 < high < 0.045  # extremes: 0.81 - 0.82 and 0.85 - 0.80
    assert compare_stats.compare_groups([0.8, 0.8], [0.8]).prob_b_beats_a == 0.5  # ties count half
    assert compare_stats.compare_groups([0.8, 0.82], [0.83, 0.81, 0.85], n_resamples=2000) == result
