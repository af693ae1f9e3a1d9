"""Voxel grids in patient space and resampling between them (SimpleITK conventions, DICOM LPS).

A :class:`Grid` is what ``meta.json`` stores: voxel ``[k, j, i]`` of a (D, H, W) array sits at
``origin + direction @ (i*sx, j*sy, k*sz)`` mm, with ``direction`` the 3x3 matrix whose columns are the
i, j, k axis directions (9 floats, row-major, as ``SimpleITK.Image.GetDirection()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

AIR_HU = -1024.0
INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}
Interpolator = Literal["linear", "bspline", "nearest"]


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (D, H, W) = (k, j, i) sizes
    spacing_mm: tuple[float, float, float]  # (sx, sy, sz)
    origin_mm: tuple[float, float, float]  # (x, y, z) LPS of voxel [0, 0, 0]
    direction: tuple[float, ...]  # 9 floats, row-major

    @classmethod
    def of_image(cls, image: sitk.Image) -> Grid:
        w, h, d = image.GetSize()
        return cls(
            shape=(d, h, w),
            spacing_mm=tuple(float(v) for v in image.GetSpacing()),
            origin_mm=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_meta(cls, grid: dict) -> Grid:
        return cls(
            shape=tuple(int(v) for v in grid["shape"]),
            spacing_mm=tuple(float(v) for v in grid["spacing"]),
            origin_mm=tuple(float(v) for v in grid["origin"]),
            direction=tuple(float(v) for v in grid["direction"]),
        )

    def to_meta(self) -> dict:
        """The ``grid`` entry of ``meta.json`` (DESIGN.md contract)."""
        return {
            "shape": list(self.shape),
            "spacing": [round(v, 6) for v in self.spacing_mm],
            "origin": [round(v, 6) for v in self.origin_mm],
            "direction": [round(v, 9) for v in self.direction],
        }

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def physical_point(self, index_kji: Sequence[float]) -> np.ndarray:
        """LPS mm of a (possibly fractional) voxel index given as (k, j, i)."""
        k, j, i = index_kji
        return np.asarray(self.origin_mm) + self.matrix @ (np.array([i, j, k], float) * self.spacing_mm)

    def reference_image(self) -> sitk.Image:
        """An empty image with this geometry, for ``sitk.Resample``."""
        d, h, w = self.shape
        ref = sitk.Image(int(w), int(h), int(d), sitk.sitkUInt8)
        ref.SetSpacing(self.spacing_mm)
        ref.SetOrigin(self.origin_mm)
        ref.SetDirection(self.direction)
        return ref

    def with_spacing(self, spacing_mm: Sequence[float]) -> Grid:
        """Same physical extent (centre kept) sampled at ``spacing_mm``."""
        new_spacing = np.asarray(spacing_mm, dtype=float)
        old_spacing = np.asarray(self.spacing_mm)
        size_xyz = np.asarray(self.shape[::-1], dtype=float)
        new_size = np.maximum(1, np.round(size_xyz * old_spacing / new_spacing)).astype(int)
        centre = self.physical_point([(n - 1) / 2 for n in self.shape])
        origin = centre - self.matrix @ ((new_size - 1) / 2 * new_spacing)
        return Grid(tuple(int(v) for v in new_size[::-1]), tuple(new_spacing.tolist()),
                    tuple(origin.tolist()), self.direction)

    def crop_or_pad(self, shape: Sequence[int]) -> Grid:
        """Centre crop or pad to ``shape`` (D, H, W) keeping spacing and the grid's voxel lattice."""
        offset_kji = [(old - new) // 2 for old, new in zip(self.shape, shape)]
        return self.subgrid(offset_kji, shape)

    def subgrid(self, start_kji: Sequence[int], shape: Sequence[int]) -> Grid:
        """The grid of voxels ``start .. start + shape`` (start may be negative: padding)."""
        origin = self.physical_point(start_kji)
        return Grid(tuple(int(v) for v in shape), self.spacing_mm, tuple(origin.tolist()), self.direction)


def image_from_array(hu: np.ndarray, grid: Grid) -> sitk.Image:
    """Wrap a (D, H, W) array as a SimpleITK image with ``grid``'s geometry."""
    if tuple(hu.shape) != tuple(grid.shape):
        raise ValueError(f"array shape {hu.shape} does not match grid shape {grid.shape}")
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(grid.spacing_mm)
    image.SetOrigin(grid.origin_mm)
    image.SetDirection(grid.direction)
    return image


def resample(image: sitk.Image, grid: Grid, interpolator: Interpolator = "linear",
             fill_hu: float = AIR_HU) -> np.ndarray:
    """Resample ``image`` (HU) onto ``grid`` in physical space; returns float32 (D, H, W) HU.

    Points outside the image's extent get ``fill_hu``. ITK counts a point as inside while it is within
    half a voxel of the outermost voxel centres, and clamps interpolation there, so a thick slab's
    physical coverage (centre +- thickness / 2) is honoured at the series' ends.
    """
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid.reference_image(), sitk.Transform(),
                        INTERPOLATORS[interpolator], float(fill_hu), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def slice_range_covered(grid: Grid, image: sitk.Image) -> tuple[int, int]:
    """Slices ``[k0, k1)`` of ``grid`` whose centre lies within ``image``'s extent along its slice axis.

    The extent is the span of the image's slice centres widened by half a slice spacing on each side
    (a reconstructed slice covers its thickness). Only the slice axis is considered: in-plane fields of
    view are handled by padding with air during resampling. Returns (0, 0) when nothing overlaps.
    """
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    origin = np.asarray(image.GetOrigin(), dtype=float)
    sz = image.GetSpacing()[2]
    lo, hi = -sz / 2 - 1e-3, (image.GetSize()[2] - 1) * sz + sz / 2 + 1e-3
    # The centre voxel of each target slice: exact for parallel slices, sensible for oblique pairs.
    _, h, w = grid.shape
    centres = np.stack([grid.physical_point([k, (h - 1) / 2, (w - 1) / 2]) for k in range(grid.shape[0])])
    along = (centres - origin) @ normal
    inside = np.flatnonzero((along >= lo) & (along <= hi))
    if inside.size == 0:
        return (0, 0)
    return int(inside[0]), int(inside[-1]) + 1


def to_int16_hu(hu: np.ndarray) -> np.ndarray:
    """Round HU to int16 (the processed-data storage type), clipping to its range."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.int16)
