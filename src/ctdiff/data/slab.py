"""Slab consistency: what series 1 measures of a thin volume, and the projection onto that measurement.

Series 1 (thick) and series 2 (thin) are two reconstructions of one scan, so each thick slice is, up to
its own noise, a weighted average along the slice normal of the thin field around its position: the
scanner's slice sensitivity profile (SSP, :class:`SliceProfile`). The profile is measured from the data (the
slab stage fits it on the train pairs: :mod:`ctdiff.training.slab`) or one of the named shapes ``box``,
``triangle`` and ``gaussian`` (full width at half maximum = the slice thickness). On the common grid
(series 2's, ``meta.json`` ``grid``) it is a linear operator acting along the slice axis only,

    A: thin volume (D, H, W) -> what series 1 measures (S, H, W),   A = W (x) identity in-plane,

with ``W`` an (S, D) matrix of each slab's profile mass over each thin voxel's extent (rows sum to one).
The projection of a prediction ``P`` onto the measurements ``m`` (series 1 sampled on the grid's
in-plane lattice at its own slice positions) changes it by a correction that is smooth along the normal and
makes it agree with them,

    P' = P + C (m - A P),    C = H (W H)^-1,

``H`` the (D, S) linear interpolation from the slab centres to the thin slices (each slab's correction a hat
peaking at its centre, constant beyond the end slabs), so ``A P' = m`` exactly. The correction is the
measured residual per slab interpolated linearly through the slices; the least-norm correction ``W^+`` (each
slab's residual spread in the shape of its own profile) agrees as well but is stepped at the slab period:
projected volumes then showed bands, the slice-to-slice change inside the body 1.7-1.9x larger at slab
boundaries than mid-slab where the truth's varies by 1.1x, at the same psnr_body (docs/slab.md). ``W^+``
stays the fallback where the slab centres do not increase strictly or ``W H`` is singular. The prediction
keeps its within-slab detail (what ``A`` cannot see); thin slices beyond the end slabs take the end slabs'
correction. A slab that reaches outside the grid along the normal measures tissue the
grid does not hold: it is kept only when at least ``min_coverage`` of its profile lies inside (its weights
renormalised over that part), otherwise dropped, leaving its slices to the other slabs.

One case's operator and measurements are computed once, by the slab stage, and read from ``data/slab``
(:class:`SlabCase`); ``ctdiff predict`` builds them for a new scan with the trained model's profile
(:func:`case_slabs`). Written with NumPy rather than taken from a library: MONAI and SimpleITK have no
slab-projection operator, and along one axis it is a small dense matrix (S x D, tens by hundreds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ctdiff.data.grid import Grid, resample
from ctdiff.io import atomic_path, digest

PROFILES: tuple[str, ...] = ("box", "triangle", "gaussian")  # the named shapes; "fitted" is measured
# A slab with less of its profile inside the grid is not used as a constraint. At the grid's two ends the end
# slabs of a bell-shaped profile reach past it (the fitted 5 mm profile: about 10 % outside); dropping them
# left their slices to the raw decode, which lost 1.2 dB psnr_body on val (hilum, SD, seed 0: the model 0.42 dB
# under baseline_consistent with 0.95, 0.76 dB over it with 0.5-0.85; docs/slab.md). Three quarters inside:
# the outside quarter at most is taken to be like the inside (the weights renormalised).
MIN_COVERAGE = 0.75
BLOCK_BYTES = 32 << 20  # forward / project work on blocks of rows (axis 1) of about this many float64 bytes
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# ------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class SliceProfile:
    """A slice sensitivity profile along the slice normal, in units of the slice thickness ``u = offset / T``.

    Named shapes (``box``, ``triangle``, ``gaussian``) have FWHM 1. A ``fitted`` profile is piecewise constant:
    ``taps[j]`` is its mass on the cell ``step`` wide centred at ``u_j = (j - J) * step`` (``J = len(taps) // 2``),
    so the taps sum to 1; with ``step`` the thin spacing over the thickness (as the slab stage fits it) a cell is
    one thin slice and the taps are exactly the weights of the thin slices around a slab centred on one, which
    is what a least-squares fit of thick slices on thin ones measures (any such weights, a box's included).
    Expressed in thicknesses, one profile serves any thickness: a series thinner or thicker than the one it was
    fitted on gets it scaled (``fitted_thickness_mm`` says which that was).
    """

    name: str
    taps: tuple[float, ...] = ()
    step: float = 0.0
    fitted_thickness_mm: float | None = None
    fit: dict[str, Any] = field(default_factory=dict, compare=False)  # how it was fitted (reporting only)

    def __post_init__(self) -> None:
        if self.name == "fitted":
            if len(self.taps) % 2 != 1 or self.step <= 0:
                raise ValueError(f"a fitted profile needs an odd number of taps and a step > 0, got "
                                 f"{len(self.taps)} taps, step {self.step}")
            if abs(sum(self.taps) - 1.0) > 1e-6 or min(self.taps) < -1e-9:
                raise ValueError(f"a fitted profile's taps must be >= 0 and sum to 1, got {self.taps}")
        elif self.name not in PROFILES:
            raise ValueError(f"slab profile {self.name!r} is not one of {(*PROFILES, 'fitted')}")

    @classmethod
    def named(cls, name: str) -> SliceProfile:
        return cls(name)

    @property
    def knots(self) -> np.ndarray:
        """(J,) positions of a fitted profile's taps, in thicknesses."""
        half = len(self.taps) // 2
        return (np.arange(len(self.taps)) - half) * self.step

    def cdf(self, u: np.ndarray) -> np.ndarray:
        """Mass of the profile below ``u`` (thicknesses from the slab centre); float64, same shape as ``u``."""
        u = np.asarray(u, dtype=np.float64)
        if self.name != "fitted":
            return _CDFS[self.name](u)
        out = np.zeros(u.shape)
        for tap, knot in zip(self.taps, self.knots.tolist()):
            if tap:
                out += tap * _box_cdf((u - knot) / self.step)
        return out

    def density(self, u: np.ndarray, du: float = 1e-4) -> np.ndarray:
        """The profile's density at ``u`` (per thickness), by differencing the CDF."""
        u = np.asarray(u, dtype=np.float64)
        return (self.cdf(u + du / 2) - self.cdf(u - du / 2)) / du

    def fwhm(self) -> float:
        """Full width at half maximum, in thicknesses (1 for the named shapes, by definition); a fitted profile's
        read off its taps joined by straight lines."""
        if self.name != "fitted":
            return 1.0
        u = np.linspace(self.knots[0], self.knots[-1], 4001)
        p = np.interp(u, self.knots, self.taps)
        above = u[p >= p.max() / 2]
        return float(above[-1] - above[0])

    @property
    def support(self) -> float:
        """Half-width of the profile's support, in thicknesses (the Gaussian's: 3 sigma)."""
        if self.name == "fitted":
            return (len(self.taps) // 2 + 0.5) * self.step
        return {"box": 0.5, "triangle": 1.0, "gaussian": 3.0 * _FWHM_TO_SIGMA}[self.name]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.name == "fitted":
            out.update(taps=list(self.taps), step=self.step,
                       fitted_thickness_mm=self.fitted_thickness_mm, fwhm=round(self.fwhm(), 6), fit=self.fit)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SliceProfile:
        if obj["name"] != "fitted":
            return cls.named(obj["name"])
        taps = np.clip(np.asarray(obj["taps"], dtype=np.float64), 0.0, None)
        if abs(taps.sum() - 1.0) > 1e-12:  # a hand-written file: normalised (a written one already is)
            taps = taps / taps.sum()
        return cls("fitted", tuple(taps.tolist()), float(obj["step"]),
                   obj.get("fitted_thickness_mm"), dict(obj.get("fit") or {}))

    @property
    def digest(self) -> str:
        """Identity of the profile (what the operator depends on), for resume keys and stale checks."""
        return digest({"name": self.name, "taps": [round(t, 8) for t in self.taps], "step": self.step})

    def describe(self) -> str:
        if self.name != "fitted":
            return f"{self.name} (FWHM = thickness)"
        return (f"fitted ({len(self.taps)} taps every {self.step:g} thickness, FWHM {self.fwhm():.2f} thickness, "
                f"on {self.fitted_thickness_mm:g} mm slices)")


def as_profile(profile: SliceProfile | str) -> SliceProfile:
    return profile if isinstance(profile, SliceProfile) else SliceProfile.named(profile)


# ------------------------------------------------------------------------------------------ operator
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
                      slab_positions_mm: Sequence[float], thickness_mm: float,
                      profile: SliceProfile | str = "box", min_coverage: float = MIN_COVERAGE) -> SlabOperator:
        """From positions along one axis (mm): thin slice centres (each covering ``thin_extent_mm``) and
        slab centres with their ``thickness_mm`` (the unit of the profile: a named shape's FWHM)."""
        profile = as_profile(profile)
        if thickness_mm <= 0 or thin_extent_mm <= 0:
            raise ValueError(f"slab thickness {thickness_mm} mm and thin extent {thin_extent_mm} mm must be > 0")
        z = np.asarray(thin_positions_mm, dtype=np.float64)
        c = np.asarray(slab_positions_mm, dtype=np.float64)
        mass = np.clip(slab_masses(profile, z, thin_extent_mm, c, thickness_mm), 0.0, None)
        # Only what lies between the grid's ends counts as inside (adjacent voxels tile that span).
        coverage = mass.sum(axis=1)
        keep = coverage >= min_coverage
        weights = mass[keep] / coverage[keep, None]
        return cls(weights, np.flatnonzero(keep), c[keep], float(thickness_mm), profile.name)

    @classmethod
    def for_case(cls, grid: Grid, series1_grid: Grid, thickness_mm: float | None,
                 profile: SliceProfile | str = "box", min_coverage: float = MIN_COVERAGE) -> SlabOperator:
        """From ``meta.json``: the common grid, series 1's grid and its SliceThickness (None: its spacing,
        the usual contiguous reconstruction). Series 1's slices are taken where their centres fall along
        the common grid's slice normal."""
        thickness = float(thickness_mm) if thickness_mm else float(series1_grid.spacing_mm[2])
        sz = float(grid.spacing_mm[2])
        return cls.from_geometry(np.arange(grid.shape[0]) * sz, sz, slab_positions(grid, series1_grid), thickness,
                                 profile, min_coverage)

    @property
    def n_slabs(self) -> int:
        return int(self.weights.shape[0])

    def phase(self, slice_mm: float) -> np.ndarray:
        """(D,) where each thin slice lies in series 1's slab pattern: its distance to the nearest slab centre
        in slab spacings, 0 (a slab's centre) to 0.5 (midway between two), for thin slices ``slice_mm`` apart
        from the grid's slice 0 (as :meth:`for_case` places them). The spacing is the median distance between
        adjacent slab centres (one slab: its thickness). The thick series pins each slab's weighted mean, so how
        well a thin slice is known, and how far the model's draws spread there, depend on it."""
        depth = self.weights.shape[1]
        centres = np.sort(np.asarray(self.positions_mm, np.float64))
        if centres.size == 0:
            return np.full(depth, 0.5)
        step = float(np.median(np.diff(centres))) if centres.size > 1 else self.thickness_mm
        z = np.arange(depth, dtype=np.float64) * float(slice_mm)
        distance = np.min(np.abs(z[:, None] - centres[None, :]), axis=1)
        return np.clip(distance / max(step, 1e-6), 0.0, 0.5)

    @cached_property
    def pseudo_inverse(self) -> np.ndarray:
        """(D, S) ``W^+``, the least-norm correction (the fallback of :attr:`correction`)."""
        return np.linalg.pinv(self.weights)

    @cached_property
    def correction(self) -> np.ndarray:
        """(D, S) ``C = H (W H)^-1``: slab residuals -> a correction interpolated linearly between the slab
        centres (see the module docstring), computed once per operator; ``W C = I``."""
        weights = self.weights
        depth, n = weights.shape[1], weights.shape[0]
        mass = weights.sum(axis=1)
        if n == 0 or np.any(mass <= 0):
            return self.pseudo_inverse
        centres = weights @ np.arange(depth, dtype=np.float64) / mass
        if n > 1 and np.any(np.diff(centres) <= 1e-9):
            return self.pseudo_inverse
        hat = np.stack([np.interp(np.arange(depth), centres, unit) for unit in np.eye(n)], axis=1)  # (D, S)
        gram = weights @ hat
        if np.linalg.cond(gram) > 1e8:
            return self.pseudo_inverse
        return hat @ np.linalg.inv(gram)

    def forward(self, thin: np.ndarray, block_rows: int | None = None) -> np.ndarray:
        """``A``: (D, H, W) thin volume -> (S, H, W) float32, what series 1 would measure (noise-free).

        In float64 on blocks of ``block_rows`` rows (default: about ``BLOCK_BYTES`` per block)."""
        self._check_depth(thin)
        out = np.empty((self.n_slabs, *thin.shape[1:]), np.float32)
        for rows in self._blocks(thin.shape, block_rows):
            out[:, rows] = np.tensordot(self.weights, np.asarray(thin[:, rows], dtype=np.float64), axes=(1, 0))
        return out

    def project(self, thin: np.ndarray, measured: np.ndarray, block_rows: int | None = None) -> np.ndarray:
        """``P' = P + C (m - A P)``: (D, H, W) prediction and (S, H, W) measurements -> (D, H, W) float32
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
            block += np.tensordot(self.correction, residual, axes=(1, 0))
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
        return slab_planes(series1_hu, series1_grid, grid, self.positions_mm)

    def _check_depth(self, thin: np.ndarray) -> None:
        if thin.ndim != 3 or thin.shape[0] != self.weights.shape[1]:
            raise ValueError(f"expected a (D, H, W) volume with D = {self.weights.shape[1]}, got {thin.shape}")


def slab_positions(grid: Grid, series1_grid: Grid) -> np.ndarray:
    """(S1,) centres of series 1's slices along the common grid's slice normal, mm from its slice 0."""
    normal = grid.matrix[:, 2]
    _, h1, w1 = series1_grid.shape
    centres = np.stack([series1_grid.physical_point([j, (h1 - 1) / 2, (w1 - 1) / 2])
                        for j in range(series1_grid.shape[0])])
    return (centres - np.asarray(grid.origin_mm)) @ normal


def slab_planes(series1_hu: np.ndarray, series1_grid: Grid, grid: Grid, positions_mm: Sequence[float]) -> np.ndarray:
    """Series 1 (S1, H1, W1) HU resampled onto the common grid's rows and columns at each position along its
    normal: (S, H, W) float32 HU (linear in-plane; air outside series 1's view)."""
    _, h, w = grid.shape
    normal = grid.matrix[:, 2]
    out = np.empty((len(positions_mm), h, w), np.float32)
    for row, pos in enumerate(np.asarray(positions_mm, dtype=np.float64).tolist()):
        # One slice of the common lattice at the slab's position along the normal: on a shared in-plane
        # lattice this lands exactly on series 1's slice (no interpolation along z).
        origin = np.asarray(grid.origin_mm) + normal * pos
        plane = Grid((1, h, w), grid.spacing_mm, tuple(origin.tolist()), grid.direction)
        out[row] = resample(series1_hu, series1_grid, plane, "linear")[0]
    return out


def slab_masses(profile: SliceProfile, thin_positions_mm: np.ndarray, thin_extent_mm: float,
                slab_positions_mm: np.ndarray, thickness_mm: float) -> np.ndarray:
    """(S, D) mass of each slab's profile over each thin voxel's extent ``[z - e/2, z + e/2]`` (not renormalised)."""
    z, c = np.asarray(thin_positions_mm, np.float64), np.asarray(slab_positions_mm, np.float64)
    hi = profile.cdf((z[None, :] + thin_extent_mm / 2.0 - c[:, None]) / thickness_mm)
    lo = profile.cdf((z[None, :] - thin_extent_mm / 2.0 - c[:, None]) / thickness_mm)
    return hi - lo


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


def blurred_box_mass(lo_mm: np.ndarray, hi_mm: np.ndarray, width_mm: float, blur_fwhm_mm: float) -> np.ndarray:
    """Mass over ``[lo, hi]`` (mm from the centre) of a box ``width_mm`` wide blurred by a Gaussian of FWHM
    ``blur_fwhm_mm`` (0: the box): the slice profile of a scanner whose slab integration is followed by a
    reconstruction filter along z. Closed form: the box-Gaussian convolution's CDF is
    ``(G(u + w/2) - G(u - w/2)) / w`` with ``G(t) = sigma (x Phi(x) + phi(x))``, ``x = t / sigma``."""
    sigma = blur_fwhm_mm * _FWHM_TO_SIGMA
    half = width_mm / 2.0

    def ramp(t: np.ndarray) -> np.ndarray:  # integral of the blurred step: G above
        if sigma == 0:
            return np.maximum(t, 0.0)
        x = t / sigma
        return sigma * (x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))

    def cdf(u: np.ndarray) -> np.ndarray:
        return (ramp(u + half) - ramp(u - half)) / width_mm

    return cdf(np.asarray(hi_mm, np.float64)) - cdf(np.asarray(lo_mm, np.float64))


_CDFS = {"box": _box_cdf, "triangle": _triangle_cdf, "gaussian": _gaussian_cdf}


# ------------------------------------------------------------------------------------ one case's slabs
def case_slabs(meta: dict, series1_hu: np.ndarray, profile: SliceProfile | str) -> tuple[SlabOperator, np.ndarray]:
    """Series 1's slab operator on a case's common grid and its (S, H, W) measurements, from ``meta.json``
    (``grid``, ``series1`` ``grid`` and ``slice_thickness``) and series 1 as acquired."""
    grid, grid1 = Grid.from_meta(meta["grid"]), Grid.from_meta(meta["series1"]["grid"])
    operator = SlabOperator.for_case(grid, grid1, meta["series1"].get("slice_thickness"), profile)
    return operator, operator.measurements(series1_hu, grid1, grid)


def consistent_baseline(source_hu: np.ndarray, operator: SlabOperator, measured: np.ndarray) -> np.ndarray:
    """``baseline_consistent``: series 1 interpolated onto the thin grid ((D, H, W) HU, ``source.npy``) projected
    onto its own slabs; (D, H, W) float32 HU. The one definition the slab stage and ``ctdiff predict`` use."""
    return operator.project(np.asarray(source_hu, dtype=np.float32), measured=measured)


BASELINE_NPY, SLABS_NPZ = "baseline_consistent.npy", "slabs.npz"


@dataclass(frozen=True)
class SlabCase:
    """One case of the slab stage's output (``data/slab/<case_id>/``): the operator, the measurements and the
    projected baseline, all computed with the stage's profile.

        baseline_consistent.npy   (D, H, W) float32 HU: source.npy projected onto series 1's slabs
        slabs.npz                 weights (S, D), slab_index (S,), positions_mm (S,), measured (S, H, W) float32,
                                  thickness_mm, profile (its name), profile_digest
    """

    case_id: str
    folder: Path
    operator: SlabOperator = field(repr=False)
    measured: np.ndarray = field(repr=False)
    profile_digest: str

    @classmethod
    def open(cls, slab_dir: Path, case_id: str) -> SlabCase:
        folder = Path(slab_dir) / case_id
        path = folder / SLABS_NPZ
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the slab stage (dvc repro slab)")
        with np.load(path, allow_pickle=False) as z:
            operator = SlabOperator(z["weights"], z["slab_index"], z["positions_mm"], float(z["thickness_mm"]),
                                    str(z["profile"]))
            return cls(case_id, folder, operator, z["measured"], str(z["profile_digest"]))

    def baseline(self, mmap: bool = True) -> np.ndarray:
        """(D, H, W) float32 HU, memory-mapped copy-on-write by default."""
        return np.load(self.folder / BASELINE_NPY, mmap_mode="c" if mmap else None, allow_pickle=False)

    def project(self, thin_hu: np.ndarray) -> np.ndarray:
        """(D, H, W) HU onto series 1's slabs: float32."""
        return self.operator.project(thin_hu, measured=self.measured)

    @staticmethod
    def write(folder: Path, operator: SlabOperator, measured: np.ndarray, baseline: np.ndarray,
              profile: SliceProfile) -> None:
        """Write one case into ``folder`` (each file atomically)."""
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / SLABS_NPZ) as tmp, open(tmp, "wb") as f:
            np.savez(f, weights=operator.weights, slab_index=operator.slab_index, positions_mm=operator.positions_mm,
                     thickness_mm=np.float64(operator.thickness_mm), profile=np.str_(operator.profile),
                     profile_digest=np.str_(profile.digest), measured=np.asarray(measured, np.float32))
        with atomic_path(folder / BASELINE_NPY) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(baseline, dtype=np.float32), allow_pickle=False)


PROFILE_JSON = "profile.json"


def read_profile(profile_dir: Path) -> SliceProfile:
    """The slab stage's profile (``models/slab/profile.json``)."""
    path = Path(profile_dir) / PROFILE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the slab stage (dvc repro slab)")
    return SliceProfile.from_json(json.loads(path.read_text()))
