"""How well a per-voxel spread (the standard deviation of a model's decoded samples) ranks and covers the
error of the model's mean: what a regression network, with one answer per voxel, cannot report.

Both are scored inside the body mask of the truth (:func:`ctdiff.metrics.image.body_mask`, as ``*_body``),
on HU clipped to ``hu_range`` like every metric (what the VAE can represent):

- ``uncertainty_spearman``: Spearman's rank correlation between the spread and ``|mean - truth|``: 1 when
  the voxels the model is least sure of are exactly those it gets most wrong, 0 when the spread says
  nothing about the error.
- ``uncertainty_coverage_2sd``: the fraction of voxels whose truth lies within ``mean +- 2 spread``: about
  0.95 for a calibrated Gaussian spread, lower when the samples agree more than they are right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctdiff.metrics.image import body_mask

UNCERTAINTY_METRICS = ("uncertainty_spearman", "uncertainty_coverage_2sd")


def uncertainty_metrics(mean_hu: np.ndarray, spread_hu: np.ndarray, truth_hu: np.ndarray,
                        hu_range: Sequence[float], mask: np.ndarray | None = None) -> dict[str, float]:
    """Both metrics for one case: (D, H, W) mean prediction, its per-voxel spread (HU) and the truth (HU);
    ``mask``: the truth's body mask when the caller has it."""
    low, high = float(hu_range[0]), float(hu_range[1])
    mask = body_mask(truth_hu).numpy() if mask is None else np.asarray(mask)
    if not mask.any():
        return {name: float("nan") for name in UNCERTAINTY_METRICS}
    error = np.abs(np.clip(np.asarray(mean_hu, np.float32)[mask], low, high)
                   - np.clip(np.asarray(truth_hu, np.float32)[mask], low, high))
    spread = np.asarray(spread_hu, np.float32)[mask]
    return {"uncertainty_spearman": spearman(spread, error),
            "uncertainty_coverage_2sd": float(np.mean(error <= 2.0 * spread))}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D samples (ties get their average rank); NaN when either is constant.

    NumPy rather than ``scipy.stats.spearmanr``: SciPy is not otherwise a dependency, and this is the
    Pearson correlation of :func:`average_ranks`.
    """
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D sample as float64, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2.0)[inverse]
