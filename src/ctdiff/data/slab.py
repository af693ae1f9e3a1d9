"""Slab consistency: what series 1 measures of a thin volume, and the projection onto that measurement.

Series 1 (thick) and series 2 (thin) are two reconstructions of one scan, so each thick slice is, up to
its own noise, a weighted average along the slice normal of the thin field inside its slab: its
sensitivity profile (box by default: the mean over ``SliceThickness`` mm centred on the slice position).
On the common grid (series 2's, ``meta.json`` ``grid``) that is a linear operator acting along the slice
axis only,

    A: thin volume (D, H, W) -> what series 1 measures (S, H, W),   A = W (x) identity in-plane,

with ``W`` an (S, D) matrix of each slab's profile mass over each thin voxel's extent (rows sum to one).
The projection of a prediction ``P`` onto the measurements ``m`` (series 1 sampled on the grid's
in-plane lattice at its own slice positions) is the smallest change that makes it agree with them,

    P' = P + W^+ (m - A P),    W^+ = W^T (W W^T)^-1 (the pseudo-inverse: least squares when rank-deficient),

so ``A P' = m`` exactly: the prediction keeps its within-slab detail (the part ``A`` cannot see) and takes
everything ``A`` sees from the measurement. Non-overlapping box slabs reduce to adding each slab's
residual to all of its thin slices; overlapping slabs (spacing < thickness) are coupled and solved
jointly; thin slices in gaps between slabs (spacing > thickness) carry no weight and stay as they are.
A slab that reaches outside the grid along the normal measures tissue the grid does not hold: it is
kept only when at least ``min_coverage`` of its profile lies inside (its weights renormalised over that
part), otherwise dropped, leaving its slices to the other slabs.

Written with NumPy rather than taken from a library: MONAI and SimpleITK have no slab-projection
operator, and along one axis it is a small dense matrix (S x D, tens by hundreds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from ctdiff.data.grid import Grid, resample
from ctdiff.data.processed import Case

Profile = Literal["box", "triangle", "gaussian"]
PROFILES: tuple[str, ...] = ("box", "triangle", "gaussian")
MIN_COVERAGE = 0.95  # a slab with less of its profile inside the grid is not used as a constraint
BLOCK_BYTES = 32 << 20  # forward / project work on blocks of rows (axis 1) of about this many float64 bytes
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class SlabOperator:
    """``A`` of the module docstring for one case: series 1's slabs seen from the common grid.

    ``weights`` (S, D): slab ``s``'s profile mass over thin slice ``k`` (rows sum to 1); ``slab_index``
    (S,): which slice of series 1 each row is (dropped slabs are absent); ``positions_mm`` (S,): slab
    centres along the grid's slice normal, in mm from the grid's slice 0.
    """

    weights: np.ndarray
    slab_index: np.ndarray
    positions_mm: np.ndarray
    thickness_mm: float
    profile: str

    @classmethod
    def from_geometry(cls, thin_positions_mm: Sequence[float], thin_extent_mm: float,
                      slab_positions_mm: Sequence[float], thickness_mm: float, profile: Profile = "box",
                      min_coverage: float = MIN_COVERAGE) -> SlabOperator:
        """From positions along one axis (mm): thin slice centres (each covering ``thin_extent_mm``) and
        slab centres with their ``thickness_mm`` (the profile's full width at half maximum)."""
        if profile not in PROFILES:
            raise ValueError(f"slab profile {profile!r} is not one of {PROFILES}")
        if thickness_mm <= 0 or thin_extent_mm <= 0:
            raise ValueError(f"slab thickness {thickness_mm} mm and thin extent {thin_extent_mm} mm must be > 0")
        z = np.asarray(thin_positions_mm, dtype=np.float64)
        c = np.asarray(slab_positions_mm, dtype=np.float64)
        cdf = _CDFS[profile]
        # Mass of slab s's profile over thin voxel k's extent [z_k - e/2, z_k + e/2].
        hi = cdf((z[None, :] + thin_extent_mm / 2.0 - c[:, None]) / thickness_mm)
        lo = cdf((z[None, :] - thin_extent_mm / 2.0 - c[:, None]) / thickness_mm)
        mass = np.clip(hi - lo, 0.0, None)
        # Only what lies between the grid's ends counts as inside (adjacent voxels tile that span).
        coverage = mass.sum(axis=1)
        keep = coverage >= min_coverage
        weights = mass[keep] / coverage[keep, None]
        return cls(weights, np.flatnonzero(keep), c[keep], float(thickness_mm), profile)

    @classmethod
    def for_case(cls, grid: Grid, series1_grid: Grid, thickness_mm: float | None, profile: Profile = "box",
                 min_coverage: float = MIN_COVERAGE) -> SlabOperator:
        """From ``meta.json``: the common grid, series 1's grid and its SliceThickness (None: its spacing,
        the usual contiguous reconstruction). Series 1's slices are taken where their centres fall along
        the common grid's slice normal."""
        thickness = float(thickness_mm) if thickness_mm else float(series1_grid.spacing_mm[2])
        normal = grid.matrix[:, 2]
        _, h1, w1 = series1_grid.shape
        centres = np.stack([series1_grid.physical_point([j, (h1 - 1) / 2, (w1 - 1) / 2])
                            for j in range(series1_grid.shape[0])])
        slab_mm = (centres - np.asarray(grid.origin_mm)) @ normal
        sz = float(grid.spacing_mm[2])
        return cls.from_geometry(np.arange(grid.shape[0]) * sz, sz, slab_mm, thickness, profile, min_coverage)

    @property
    def n_slabs(self) -> int:
        return int(self.weights.shape[0])

    @property
    def constrained(self) -> np.ndarray:
        """(D,) bool: thin slices that at least one kept slab sees."""
        return self.weights.sum(axis=0) > 0

    @cached_property
    def pseudo_inverse(self) -> np.ndarray:
        """(D, S) ``W^+``, computed once per operator."""
        return np.linalg.pinv(self.weights)

    def forward(self, thin: np.ndarray, block_rows: int | None = None) -> np.ndarray:
        """``A``: (D, H, W) thin volume -> (S, H, W) float32, what series 1 would measure (noise-free).

        In float64 on blocks of ``block_rows`` rows (default: about ``BLOCK_BYTES`` per block)."""
        self._check_depth(thin)
        out = np.empty((self.n_slabs, *thin.shape[1:]), np.float32)
        for rows in self._blocks(thin.shape, block_rows):
            out[:, rows] = np.tensordot(self.weights, np.asarray(thin[:, rows], dtype=np.float64), axes=(1, 0))
        return out

    def project(self, thin: np.ndarray, measured: np.ndarray, block_rows: int | None = None) -> np.ndarray:
        """``P' = P + W^+ (m - A P)``: (D, H, W) prediction and (S, H, W) measurements -> (D, H, W) float32
        with ``forward(P') == measured`` (to float precision) when the slabs are independent.

        In float64 on blocks of ``block_rows`` rows (default: about ``BLOCK_BYTES`` per block): the rows are
        independent, so no temporary is larger than a block."""
        self._check_depth(thin)
        if measured.shape != (self.n_slabs, *thin.shape[1:]):
            raise ValueError(f"measurements of shape {measured.shape} do not fit {self.n_slabs} slabs of "
                             f"{thin.shape[1:]}")
        out = np.empty(thin.shape, np.float32)
        for rows in self._blocks(thin.shape, block_rows):
            block = np.array(thin[:, rows], dtype=np.float64)  # a copy: updated in place below
            residual = np.asarray(measured[:, rows], dtype=np.float64) - np.tensordot(self.weights, block,
                                                                                       axes=(1, 0))
            block += np.tensordot(self.pseudo_inverse, residual, axes=(1, 0))
            out[:, rows] = block
        return out

    @staticmethod
    def _blocks(shape: tuple[int, ...], block_rows: int | None) -> list[slice]:
        """Slices of axis 1 (rows) of a (D, H, W) volume: ``block_rows`` rows each, or about ``BLOCK_BYTES``."""
        depth, height, width = shape
        if block_rows is None:
            block_rows = BLOCK_BYTES // max(1, 8 * depth * width)
        block_rows = max(1, int(block_rows))
        return [slice(start, min(height, start + block_rows)) for start in range(0, height, block_rows)]

    def measurements(self, series1_hu: np.ndarray, series1_grid: Grid, grid: Grid) -> np.ndarray:
        """Series 1 as acquired, (S1, H1, W1) HU on its own grid -> (S, H, W) float32 HU: the kept slabs
        sampled on the common grid's rows and columns (linear in-plane; air outside series 1's view)."""
        _, h, w = grid.shape
        normal = grid.matrix[:, 2]
        out = np.empty((self.n_slabs, h, w), np.float32)
        for row, pos in enumerate(self.positions_mm.tolist()):
            # One slice of the common lattice at the slab's position along the normal: on a shared
            # in-plane lattice this lands exactly on series 1's slice (no interpolation along z).
            origin = np.asarray(grid.origin_mm) + normal * pos
            plane = Grid((1, h, w), grid.spacing_mm, tuple(origin.tolist()), grid.direction)
            out[row] = resample(series1_hu, series1_grid, plane, "linear")[0]
        return out

    def _check_depth(self, thin: np.ndarray) -> None:
        if thin.ndim != 3 or thin.shape[0] != self.weights.shape[1]:
            raise ValueError(f"expected a (D, H, W) volume with D = {self.weights.shape[1]}, got {thin.shape}")


def _box_cdf(u: np.ndarray) -> np.ndarray:
    """Mass of a box of width 1 centred on 0, below ``u`` (in units of the thickness)."""
    return np.clip(u + 0.5, 0.0, 1.0)


def _triangle_cdf(u: np.ndarray) -> np.ndarray:
    """Mass below ``u`` of a triangle with FWHM 1 (support [-1, 1])."""
    u = np.clip(u, -1.0, 1.0)
    return np.where(u < 0.0, 0.5 * (1.0 + u) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def _gaussian_cdf(u: np.ndarray) -> np.ndarray:
    """Mass below ``u`` of a Gaussian with FWHM 1."""
    return 0.5 * (1.0 + _erf(u / (_FWHM_TO_SIGMA * math.sqrt(2.0))))


_erf = np.vectorize(math.erf, otypes=[np.float64])  # S x D values: no need for scipy


_CDFS = {"box": _box_cdf, "triangle": _triangle_cdf, "gaussian": _gaussian_cdf}


def case_consistency(meta: dict, series1_hu: np.ndarray, profile: str) -> tuple[SlabOperator, np.ndarray]:
    """Series 1's slab operator on the case's common grid and its measurements, from ``meta.json``."""
    grid, grid1 = Grid.from_meta(meta["grid"]), Grid.from_meta(meta["series1"]["grid"])
    operator = SlabOperator.for_case(grid, grid1, meta["series1"].get("slice_thickness"), profile)  # type: ignore[arg-type]
    return operator, operator.measurements(series1_hu, grid1, grid)


def baseline_consistent(case: Case, profile: str) -> tuple[np.ndarray, SlabOperator, np.ndarray]:
    """(evaluate's ``baseline_consistent`` of a case, its slab operator, its measurements).

    The volume is (D, H, W) float32 HU: ``source.npy`` (series 1 interpolated onto the common grid)
    projected onto the slabs of ``series1.npy`` (series 1 as acquired) with ``profile``: the reference
    network's input, and the train stage's condition when ``train.condition: consistent``.
    """
    operator, measured = case_consistency(case.meta, case.load("series1"), profile)
    return operator.project(np.asarray(case.load("source"), dtype=np.float32), measured=measured), operator, measured
