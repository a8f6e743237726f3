"""How often src/stats.py's 95% AUROC intervals hold the true AUROC, and what a run's
intervals cost at PASCAL's size.

    python -m benchmarks.stats_coverage
    python -m benchmarks.stats_coverage --simulations 2000 --seed 1

Coverage: simulated validation sets of N images, half of them positive, binormal scores
(negatives N(0, 1), positives N(d, 1), d = sqrt(2) * Phi^-1(AUROC): the true AUROC is known);
each set's DeLong interval, plain (Wald: A +- 1.96 sd) and on the logit scale (what a run
logs), and the share that holds the true AUROC. Printed for Demo-2's size (50 images) at
AUROC 0.95 and 0.8, and for 200 images at AUROC 0.8 (the case tests/test_stats.py checks).

Cost: a run's intervals at its best epoch (`src.stats.auroc_intervals` and the AP bootstrap
with `RUN_RESAMPLES` resamples) for 1,449 images x 20 classes (PASCAL VOC 2012 val), best of
3 on this machine, in CPU seconds; and how far the AP interval's ends move between bootstrap
seeds (their standard deviation over 10 seeds), the price of a modest number of resamples.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from scipy import stats as sps

from src import stats

CASES = ((50, 0.95), (50, 0.8), (200, 0.8))
PASCAL = (1449, 20)


def binormal_sets(images: int, auroc: float, sets: int, seed: int) -> tuple[np.ndarray, ...]:
    """(labels, scores), each [images, sets]: one simulated validation set per column, the
    first half of the images positive."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((images, sets))
    labels[: images // 2] = 1
    shift = np.sqrt(2) * sps.norm.ppf(auroc)
    return labels, rng.standard_normal((images, sets)) + shift * labels


def coverage(images: int, auroc: float, sets: int, seed: int) -> tuple[float, float]:
    """The shares of the simulated sets whose (Wald, logit) interval holds `auroc`."""
    labels, scores = binormal_sets(images, auroc, sets, seed)
    d = stats.delong(labels, scores)
    sd = np.sqrt(d.variance)
    wald = (d.auroc - stats.Z * sd <= auroc) & (auroc <= d.auroc + stats.Z * sd)
    logit, _ = stats.auroc_intervals(labels, scores)
    return float(wald.mean()), float(((logit.low <= auroc) & (auroc <= logit.high)).mean())


def pascal_sized_run(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a fair classifier on 1,449 images x 20 classes (each class
    in 3-25% of the images, AUROC about 0.9)."""
    rng = np.random.default_rng(seed)
    images, classes = PASCAL
    labels = (rng.random((images, classes)) < rng.uniform(0.03, 0.25, classes)).astype(float)
    logits = rng.standard_normal((images, classes)) + 1.8 * labels - 1.5
    return labels, 1 / (1 + np.exp(-logits))


def coverage_lines(simulations: int, seed: int) -> list[str]:
    lines = [f"Coverage of the 95% AUROC intervals, {simulations:,} simulated sets each:"]
    for images, auroc in CASES:
        wald, logit = coverage(images, auroc, simulations, seed)
        lines.append(f"  {images:>4} images, AUROC {auroc:.2f}: Wald {wald:.1%}, logit {logit:.1%}")
    return lines


def cost_lines(seed: int, repeats: int = 3, bootstrap_seeds: int = 10) -> list[str]:
    labels, probs = pascal_sized_run(seed)
    seconds = []
    for _ in range(repeats):
        start = time.process_time()  # one core's time: the same on a busy machine
        stats.auroc_intervals(labels, probs)
        stats.bootstrap_intervals(labels, probs, n_resamples=stats.RUN_RESAMPLES)
        seconds.append(time.process_time() - start)
    per_class = [
        stats.bootstrap_intervals(labels, probs, seed=s)[0] for s in range(bootstrap_seeds)
    ]
    spread = np.array([(i.low, i.high) for i in per_class]).std(axis=0)  # [2, classes]
    return [
        f"A run's intervals at {PASCAL[0]:,} images x {PASCAL[1]} classes (AP bootstrap of "
        f"{stats.RUN_RESAMPLES} resamples): {min(seconds):.2f} s of CPU",
        f"  AP interval ends between {bootstrap_seeds} bootstrap seeds: sd {spread.mean():.4f} "
        f"on average, {spread.max():.4f} at most (per class)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stats_coverage",
        description="Coverage of the AUROC intervals and the cost of a run's intervals.",
    )
    parser.add_argument("--simulations", type=int, default=20_000, help="sets per case")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.simulations < 1:
        parser.error("--simulations must be at least 1")
    print("\n".join(coverage_lines(args.simulations, args.seed)), flush=True)
    print("\n".join(cost_lines(args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
