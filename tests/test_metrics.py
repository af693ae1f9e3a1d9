import math

import numpy as np
import pytest
import torch
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms.utils_morphological_ops import dilate, erode

from ctdiff.data.intensity import to_hu
from ctdiff.metrics import image
from ctdiff.metrics.image import (
    METRIC_NAMES,
    PSNR_CAP_DB,
    TruthScorer,
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


# ---------------------------------------------------------------- slab-wise scoring vs the whole volume


def _whole_volume_metrics(pred_hu, truth_hu, hu_range):
    """The whole-volume computation reconstruction_metrics did before it worked in slabs (MONAI throughout)."""
    pred01, truth01 = to_x01(pred_hu, hu_range), to_x01(truth_hu, hu_range)
    pred_clipped, truth_clipped = to_hu(pred01, hu_range), to_hu(truth01, hu_range)
    raw = (torch.as_tensor(truth_hu).float() > -500.0).float()[None, None]
    mask = erode(dilate(raw, 3), 3)[0, 0] > 0.5
    window = [min(11, s if s % 2 else s - 1) for s in truth01.shape]
    ssim_map = compute_ssim_and_cs(pred01[None, None], truth01[None, None], spatial_dims=3, kernel_size=window,
                                   kernel_sigma=[1.5] * 3, data_range=1.0)[0][0, 0]
    d, h, w = (k // 2 for k in window)
    centres = mask[d:mask.shape[0] - d, h:mask.shape[1] - h, w:mask.shape[2] - w]

    def psnr_of(p, t):
        if p.numel() == 0:
            return math.nan
        return min(float(PSNRMetric(max_val=1.0)(p.reshape(1, 1, -1), t.reshape(1, 1, -1)).item()), PSNR_CAP_DB)

    def mae_of(p, t):
        return float(MAEMetric()(p.reshape(1, 1, -1), t.reshape(1, 1, -1)).item()) if p.numel() else math.nan

    body = ssim_map[centres]
    return {
        "psnr": psnr_of(pred01, truth01),
        "ssim": float(ssim_map.mean()),
        "mae_hu": mae_of(pred_clipped, truth_clipped),
        "psnr_body": psnr_of(pred01[mask], truth01[mask]),
        "ssim_body": float(body.mean()) if body.numel() else math.nan,
        "mae_hu_body": mae_of(pred_clipped[mask], truth_clipped[mask]),
    }, mask


def _smooth_volume(shape, seed):
    """Smoothed noise in HU: a body (> -500 HU) of irregular blobs with air around, some of it beyond the
    [-1000, 1000] range (clipped before scoring)."""
    noise = torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    kernel = [min(5, n if n % 2 else n - 1) for n in shape]
    smooth = torch.nn.functional.avg_pool3d(noise[None, None], kernel, stride=1, padding=[k // 2 for k in kernel])
    smooth = smooth[0, 0] / smooth.std()
    return (-350.0 + 700.0 * smooth).numpy()


def _assert_close(got, want, ssim_tol=1e-5):
    assert list(got) == list(METRIC_NAMES) == list(want)
    for name in METRIC_NAMES:
        if math.isnan(want[name]):
            assert math.isnan(got[name]), name
        else:
            tol = 1e-3 if name.startswith("mae_hu") else ssim_tol if name.startswith("ssim") else 1e-5  # HU; dB
            assert got[name] == pytest.approx(want[name], abs=tol), name


def test_slab_wise_scorer_matches_the_whole_volume_computation(monkeypatch):
    monkeypatch.setattr(image, "BODY_SLAB_DEPTH", 7)  # the body mask's closing in 6 slabs too
    truth = _smooth_volume((40, 48, 48), seed=1)
    rng = np.random.default_rng(2)
    preds = [truth + rng.normal(0.0, 60.0, truth.shape).astype(np.float32),
             truth + 150.0 * np.sin(np.arange(48, dtype=np.float32) / 3.0),  # broadcast over (D, H, W)
             _smooth_volume(truth.shape, seed=3)]
    scorer = TruthScorer(truth, HU_RANGE, ssim_slab_depth=8)  # 30 centre rows: 4 slabs (8, 8, 8, 6)
    assert len(range(0, truth.shape[0] - 10, scorer.ssim_slab_depth)) >= 3
    for pred in preds:
        want, mask = _whole_volume_metrics(pred, truth, HU_RANGE)
        assert 0.1 < mask.float().mean() < 0.9  # a body with edges inside the volume
        assert torch.equal(scorer.mask, mask)
        _assert_close(scorer.score(pred), want)
        _assert_close(reconstruction_metrics(pred, truth, HU_RANGE), want)  # the default slab depth: 2 slabs
    # One scorer, many predictions: nothing of one prediction leaks into the next.
    assert scorer.score(truth)["psnr"] == PSNR_CAP_DB and scorer.score(truth)["mae_hu"] == 0.0


@pytest.mark.parametrize("shape", [(5, 24, 24), (3, 7, 9), (12, 10, 13), (11, 4, 30), (14, 3, 3)])
@pytest.mark.parametrize("slab_depth", [1, 2, 16])
def test_small_and_odd_shapes_match_the_whole_volume_computation(shape, slab_depth):
    """Axes shorter than the window shrink it; slabs of one or two centre rows still add up to the whole."""
    truth = _smooth_volume(shape, seed=4)
    pred = truth + np.random.default_rng(5).normal(0.0, 80.0, shape).astype(np.float32)
    want, _ = _whole_volume_metrics(pred, truth, HU_RANGE)
    _assert_close(TruthScorer(truth, HU_RANGE, ssim_slab_depth=slab_depth).score(pred), want)


def test_an_empty_body_gives_nan_body_metrics():
    truth = np.full((12, 12, 12), -1000.0, np.float32)
    values = TruthScorer(truth, HU_RANGE, ssim_slab_depth=1).score(truth + 10.0)
    want, _ = _whole_volume_metrics(truth + 10.0, truth, HU_RANGE)
    _assert_close(values, want)
    assert all(math.isnan(values[n]) for n in ("psnr_body", "ssim_body", "mae_hu_body"))


def test_scorer_rejects_bad_shapes():
    scorer = TruthScorer(np.zeros((12, 12, 12), np.float32), HU_RANGE)
    with pytest.raises(ValueError, match="truth's shape"):
        scorer.score(np.zeros((12, 12, 11), np.float32))
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_metrics(np.zeros((12, 12, 11)), np.zeros((12, 12, 12)), HU_RANGE)
    with pytest.raises(ValueError, match="D, H, W"):
        TruthScorer(np.zeros((12, 12)), HU_RANGE)


def test_body_mask_in_slabs_equals_the_whole_volume_closing(monkeypatch):
    hu = _smooth_volume((23, 20, 20), seed=6)
    raw = (torch.as_tensor(hu) > -500.0).float()[None, None]
    for closing in (3, 5):
        whole = erode(dilate(raw, closing), closing)[0, 0] > 0.5
        for depth in (1, 4, 50):
            monkeypatch.setattr(image, "BODY_SLAB_DEPTH", depth)
            assert torch.equal(body_mask(hu, closing_voxels=closing), whole)


# ---------------------------------------------------------------- hand-written SSIM and closing vs MONAI


def _ct_like(shape, seed):
    """A CT-like volume in HU: air (some of it below -1000, clipped), a body of soft tissue (40 HU) with a
    lung (-850 HU), a bone (700 HU) and a bright vessel, smooth texture and 15 HU noise. Its flat bright
    regions are where float32 cancellation in E[x^2] - E[x]^2 shows."""
    d, h, w = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    hu[(y / 0.8) ** 2 + (x / 0.85) ** 2 <= 1] = 40.0
    hu[((y + 0.1) / 0.45) ** 2 + ((x - 0.35) / 0.3) ** 2 <= 1] = -850.0
    hu[((y - 0.55) / 0.15) ** 2 + (x / 0.15) ** 2 <= 1] = 700.0
    hu[(y + 0.1 - 0.1 * z) ** 2 + (x + 0.35) ** 2 <= 0.02] = 300.0
    hu += np.where(hu > -1000, 40.0 * _smooth_volume(shape, seed) / 700.0, 0.0).astype(np.float32)
    return hu + rng.normal(0.0, 15.0, shape).astype(np.float32)


def _monai_map(pred01, truth01):
    window = [min(11, s if s % 2 else s - 1) for s in truth01.shape]
    return compute_ssim_and_cs(pred01[None, None], truth01[None, None], spatial_dims=3, kernel_size=window,
                               kernel_sigma=[1.5] * 3, data_range=1.0)[0][0, 0]


def _float64_map(pred01, truth01):
    """MONAI's SSIM map (its window, its formula) in float64, the window normalised in float64: what both
    float32 computations approximate."""
    window = [min(11, s if s % 2 else s - 1) for s in truth01.shape]
    gauss = []
    for k in window:
        dist = torch.arange(start=(1 - k) / 2, end=(1 + k) / 2, step=1, dtype=torch.float64)
        g = torch.exp(-((dist / 1.5) ** 2) / 2)
        gauss.append(g / g.sum())
    kernel = torch.einsum("i,j,k->ijk", *gauss)[None, None]

    def mean(v):
        return torch.nn.functional.conv3d(v[None, None].double(), kernel)[0, 0]

    x, y = pred01.double(), truth01.double()
    mx, my, sx, sy, sxy = mean(x), mean(y), mean(x * x), mean(y * y), mean(x * y)
    sx, sy, sxy = sx - mx * mx, sy - my * my, sxy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * ((2 * sxy + c2) / (sx + sy + c2))


@pytest.mark.parametrize("shape", [(16, 20, 24), (5, 24, 24), (3, 7, 9), (12, 10, 13), (11, 4, 30), (14, 3, 3)])
def test_separable_ssim_map_equals_monai_on_random_volumes(shape):
    """Every window size MONAI would use (11, and the shrunk odd windows of short axes), voxel by voxel: the
    separable map is within float32 rounding of the float64 value, and of MONAI's own float32 map (which
    strays up to about 1e-5 from float64 on these volumes)."""
    truth_hu = _smooth_volume(shape, seed=7)
    truth01 = to_x01(truth_hu, HU_RANGE)
    pred01 = to_x01(truth_hu + np.random.default_rng(8).normal(0.0, 80.0, shape), HU_RANGE)
    want, exact = _monai_map(pred01, truth01), _float64_map(pred01, truth01)
    got = image.ssim_map(pred01, truth01, slab_depth=3)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got.double() - exact).abs().max()) < 5e-6
    assert float((got - want).abs().max()) < 2e-5
    assert ssim(pred01, truth01) == pytest.approx(float(want.double().mean()), abs=2e-6)
    assert ssim(pred01, truth01) == pytest.approx(float(exact.mean()), abs=5e-7)
    mask = body_mask(truth_hu)
    centres = mask[tuple(slice(k // 2, n - k // 2) for k, n in zip([min(11, s if s % 2 else s - 1)
                                                                      for s in shape], shape))]
    if centres.any():
        assert ssim(pred01, truth01, mask) == pytest.approx(float(want[centres].double().mean()), abs=2e-6)
        assert ssim(pred01, truth01, mask) == pytest.approx(float(exact[centres].mean()), abs=5e-7)


def test_ssim_equals_monai_ssim_metric():
    from monai.metrics import SSIMMetric

    truth01 = to_x01(_ct_like((24, 40, 36), seed=1), HU_RANGE)
    pred01 = to_x01(_ct_like((24, 40, 36), seed=2), HU_RANGE)
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
    want = float(metric(pred01[None, None], truth01[None, None]).item())
    assert ssim(pred01, truth01) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_on_ct_like_volumes_is_monai_to_float32_rounding(seed):
    """On CT-like volumes MONAI's float32 map itself strays from the float64 value: over flat bright tissue
    E[x^2] - E[x]^2 cancels, and its window, normalised in float32, sums to 1 - 1.4e-7, which inflates every
    local variance by ~1.4e-7 E[x]^2 and the mean SSIM by ~1e-5. The separable map's taps sum to 1, and its
    mean stays within 3e-7 of float64. So each is compared with float64 at its own rounding, and with each
    other at MONAI's."""
    truth_hu = _ct_like((30, 64, 64), seed)
    pred_hu = truth_hu + np.random.default_rng(seed + 10).normal(10.0, 40.0, truth_hu.shape).astype(np.float32)
    truth01, pred01 = to_x01(truth_hu, HU_RANGE), to_x01(pred_hu, HU_RANGE)
    exact, monai_map, got = _float64_map(pred01, truth01), _monai_map(pred01, truth01), image.ssim_map(pred01, truth01)
    mask = body_mask(truth_hu)
    centres = mask[5:-5, 5:-5, 5:-5]
    assert 0.2 < float(centres.float().mean()) < 0.9
    # Voxel by voxel the float32 formula loses digits to cancellation in flat bright tissue (both maps do);
    # the means, which are what is reported, keep them.
    assert float((got.double() - exact).abs().max()) < 3e-4
    assert float((monai_map.double() - exact).abs().max()) < 3e-3
    assert float(got.double().mean()) == pytest.approx(float(exact.mean()), abs=3e-7)
    assert ssim(pred01, truth01, mask) == pytest.approx(float(exact[centres].mean()), abs=3e-7)
    assert float(monai_map.double().mean()) == pytest.approx(float(exact.mean()), abs=1e-4)
    assert ssim(pred01, truth01, mask) == pytest.approx(float(monai_map[centres].double().mean()), abs=2e-4)
    # The scorer (slabs, the truth's maps kept) gives the same numbers.
    scored = TruthScorer(truth_hu, HU_RANGE, ssim_slab_depth=7).score(pred_hu)
    assert scored["ssim"] == pytest.approx(float(exact.mean()), abs=3e-7)
    assert scored["ssim_body"] == pytest.approx(float(exact[centres].mean()), abs=3e-7)


def test_the_window_taps_are_monai_s_summing_to_one():
    from monai.metrics.regression import _gaussian_kernel

    for size in (3, 5, 7, 9, 11):
        taps = image._gaussian_1d(size)
        monai_taps = _gaussian_kernel(2, 1, [size, 1], [1.5, 1.5])[0, 0, :, 0]
        assert taps.dtype == torch.float32 and torch.allclose(taps, monai_taps, rtol=1e-6, atol=1e-8)
        assert abs(float(taps.double().sum()) - 1.0) < 1e-9
    assert float(monai_taps.double().sum()) - 1.0 < -1e-8  # the 11 taps normalised in float32: what is fixed


@pytest.mark.parametrize("closing", [1, 3, 5])
def test_boolean_closing_equals_monai_erode_of_dilate(closing):
    for shape in [(23, 40, 36), (4, 9, 9), (1, 12, 12)]:
        hu = _ct_like(shape, seed=3)
        hu[::3, ::4, ::5] = -900.0  # one-voxel holes for the closing to bridge
        raw = (torch.as_tensor(hu) > -500.0).float()[None, None]
        want = erode(dilate(raw, closing), closing)[0, 0] > 0.5
        assert torch.equal(body_mask(hu, closing_voxels=closing), want)
    flat = _ct_like((1, 30, 30), seed=4)[0]  # a 2-D image: MONAI's 2-D morphology
    want = erode(dilate((torch.as_tensor(flat) > -500.0).float()[None, None], 3), 3)[0, 0] > 0.5
    assert torch.equal(body_mask(flat), want)
    with pytest.raises(ValueError, match="odd"):
        body_mask(flat, closing_voxels=4)


def test_psnr_is_monai_psnr_metric():
    truth01 = to_x01(_ct_like((10, 20, 20), seed=5), HU_RANGE)
    pred01 = to_x01(_ct_like((10, 20, 20), seed=6), HU_RANGE)
    mask = body_mask(_ct_like((10, 20, 20), seed=5))
    for m in (None, mask):
        p, t = (pred01, truth01) if m is None else (pred01[m], truth01[m])
        want = float(PSNRMetric(max_val=1.0)(p.reshape(1, 1, -1), t.reshape(1, 1, -1)).item())
        assert image.psnr(pred01, truth01, m) == pytest.approx(want, abs=1e-4)
    assert image.psnr(truth01, truth01) == PSNR_CAP_DB
    assert math.isnan(image.psnr(pred01, truth01, torch.zeros_like(mask)))
    assert image.psnr_of_mse(1e-4) == pytest.approx(40.0)


def test_the_scorer_reads_any_array_kind_alike(tmp_path):
    """int16 memory-mapped (read-only) volumes, tensors and float64 arrays score as the float32 arrays do."""
    truth = np.round(_ct_like((20, 24, 28), seed=8))
    pred = np.round(truth + np.random.default_rng(9).normal(0.0, 50.0, truth.shape))
    want = TruthScorer(truth.astype(np.float32), HU_RANGE).score(pred.astype(np.float32))
    np.save(tmp_path / "truth.npy", truth.astype(np.int16))
    np.save(tmp_path / "pred.npy", pred.astype(np.int16))
    mapped = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("truth", "pred")]
    for t, p in [mapped, (torch.from_numpy(truth.astype(np.float32)), torch.from_numpy(pred.astype(np.float32))),
                 (truth, pred)]:
        scorer = TruthScorer(t, HU_RANGE, ssim_slab_depth=4)
        assert scorer.score(p) == pytest.approx(want, rel=1e-6)
    assert image.mean_abs01(pred, scorer) == pytest.approx(want["mae_hu"] / 2000.0, rel=1e-6)
    assert torch.equal(scorer.x01(slice(3, 5)), to_x01(truth[3:5], HU_RANGE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_scorer_scores_on_the_gpu_as_on_the_cpu():
    truth = _ct_like((30, 64, 64), seed=11)
    preds = [truth + np.random.default_rng(12).normal(0.0, 40.0, truth.shape).astype(np.float32), truth + 25.0]
    cpu = TruthScorer(truth, HU_RANGE)
    gpu = TruthScorer(truth, HU_RANGE, device="cuda")
    assert gpu.mask.is_cuda and gpu.mu_y.is_cuda and torch.equal(gpu.mask.cpu(), cpu.mask)
    for pred in preds:
        want = cpu.score(pred)
        for given in (pred, torch.from_numpy(pred).cuda()):
            assert gpu.score(given) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert TruthScorer(torch.from_numpy(truth).cuda(), HU_RANGE).device.type == "cuda"
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed for the process: the scorer still works in float32
    try:
        single = reconstruction_metrics(preds[0], truth, HU_RANGE, device="cuda")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert single == pytest.approx(cpu.score(preds[0]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("workers", [1, 2, 3, 40])
def test_workers_and_kept_maps_do_not_change_the_numbers(monkeypatch, workers):
    """The map rows split between worker threads (each slice's errors counted by one of them), and the truth's
    maps kept or computed inside score, give the whole-volume numbers."""
    monkeypatch.setattr(image, "_workers", lambda device: workers)
    threads = torch.get_num_threads()
    truth = _ct_like((30, 40, 36), seed=13)
    pred = truth + np.random.default_rng(14).normal(0.0, 40.0, truth.shape).astype(np.float32)
    want, mask = _whole_volume_metrics(pred, truth, HU_RANGE)
    for keep_maps in (True, False):
        scorer = TruthScorer(truth, HU_RANGE, ssim_slab_depth=4, keep_maps=keep_maps)
        assert torch.equal(scorer.mask, mask) and (scorer.mu_y is not None) == keep_maps
        _assert_close(scorer.score(pred), want, ssim_tol=1e-4)  # MONAI's own float32 error here (see above)
    assert torch.get_num_threads() == threads  # the workers' single intra-op thread was the caller's again
