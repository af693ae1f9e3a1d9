"""Scores per case: every metric of one prediction, the means over cases, and paired intervals between two
predictions (rungs) over the same cases.

A gain of one rung over another is judged per case (same case, same seed), so the case-to-case spread of
difficulty cancels; its uncertainty over the handful of test cases is a seeded percentile bootstrap of
the mean paired difference. Written with NumPy (a dozen lines) rather than ``scipy.stats.bootstrap``:
SciPy is not otherwise a dependency, and with 4-20 cases BCa intervals are unstable anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ctdiff.metrics.image import METRIC_NAMES, TruthScorer, mean_metrics
from ctdiff.metrics.structures import CONSPICUITY, FALSE_DEFECTS, STRUCTURE_METRICS, StructureTruth

BOOTSTRAP_RESAMPLES = 10_000
PAIRED_METRICS = ("psnr_body", "mae_hu_body", CONSPICUITY, FALSE_DEFECTS)  # the gains a reader looks for first


def score(pred_hu: np.ndarray, truth: TruthScorer, structures: StructureTruth | None = None) -> dict[str, float]:
    """Every metric of one (D, H, W) HU prediction against the case's truth (one :class:`TruthScorer` per case
    for all its predictions): :data:`METRIC_NAMES`, and with ``structures`` (a case with labels) the
    structure metrics that case has."""
    scores = truth.score(pred_hu)
    if structures is not None:
        scores.update(structures.metrics(pred_hu))
    return scores


def summarise(per_case: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of every metric of every rung over cases (NaN-aware).

    :data:`METRIC_NAMES` must be in every case; any other metric (a structure metric, the uncertainty of
    the model's spread) is averaged over the cases that have it (embolus conspicuity over APE cases, ...)
    and left out where none has it.
    """
    rungs = list(per_case[0])
    out = {}
    for rung in rungs:
        cases = [case[rung] for case in per_case]
        out[rung] = mean_metrics(cases)
        for name in dict.fromkeys(name for case in cases for name in case if name not in METRIC_NAMES):
            values = [case[name] for case in cases if name in case]
            out[rung][name] = float(np.nanmean(values))
    return out


def paired_bootstrap(differences: Sequence[float], seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                     confidence: float = 0.95) -> dict[str, float]:
    """Mean of per-case ``differences`` and its percentile bootstrap interval (seeded, so reruns agree).

    Returns ``mean``, ``ci95_low``, ``ci95_high`` (named for the default ``confidence``) and ``cases``.
    One case gives a zero-width interval: the spread cannot be estimated from it.
    """
    d = np.asarray([v for v in differences if not math.isnan(v)], dtype=np.float64)
    if d.size == 0:
        return {"mean": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "cases": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(d.mean()), "ci95_low": float(low), "ci95_high": float(high), "cases": int(d.size)}


def paired_gains(per_case: Sequence[Mapping[str, Mapping[str, float]]], rung: str, against: str, seed: int,
                 metrics: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, float]]:
    """{metric: paired_bootstrap(rung - against per case)}: positive is better for PSNR and SSIM,
    negative for MAE and false defects; for conspicuity, toward 1 is better (positive below 1).

    A structure metric is paired over the cases that have it and left out where none has it.
    """
    for name in metrics:
        if name not in (*METRIC_NAMES, *STRUCTURE_METRICS):
            raise ValueError(f"{name} is not one of {METRIC_NAMES + STRUCTURE_METRICS}")
    return {name: paired_bootstrap([case[rung][name] - case[against][name] for case in per_case
                                    if name in case[rung] and name in case[against]], seed)
            for name in metrics if name in METRIC_NAMES or any(name in case[rung] for case in per_case)}
