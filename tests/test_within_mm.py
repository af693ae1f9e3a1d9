"""within_mm on the mask's bounding box equals the whole-volume distance map it replaced."""

import numpy as np
import pytest
import SimpleITK as sitk

from ctdiff.metrics.structures import within_mm


def _whole_volume(mask, spacing_mm, distance_mm):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance) <= distance_mm * (1 + 1e-5)


@pytest.mark.parametrize("spacing_mm", [(0.8, 0.8, 1.0), (0.7, 0.5, 2.5), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("distance_mm", [0.5, 2.0, 4.0, 30.0])
def test_the_bounding_box_gives_the_whole_volume_answer(spacing_mm, distance_mm):
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = np.zeros((20, 24, 28), bool)
        corner = rng.integers(0, [18, 22, 26])
        mask[tuple(slice(c, c + int(n)) for c, n in zip(corner, rng.integers(1, 4, 3)))] = True
        mask[tuple(rng.integers(0, [20, 24, 28]))] = True  # a second, far-off component
        assert np.array_equal(within_mm(mask, spacing_mm, distance_mm), _whole_volume(mask, spacing_mm, distance_mm))


def test_a_voxel_exactly_at_the_distance_is_within():
    mask = np.zeros((12, 12, 12), bool)
    mask[6, 6, 6] = True
    near = within_mm(mask, (0.8, 0.8, 1.0), 4.0)
    assert near[6, 6, 11] and near[6, 11, 6] and near[10, 6, 6]  # 5 x 0.8 mm and 4 x 1 mm
    assert not near[6, 6, 0] and not near[11, 6, 6]


def test_an_empty_mask_has_nothing_within_reach():
    assert not within_mm(np.zeros((4, 5, 6), bool), (1.0, 1.0, 1.0), 3.0).any()
