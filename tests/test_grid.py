import numpy as np
import pytest
import SimpleITK as sitk

from ctdiff.grid import AIR_HU, Grid, image_from_array, resample, slice_range_covered, to_int16_hu

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
    image = image_from_array(hu, grid)
    cropped = grid.crop_or_pad((6, 8, 4))
    np.testing.assert_array_equal(resample(image, cropped), hu[2:8, :, 2:6])
    padded = grid.crop_or_pad((10, 12, 8))
    out = resample(image, padded)
    np.testing.assert_array_equal(out[:, 2:10, :], hu)
    assert (out[:, :2] == AIR_HU).all() and (out[:, 10:] == AIR_HU).all()


def test_thick_series_covers_half_a_slice_beyond_its_centres():
    # Three 5 mm slabs centred at z = 2, 7, 12 cover z in [-0.5, 14.5].
    thick = np.stack([np.full((4, 4), 100.0 * (k + 1)) for k in range(3)]).astype(np.float32)
    thick_grid = Grid((3, 4, 4), (1.0, 1.0, 5.0), (0.0, 0.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    thin_grid = Grid((18, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, -2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # z=-2..15
    image = image_from_array(thick, thick_grid)
    assert slice_range_covered(thin_grid, image) == (2, 17)  # z = 0 .. 14
    out = resample(image, thin_grid)[:, 1, 1]
    assert out[0] == AIR_HU and out[17] == AIR_HU
    np.testing.assert_allclose(out[2:5], 100.0)  # clamped inside the first slab
    np.testing.assert_allclose(out[9], 200.0)  # z = 7: centre of slab 2
    np.testing.assert_allclose(out[6], 140.0)  # z = 4: linear between slabs 1 and 2


def test_no_overlap_is_empty_range():
    a = Grid((3, 4, 4), (1.0, 1.0, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    b = Grid((3, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 100.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = image_from_array(np.zeros(a.shape, np.float32), a)
    assert slice_range_covered(b, image) == (0, 0)


def test_to_int16_hu_rounds_and_clips():
    out = to_int16_hu(np.array([-1024.4, 40.6, 1e6, -1e6]))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [-1024, 41, 32767, -32768])
