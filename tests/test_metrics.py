import math

import numpy as np
import pytest
import torch

from ctdiff.metrics.image import (
    METRIC_NAMES,
    PSNR_CAP_DB,
    body_mask,
    mean_metrics,
    reconstruction_metrics,
    ssim,
    to_x01,
)

HU_RANGE = (-1000.0, 1000.0)


def _phantom(shape=(16, 32, 32)) -> np.ndarray:
    """Air around a cube of water (0 HU) with a bright insert."""
    hu = np.full(shape, -1024.0, np.float32)
    hu[2:-2, 6:-6, 6:-6] = 0.0
    hu[6:10, 12:20, 12:20] = 400.0
    return hu


def test_identical_volumes_give_capped_psnr_unit_ssim_zero_error():
    hu = _phantom()
    values = reconstruction_metrics(hu, hu.copy(), HU_RANGE)
    assert set(values) == set(METRIC_NAMES)
    assert values["psnr"] == values["psnr_body"] == PSNR_CAP_DB
    assert values["ssim"] == pytest.approx(1.0) and values["ssim_body"] == pytest.approx(1.0)
    assert values["mae_hu"] == 0.0 and values["mae_hu_body"] == 0.0


def test_psnr_of_known_noise_matches_the_analytic_value():
    sigma_hu = 40.0
    ref = np.zeros((12, 20, 20), np.float32)  # water: no clipping for +-40 HU
    signs = np.random.default_rng(0).choice([-1.0, 1.0], ref.shape).astype(np.float32)
    values = reconstruction_metrics(ref + sigma_hu * signs, ref, HU_RANGE)
    # MSE in [0, 1] units is exactly (sigma / 2000)^2 with data range 1.
    expected = 20 * math.log10((HU_RANGE[1] - HU_RANGE[0]) / sigma_hu)
    assert values["psnr"] == pytest.approx(expected, abs=1e-3)
    assert values["psnr_body"] == pytest.approx(expected, abs=1e-3)  # all water: all body
    assert values["mae_hu"] == pytest.approx(sigma_hu, abs=1e-3)


def test_mae_is_exact_and_body_metrics_ignore_errors_outside_the_body():
    ref = _phantom()
    mask = body_mask(ref).numpy()
    pred = ref.copy()
    pred[mask] += 25.0
    pred[~mask] = -600.0  # air reconstructed 400 HU too bright: outside the body mask
    values = reconstruction_metrics(pred, ref, HU_RANGE)
    assert values["mae_hu_body"] == pytest.approx(25.0, abs=1e-4)
    n_body, n = mask.sum(), mask.size
    assert values["mae_hu"] == pytest.approx((25.0 * n_body + 400.0 * (n - n_body)) / n, rel=1e-5)
    assert values["psnr_body"] == pytest.approx(20 * math.log10(2000 / 25.0), abs=1e-3)
    assert values["psnr"] < values["psnr_body"]


def test_hu_beyond_the_range_is_clipped_before_comparing():
    ref = _phantom()
    pred = np.clip(ref, *HU_RANGE)  # -1024 air comes back as -1000, which the VAE cannot go below
    values = reconstruction_metrics(pred, ref, HU_RANGE)
    assert values["mae_hu"] == 0.0 and values["psnr"] == PSNR_CAP_DB
    assert to_x01(torch.tensor([-2000.0, 0.0, 3000.0]), HU_RANGE).tolist() == [0.0, 0.5, 1.0]


def test_body_mask_thresholds_and_closes_small_gaps():
    hu = np.full((9, 9, 9), -1000.0, np.float32)
    hu[2:7, 2:7, 2:7] = 40.0
    hu[4, 4, 4] = -800.0  # one dark voxel inside the body (noise, a small air bubble)
    mask = body_mask(hu)
    assert mask[4, 4, 4] and mask[2:7, 2:7, 2:7].all()
    assert mask.sum() == 125  # nothing grows into the air
    hu[3:6, 3:6, 3:6] = -850.0  # a lung-sized region stays out
    assert not body_mask(hu)[4, 4, 4]


def test_ssim_body_averages_window_centres_inside_the_mask():
    ref = np.full((16, 24, 48), -1000.0, np.float32)
    ref[2:-2, 4:-4, 4:20] = 0.0  # body in x < 20
    pred = ref.copy()
    pred[:, :, 32:] = 500.0  # air changed farther than the window radius (5) from every body voxel
    ref01, pred01 = to_x01(ref, HU_RANGE), to_x01(pred, HU_RANGE)
    mask = body_mask(ref)
    assert ssim(pred01, ref01, mask) == pytest.approx(1.0, abs=1e-6)
    assert ssim(pred01, ref01) < 0.99


def test_short_axes_shrink_the_ssim_window():
    ref = _phantom((5, 24, 24))
    assert reconstruction_metrics(ref, ref, HU_RANGE)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too short"):
        reconstruction_metrics(ref[:2], ref[:2], HU_RANGE)


def test_mean_metrics_skips_nan():
    cases = [dict.fromkeys(METRIC_NAMES, 1.0), dict.fromkeys(METRIC_NAMES, 3.0)]
    cases[1]["psnr_body"] = math.nan
    means = mean_metrics(cases)
    assert means["psnr"] == 2.0 and means["psnr_body"] == 1.0
