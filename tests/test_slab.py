"""The slab-consistency operator: forward model, projection, and the geometry read from real DICOM."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from paramkit import merged_params
from pydicom.uid import generate_uid

from ctdiff.data.dicom_write import SeriesSpec, encode_series
from ctdiff.data.grid import Grid
from ctdiff.data.preprocess import preprocess
from ctdiff.data.slab import SlabOperator, SliceProfile


def random_volume(shape, seed=0, scale=300.0):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def contiguous(n_thin=30, n=5, thin_mm=1.0, **kw):
    """Slabs of ``n`` thin slices each, back to back, centred on their slices' mean position."""
    z = np.arange(n_thin) * thin_mm
    centres = [(j * n + (n - 1) / 2) * thin_mm for j in range(n_thin // n)]
    return SlabOperator.from_geometry(z, thin_mm, centres, n * thin_mm, **kw)


def test_box_slabs_average_their_thin_slices():
    op = contiguous(30, 5)
    thin = random_volume((30, 4, 6))
    expected = thin.reshape(6, 5, 4, 6).mean(axis=1)
    np.testing.assert_allclose(op.forward(thin), expected, rtol=0, atol=1e-3)
    np.testing.assert_allclose(op.weights.sum(axis=1), 1.0)


@pytest.mark.parametrize("profile", ["box", "triangle", "gaussian"])
@pytest.mark.parametrize("spacing_mm, thickness_mm", [(5.0, 5.0), (2.5, 5.0), (3.0, 5.0), (5.0, 2.0), (4.0, 1.0)])
def test_projection_meets_the_measurements(profile, spacing_mm, thickness_mm):
    """Contiguous, overlapping and gapped slabs: A(P') equals the measurements to float tolerance,
    projecting twice changes nothing, and the change is linear between the slab centres (constant beyond)."""
    z = np.arange(40) * 1.0
    centres = np.arange(3.0, 37.0, spacing_mm)
    op = SlabOperator.from_geometry(z, 1.0, centres, thickness_mm, profile=profile)
    assert op.n_slabs >= 3
    prediction, truth = random_volume((40, 5, 7), 1), random_volume((40, 5, 7), 2)
    measured = op.forward(truth)
    projected = op.project(prediction, measured)
    np.testing.assert_allclose(op.forward(projected), measured, rtol=0, atol=1e-2)
    np.testing.assert_allclose(op.project(projected, measured), projected, rtol=0, atol=1e-2)
    # The change is a hat per slab centre (linear interpolation): the prediction's own detail is kept.
    change = (projected - prediction).reshape(40, -1).astype(np.float64)
    centres = op.weights @ z / op.weights.sum(axis=1)  # each kept slab's centre of mass on the grid
    hats = np.stack([np.interp(z, centres, unit) for unit in np.eye(op.n_slabs)], axis=1)
    np.testing.assert_allclose(hats @ np.linalg.lstsq(hats, change, rcond=None)[0], change, atol=1e-2)


def test_projection_of_a_consistent_volume_is_itself():
    op = contiguous(30, 5)
    truth = random_volume((30, 3, 3), 3)
    np.testing.assert_allclose(op.project(truth, op.forward(truth)), truth, atol=1e-3)


def test_projection_keeps_within_slab_detail_and_takes_the_slab_mean():
    """Non-overlapping box slabs: each slab's mean of P' is the measurement, and P' - P is linear between the
    slab centres: the prediction's detail inside a slab is kept up to that smooth change."""
    op = contiguous(20, 5)
    prediction, measured = random_volume((20, 2, 2), 4), random_volume((4, 2, 2), 5)
    projected = op.project(prediction, measured)
    np.testing.assert_allclose(projected.reshape(4, 5, 2, 2).mean(axis=1), measured, atol=1e-3)
    change = (projected - prediction).astype(np.float64)
    centres = np.array([2.0, 7.0, 12.0, 17.0])
    at_centres = change[centres.astype(int)]
    expected = np.stack([np.interp(np.arange(20.0), centres, at_centres[:, i, j]) for i in range(2)
                         for j in range(2)], axis=1).reshape(20, 2, 2)
    np.testing.assert_allclose(change, expected, atol=1e-3)


def test_slabs_reaching_outside_the_grid():
    """A slab half outside is dropped (its measurement includes tissue the grid does not hold); one
    that is 98% inside is kept with its weights renormalised over the inside."""
    z = np.arange(20) * 1.0  # thin voxels cover [-0.5, 19.5]
    op = SlabOperator.from_geometry(z, 1.0, [-0.5, 2.0, 17.1], 5.0)
    np.testing.assert_array_equal(op.slab_index, [1, 2])
    np.testing.assert_allclose(op.weights.sum(axis=1), 1.0)
    assert op.weights[1, 19] > 0 and op.weights[1, :15].sum() == 0
    with pytest.raises(ValueError, match="profile"):
        SlabOperator.from_geometry(z, 1.0, [5.0], 5.0, profile="sinc")


def test_bad_shapes_are_errors():
    op = contiguous(10, 5)
    with pytest.raises(ValueError, match="D = 10"):
        op.forward(np.zeros((9, 2, 2)))
    with pytest.raises(ValueError, match="2 slabs"):
        op.project(np.zeros((10, 2, 2)), np.zeros((3, 2, 2)))


@pytest.mark.parametrize("profile, spacing_mm, thickness_mm", [("box", 5.0, 5.0), ("gaussian", 2.5, 5.0),
                                                               ("triangle", 4.0, 1.0)])
def test_row_blocks_match_the_whole_volume(monkeypatch, profile, spacing_mm, thickness_mm):
    """forward and project in blocks of rows (axis 1) give what one whole-volume float64 pass gave."""
    from ctdiff.data import slab

    op = SlabOperator.from_geometry(np.arange(40) * 1.0, 1.0, np.arange(3.0, 37.0, spacing_mm), thickness_mm,
                                    profile=profile)
    prediction, truth = random_volume((40, 11, 6), 1), random_volume((40, 11, 6), 2)
    measured = op.forward(truth)
    # The whole-volume computation as it was before the blocks.
    thin64 = prediction.astype(np.float64)
    whole_forward = np.tensordot(op.weights, thin64, axes=(1, 0)).astype(np.float32)
    residual = measured.astype(np.float64) - np.tensordot(op.weights, thin64, axes=(1, 0))
    whole_project = (thin64 + np.tensordot(op.correction, residual, axes=(1, 0))).astype(np.float32)
    np.testing.assert_allclose(op.forward(prediction, block_rows=11), whole_forward, rtol=0, atol=1e-4)
    np.testing.assert_allclose(op.project(prediction, measured, block_rows=11), whole_project, rtol=0, atol=1e-4)
    for rows in (1, 3, 4):  # 11 rows: blocks of one, uneven blocks
        np.testing.assert_allclose(op.forward(prediction, block_rows=rows), whole_forward, rtol=0, atol=1e-4)
        projected = op.project(prediction, measured, block_rows=rows)
        assert projected.dtype == np.float32 and projected.shape == prediction.shape
        np.testing.assert_allclose(projected, whole_project, rtol=0, atol=1e-4)
    monkeypatch.setattr(slab, "BLOCK_BYTES", 2 * 8 * 40 * 6)  # the default block: two rows
    assert SlabOperator._blocks(prediction.shape, None)[:2] == [slice(0, 2), slice(2, 4)]
    np.testing.assert_allclose(op.project(prediction, measured), whole_project, rtol=0, atol=1e-4)
    np.testing.assert_allclose(op.forward(prediction.astype(np.int16)), op.forward(prediction.astype(np.int16),
                                                                                   block_rows=11), atol=1e-4)
    assert op.correction is op.correction  # computed once per operator
    np.testing.assert_allclose(op.weights @ op.correction, np.eye(op.n_slabs), atol=1e-9)  # W C = I


REAL_TAPS = (0.02, 0.07, 0.13, 0.18, 0.2, 0.18, 0.13, 0.07, 0.02)  # a real 5 mm profile, every mm (docs/slab.md)


@pytest.mark.parametrize("profile", ["box", "gaussian", SliceProfile("fitted", REAL_TAPS, 0.2)])
def test_the_projection_adds_no_bands_at_the_slab_period(profile):
    """A smooth field measured by 5 mm slabs, its interpolation projected back: the slice-to-slice change is
    about as large at the slab boundaries as mid-slab, as in the field itself (the least-norm correction W^+
    was stepped at the slab period: 1.7-1.9x on the phantoms)."""
    z = np.arange(60.0)
    truth = (200.0 * np.sin(z / 2.5) + 3.0 * z)[:, None, None] * np.ones((1, 4, 4))
    op = SlabOperator.from_geometry(z, 1.0, np.arange(2.0, 58.0, 5.0), 5.0, profile)
    measured = op.forward(truth)
    interpolated = np.interp(z, op.positions_mm, measured[:, 0, 0])[:, None, None] * np.ones((1, 4, 4))

    def banding(volume):
        change = np.abs(np.diff(volume[:, 0, 0]))[5:-6]  # away from the ends
        by_phase = [change[k::5].mean() for k in range(5)]
        return max(by_phase) / min(by_phase)

    for correction in ("correction", "pseudo_inverse"):
        residual = measured - op.forward(interpolated)
        projected = interpolated + np.tensordot(getattr(op, correction), residual, axes=(1, 0))
        np.testing.assert_allclose(op.forward(projected), measured, atol=1e-3)  # both agree with series 1
        if correction == "correction":
            assert banding(projected) < 1.3 * banding(truth), banding(projected)
            np.testing.assert_allclose(op.project(interpolated, measured), projected, atol=1e-3)
        else:
            assert banding(projected) > 1.3 * banding(truth)  # what the default no longer does


def _slab_average_case(path: Path, thin_hu: np.ndarray, n: int, stride: int, origin_z: float = -180.0) -> None:
    """A zip whose series 1 is exactly the mean of ``n`` thin slices every ``stride`` slices (noise-free)."""
    starts = range(0, thin_hu.shape[0] - n + 1, stride)
    thick = np.stack([thin_hu[s : s + n].mean(axis=0) for s in starts])
    frame, study = generate_uid(), generate_uid()
    thin_spec = SeriesSpec(spacing_mm=(0.8, 0.8, 1.0), origin_mm=(-10.0, -12.0, origin_z), series_number=2,
                           frame_of_reference_uid=frame, study_uid=study)
    thick_spec = SeriesSpec(spacing_mm=(0.8, 0.8, float(stride)), slice_thickness_mm=float(n),
                            origin_mm=(-10.0, -12.0, origin_z + (n - 1) / 2.0), series_number=1,
                            frame_of_reference_uid=frame, study_uid=study)
    with zipfile.ZipFile(path, "w") as zf:
        for folder, hu, spec in (("1", thick, thick_spec), ("2", thin_hu, thin_spec)):
            for name, data in encode_series(hu, spec):
                zf.writestr(f"{path.stem}/{folder}/{name}", data)


@pytest.mark.parametrize("n, stride", [(5, 5), (5, 3), (3, 5)])
def test_operator_from_processed_meta_reproduces_series_1(tmp_path, n, stride):
    """Through real DICOM and preprocess: A, built from meta.json alone, maps the thin series to
    series 1 as acquired (to int16 rounding), for contiguous, overlapping and gapped slabs."""
    raw = tmp_path / "raw"
    (raw / "APE").mkdir(parents=True)
    (raw / "non-APE").mkdir()
    rng = np.random.default_rng(7)
    for i, category in enumerate(("APE", "non-APE", "non-APE")):
        z, y, x = np.meshgrid(np.arange(33), np.arange(12), np.arange(14), indexing="ij")
        thin = 40.0 + 300.0 * np.sin(0.4 * z + 0.3 * x + i) * np.cos(0.2 * y) + rng.normal(0, 20, z.shape)
        _slab_average_case(raw / category / f"case_{i + 1:03d}.zip", np.rint(thin), n, stride)
    params = merged_params({"preprocess": {"workers": 1, "min_slices": 2}})
    preprocess(params, raw, tmp_path / "processed", progress=False)
    for case_dir in sorted((tmp_path / "processed").glob("case_*")):
        meta = json.loads((case_dir / "meta.json").read_text())
        grid, grid1 = Grid.from_meta(meta["grid"]), Grid.from_meta(meta["series1"]["grid"])
        # the slabs wholly inside the grid reproduce series 1 exactly
        whole = SlabOperator.for_case(grid, grid1, meta["series1"]["slice_thickness"], min_coverage=1 - 1e-6)
        target, series1 = np.load(case_dir / "target.npy"), np.load(case_dir / "series1.npy")
        measured = whole.measurements(series1, grid1, grid)
        np.testing.assert_array_equal(measured, series1[whole.slab_index].astype(np.float32))
        np.testing.assert_allclose(whole.forward(target), measured, rtol=0, atol=0.51)
        # the default also keeps an end slab with at least 3/4 of its profile inside (renormalised), and the
        # projection honours every kept slab
        op = SlabOperator.for_case(grid, grid1, meta["series1"]["slice_thickness"])
        assert set(whole.slab_index) <= set(op.slab_index) and op.n_slabs >= series1.shape[0] - 1
        measured = op.measurements(series1, grid1, grid)
        projected = op.project(np.load(case_dir / "source.npy"), measured)
        np.testing.assert_allclose(op.forward(projected), measured, rtol=0, atol=1e-2)
