import numpy as np
import pytest
import SimpleITK as sitk

from ctdiff.data.grid import AIR_HU, Grid, image_from_array, resample, slice_range_covered, to_int16_hu

OBLIQUE = tuple(sitk.VersorRigid3DTransform((0.2, -0.1, 0.3, 0.9)).GetMatrix())


@pytest.fixture
def oblique_grid():
    return Grid((5, 6, 7), (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0), OBLIQUE)


def test_physical_point_matches_simpleitk(oblique_grid):
    image = image_from_array(np.zeros(oblique_grid.shape, np.float32), oblique_grid)
    for kji in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        expected = image.TransformIndexToPhysicalPoint([int(v) for v in kji[::-1]])
        np.testing.assert_allclose(oblique_grid.physical_point(kji), expected, atol=1e-9)
    assert Grid.of_image(image) == oblique_grid


def test_meta_round_trip(oblique_grid):
    again = Grid.from_meta(oblique_grid.to_meta())
    assert again.shape == oblique_grid.shape
    np.testing.assert_allclose(again.direction, oblique_grid.direction, atol=1e-8)


def test_with_spacing_keeps_centre_and_extent(oblique_grid):
    fine = oblique_grid.with_spacing((0.35, 0.4, 1.25))
    assert fine.shape == (10, 12, 14)
    centre = lambda g: g.physical_point([(n - 1) / 2 for n in g.shape])  # noqa: E731
    np.testing.assert_allclose(centre(fine), centre(oblique_grid), atol=1e-9)


def test_crop_or_pad_is_centred_on_the_same_lattice():
    grid = Grid((10, 8, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    hu = np.arange(np.prod(grid.shape), dtype=np.float32).reshape(grid.shape)
    cropped = grid.crop_or_pad((6, 8, 4))
    np.testing.assert_array_equal(resample(hu, grid, cropped), hu[2:8, :, 2:6])
    padded = grid.crop_or_pad((10, 12, 8))
    out = resample(hu, grid, padded)
    np.testing.assert_array_equal(out[:, 2:10, :], hu)
    assert (out[:, :2] == AIR_HU).all() and (out[:, 10:] == AIR_HU).all()


def test_thick_series_covers_half_a_slice_beyond_its_centres():
    # Three 5 mm slabs centred at z = 2, 7, 12 cover z in [-0.5, 14.5].
    thick = np.stack([np.full((4, 4), 100.0 * (k + 1)) for k in range(3)]).astype(np.float32)
    thick_grid = Grid((3, 4, 4), (1.0, 1.0, 5.0), (0.0, 0.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    thin_grid = Grid((18, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, -2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # z=-2..15
    assert slice_range_covered(thin_grid, thick_grid) == (2, 17)  # z = 0 .. 14
    out = resample(thick, thick_grid, thin_grid)[:, 1, 1]
    assert out[0] == AIR_HU and out[17] == AIR_HU
    np.testing.assert_allclose(out[2:5], 100.0)  # clamped inside the first slab
    np.testing.assert_allclose(out[9], 200.0)  # z = 7: centre of slab 2
    np.testing.assert_allclose(out[6], 140.0)  # z = 4: linear between slabs 1 and 2


def test_no_overlap_is_empty_range():
    a = Grid((3, 4, 4), (1.0, 1.0, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    b = Grid((3, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert slice_range_covered(b, a) == (0, 0)


def itk_resample(hu, src, dst, interpolator):
    """SimpleITK's own resampler: the reference the fast path must reproduce."""
    image = image_from_array(hu.astype(np.float32), src)
    kind = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    out = sitk.Resample(image, dst.template_image(), sitk.Transform(), kind, AIR_HU, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("interpolator", ["linear", "nearest"])
@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), OBLIQUE])
def test_slice_axis_fast_path_matches_simpleitk(interpolator, direction):
    rng = np.random.default_rng(1)
    thick_grid = Grid((7, 9, 11), (0.8, 0.7, 5.0), (-3.0, 4.0, 10.0), direction)
    thick = rng.normal(0, 300, thick_grid.shape).astype(np.float32)
    # A thin grid shifted by whole pixels in-plane, by a fraction of a slab along z, and wider than
    # the thick series on every side (air padding and half-slab coverage at both ends).
    thin_grid = thick_grid.subgrid((-1, -2, 3), (45, 12, 6))
    thin_grid = Grid(thin_grid.shape, (0.8, 0.7, 0.9), tuple(thin_grid.physical_point((0.37, 0, 0))), direction)
    ours = resample(thick, thick_grid, thin_grid, interpolator)
    np.testing.assert_allclose(ours, itk_resample(thick, thick_grid, thin_grid, interpolator), atol=2e-3)
    assert (ours == AIR_HU).any() and (ours != AIR_HU).any()


def test_general_path_handles_different_pixel_spacing():
    grid = Grid((4, 8, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    hu = np.tile(np.arange(8, dtype=np.float32) * 10, (4, 8, 1))  # a ramp along x
    out = resample(hu, grid, grid.with_spacing((0.5, 1.0, 2.0)))
    assert out.shape == (4, 8, 16)
    x_mm = -0.25 + 0.5 * np.arange(16)  # same centre (3.5 mm), half the spacing
    np.testing.assert_allclose(out[0, 0], np.clip(10 * x_mm, 0, 70), atol=1e-4)


def test_to_int16_hu_rounds_and_clips():
    out = to_int16_hu(np.array([[-1024.4, 40.6, 1e6, -1e6]]))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[0], [-1024, 41, 32767, -32768])
