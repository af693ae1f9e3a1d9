"""Paired gains and their bootstrap intervals on numbers with a known answer."""

import math

import numpy as np
import pytest

from ctdiff.metrics.cases import paired_bootstrap, paired_gains, summarise


def test_constant_differences_give_a_zero_width_interval():
    out = paired_bootstrap([0.5, 0.5, 0.5, 0.5], seed=0)
    assert out == {"mean": 0.5, "ci95_low": 0.5, "ci95_high": 0.5, "cases": 4}


def test_interval_is_seeded_and_brackets_the_mean():
    d = [1.0, 2.0, -0.5, 3.0, 0.2]
    a, b = paired_bootstrap(d, seed=1), paired_bootstrap(d, seed=1)
    assert a == b
    assert a["mean"] == pytest.approx(np.mean(d))
    assert a["ci95_low"] < a["mean"] < a["ci95_high"]
    assert min(d) <= a["ci95_low"] and a["ci95_high"] <= max(d)
    # A gain that flips sign between cases is not significant; a consistent one is.
    assert paired_bootstrap([2.0, -2.0, 2.1, -1.9], seed=0)["ci95_low"] < 0
    assert paired_bootstrap([0.9, 1.1, 1.0, 1.2], seed=0)["ci95_low"] > 0


def test_nan_cases_are_left_out_and_nothing_gives_nan():
    assert paired_bootstrap([1.0, math.nan, 3.0], seed=0)["cases"] == 2
    assert math.isnan(paired_bootstrap([], seed=0)["mean"])


def test_paired_gains_pair_cases():
    per_case = [
        {"model": {"psnr_body": 30.0, "mae_hu_body": 10.0}, "baseline": {"psnr_body": 29.0, "mae_hu_body": 12.0}},
        {"model": {"psnr_body": 20.0, "mae_hu_body": 30.0}, "baseline": {"psnr_body": 19.0, "mae_hu_body": 32.0}},
    ]
    gains = paired_gains(per_case, "model", "baseline", seed=0)
    # Unpaired the two cases' spread (10 dB) would swamp the gain; paired it is exactly 1 dB and -2 HU.
    assert gains["psnr_body"]["ci95_low"] == gains["psnr_body"]["ci95_high"] == 1.0
    assert gains["mae_hu_body"]["mean"] == -2.0
    with pytest.raises(ValueError):
        paired_gains(per_case, "model", "baseline", seed=0, metrics=("psnr_hu",))
    with pytest.raises(KeyError):
        summarise(per_case)
