"""The spread of a model's samples against its error: a calibrated and a miscalibrated spread of known size."""

import numpy as np
import pytest

from ctdiff.metrics.uncertainty import average_ranks, spearman, uncertainty_metrics

HU_RANGE = (-1000.0, 1000.0)


def draws(sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` samples around a truth of 40 HU, voxel by voxel N(40, sigma)."""
    return 40.0 + sigma * np.random.default_rng(seed).standard_normal((n, *sigma.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    shape = (12, 40, 40)
    truth = np.full(shape, 40.0, np.float32)  # all body (soft tissue)
    # the noise level varies across the volume: 5 to 80 HU, so some voxels are far harder than others
    sigma = np.broadcast_to(np.linspace(5.0, 80.0, shape[2], dtype=np.float32), shape).copy()
    # one sample is the model's answer; 64 more from the same distribution are what its draws say
    answer = draws(sigma, 1, seed=0)[0]
    samples = draws(sigma, 64, seed=1)
    return truth, sigma, answer, samples


def test_a_calibrated_spread_covers_about_95_percent_and_ranks_the_error(case):
    truth, sigma, answer, samples = case
    spread = samples.std(axis=0, ddof=1)
    got = uncertainty_metrics(answer, spread, truth, HU_RANGE)
    assert 0.93 < got["uncertainty_coverage_2sd"] < 0.97
    assert got["uncertainty_spearman"] > 0.3  # a voxel's error scales with its sigma: the ranks agree


def test_an_overconfident_spread_covers_little_and_an_uninformative_one_ranks_nothing(case):
    truth, sigma, answer, samples = case
    overconfident = samples.std(axis=0, ddof=1) / 4  # the draws agree four times more than they are right
    got = uncertainty_metrics(answer, overconfident, truth, HU_RANGE)
    assert got["uncertainty_coverage_2sd"] < 0.5
    assert got["uncertainty_spearman"] > 0.3  # scaling the spread changes no rank
    shuffled = np.random.default_rng(2).permutation(overconfident.ravel()).reshape(sigma.shape) * 4
    got = uncertainty_metrics(answer, shuffled, truth, HU_RANGE)
    assert abs(got["uncertainty_spearman"]) < 0.05


def test_outside_the_body_nothing_counts(case):
    truth, sigma, answer, samples = case
    truth = truth.copy()
    truth[:, :, :20] = -1000.0  # air: outside the body mask
    wrong_in_air = answer.copy()
    wrong_in_air[:, :, :20] = 900.0  # a huge error there, and a spread of zero
    spread = samples.std(axis=0, ddof=1)
    spread[:, :, :20] = 0.0
    inside = uncertainty_metrics(wrong_in_air, spread, truth, HU_RANGE)["uncertainty_coverage_2sd"]
    assert inside > 0.9


def test_ranks_average_ties_and_spearman_matches_its_definition():
    np.testing.assert_array_equal(average_ranks(np.array([10.0, 20.0, 20.0, 5.0])), [2.0, 3.5, 3.5, 1.0])
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.ones(5)))
