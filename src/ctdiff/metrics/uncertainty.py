"""How well a per-voxel spread (the standard deviation of a model's decoded samples) ranks and covers the
error of the model's mean: what a regression network, with one answer per voxel, cannot report.

Both are scored inside the body mask of the truth (:func:`ctdiff.metrics.image.body_mask`, as ``*_body``),
on HU clipped to ``hu_range`` like every metric (what the VAE can represent):

- ``uncertainty_spearman``: Spearman's rank correlation between the spread and ``|mean - truth|``: 1 when
  the voxels the model is least sure of are exactly those it gets most wrong, 0 when the spread says
  nothing about the error.
- ``uncertainty_coverage_2sd``: the fraction of voxels whose truth lies within ``mean +- 2 spread``: about
  0.95 for a calibrated Gaussian spread, lower when the samples agree more than they are right.

The raw spread ranks the error but is no error bar: the draws of a small model agree more than they are
right (on the phantoms the truth lay within 2 spreads in 53-77 % of body voxels, not 95 %). :class:`Calibration`
scales it so that its intervals cover the truth at the nominal rates, by split conformal prediction on
held-out cases (the calibrate stage runs it on val): the nonconformity of a voxel is ``|mean - truth| / spread``
and the scale for coverage ``c`` is its ``c`` quantile over the calibration cases' body voxels (the
finite-sample quantile ``ceil((n + 1) c) / n``), one scale per group of voxels when one is not enough: the HU
band of the predicted mean (tissues) and the slab phase of the voxel's slice (the thick series pins each
slab's mean, so the draws agree most at slab centres). Then ``mean +- scale x spread`` covers a fraction ``c``
of new voxels from the same distribution (exchangeable with the calibration voxels; voxels of one case are not
independent, so the guarantee is approximate and the test split measures it: ``uncertainty_coverage_90``/``_95``
and the interval width ``uncertainty_width_95_hu``; ``uncertainty_coverage_95_centre``/``_midway``: at slab
centres and midway between them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctdiff.metrics.image import body_mask

UNCERTAINTY_METRICS = ("uncertainty_spearman", "uncertainty_coverage_2sd")
CALIBRATED_METRICS = ("uncertainty_coverage_90", "uncertainty_coverage_95", "uncertainty_width_95_hu",
                      "uncertainty_coverage_95_centre", "uncertainty_coverage_95_midway")
LEVELS = (0.9, 0.95)  # the nominal coverages a calibration is fitted and scored at
MIN_SPREAD_HU = 1.0  # spreads below this are taken as this: a voxel the draws all agree on is not certain


@dataclass(frozen=True)
class Calibration:
    """Scales of the spread per group of voxels and per nominal coverage (split conformal, one quantile per group:
    Mondrian conformal prediction). A voxel's group is the HU band of its predicted mean and, with
    ``phase_edges``, where its slice lies between series 1's slab centres (:meth:`ctdiff.data.slab.SlabOperator.phase`):
    the thick series pins each slab's weighted mean, so the draws agree most at a slab's centre, more than the
    error there falls (MAISI on the periphery phantoms: a 2.8x smaller spread at the centres than midway, a 1.7x
    smaller error), and one scale per band covered 81-85 % at the centres and 93-94 % midway for a nominal 90 %
    (val, leave one case out: benchmarks/bench_calibration_phase.py --loco-val, benchmarks/RESULTS.md).

    ``edges_hu``: HU band edges (ascending; ``[]`` = one band); ``phase_edges``: slab-phase edges in (0, 0.5)
    (``[]`` = one group); ``scales[level][band * (len(phase_edges) + 1) + phase bin]``: the spread multiplier whose
    interval covers ``level`` of the calibration voxels in that group."""

    edges_hu: tuple[float, ...]
    scales: dict[float, tuple[float, ...]]
    voxels: tuple[int, ...] = ()  # calibration voxels per group (reporting)
    phase_edges: tuple[float, ...] = ()

    def band_of(self, mean_hu: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges_hu, np.float32), np.asarray(mean_hu, np.float32), side="right")

    def group_of(self, mean_hu: np.ndarray, phase: np.ndarray | None = None) -> np.ndarray:
        """The group of each voxel: its HU band and, when the calibration has phase groups, its slab phase
        (``phase`` broadcast against ``mean_hu``: per voxel, or (D, 1, 1) per slice)."""
        band = self.band_of(mean_hu)
        if not self.phase_edges:
            return band
        if phase is None:
            raise ValueError("this calibration has a scale per slab phase: pass each voxel's phase")
        phase_bin = np.searchsorted(np.asarray(self.phase_edges, np.float32), np.asarray(phase, np.float32),
                                    side="right")
        return band * (len(self.phase_edges) + 1) + phase_bin

    def half_width(self, mean_hu: np.ndarray, spread_hu: np.ndarray, level: float,
                   phase: np.ndarray | None = None) -> np.ndarray:
        """The calibrated interval's half-width (HU) per voxel: ``scale(group) x spread``."""
        scales = np.asarray(self.scales[level], np.float32)
        return scales[self.group_of(mean_hu, phase)] * np.maximum(np.asarray(spread_hu, np.float32), MIN_SPREAD_HU)

    def to_json(self) -> dict[str, Any]:
        return {"edges_hu": list(self.edges_hu), "phase_edges": list(self.phase_edges),
                "scales": {str(k): list(v) for k, v in self.scales.items()}, "voxels": list(self.voxels)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Calibration:
        return cls(tuple(obj["edges_hu"]), {float(k): tuple(v) for k, v in obj["scales"].items()},
                   tuple(obj.get("voxels", ())), tuple(obj.get("phase_edges", ())))

    @classmethod
    def fit(cls, scores: Sequence[tuple[np.ndarray, ...]], edges_hu: Sequence[float],
            levels: Sequence[float] = LEVELS, phase_edges: Sequence[float] = ()) -> Calibration:
        """From ``(nonconformity, predicted mean HU[, slab phase])`` of each calibration case's body voxels
        (:func:`nonconformity`; the phase per voxel, needed with ``phase_edges``). A group without voxels takes
        the pooled scale."""
        shape = cls(tuple(float(e) for e in edges_hu), {}, (), tuple(float(e) for e in phase_edges))
        if shape.phase_edges and any(len(s) < 3 for s in scores):
            raise ValueError("a calibration per slab phase needs each voxel's phase: (ratio, mean, phase) per case")
        ratio = np.concatenate([s[0] for s in scores])
        phase = np.concatenate([s[2] for s in scores]) if shape.phase_edges else None
        group = shape.group_of(np.concatenate([s[1] for s in scores]), phase)
        n_groups = (len(shape.edges_hu) + 1) * (len(shape.phase_edges) + 1)
        out: dict[float, list[float]] = {float(level): [] for level in levels}
        counts = []
        pooled = {level: conformal_quantile(ratio, level) for level in out}
        for g in range(n_groups):
            in_group = ratio[group == g]
            counts.append(int(in_group.size))
            for level in out:
                out[level].append(conformal_quantile(in_group, level) if in_group.size else pooled[level])
        return cls(shape.edges_hu, {k: tuple(v) for k, v in out.items()}, tuple(counts), shape.phase_edges)


def phase_edges(bins: int) -> tuple[float, ...]:
    """Edges of ``bins`` equal slab-phase groups over [0, 0.5] (1: none)."""
    return tuple(0.5 * i / bins for i in range(1, bins))


# The phase thirds the coverage is reported on: a slab's centre below the first, midway at or above the second.
CENTRE_BELOW, MIDWAY_FROM = phase_edges(3)


def voxel_phase(slice_phase: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each ``mask`` voxel's slab phase from its slice's ((D,) :meth:`ctdiff.data.slab.SlabOperator.phase`)."""
    return np.broadcast_to(np.asarray(slice_phase)[:, None, None], mask.shape)[mask]


def conformal_quantile(ratios: np.ndarray, level: float) -> float:
    """The split-conformal quantile of nonconformity scores: the ``ceil((n + 1) level)``-th smallest of ``n``."""
    n = ratios.size
    k = min(n, math.ceil((n + 1) * level))
    return float(np.partition(ratios, k - 1)[k - 1])


def nonconformity(mean_hu: np.ndarray, spread_hu: np.ndarray, truth_hu: np.ndarray, hu_range: Sequence[float],
                  mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(|mean - truth| / spread, mean)`` over the ``mask`` voxels, HU clipped to ``hu_range`` (as every metric)."""
    low, high = float(hu_range[0]), float(hu_range[1])
    mean = np.clip(np.asarray(mean_hu, np.float32)[mask], low, high)
    error = np.abs(mean - np.clip(np.asarray(truth_hu, np.float32)[mask], low, high))
    return error / np.maximum(np.asarray(spread_hu, np.float32)[mask], MIN_SPREAD_HU), mean


def calibrated_metrics(mean_hu: np.ndarray, spread_hu: np.ndarray, truth_hu: np.ndarray, hu_range: Sequence[float],
                       calibration: Calibration, mask: np.ndarray, phase: np.ndarray | None = None
                       ) -> dict[str, float]:
    """Coverage of the calibrated 90 % and 95 % intervals and the 95 % interval's mean full width (HU) over
    the ``mask`` voxels; with ``phase`` ((D,) slab phase per slice, :meth:`ctdiff.data.slab.SlabOperator.phase`),
    also the 95 % coverage on slices near a slab's centre (phase < 1/6) and near midway (>= 1/3)."""
    ratio, mean = nonconformity(mean_hu, spread_hu, truth_hu, hu_range, mask)
    phases = None if phase is None else voxel_phase(phase, mask)
    group = calibration.group_of(mean, phases)
    out = {}
    for level, name in ((0.9, "uncertainty_coverage_90"), (0.95, "uncertainty_coverage_95")):
        out[name] = float(np.mean(ratio <= np.asarray(calibration.scales[level], np.float32)[group]))
    spread = np.maximum(np.asarray(spread_hu, np.float32)[mask], MIN_SPREAD_HU)
    scale95 = np.asarray(calibration.scales[0.95], np.float32)[group]
    out["uncertainty_width_95_hu"] = float(np.mean(2.0 * scale95 * spread))
    if phases is not None:
        covered = ratio <= scale95
        for name, where in (("uncertainty_coverage_95_centre", phases < CENTRE_BELOW),
                            ("uncertainty_coverage_95_midway", phases >= MIDWAY_FROM)):
            out[name] = float(np.mean(covered[where])) if where.any() else float("nan")
    return out


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
