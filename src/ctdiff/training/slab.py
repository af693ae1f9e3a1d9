"""The slab stage: series 1's slice sensitivity profile measured from the train pairs, and every case's slabs.

Series 1 (thick) and series 2 (thin) are two reconstructions of one acquisition, so the profile that turns
the thin series into the thick one can be measured instead of assumed (:class:`ctdiff.data.slab.SliceProfile`).
On a real Philips exam reconstructed at 5 mm and 1 mm the box average (a named shape) predicts the real 5 mm
slices with about 25 HU error inside the object, a profile fitted like this within about 5 HU
(``benchmarks/bench_real_pair.py``).

**The fit** (:func:`fit_profile`): the profile is piecewise constant on cells ``step`` thicknesses wide
(``step`` = the thin spacing over the thickness, the finest the thin series resolves: one cell per thin
slice), out to ``slab.half_width`` thicknesses either side; each cell's tap is the profile's mass there, so
a thick slice is predicted as ``m_s = sum_j w_j (B_j t)_s`` with ``B_j`` the (S, D) mass of cell ``j`` over
each thin voxel (:func:`ctdiff.data.slab.slab_masses`): for a slab centred on a thin slice, ``w_j`` is simply
the weight of the ``j``-th thin slice from it, the least squares of each thick slice on the thin slices
around it. The taps ``w`` minimise, over every fully supported slab of every
train case and every in-object voxel (the measured thick slice above -500 HU, in HU),

    || m - sum_j w_j B_j t ||^2 + lambda ||D2 w||^2     subject to   sum_j w_j = 1,  w_j >= 0,

with ``D2`` the second difference (the taps go smoothly to zero at the ends; ``lambda`` = ``slab.smoothness``
times the mean diagonal of the normal matrix, so it does not depend on the number of voxels) and, with
``slab.symmetric``, ``w_j = w_-j``. The sum constraint keeps a uniform field uniform (the projection then
never shifts HU); non-negativity holds it to a physical profile. The normal equations are accumulated case
by case on blocks of rows, so memory stays bounded at real size; the constrained least squares is a small
KKT system solved with an active set for the non-negative taps (:func:`solve_taps`): a dozen unknowns,
written with NumPy rather than adding SciPy for ``lsq_linear``. With ``slab.inplane_sigma_mm`` both series are
smoothed in-plane first (a Gaussian), which takes out noise and a difference of reconstruction kernels,
which a profile along z cannot model.

**The report** (``dvclive/slab``): the forward error ``|A t - m|`` in HU inside the object on the val pairs
(never used to fit) for the fitted and every named profile, and the cap the projection puts on the true thin
series (``project(t)`` scored against ``t``: what every projected rung can at best reach), and the profile
itself as a plot. A fit that predicts val slabs worse than the best named shape by more than
``slab.tolerance`` stops the stage (:class:`SlabFitError`) unless ``slab.accept_poor_fit``.

**The output**: ``models/slab/profile.json`` (the profile in use: the fit, or the named shape
``slab.profile`` chooses) and ``data/slab/<case_id>/`` for every case of every split
(:class:`ctdiff.data.slab.SlabCase`: operator, measurements, ``baseline_consistent``), so train's condition,
sr_reference's input and evaluate's rungs read one computation; the trained model carries the profile to
``ctdiff predict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import SimpleITK as sitk
from dvclive import Live
from tqdm import tqdm

from ctdiff.data.processed import Case, read_splits
from ctdiff.data.slab import (
    PROFILE_JSON,
    PROFILES,
    SlabCase,
    SlabOperator,
    SliceProfile,
    case_slabs,
    consistent_baseline,
    slab_masses,
    slab_planes,
    slab_positions,
)
from ctdiff.io import atomic_dir, atomic_write_json
from ctdiff.metrics.image import TruthScorer
from ctdiff.params import Params, SlabParams

OBJECT_HU = -500.0  # a measured thick voxel above this is inside the object (the body mask's threshold)
FIT_BLOCK_VOXELS = 1 << 20  # thin voxels per block of rows while accumulating the normal equations


class SlabFitError(RuntimeError):
    """The fitted profile predicts the val slabs worse than a named shape (one line, with the numbers)."""


# ------------------------------------------------------------------------------------------- geometry
@dataclass
class SlabPair:
    """One case as the fit sees it: the thin series on the common grid, series 1's slices sampled on that grid's
    rows and columns at their own positions, and where those positions lie along the slice normal."""

    case_id: str
    thin_hu: np.ndarray  # (D, H, W) float32 (memory-mapped int16 is fine)
    measured: np.ndarray  # (S, H, W) float32 HU
    positions_mm: np.ndarray  # (S,) slab centres, mm from the grid's slice 0
    thin_mm: float  # the thin grid's slice spacing (= each thin voxel's extent)
    thickness_mm: float

    @classmethod
    def of_case(cls, case: Case) -> SlabPair:
        grid, grid1 = case.grid, case.series1_grid
        positions = slab_positions(grid, grid1)
        thickness = float(case.meta["series1"].get("slice_thickness") or grid1.spacing_mm[2])
        measured = slab_planes(case.load("series1"), grid1, grid, positions)
        return cls(case.case_id, case.load("target", mmap=True), measured, positions, float(grid.spacing_mm[2]),
                   thickness)

    def inside(self, support: float) -> np.ndarray:
        """(S,) bool: slabs whose profile support (``support`` thicknesses each side) lies inside the thin grid."""
        depth = self.thin_hu.shape[0]
        low, high = -self.thin_mm / 2, (depth - 0.5) * self.thin_mm
        reach = support * self.thickness_mm
        return (self.positions_mm - reach >= low - 1e-6) & (self.positions_mm + reach <= high + 1e-6)


def smooth_inplane(volume: np.ndarray, sigma_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """(N, H, W) smoothed with an in-plane Gaussian of ``sigma_mm`` (SimpleITK, per slice); float32."""
    image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    image.SetSpacing((float(spacing_mm[0]), float(spacing_mm[1]), 1.0))
    smoothed = sitk.DiscreteGaussian(image, [sigma_mm ** 2, sigma_mm ** 2, 0.0], 32, 0.01, True)
    return sitk.GetArrayFromImage(smoothed)


# ------------------------------------------------------------------------------------------------ fit
@dataclass
class NormalEquations:
    """Running sums of the least-squares problem in the taps: ``G = F F^T``, ``b = F m``, ``mm = m . m``, ``n``."""

    gram: np.ndarray
    rhs: np.ndarray
    mm: float = 0.0
    n: int = 0

    @classmethod
    def zeros(cls, k: int) -> NormalEquations:
        return cls(np.zeros((k, k)), np.zeros(k))


def tap_basis(pair: SlabPair, slabs: np.ndarray, step: float, half: int) -> np.ndarray:
    """(2 half + 1, S', D) mass of each tap's cell over each thin voxel, for the selected slabs."""
    z = np.arange(pair.thin_hu.shape[0]) * pair.thin_mm
    hat = SliceProfile("fitted", tuple([0.0] * half + [1.0] + [0.0] * half), step)  # one cell: shifted below
    out = np.empty((2 * half + 1, int(slabs.sum()), z.size))
    centres = pair.positions_mm[slabs]
    for j in range(2 * half + 1):
        shift_mm = (j - half) * step * pair.thickness_mm
        out[j] = slab_masses(hat, z, pair.thin_mm, centres + shift_mm, pair.thickness_mm)
    return out


def accumulate(eq: NormalEquations, pair: SlabPair, slabs: np.ndarray, step: float, half: int, symmetric: bool,
               inplane_sigma_mm: float, spacing_mm: Sequence[float]) -> None:
    """Add one case's selected slabs to the normal equations (blocks of rows: bounded memory)."""
    if not slabs.any():
        return
    basis = tap_basis(pair, slabs, step, half)
    if symmetric:  # unknowns v_0 .. v_half with w_{+-i} = v_i
        basis = np.stack([basis[half]] + [basis[half + i] + basis[half - i] for i in range(1, half + 1)])
    thin, measured = pair.thin_hu, pair.measured[slabs]
    if inplane_sigma_mm > 0:
        thin = smooth_inplane(thin, inplane_sigma_mm, spacing_mm)
        measured_fit = smooth_inplane(measured, inplane_sigma_mm, spacing_mm)
    else:
        measured_fit = measured
    depth, height, width = thin.shape
    rows = max(1, FIT_BLOCK_VOXELS // max(1, depth * width))
    for start in range(0, height, rows):
        block = np.asarray(thin[:, start:start + rows], dtype=np.float64)
        inside = measured[:, start:start + rows] > OBJECT_HU  # (S', r, W), from the unsmoothed slices
        if not inside.any():
            continue
        features = np.tensordot(basis, block, axes=(2, 0))[:, inside]  # (K, n)
        target = np.asarray(measured_fit[:, start:start + rows], dtype=np.float64)[inside]
        eq.gram += features @ features.T
        eq.rhs += features @ target
        eq.mm += float(target @ target)
        eq.n += int(target.size)


def second_difference(n_taps: int) -> np.ndarray:
    """(n + 2, n) second differences of the taps with a zero beyond each end."""
    padded = np.zeros((n_taps + 4, n_taps))
    padded[2:-2] = np.eye(n_taps)
    return padded[2:] - 2 * padded[1:-1] + padded[:-2]


def solve_taps(eq: NormalEquations, smoothness: float, half: int, symmetric: bool) -> np.ndarray:
    """The taps (2 half + 1,), >= 0 and summing to 1, minimising the fit's objective (module docstring).

    An active-set solution of the equality-constrained least squares: solve the KKT system, pin the most
    negative unknown to zero, repeat (at most one pass per unknown)."""
    k = eq.gram.shape[0]
    expand = np.zeros((2 * half + 1, k))  # w = expand @ v
    if symmetric:
        expand[half, 0] = 1.0
        for i in range(1, half + 1):
            expand[half + i, i] = expand[half - i, i] = 1.0
    else:
        expand = np.eye(k)
    d2 = second_difference(2 * half + 1) @ expand
    scale = float(np.trace(eq.gram)) / k if eq.n else 1.0
    hessian = eq.gram + smoothness * scale * d2.T @ d2
    ones = expand.sum(axis=0)  # sum_j w_j = ones @ v
    free = np.ones(k, bool)
    v = np.zeros(k)
    for _ in range(k):
        idx = np.flatnonzero(free)
        kkt = np.zeros((idx.size + 1, idx.size + 1))
        kkt[:-1, :-1] = hessian[np.ix_(idx, idx)]
        kkt[:-1, -1] = kkt[-1, :-1] = ones[idx]
        solution = np.linalg.lstsq(kkt, np.append(eq.rhs[idx], 1.0), rcond=None)[0]
        v = np.zeros(k)
        v[idx] = solution[:-1]
        if (v >= -1e-12).all():
            break
        free[idx[np.argmin(v[idx])]] = False
    taps = np.clip(expand @ v, 0.0, None)
    return taps / taps.sum()


def fit_profile(pairs: Sequence[SlabPair], sp: SlabParams, slab_masks: Sequence[np.ndarray] | None = None,
                spacing_mm: Sequence[Sequence[float]] | None = None) -> SliceProfile:
    """The profile fitted on ``pairs`` (all of their fully supported slabs, or those of ``slab_masks``).

    ``spacing_mm``: each pair's in-plane spacing (for ``slab.inplane_sigma_mm``)."""
    if not pairs:
        raise ValueError("no pairs to fit a slice profile on")
    step = median(p.thin_mm / p.thickness_mm for p in pairs)
    half = max(1, math.ceil(sp.half_width / step - 1e-9))
    k = half + 1 if sp.symmetric else 2 * half + 1
    eq = NormalEquations.zeros(k)
    used = 0
    for i, pair in enumerate(pairs):
        slabs = pair.inside((half + 0.5) * step)
        if slab_masks is not None:
            slabs = slabs & slab_masks[i]
        used += int(slabs.sum())
        accumulate(eq, pair, slabs, step, half, sp.symmetric, sp.inplane_sigma_mm,
                   spacing_mm[i] if spacing_mm is not None else (1.0, 1.0))
    if eq.n == 0:
        raise SlabFitError(f"no slab of series 1 lies wholly inside the thin series of the {len(pairs)} train "
                           f"case(s) (a profile {sp.half_width:g} thicknesses wide each side): lower slab.half_width "
                           f"or set slab.profile to a named shape")
    taps = solve_taps(eq, sp.smoothness, half, sp.symmetric)
    rms = math.sqrt(max(eq.mm - 2 * _taps_to_v(taps, half, sp.symmetric) @ eq.rhs
                        + _taps_to_v(taps, half, sp.symmetric) @ eq.gram @ _taps_to_v(taps, half, sp.symmetric),
                        0.0) / eq.n)
    thickness = median(p.thickness_mm for p in pairs)
    fit = {"cases": len(pairs), "slabs": used, "voxels": eq.n, "rms_hu": round(rms, 4),
           "half_width": sp.half_width, "symmetric": sp.symmetric, "smoothness": sp.smoothness,
           "inplane_sigma_mm": sp.inplane_sigma_mm}
    return SliceProfile("fitted", tuple(taps.tolist()), float(step), float(thickness), fit)


def _taps_to_v(taps: np.ndarray, half: int, symmetric: bool) -> np.ndarray:
    return taps[half:] if symmetric else taps


# -------------------------------------------------------------------------------------------- scoring
def forward_error(pair: SlabPair, profile: SliceProfile, slabs: np.ndarray | None = None) -> tuple[float, int]:
    """(sum of |A t - m| in HU, voxel count) over the in-object voxels of the slabs ``slabs`` (default: those a
    named profile keeps), ``t`` the thin series of ``pair``."""
    z = np.arange(pair.thin_hu.shape[0]) * pair.thin_mm
    if slabs is None:
        slabs = np.ones(pair.positions_mm.size, bool)
    operator = SlabOperator.from_geometry(z, pair.thin_mm, pair.positions_mm[slabs], pair.thickness_mm, profile,
                                          min_coverage=0.0)
    predicted = operator.forward(pair.thin_hu)
    measured = pair.measured[slabs]
    inside = measured > OBJECT_HU
    return float(np.abs(predicted - measured)[inside].sum(dtype=np.float64)), int(inside.sum())


def compare_profiles(pairs: Sequence[SlabPair], profiles: dict[str, SliceProfile], support: float
                     ) -> dict[str, float]:
    """Mean forward error in HU of each profile over the in-object voxels of the slabs every profile can use
    (support inside the grid for the widest, ``support`` thicknesses)."""
    out = {}
    for name, profile in profiles.items():
        total, count = 0.0, 0
        for pair in pairs:
            s, n = forward_error(pair, profile, pair.inside(support))
            total, count = total + s, count + n
        out[name] = total / count if count else math.nan
    return out


# ---------------------------------------------------------------------------------------------- stage
def run_slab_stage(params: Params, processed_dir: Path, profile_dir: Path, slab_dir: Path, live: Live | None,
                   progress: bool = True, say: Callable[..., None] = print) -> dict[str, Any]:
    """Fit, report, choose, and write every case's slabs (module docstring). Returns the summary."""
    sp = params.slab
    splits = read_splits(processed_dir)
    train_cases = [Case.open(processed_dir / c) for c in splits.get("train", [])]
    val_cases = [Case.open(processed_dir / c) for c in splits.get("val", [])]
    if not train_cases:
        raise SlabFitError(f"{processed_dir / 'splits.json'} has no train cases to fit the slice profile on")
    pairs = [SlabPair.of_case(c) for c in tqdm(train_cases, desc="slab: train pairs", disable=not progress)]
    fitted = fit_profile(pairs, sp, spacing_mm=[c.spacing_mm for c in train_cases])
    candidates = {"fitted": fitted, **{name: SliceProfile.named(name) for name in PROFILES}}
    support = max(p.support for p in candidates.values())
    summary: dict[str, Any] = {"profile": sp.profile, "fitted": {"fwhm_mm": fitted.fwhm() * fitted.fitted_thickness_mm,
                                                                  "taps": len(fitted.taps), **fitted.fit}}
    val_pairs = [SlabPair.of_case(c) for c in val_cases]
    report_pairs = val_pairs or pairs  # with no val split, the train pairs (said in the summary)
    summary["scored_on"] = "val" if val_pairs else "train"
    errors = compare_profiles(report_pairs, candidates, support)
    summary["forward_mae_hu"] = errors
    summary["train_forward_mae_hu"] = compare_profiles(pairs, {"fitted": fitted}, support)["fitted"]
    summary["projected_truth"] = projected_truth_caps(val_cases or train_cases, candidates, params.hu_range)
    best_named = min(PROFILES, key=lambda n: errors[n])
    say(f"slab: fitted profile {fitted.describe()}; {summary['scored_on']} forward error inside the object: "
        + ", ".join(f"{n} {v:.2f} HU" for n, v in errors.items()))
    if sp.profile == "fitted" and errors["fitted"] > (1 + sp.tolerance) * errors[best_named]:
        message = (f"the fitted slice profile predicts the {summary['scored_on']} slabs with {errors['fitted']:.2f} HU "
                   f"error, worse than {best_named} ({errors[best_named]:.2f} HU) by more than slab.tolerance "
                   f"({sp.tolerance:.0%}): set slab.profile={best_named}, or slab.accept_poor_fit=true to keep it")
        if not sp.accept_poor_fit:
            raise SlabFitError(message)
        say(f"slab: warning: {message}")
    profile = candidates[sp.profile]
    write_cases(processed_dir, slab_dir, [c for cs in splits.values() for c in cs], profile, progress)
    with atomic_dir(profile_dir) as tmp:
        atomic_write_json(tmp / PROFILE_JSON, profile.to_json())
    if live is not None:
        log_summary(live, summary, candidates)
    return summary


def projected_truth_caps(cases: Sequence[Case], profiles: dict[str, SliceProfile], hu_range: Sequence[float]
                         ) -> dict[str, dict[str, float]]:
    """psnr_body and mae_hu_body of the true thin series projected onto series 1's slabs with each profile:
    the most any projected rung can reach (its own error is the profile's mismatch)."""
    sums: dict[str, dict[str, list[float]]] = {name: {"psnr_body": [], "mae_hu_body": []} for name in profiles}
    for case in cases:
        truth = case.load("target")
        scorer = TruthScorer(truth, hu_range)
        series1 = case.load("series1")
        for name, profile in profiles.items():
            operator, measured = case_slabs(case.meta, series1, profile)
            scores = scorer.score(operator.project(truth, measured=measured))
            for key in sums[name]:
                sums[name][key].append(scores[key])
    return {name: {key: float(np.mean(v)) for key, v in metrics.items()} for name, metrics in sums.items()}


def write_cases(processed_dir: Path, slab_dir: Path, case_ids: Sequence[str], profile: SliceProfile,
                progress: bool) -> None:
    """``data/slab/<case_id>/`` for every case, built in a temporary folder and swapped in whole."""
    with atomic_dir(slab_dir) as tmp:
        for case_id in tqdm(sorted(case_ids), desc="slab: project", unit="case", disable=not progress):
            case = Case.open(processed_dir / case_id)
            operator, measured = case_slabs(case.meta, case.load("series1"), profile)
            if operator.n_slabs == 0:
                raise SlabFitError(f"{case_id}: no slab of series 1 lies inside the thin grid")
            SlabCase.write(tmp / case_id, operator, measured, consistent_baseline(case.load("source"), operator,
                                                                                  measured), profile)


def log_summary(live: Live, summary: dict[str, Any], candidates: dict[str, SliceProfile]) -> None:
    """metrics.json and the profile plot (density per mm against the offset from the slab centre, in mm)."""
    for name, value in summary["forward_mae_hu"].items():
        live.log_metric(f"forward_mae_hu/{name}", value, plot=False)
    live.log_metric("train_forward_mae_hu/fitted", summary["train_forward_mae_hu"], plot=False)
    for name, scores in summary["projected_truth"].items():
        for key, value in scores.items():
            live.log_metric(f"projected_truth/{name}/{key}", value, plot=False)
    live.log_metric("fitted/fwhm_mm", summary["fitted"]["fwhm_mm"], plot=False)
    live.log_metric("fitted/rms_hu", summary["fitted"]["rms_hu"], plot=False)
    live.summary.update({"profile": summary["profile"], "scored_on": summary["scored_on"],
                         "fit": {k: v for k, v in summary["fitted"].items() if k not in ("fwhm_mm", "rms_hu")}})
    thickness = candidates["fitted"].fitted_thickness_mm or 1.0
    offsets = np.linspace(-1.5, 1.5, 61)
    points = [{"offset_mm": round(float(u * thickness), 4),
               **{name: float(p.density(np.array([u]))[0] / thickness) for name, p in candidates.items()}}
              for u in offsets]
    live.log_plot("profile", points, x="offset_mm", y=list(candidates), template="linear",
                  title=f"slice sensitivity profiles at {thickness:g} mm (density per mm)")
