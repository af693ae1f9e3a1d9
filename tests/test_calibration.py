"""Split-conformal calibration of the model's spread on synthetic samples of known miscalibration: one scale,
a scale per HU band, a scale per slab phase; and where a thin slice lies between series 1's slab centres."""

import numpy as np
import pytest

from ctdiff.data.slab import SlabOperator
from ctdiff.metrics.uncertainty import Calibration, calibrated_metrics, nonconformity, phase_edges

HU_RANGE = (-1000.0, 1000.0)
Z95 = 1.959964


def volume_case(k: np.ndarray, base_hu: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, spread, truth): the truth lies ``k x spread`` standard normal deviations from the prediction,
    voxel by voxel (k = 1: a calibrated Gaussian spread; k > 1: draws that agree more than they are right)."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(5.0, 60.0, k.shape).astype(np.float32)
    prediction = (base_hu + rng.normal(0.0, 3.0, k.shape)).astype(np.float32)
    truth = prediction + k * spread * rng.standard_normal(k.shape).astype(np.float32)
    return prediction, spread, truth


def scores_of(prediction, spread, truth, phase=None):
    mask = np.ones(prediction.shape, bool)
    ratio, mean = nonconformity(prediction, spread, truth, HU_RANGE, mask)
    if phase is None:
        return ratio, mean
    return ratio, mean, np.broadcast_to(phase[:, None, None], prediction.shape)[mask]


def test_one_scale_corrects_an_overconfident_spread_to_the_nominal_coverage():
    shape = (16, 40, 40)
    k, base = np.full(shape, 2.5, np.float32), np.full(shape, 40.0, np.float32)
    calibration = Calibration.fit([scores_of(*volume_case(k, base, seed)) for seed in (0, 1)], [])
    # the 95 % scale of |Z| x 2.5 is 1.96 x 2.5
    assert calibration.scales[0.95][0] == pytest.approx(Z95 * 2.5, rel=0.03)
    prediction, spread, truth = volume_case(k, base, seed=7)  # a new case from the same distribution
    mask = np.ones(shape, bool)
    raw = float(np.mean(np.abs(prediction - truth) <= 2 * spread))
    assert raw < 0.65  # the raw 2-sd interval: P(|Z| < 0.8) = 0.58
    got = calibrated_metrics(prediction, spread, truth, HU_RANGE, calibration, mask)
    assert got["uncertainty_coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert got["uncertainty_coverage_90"] == pytest.approx(0.90, abs=0.01)
    assert got["uncertainty_width_95_hu"] == pytest.approx(2 * calibration.scales[0.95][0] * spread.mean(), rel=1e-4)
    assert "uncertainty_coverage_95_centre" not in got  # no phase given


def test_a_scale_per_hu_band_where_tissues_are_miscalibrated_differently():
    shape = (16, 40, 40)
    lung = np.zeros(shape, bool)
    lung[:, :, :20] = True  # lung at -800 HU, three times overconfident; soft tissue at 40 HU, calibrated
    k = np.where(lung, 3.0, 1.0).astype(np.float32)
    base = np.where(lung, -800.0, 40.0).astype(np.float32)
    cal_scores = [scores_of(*volume_case(k, base, seed)) for seed in (0, 1)]
    prediction, spread, truth = volume_case(k, base, seed=7)

    def coverage(calibration, where):
        return calibrated_metrics(prediction, spread, truth, HU_RANGE, calibration, where)["uncertainty_coverage_95"]

    pooled = Calibration.fit(cal_scores, [])
    assert coverage(pooled, lung) < 0.9 and coverage(pooled, ~lung) > 0.99  # one scale: right on average only
    banded = Calibration.fit(cal_scores, [-500.0, 150.0])
    assert banded.voxels[2] == 0 and banded.scales[0.95][2] == pooled.scales[0.95][0]  # no voxel: the pooled scale
    for where in (lung, ~lung):
        assert coverage(banded, where) == pytest.approx(0.95, abs=0.01)


def slab_operator(depth: int, thin_mm: float, spacing_mm: float, thickness_mm: float) -> SlabOperator:
    """Series 1 with slabs every ``spacing_mm`` over a thin grid of ``depth`` slices ``thin_mm`` apart."""
    z = np.arange(depth) * thin_mm
    centres = np.arange(thickness_mm / 2 - thin_mm / 2, z[-1], spacing_mm)
    return SlabOperator.from_geometry(z, thin_mm, centres, thickness_mm, "box")


def test_the_slab_phase_of_each_thin_slice_follows_the_slab_geometry():
    # 5 mm slabs on a 1 mm grid: centres on slices 2, 7, 12, ...; midway at 4.5, 9.5
    phase = slab_operator(20, 1.0, 5.0, 5.0).phase(1.0)
    np.testing.assert_allclose(phase[:10], [0.4, 0.2, 0.0, 0.2, 0.4, 0.4, 0.2, 0.0, 0.2, 0.4], atol=1e-9)
    # overlapping slabs (5 mm every 2.5 mm) on a 0.625 mm grid: the phase is in units of the spacing
    z = np.arange(40) * 0.625
    phase = SlabOperator.from_geometry(z, 0.625, np.arange(2.5, 22.0, 2.5), 5.0, "box").phase(0.625)
    np.testing.assert_allclose(phase[4:12], [0.0, 0.25, 0.5, 0.25, 0.0, 0.25, 0.5, 0.25], atol=1e-9)
    # one slab: distances in thicknesses, clipped at midway
    single = SlabOperator.from_geometry(np.arange(9.0), 1.0, [4.0], 5.0, "box")
    np.testing.assert_allclose(single.phase(1.0), [0.5, 0.5, 0.4, 0.2, 0.0, 0.2, 0.4, 0.5, 0.5])


def test_a_scale_per_slab_phase_where_the_draws_agree_most_at_slab_centres():
    # The draws agree 3x more than they are right at the slab centres, and are calibrated midway: one scale per
    # HU band covers too little at the centres and too much midway; one per phase group covers each at nominal.
    depth, shape = 30, (30, 32, 32)
    phase = slab_operator(depth, 1.0, 5.0, 5.0).phase(1.0)
    k = np.broadcast_to(np.interp(phase, [0.0, 0.5], [3.0, 1.0])[:, None, None], shape).astype(np.float32)
    base = np.full(shape, 40.0, np.float32)
    cal_scores = [scores_of(*volume_case(k, base, seed), phase=phase) for seed in (0, 1, 2)]
    prediction, spread, truth = volume_case(k, base, seed=7)
    mask = np.ones(shape, bool)

    banded = Calibration.fit([s[:2] for s in cal_scores], [-500.0, 150.0])
    got = calibrated_metrics(prediction, spread, truth, HU_RANGE, banded, mask, phase)
    assert got["uncertainty_coverage_95"] == pytest.approx(0.95, abs=0.01)  # right on average ...
    assert got["uncertainty_coverage_95_centre"] < 0.91 and got["uncertainty_coverage_95_midway"] > 0.98  # ... only

    grouped = Calibration.fit(cal_scores, [-500.0, 150.0], phase_edges=phase_edges(3))
    assert grouped.phase_edges == pytest.approx((1 / 6, 1 / 3)) and len(grouped.scales[0.95]) == 9
    got = calibrated_metrics(prediction, spread, truth, HU_RANGE, grouped, mask, phase)
    for name in ("uncertainty_coverage_95", "uncertainty_coverage_95_centre", "uncertainty_coverage_95_midway"):
        assert got[name] == pytest.approx(0.95, abs=0.015), name
    # the interval is widest where the draws are most overconfident
    half = grouped.half_width(prediction, spread, 0.95, phase[:, None, None]) / np.maximum(spread, 1.0)
    assert half[phase == 0].min() > 2 * half[phase == 0.4].max()


def test_a_calibration_round_trips_and_one_without_phase_groups_needs_no_phase():
    rng = np.random.default_rng(0)
    ratio, mean, phase = rng.exponential(1.0, 5000), rng.uniform(-1000, 500, 5000), rng.uniform(0, 0.5, 5000)
    grouped = Calibration.fit([(ratio, mean, phase)], [-500.0], phase_edges=phase_edges(2))
    again = Calibration.from_json(grouped.to_json())
    assert again == grouped and again.phase_edges == (0.25,)
    with pytest.raises(ValueError, match="slab phase"):
        grouped.half_width(mean, np.ones_like(mean), 0.95)  # without each voxel's phase
    with pytest.raises(ValueError, match="slab phase"):
        Calibration.fit([(ratio, mean)], [-500.0], phase_edges=phase_edges(2))
    # a calibration.json written before the phase groups: per HU band, the phase ignored
    old = {"edges_hu": [-500.0], "scales": {"0.9": [1.5, 2.5], "0.95": [2.0, 3.0]}, "voxels": [10, 20]}
    bands = Calibration.from_json(old)
    assert bands.phase_edges == ()
    np.testing.assert_allclose(bands.half_width(np.array([-800.0, 40.0]), np.array([10.0, 10.0]), 0.95),
                               [20.0, 30.0])
    np.testing.assert_allclose(bands.half_width(np.array([-800.0]), np.array([10.0]), 0.95, np.array([0.4])), [20.0])
