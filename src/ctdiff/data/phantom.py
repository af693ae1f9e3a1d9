"""Synthetic chest CT phantoms with known truth, written as real DICOM in the APE-data zip layout.

A phantom is a continuous Hounsfield-unit field in patient coordinates (DICOM LPS, mm): air, an
elliptical body (skin/muscle, subcutaneous fat, muscle), the thoracic cavity (mediastinal fat), two
textured lungs with a gravity gradient, heart with an opacified blood pool, ascending and descending aorta,
superior vena cava, oesophagus, trachea, main and lobar bronchi (with walls), contrast-filled pulmonary
arteries branching from the hila into the lungs as tapered tubes (seven generations down to about 1 mm,
with thin side branches) that run obliquely through z, pulmonary veins from the left atrium, the spine
(cortical shell, cancellous body, intervertebral discs, posterior arch around the CSF canal), tilted ribs
and the sternum. APE cases add emboli: low-density filling defects inside the arteries, a few mm long.

Geometry: the anatomy is adult-sized whatever the image. Sizes below are for a chest ``REFERENCE_BODY_MM``
= 320 mm wide and scale with ``s = body_mm / 320``; they do not depend on ``shape`` or ``pixel_mm``. The body
centre sits within a few mm of x = y = 0, the pulmonary bifurcation at a table height drawn in
[-230, -130] mm, the two hila close to it. SimpleITK conventions: identity direction, so +x = patient left,
+y = posterior, +z = superior; thin slice 0 is the most inferior. Voxel ``[k, j, i]`` of a series sits at
``origin + (i*sx, j*sy, k*sz)``. Both series share one StudyInstanceUID and one FrameOfReferenceUID; UIDs
are derived from (seed, case) so reruns name the same study.

Sampling, per case: the image is a crop of that chest, chosen by the family (``data.phantom.family``: its
``shape``, ``pixel_mm`` and ``centre``).

- **crop**: ``W x H`` pixels of ``pixel_mm`` centred in-plane on ``centre``: ``hilum`` (one of the two
  hila, drawn per case, jittered N(0, 3 mm) per axis, clipped to 6 mm: the hilar pulmonary arteries and
  their oblique branches, lung and mediastinum are in view), ``periphery`` (a point of one lung, drawn per
  case, 55-80 % of the way from its centre to its lateral border and up to 40 % of its depth off its
  centre, 0-30 mm above or below the hilum: small vessels in aerated lung, pleura, ribs and chest wall),
  ``body`` (the body centre; a crop wider than the body is the whole chest) or ``[x, y]`` mm from the body
  centre. In z the ``D`` thin slices are centred on that hilum's z (both hila's mean for ``body`` and
  ``[x, y]``; the drawn height for ``periphery``) +- 6 mm, slice 0 on a 0.5 mm step.
- **the field along z**: both series integrate one field sampled every ``thin_mm / z_subsamples`` (from
  beyond the first to beyond the last thin slice, as far as the widest profile reaches), each with its own
  slice sensitivity profile: a box of its nominal thickness blurred by a Gaussian (``thin_blur_mm``,
  ``thick_blur_mm`` FWHM: the scanner's reconstruction filter along z). With the defaults the thick profile
  is bell-shaped, as a real 5 mm reconstruction measures (:mod:`ctdiff.data.slab`), so the thick series is
  not the box average of the thin one and neither is a weighted sum of the other's slices: the slab stage
  has something to measure, and an assumed profile is visibly wrong.
- **thin series** (series 2): ``shape = (D, H, W)``, pixel ``pixel_mm``, slice spacing = nominal thickness =
  ``thin_mm``. Each voxel is the in-plane pixel average (2x2 sub-samples, i.e. partial volume) of the
  field, integrated along z with the thin profile; tissue edges are softened over ``EDGE_MM`` (the
  scanner's point spread). ``truth_hu`` is this noise-free volume; ``thin_hu = truth_hu + N(0, noise_hu)``.
  The labels are the tissue at each thin slice's centre.
- **thick series** (series 1): slab ``j`` is centred on thin slices ``k0 + j*m .. k0 + j*m + n - 1``
  (``n = thick_mm / thin_mm``) and integrates the field with the thick profile; slab starts advance by
  ``m = thick_spacing_mm / thin_mm`` thin slices (``thick_spacing_mm`` 0: ``m = n``, contiguous slabs;
  ``m < n`` overlapping slabs, ``m > n`` gaps). ``(D - n) // m + 1`` slabs fit, centred in the thin
  extent (the left-over thin slices split between the two ends). SliceThickness = ``thick_mm``, spacing =
  ``m * thin_mm``; optionally blurred in-plane (``thick_inplane_blur_mm``: a softer kernel). Noise: a
  thin-level N(0, noise_hu) field of its own weighted by the thick profile (about ``noise_hu / sqrt(n)``
  per slice, shared by overlapping slabs as on a scanner, independent of the thin series' noise).
- **emboli** (APE cases): 1-3, each in an artery that passes through the crop and is wide enough to show
  (radius >= max(0.6 pixel, 2 mm * s)), centred inside the crop (failing that, in a crop only a few slices
  deep, within the artery's radius of it) and covering at least one voxel.

Everything random comes from ``numpy.random.default_rng`` seeded with (seed, case number); crop, anatomy,
emboli and noise use separate child streams, so the same case number with and without APE, or at another
shape, pixel size or crop, is the same patient.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.uid import generate_uid
from tqdm import tqdm

from ctdiff.data.dicom_write import IDENTITY_DIRECTION, SeriesSpec, encode_series
from ctdiff.data.grid import Grid
from ctdiff.data.labels import write_case_labels, write_classes
from ctdiff.data.slab import blurred_box_mass
from ctdiff.io import atomic_path
from ctdiff.params import PhantomParams

CATEGORIES = ("APE", "non-APE")
THICK_SERIES, THIN_SERIES = "1", "2"  # folder names inside each case, as in APE-data

EDGE_MM = 1.0  # width of the soft tissue boundaries (about a CT scanner's point spread)
SUBSAMPLES = 2  # in-plane sub-samples per pixel and axis (partial volume)
REFERENCE_BODY_MM = 320.0  # anatomy below is sized for a chest this wide, then scaled to body_mm
_Z_CHUNK = 16  # field samples along z rendered at once: bounds memory for large phantoms
_STREAM = 0x5EED_C7  # keeps phantom random streams apart from other users of the same seed
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)  # fixed member timestamps: zip bytes depend only on content


class Tissue(IntEnum):
    """Labels of :attr:`PhantomCase.labels`: the tissue covering most of each thin voxel."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2  # skin, muscle, mediastinum
    LUNG = 3
    HEART = 4
    BLOOD = 5  # heart blood pool, aorta, vena cava, pulmonary veins (contrast, but not pulmonary arterial)
    AIRWAY = 6
    ARTERY = 7  # contrast-filled pulmonary artery lumen
    EMBOLUS = 8
    BONE_CORTICAL = 9
    BONE_CANCELLOUS = 10
    DISC = 11
    CSF = 12


TISSUE_CLASSES = {int(t): t.name.lower() for t in Tissue}  # the class table written beside the labels

# Per-patient tissue values are drawn from these ranges (HU), typical of contrast-enhanced CT pulmonary
# angiography (the arteries opacified, the aorta less so).
HU_AIR = -1000.0
HU_RANGES: dict[str, tuple[float, float]] = {
    "fat": (-110.0, -90.0),
    "soft_tissue": (35.0, 50.0),
    "lung": (-870.0, -830.0),
    "heart": (35.0, 50.0),
    "blood": (170.0, 230.0),
    "vein": (130.0, 190.0),
    "airway": (-995.0, -975.0),
    "artery": (270.0, 330.0),
    "embolus": (40.0, 60.0),
    "cortical": (650.0, 800.0),
    "cancellous": (200.0, 300.0),
    "disc": (70.0, 90.0),
    "csf": (5.0, 15.0),
}
LUNG_TEXTURE_STD_HU = 18.0
LUNG_GRAVITY_HU = 25.0  # dependent (posterior) lung is denser by up to this much


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic patient: both series, the noise-free truth and the tissue labels.

    Arrays are indexed ``[z, y, x]``; spacings are ``(sx, sy, sz)`` mm and origins ``(x, y, z)`` mm
    (LPS) in SimpleITK's conventions, direction is 9 floats row-major.
    """

    case_id: str
    category: str  # "APE" or "non-APE"
    truth_hu: np.ndarray  # (D, H, W) float32, noise-free thin field
    thin_hu: np.ndarray  # (D, H, W) float32, truth + noise: series 2
    thick_truth_hu: np.ndarray  # (S, H, W) float32, the noise-free thick slices (S slabs, see slab_starts)
    thick_hu: np.ndarray  # (S, H, W) float32, thick slices + their noise: series 1
    labels: np.ndarray  # (D, H, W) uint8, Tissue covering most of each thin voxel
    thin_origin_mm: tuple[float, float, float]
    thick_origin_mm: tuple[float, float, float]
    thin_spacing_mm: tuple[float, float, float]
    thick_spacing_mm: tuple[float, float, float]  # sz = distance between thick slices (slab_step thin slices)
    thick_thickness_mm: float  # SliceThickness of series 1: slab_slices * thin_mm
    slab_slices: int  # n: thin slices each thick slab is centred on (its nominal thickness / thin_mm)
    slab_step: int  # m: thin slices from one slab's start to the next (< n overlap, > n gaps)
    slab_start: int  # k0: first thin slice of the first slab; slab j is centred on k0 + j*m .. k0 + j*m + n - 1
    n_emboli: int
    crop_centre_mm: tuple[float, float, float]  # (x, y, z) of the image centre, LPS
    view: str  # what the crop is centred on: "left hilum", "right lung periphery", "body", "x, y mm from body"
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    uids: dict[str, str] = field(default_factory=dict)  # study, frame_of_reference, series_1, series_2

    @property
    def slab_starts(self) -> np.ndarray:
        """First thin slice of each thick slab."""
        return self.slab_start + self.slab_step * np.arange(self.thick_hu.shape[0])


# ------------------------------------------------------------------------------------------ public
def case_id_for(number: int) -> str:
    """``case_007`` for case number 7 (zero-padded to 3 digits, as in APE-data)."""
    return f"case_{number:03d}"


def ape_case_numbers(p: PhantomParams, seed: int) -> set[int]:
    """Which of the case numbers ``1..n_cases`` are APE: ``round(n_cases * ape_fraction)`` of them
    (half rounds up), chosen at random from ``seed``."""
    n_ape = int(math.floor(p.n_cases * p.ape_fraction + 0.5))
    rng = np.random.default_rng([_STREAM, _seed_word(seed), 0])
    return {int(n) for n in rng.permutation(np.arange(1, p.n_cases + 1))[:n_ape]}


def make_case(number: int, p: PhantomParams, seed: int, ape: bool) -> PhantomCase:
    """Generate case ``number`` (>= 1): anatomy from (seed, number), emboli only when ``ape``."""
    n, m = slab_slices(p), slab_step(p)
    depth, rows, cols = p.shape
    if depth < n:
        raise ValueError(f"data.phantom.families.{p.family}.shape: {depth} thin slices cannot hold one {p.thick_mm} mm "
                         "slab")
    # Streams 0-3 as they always were; 4 (the periphery's placement) was added later: spawn(n) keeps the first ones.
    streams = np.random.SeedSequence([_STREAM, _seed_word(seed), number]).spawn(5)
    grid_rng, anatomy_rng, emboli_rng, noise_rng, place_rng = (np.random.default_rng(ss) for ss in streams)
    anatomy = _sample_anatomy(p.body_mm / REFERENCE_BODY_MM, anatomy_rng)
    grid = _Grid.for_params(p, anatomy, grid_rng, place_rng)
    if ape:
        anatomy.emboli = _sample_emboli(anatomy, grid, emboli_rng, case_id_for(number))

    n_slabs = (depth - n) // m + 1
    k_start = (depth - (n_slabs - 1) * m - n) // 2
    starts = k_start + m * np.arange(n_slabs)
    slab_centres = (starts + (n - 1) / 2.0) * p.thin_mm  # mm from thin slice 0
    truth, thick_truth, labels = _integrate(anatomy, grid, p, slab_centres)
    if ape and not (labels == Tissue.EMBOLUS).any():  # _sample_emboli checked each one; a bug if hit
        raise RuntimeError(f"{case_id_for(number)}: emboli were placed but none covers a voxel")
    if p.thick_inplane_blur_mm > 0:
        thick_truth = _blur_inplane(thick_truth, p.thick_inplane_blur_mm, p.pixel_mm)

    thin = truth + noise_rng.normal(0.0, p.noise_hu, truth.shape).astype(np.float32)
    # The thick series' own noise: a thin-level field weighted by the thick profile's share of each thin slice.
    noise_weights = thick_profile_masses(p, np.arange(depth) * p.thin_mm, p.thin_mm, slab_centres)
    noise_weights /= noise_weights.sum(axis=1, keepdims=True)
    thick_noise = np.tensordot(noise_weights, noise_rng.normal(0.0, p.noise_hu, truth.shape), axes=(1, 0))
    thick = thick_truth + thick_noise.astype(np.float32)

    x0, y0, z0 = grid.origin_mm
    thick_z0 = z0 + (k_start + (n - 1) / 2.0) * p.thin_mm  # mean z of the slab's thin slices
    uid_key = [str(_STREAM), str(seed), str(number)]
    uids = {name: generate_uid(entropy_srcs=[*uid_key, name])
            for name in ("study", "frame_of_reference", "series_1", "series_2")}
    return PhantomCase(
        case_id=case_id_for(number),
        category="APE" if ape else "non-APE",
        truth_hu=truth,
        thin_hu=thin,
        thick_truth_hu=thick_truth,
        thick_hu=thick,
        labels=labels,
        thin_origin_mm=(x0, y0, z0),
        thick_origin_mm=(x0, y0, thick_z0),
        thin_spacing_mm=(p.pixel_mm, p.pixel_mm, p.thin_mm),
        thick_spacing_mm=(p.pixel_mm, p.pixel_mm, m * p.thin_mm),
        thick_thickness_mm=n * p.thin_mm,
        slab_slices=n,
        slab_step=m,
        slab_start=k_start,
        n_emboli=len(anatomy.emboli),
        crop_centre_mm=grid.centre_mm,
        view=grid.view,
        uids=uids,
    )


def thick_profile_masses(p: PhantomParams, z_mm: np.ndarray, extent_mm: float, centres_mm: np.ndarray) -> np.ndarray:
    """(S, N) mass of each thick slab's profile (centred at ``centres_mm``) over cells of ``extent_mm`` at ``z_mm``."""
    offsets = np.asarray(z_mm, np.float64)[None, :] - np.asarray(centres_mm, np.float64)[:, None]
    return blurred_box_mass(offsets - extent_mm / 2, offsets + extent_mm / 2, p.thick_mm, p.thick_blur_mm)


def _integrate(anatomy: _Anatomy, grid: _Grid, p: PhantomParams, slab_centres_mm: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth (D, H, W), thick truth (S, H, W), labels (D, H, W)): the field sampled every ``thin_mm /
    z_subsamples`` along z, integrated with the thin profile at each thin slice and with the thick profile at
    each slab centre (mm from thin slice 0), chunk by chunk so memory stays bounded."""
    q, thin_mm = p.z_subsamples, p.thin_mm
    depth = len(grid.z)
    step = thin_mm / q
    # How far each profile reaches from its centre (3 sigma of its blur beyond its box), mm.
    thin_reach, thick_reach = thin_mm / 2 + 3 * p.thin_blur_mm, p.thick_mm / 2 + 3 * p.thick_blur_mm
    before_mm = max(thin_reach, thick_reach - float(slab_centres_mm.min()))
    after_mm = max(thin_reach, float(slab_centres_mm.max()) + thick_reach - (depth - 1) * thin_mm)
    before, after = int(math.ceil(before_mm / step)) + 1, int(math.ceil(after_mm / step)) + 1
    index = np.arange(-before, (depth - 1) * q + after + 1)  # field samples, in steps from thin slice 0
    z_mm = index * step
    thin_w = blurred_box_mass(z_mm[None, :] - step / 2 - np.arange(depth)[:, None] * thin_mm,
                              z_mm[None, :] + step / 2 - np.arange(depth)[:, None] * thin_mm, thin_mm, p.thin_blur_mm)
    thick_w = thick_profile_masses(p, z_mm, step, slab_centres_mm)
    thin_w /= thin_w.sum(axis=1, keepdims=True)  # the samples cover each profile (up to its far tails)
    thick_w /= thick_w.sum(axis=1, keepdims=True)
    fine = _Grid(z=(grid.z[0] + z_mm).astype(np.float32), y=grid.y, x=grid.x, pixel_mm=grid.pixel_mm, thin_mm=step,
                 origin_mm=(grid.origin_mm[0], grid.origin_mm[1], float(grid.z[0] + z_mm[0])),
                 centre_mm=grid.centre_mm, view=grid.view)
    rows, cols = len(grid.y) // SUBSAMPLES, len(grid.x) // SUBSAMPLES
    truth = np.zeros((depth, rows, cols), np.float32)
    thick = np.zeros((len(slab_centres_mm), rows, cols), np.float32)
    labels = np.empty((depth, rows, cols), np.uint8)
    for c0 in range(0, len(z_mm), _Z_CHUNK):
        c1 = min(len(z_mm), c0 + _Z_CHUNK)
        field, tissue = _render(anatomy, fine, c0, c1)
        for weights, out in ((thin_w, truth), (thick_w, thick)):
            used = np.flatnonzero(weights[:, c0:c1].any(axis=1))
            if used.size:
                lo, hi = used[0], used[-1] + 1
                out[lo:hi] += np.tensordot(weights[lo:hi, c0:c1], field, axes=(1, 0)).astype(np.float32)
        centres = index[c0:c1] % q == 0
        k = index[c0:c1][centres] // q
        inside = (k >= 0) & (k < depth)
        labels[k[inside]] = tissue[np.flatnonzero(centres)[inside]]
    return truth, thick, labels


def _blur_inplane(volume: np.ndarray, fwhm_mm: float, pixel_mm: float) -> np.ndarray:
    """(N, H, W) blurred in-plane by a Gaussian of ``fwhm_mm`` (SimpleITK), float32."""
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((pixel_mm, pixel_mm, 1.0))
    variance = (fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))) ** 2
    return sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [variance, variance, 0.0], 32, 0.01, True))


def slab_slices(p: PhantomParams) -> int:
    """Thin slices per thick slab, ``thick_mm / thin_mm`` (a whole number: PhantomParams checks it)."""
    return round(p.thick_mm / p.thin_mm)


def slab_step(p: PhantomParams) -> int:
    """Thin slices from one thick slab's start to the next, ``thick_spacing_mm / thin_mm`` (``thick_mm``
    when ``thick_spacing_mm`` is 0; a whole number >= 1: PhantomParams checks it)."""
    return round(p.thick_step_mm / p.thin_mm)


def case_zip_members(case: PhantomCase, seed: int) -> list[tuple[str, bytes]]:
    """DICOM files of both series as zip members ``case_XXX/1/*.dcm`` (thick), ``case_XXX/2/*.dcm``
    (thin). Patient fields are fake but PHI-shaped on purpose: the preprocess stage must strip them."""
    number = int(case.case_id.rsplit("_", 1)[1])
    rng = np.random.default_rng([_STREAM, _seed_word(seed), number, 1])
    patient = {
        "patient_name": f"PHANTOM^CASE{number:03d}",
        "patient_id": f"PH{_seed_word(seed) % 100000:05d}{number:04d}",
        "patient_birth_date": f"{rng.integers(1940, 2000)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "accession_number": f"ACC{rng.integers(10**7, 10**8)}",
        "institution_name": "Phantom General Hospital",
        "referring_physician": "PHANTOM^REFERRER",
        "study_date": f"2024{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "study_uid": case.uids["study"],
        "frame_of_reference_uid": case.uids["frame_of_reference"],
    }
    series = (
        (THICK_SERIES, case.thick_hu, case.thick_spacing_mm, case.thick_thickness_mm, case.thick_origin_mm),
        (THIN_SERIES, case.thin_hu, case.thin_spacing_mm, case.thin_spacing_mm[2], case.thin_origin_mm),
    )
    members = []
    for number_str, hu, spacing, thickness, origin in series:
        spec = SeriesSpec(
            spacing_mm=spacing,
            origin_mm=origin,
            direction=case.direction,
            slice_thickness_mm=thickness,
            series_uid=case.uids[f"series_{number_str}"],
            series_number=int(number_str),
            series_description=f"CTPA {thickness:g} mm",
            **patient,
        )
        members += [(f"{case.case_id}/{number_str}/{name}", data) for name, data in encode_series(hu, spec)]
    return members


def write_case_zip(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` into the zip ``path`` atomically (deflate, fixed timestamps)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)


def write_phantom_dataset(raw_dir: Path, p: PhantomParams, seed: int, progress: bool = False) -> list[Path]:
    """Generate ``p.n_cases`` phantoms into ``raw_dir`` in the APE-data layout.

    Writes ``raw_dir/APE/case_XXX.zip`` and ``raw_dir/non-APE/case_XXX.zip`` (case numbers 1..n_cases,
    unique across both folders; both folders always exist), each zip written atomically and holding
    ``case_XXX/1/*.dcm`` (thick) and ``case_XXX/2/*.dcm`` (thin), and each case's tissue labels on the
    thin grid as ``raw_dir/labels/case_XXX.nii.gz`` with the class table :data:`TISSUE_CLASSES`
    (:mod:`ctdiff.data.labels`). Returns the zip paths in case order.
    """
    raw_dir = Path(raw_dir)
    slab_slices(p)  # fail before writing anything
    for category in CATEGORIES:
        (raw_dir / category).mkdir(parents=True, exist_ok=True)
    ape = ape_case_numbers(p, seed)
    write_classes(raw_dir, TISSUE_CLASSES)
    paths = []
    for number in tqdm(range(1, p.n_cases + 1), desc="phantom cases", unit="case", disable=not progress):
        case = make_case(number, p, seed, ape=number in ape)
        path = raw_dir / case.category / f"{case.case_id}.zip"
        write_case_zip(path, case_zip_members(case, seed))
        write_case_labels(raw_dir, case.case_id, case.labels, thin_grid(case))
        paths.append(path)
    return paths


def thin_grid(case: PhantomCase) -> Grid:
    """The thin series' (series 2's) voxel grid: where :attr:`PhantomCase.labels` lives."""
    return Grid(tuple(case.labels.shape), case.thin_spacing_mm, case.thin_origin_mm, tuple(case.direction))


# ---------------------------------------------------------------------------------------- sampling
def _seed_word(seed: int) -> int:
    return seed % (1 << 63)  # SeedSequence wants non-negative entropy; negative seeds stay distinct


@dataclass(frozen=True)
class _Grid:
    """Sample positions of the thin series: slice z (D,), and in-plane sub-sample y (H*ss,), x (W*ss,)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    pixel_mm: float
    thin_mm: float
    origin_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    view: str

    @staticmethod
    def for_params(p: PhantomParams, anatomy: _Anatomy, rng: np.random.Generator, place_rng: np.random.Generator
                   ) -> _Grid:
        """The crop: centred on ``p.centre`` in-plane and near the hila in z (see the module docstring).
        ``place_rng`` draws the periphery's point (a stream of its own: the other modes stay as they were)."""
        depth, rows, cols = p.shape
        # Every draw is made whatever the mode, so the modes share the z placement.
        side = (-1.0, 1.0)[int(rng.integers(2))]
        jitter = np.clip(rng.normal(0.0, 3.0, 2), -6.0, 6.0)
        dz = float(rng.uniform(-6.0, 6.0))
        hilum = anatomy.hila[side]
        cx, cy = anatomy.centre
        z_c = float(np.mean([h[2] for h in anatomy.hila.values()]))
        if p.centre == "hilum":
            view = f"{'left' if side > 0 else 'right'} hilum"  # +x = patient left
            x_c, y_c = float(hilum[0] + jitter[0]), float(hilum[1] + jitter[1])
            z_c = float(hilum[2])
        elif p.centre == "periphery":
            # A point of the lung on that side between its centre and its lateral border, off its centre in
            # depth, above or below the hilum: aerated lung with small vessels, pleura, ribs, chest wall.
            lung_x, lung_y, ax, ay = anatomy.lungs[0 if side < 0 else 1]
            out, across = place_rng.uniform(0.55, 0.8), place_rng.uniform(-0.4, 0.4)
            x_c, y_c = float(lung_x + side * out * ax), float(lung_y + across * ay)
            z_c = float(hilum[2] + place_rng.choice([-1.0, 1.0]) * place_rng.uniform(0.0, 30.0))
            view = f"{'left' if side > 0 else 'right'} lung periphery"
        elif p.centre == "body":
            view, x_c, y_c = "body", cx, cy
        else:
            ox, oy = p.centre
            view, x_c, y_c = f"{ox:g}, {oy:g} mm from body", cx + ox, cy + oy
        x0 = round(x_c - (cols - 1) / 2.0 * p.pixel_mm, 2)  # short decimals: DICOM writes 6 digits
        y0 = round(y_c - (rows - 1) / 2.0 * p.pixel_mm, 2)
        z0 = float(np.round((z_c + dz - (depth - 1) / 2.0 * p.thin_mm) * 2.0) / 2.0)
        sub = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5  # sub-sample offsets in pixels

        def axis(start: float, n: int) -> np.ndarray:
            return (start + (np.arange(n)[:, None] + sub[None, :]) * p.pixel_mm).ravel().astype(np.float32)

        # float32 sample positions keep every rendered array float32 (half the memory traffic); the
        # anatomy's scalars are Python floats so NumPy does not promote them back to float64.
        return _Grid(
            z=(z0 + np.arange(depth) * p.thin_mm).astype(np.float32),
            y=axis(y0, rows),
            x=axis(x0, cols),
            pixel_mm=p.pixel_mm,
            thin_mm=p.thin_mm,
            origin_mm=(x0, y0, z0),
            centre_mm=(round(x0 + (cols - 1) / 2.0 * p.pixel_mm, 3), round(y0 + (rows - 1) / 2.0 * p.pixel_mm, 3),
                       round(z0 + (depth - 1) / 2.0 * p.thin_mm, 3)),
            view=view,
        )

    def box(self, lo: np.ndarray, hi: np.ndarray, k0: int, k1: int) -> tuple[slice, slice, slice] | None:
        """Slices (chunk-relative z, sub-sample y, x) of the whole voxels in chunk ``[k0, k1)`` that
        touch the box ``lo..hi`` (x, y, z mm); None when empty."""
        ss = SUBSAMPLES
        x0, y0, z0 = self.origin_mm
        n_cols, n_rows = len(self.x) // ss, len(self.y) // ss
        i0 = max(0, math.floor((lo[0] - x0) / self.pixel_mm + 0.5))
        i1 = min(n_cols, math.ceil((hi[0] - x0) / self.pixel_mm + 0.5))
        j0 = max(0, math.floor((lo[1] - y0) / self.pixel_mm + 0.5))
        j1 = min(n_rows, math.ceil((hi[1] - y0) / self.pixel_mm + 0.5))
        kz0 = max(k0, math.ceil((lo[2] - z0) / self.thin_mm))
        kz1 = min(k1, math.floor((hi[2] - z0) / self.thin_mm) + 1)
        if i0 >= i1 or j0 >= j1 or kz0 >= kz1:
            return None
        return slice(kz0 - k0, kz1 - k0), slice(j0 * ss, j1 * ss), slice(i0 * ss, i1 * ss)


@dataclass
class _Tube:
    """Tapered tube from p0 to p1 (x, y, z mm), radius r0 -> r1 mm."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    peripheral: bool = False  # True: kept inside the lungs (a branch), else inside the thoracic cavity

    def bounds(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.r0, self.r1) + margin
        return np.minimum(self.p0, self.p1) - r, np.maximum(self.p0, self.p1) + r

    def sdf(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        (ax, ay, az), (dx, dy, dz) = self.p0.tolist(), (self.p1 - self.p0).tolist()
        vx, vy, vz = x - ax, y - ay, z - az
        t = np.clip((vx * dx + vy * dy + vz * dz) / (dx * dx + dy * dy + dz * dz), 0.0, 1.0)
        dist = np.sqrt((vx - t * dx) ** 2 + (vy - t * dy) ** 2 + (vz - t * dz) ** 2)
        return dist - (self.r0 + t * (self.r1 - self.r0))


@dataclass
class _Embolus:
    """Ellipsoid along a vessel's axis (half length ``half_mm``, cross radius ``rho_mm``), clipped to the
    lumen of ``tube``."""

    centre: np.ndarray
    axis: np.ndarray  # unit vector
    half_mm: float
    rho_mm: float
    hu: float
    tube: _Tube

    def bounds(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.half_mm, self.rho_mm) + margin
        return self.centre - r, self.centre + r

    def sdf(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        (cx, cy, cz), (ux, uy, uz) = self.centre.tolist(), self.axis.tolist()
        vx, vy, vz = x - cx, y - cy, z - cz
        along = vx * ux + vy * uy + vz * uz
        perp = np.sqrt(np.maximum(vx**2 + vy**2 + vz**2 - along**2, 0.0))
        return _ellipse_sdf(along, perp, self.half_mm, self.rho_mm)


@dataclass
class _Anatomy:
    """Every random choice for one patient (mm, HU)."""

    scale: float  # s: anatomy size relative to REFERENCE_BODY_MM
    z_bifurcation: float  # table height (mm) the anatomy is placed around: about the pulmonary bifurcation
    hu: dict[str, float]
    centre: tuple[float, float]  # body centre (x, y)
    body: tuple[float, float]  # outer semi-axes (a, b)
    skin_mm: float
    fat_mm: float
    muscle_mm: float
    cavity: tuple[float, float]  # thoracic cavity semi-axes (A, B)
    lungs: list[tuple[float, float, float, float]]  # (centre x, centre y, semi-axis x, semi-axis y)
    lung_taper_per_mm: float
    mediastinum_half_mm: float
    texture: tuple[np.ndarray, np.ndarray, np.ndarray]  # wave vectors (n, 3) rad/mm, phases, amplitudes
    heart_centre: np.ndarray
    heart_radii: np.ndarray
    aortas: list[_Tube]  # and the superior vena cava
    airways: list[_Tube]
    airway_wall_mm: float
    oesophagus: _Tube
    veins: list[_Tube]  # pulmonary veins (opacified less than the arteries)
    arteries: list[_Tube]
    hila: dict[float, np.ndarray]  # side (-1 right, +1 left) -> (x, y, z) where the lobar arteries start
    spine: dict[str, float]
    ribs: dict[str, float]
    sternum: tuple[float, float, float, float]  # centre x, y, semi-axes x, y
    emboli: list[_Embolus] = field(default_factory=list)


def _sample_anatomy(s: float, rng: np.random.Generator) -> _Anatomy:
    """Every random choice for one patient, sized by ``s`` and independent of the image grid."""
    u = rng.uniform
    zm = float(np.round(u(-230.0, -130.0) * 2.0) / 2.0)
    hu = {name: float(u(lo, hi)) for name, (lo, hi) in HU_RANGES.items()}
    cx, cy = u(-8.0, 8.0) * s, u(-8.0, 8.0) * s
    a, b = u(128.0, 148.0) * s, u(92.0, 110.0) * s
    skin, fat, muscle = 2.0 * s, u(8.0, 24.0) * s, u(8.0, 14.0) * s
    wall = skin + fat + muscle + 6.0 * s  # ribs and intercostal muscle
    big_a, big_b = a - wall, b - wall

    lung_ax, lung_ay = u(0.44, 0.5) * big_a, u(0.85, 0.95) * big_b
    lungs = [(cx + side * u(0.48, 0.54) * big_a, cy + u(0.0, 0.08) * big_b, lung_ax * u(0.95, 1.05), lung_ay)
             for side in (-1.0, 1.0)]

    n_waves = 16
    wavelengths = u(6.0, 24.0, n_waves) * s
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    texture = (directions * (2 * np.pi / wavelengths)[:, None], u(0, 2 * np.pi, n_waves),
               np.full(n_waves, LUNG_TEXTURE_STD_HU * math.sqrt(2.0 / n_waves)))

    def point(x: float, y: float, z: float, jitter: float = 5.0) -> np.ndarray:
        return np.array([cx + x, cy + y, zm + z]) + rng.normal(0.0, jitter * s, 3)

    heart_centre = point(0.18 * big_a, -0.42 * big_b, -50.0 * s)
    heart_radii = np.array([0.5 * big_a, 0.5 * big_b, 55.0 * s]) * u(0.9, 1.1)

    vertebra_y = cy + 0.3 * b
    aortas = [
        _Tube(point(28.0 * s, vertebra_y - cy - 14.0 * s, -200.0 * s),
              point(28.0 * s, vertebra_y - cy - 18.0 * s, 200.0 * s), 11.0 * s, 11.0 * s),
        _Tube(point(-0.12 * big_a, -0.4 * big_b, -30.0 * s), point(-0.1 * big_a, -0.3 * big_b, 200.0 * s),
              14.0 * s, 13.0 * s),
        _Tube(point(-0.3 * big_a, -0.3 * big_b, -40.0 * s), point(-0.28 * big_a, -0.24 * big_b, 200.0 * s),
              9.0 * s, 8.5 * s),  # superior vena cava, at the right mediastinal border
    ]

    # Pulmonary trunk from the right ventricle up and back to the bifurcation, main arteries to the
    # hila (just lateral to the mediastinum), then a tree of five generations per lobe whose branches
    # leave the hila at steep angles to the axial plane: that is the z detail a thick slab averages away.
    bif = point(0.04 * big_a, -0.12 * big_b, 8.0 * s)
    hila = {-1.0: point(-0.41 * big_a, 0.05 * big_b, 2.0 * s), 1.0: point(0.39 * big_a, 0.12 * big_b, 12.0 * s)}
    arteries = [
        _Tube(point(0.12 * big_a, -0.55 * big_b, -28.0 * s), bif, 14.0 * s, 13.0 * s),
        _Tube(bif, hila[-1.0], 11.0 * s, 9.5 * s),
        _Tube(bif, hila[1.0], 10.5 * s, 9.0 * s),
    ]
    carina = bif + np.array([0.0, 0.25 * big_b, -6.0 * s])
    airways = [_Tube(carina + np.array([0.0, 0.0, 150.0 * s]), carina, 8.0 * s, 8.0 * s)]
    oesophagus = _Tube(point(0.06 * big_a, carina[1] - cy + 16.0 * s, -150.0 * s),
                       point(0.03 * big_a, carina[1] - cy + 14.0 * s, 150.0 * s), 7.0 * s, 7.0 * s)
    veins: list[_Tube] = []
    lobar = [(0.5, -0.2, 0.85), (0.9, -0.4, -0.1), (0.5, 0.4, -0.8)]  # upper, middle, lower lobe
    for side, hilum in hila.items():
        bronchus_end = hilum + np.array([side * -6.0 * s, 10.0 * s, -4.0 * s])
        airways.append(_Tube(carina, bronchus_end, 6.5 * s, 5.0 * s))
        for dx, dy, dz in lobar:
            direction = np.array([side * dx, dy, dz]) + rng.normal(0.0, 0.25, 3)
            _grow(arteries, hilum, direction, 26.0 * s, 5.5 * s, depth=7, rng=rng, twig_mm=5.0 * s)
            _grow(airways, bronchus_end, direction + rng.normal(0.0, 0.2, 3), 24.0 * s, 4.5 * s, depth=3, rng=rng)
        # Pulmonary veins: upper and lower, from the left atrium (back of the heart, below the hila) out
        # into the lung, apart from the arteries.
        for dz_ostium, dz_dir in ((-14.0, 0.5), (-34.0, -0.5)):
            ostium = point(side * 0.2 * big_a, 0.0, dz_ostium * s, jitter=3.0)
            end = point(side * 0.36 * big_a, 0.1 * big_b, (dz_ostium + 6.0) * s, jitter=3.0)
            veins.append(_Tube(ostium, end, 7.0 * s, 6.0 * s))
            direction = np.array([side, 0.3, dz_dir]) + rng.normal(0.0, 0.25, 3)
            _grow(veins, end, direction, 24.0 * s, 4.5 * s, depth=6, rng=rng, twig_mm=8.0 * s)

    vb_r = (u(17.0, 21.0) * s, u(14.0, 17.0) * s)
    canal_y = vertebra_y + vb_r[1] + 9.0 * s
    spine = {
        "x": cx, "y": vertebra_y, "rx": vb_r[0], "ry": vb_r[1], "shell": 2.5 * s,
        "disc_period": u(26.0, 30.0) * s, "disc_phase": u(0.0, 30.0) * s, "disc_half": 3.0 * s,
        "canal_y": canal_y, "canal_rx": 8.0 * s, "canal_ry": 7.0 * s, "arch_rx": 13.0 * s, "arch_ry": 11.0 * s,
        "process_y": canal_y + 20.0 * s, "process_rx": 4.0 * s, "process_ry": 12.0 * s,
    }
    ribs = {
        "ax": big_a + 4.0 * s, "ay": big_b + 4.0 * s, "period": u(24.0, 30.0) * s, "phase": u(0.0, 30.0) * s,
        "drop": -u(30.0, 45.0) * s, "half_r": 4.0 * s, "half_z": 6.5 * s, "shell": 1.5 * s,
    }
    sternum = (cx, cy - big_b - 8.0 * s, 14.0 * s, 6.0 * s)
    return _Anatomy(
        scale=s, z_bifurcation=zm, hu=hu, centre=(cx, cy), body=(a, b), skin_mm=skin, fat_mm=fat, muscle_mm=muscle,
        cavity=(big_a, big_b),
        lungs=lungs, lung_taper_per_mm=0.0025 / s, mediastinum_half_mm=0.26 * big_a, texture=texture,
        heart_centre=heart_centre, heart_radii=heart_radii, aortas=aortas, airways=airways,
        airway_wall_mm=1.5 * s, oesophagus=oesophagus, veins=veins, arteries=arteries,
        hila=hila, spine=spine, ribs=ribs, sternum=sternum,
    )


def _grow(tubes: list[_Tube], start: np.ndarray, direction: np.ndarray, length: float, radius: float,
          depth: int, rng: np.random.Generator, twig_mm: float = 0.0) -> None:
    """Append a branch (kept inside the lungs) and, recursively, two children that turn away from it at
    random, each shorter and thinner. With ``twig_mm``, branches wider than 1.5 mm also give off thin side
    branches about every ``twig_mm`` along their length (small vessels near the hilum, not only at the
    periphery)."""
    direction = direction / np.linalg.norm(direction)
    span = direction * length * rng.uniform(0.8, 1.2)
    end = start + span
    r_end = radius * 0.92
    tubes.append(_Tube(start, end, radius, r_end, peripheral=True))
    if twig_mm > 0 and radius > 1.5:
        for t in rng.uniform(0.15, 0.95, int(rng.poisson(length / twig_mm))):
            twig = direction + rng.normal(0.0, 1.2, 3)
            _grow(tubes, start + t * span, twig, 14.0 * rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.1), 2, rng)
    if depth > 1:
        for _ in range(2):
            child = direction + rng.normal(0.0, 0.6, 3)
            _grow(tubes, end, child, length * 0.75, r_end * 0.8, depth - 1, rng, twig_mm)  # 0.8: about Murray's law


def _sample_emboli(anatomy: _Anatomy, grid: _Grid, rng: np.random.Generator, label: str) -> list[_Embolus]:
    """1-3 emboli in arteries that pass through the crop and are wide enough to show at this pixel size,
    each covering at least one voxel: centred inside the crop where that can be done, else (a crop only a
    few slices deep) within the artery's radius of it."""
    s = anatomy.scale
    min_radius = max(0.6 * grid.pixel_mm, 2.0 * s)
    lo = np.array([grid.x[0], grid.y[0], grid.z[0] + 1.0])
    hi = np.array([grid.x[-1], grid.y[-1], grid.z[-1] - 1.0])
    wanted = int(rng.integers(1, 4))
    emboli: list[_Embolus] = []
    for reach in (0.0, 1.0):
        candidates = []  # (tube, the t range of its middle part that lies in the crop, grown by reach * radius)
        for tube in anatomy.arteries:
            grow = reach * max(tube.r0, tube.r1)
            span = _segment_in_box(tube.p0, tube.p1, lo - grow, hi + grow, 0.15, 0.85)
            if span is not None and min(tube.r0, tube.r1) >= min_radius:
                candidates.append((tube, span))
        for _ in range(200):
            if len(emboli) == wanted or not candidates:
                break
            tube, (t_lo, t_hi) = candidates[int(rng.integers(len(candidates)))]
            t = rng.uniform(t_lo, t_hi)
            axis = (tube.p1 - tube.p0) / np.linalg.norm(tube.p1 - tube.p0)
            radius = tube.r0 + t * (tube.r1 - tube.r0)
            rho = radius * rng.uniform(0.6, 1.0)  # 1.0: occlusive
            side = np.cross(axis, rng.normal(size=3))
            side /= np.linalg.norm(side)
            centre = tube.p0 + t * (tube.p1 - tube.p0) + side * (radius - rho) * rng.uniform(0.0, 1.0)
            if np.any(centre < lo - reach * rho) or np.any(centre > hi + reach * rho):
                continue
            embolus = _Embolus(centre, axis, rng.uniform(2.5, 7.5) * s, rho,
                               float(rng.uniform(*HU_RANGES["embolus"])), tube)
            if _covers_a_voxel(embolus, anatomy, grid):
                emboli.append(embolus)
        if emboli:
            break
    if not emboli:
        raise ValueError(f"{label}: no artery in the crop ({grid.view}) is wide enough to show an embolus at "
                         f"{grid.pixel_mm:g} mm pixels; give the family (data.phantom.families) a finer pixel_mm, a "
                         "larger shape or the hilum centre")
    return emboli


def _segment_in_box(p0: np.ndarray, p1: np.ndarray, lo: np.ndarray, hi: np.ndarray, t0: float,
                    t1: float) -> tuple[float, float] | None:
    """The part ``[t_lo, t_hi]`` of ``t0..t1`` where ``p0 + t (p1 - p0)`` lies inside the box ``lo..hi``."""
    d = p1 - p0
    for axis in range(3):
        if abs(d[axis]) < 1e-9:
            if not lo[axis] <= p0[axis] <= hi[axis]:
                return None
            continue
        a, b = sorted(((lo[axis] - p0[axis]) / d[axis], (hi[axis] - p0[axis]) / d[axis]))
        t0, t1 = max(t0, a), min(t1, b)
    return (float(t0), float(t1)) if t0 < t1 else None


def _covers_a_voxel(embolus: _Embolus, anatomy: _Anatomy, grid: _Grid) -> bool:
    box = grid.box(*embolus.bounds(EDGE_MM), 0, len(grid.z))
    if box is None:
        return False
    z, y, x = grid.z[box[0], None, None], grid.y[None, box[1], None], grid.x[None, None, box[2]]
    lumen = np.maximum(embolus.tube.sdf(z, y, x), _vessel_region(anatomy, embolus.tube.peripheral, z, y, x))
    return bool((_voxel_mean(_soft(np.maximum(embolus.sdf(z, y, x), lumen))) > 0.5).any())


# ---------------------------------------------------------------------------------------- rendering
def _soft(sdf: np.ndarray) -> np.ndarray:
    """Fraction inside for a signed distance (mm, negative inside), ramped over EDGE_MM."""
    return np.clip(0.5 - sdf / EDGE_MM, 0.0, 1.0)


def _voxel_mean(sub: np.ndarray) -> np.ndarray:
    """(Dz, H*ss, W*ss) sub-samples -> (Dz, H, W) pixel means (strided sums: much faster than a
    reduction over reshaped axes)."""
    ss = SUBSAMPLES
    total = sum(sub[:, i::ss, j::ss] for i in range(ss) for j in range(ss))
    return total / (ss * ss)


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (mm) to the ellipse (u/a)^2 + (v/b)^2 = 1: f / |grad f|, exact on the
    axes and close near the curve, which is all the soft edge needs."""
    f = (u / a) ** 2 + (v / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    return f / np.maximum(grad, 1e-6)


class _Canvas:
    """Painter's algorithm on sub-samples: each structure overwrites what lies under it by its coverage."""

    def __init__(self, depth: int, rows_ss: int, cols_ss: int, background_hu: float) -> None:
        self.hu = np.full((depth, rows_ss, cols_ss), background_hu, np.float32)
        self.labels = np.zeros((depth, rows_ss // SUBSAMPLES, cols_ss // SUBSAMPLES), np.uint8)

    def paint(self, sdf: np.ndarray, value: float | np.ndarray, label: Tissue,
              box: tuple[slice, slice, slice] | None = None, replaces: float | None = None) -> None:
        """Cover the inside of ``sdf`` with ``value`` HU. With ``replaces``, the structure takes the
        place of that much of a tissue of ``replaces`` HU painted just before and lying wholly around it
        (an embolus in the lumen), so partial-volume voxels keep the right mixture."""
        box = box or (slice(None),) * 3
        region = self.hu[box]
        # Masks constant along z (body, spine) stay 2D: coverage is computed once and broadcast.
        m = _soft(sdf)
        m = np.broadcast_to(m, (m.shape[0], *region.shape[1:]))
        region += m * (value - (region if replaces is None else replaces))
        ss = SUBSAMPLES
        label_box = (box[0],) + tuple(
            slice(None if b.start is None else b.start // ss, None if b.stop is None else b.stop // ss)
            for b in box[1:]
        )
        labels = self.labels[label_box]
        labels[np.broadcast_to(_voxel_mean(m) > 0.5, labels.shape)] = label


def _cavity_sdf(anat: _Anatomy, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    cx, cy = anat.centre
    return _ellipse_sdf(x - cx, y - cy, *anat.cavity)


def _lungs_sdf(anat: _Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Both lungs: ellipses narrowing towards the apex, inside the cavity, flat medial border."""
    cx = anat.centre[0]
    taper = np.clip(1.0 - anat.lung_taper_per_mm * (z - anat.z_bifurcation), 0.3, 1.3)
    inside = np.minimum.reduce([_ellipse_sdf(x - lx, y - ly, lax * taper, lay * taper)
                                for lx, ly, lax, lay in anat.lungs])
    return np.maximum(inside, np.maximum(anat.mediastinum_half_mm - np.abs(x - cx), _cavity_sdf(anat, y, x)))


def _heart_sdf(anat: _Anatomy, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    hc, hr = anat.heart_centre.tolist(), anat.heart_radii.tolist()
    q = ((x - hc[0]) / hr[0]) ** 2 + ((y - hc[1]) / hr[1]) ** 2 + ((z - hc[2]) / hr[2]) ** 2
    return (np.sqrt(q) - 1.0) * min(hr)


def _vessel_region(anat: _Anatomy, peripheral: bool, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where a tube may show: the lungs outside the heart (branches) or the thoracic cavity (the rest)."""
    if peripheral:
        return np.maximum(_lungs_sdf(anat, z, y, x), -_heart_sdf(anat, z, y, x))
    return _cavity_sdf(anat, y, x)


def _render(anat: _Anatomy, grid: _Grid, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free thin slices ``k0..k1-1``: (k1-k0, H, W) float32 HU and uint8 Tissue labels."""
    hu = anat.hu
    z = grid.z[k0:k1, None, None]
    y = grid.y[None, :, None]
    x = grid.x[None, None, :]
    cx, cy = anat.centre
    canvas = _Canvas(k1 - k0, len(grid.y), len(grid.x), HU_AIR)

    def tube_sdf(tubes: list[_Tube], peripheral: bool) -> np.ndarray:
        sdf = np.full(canvas.hu.shape, np.inf, np.float32)
        for tube in tubes:
            if tube.peripheral != peripheral:
                continue
            box = grid.box(*tube.bounds(EDGE_MM), k0, k1)
            if box is not None:
                zz, yy, xx = z[box[0]], y[:, box[1]], x[:, :, box[2]]
                sdf[box] = np.minimum(sdf[box], tube.sdf(zz, yy, xx))
        return sdf

    def vessels(tubes: list[_Tube], offset: float = 0.0) -> np.ndarray:
        """Union of the tubes (grown by ``offset`` mm), each clipped to where it may show."""
        return np.minimum(np.maximum(tube_sdf(tubes, False) - offset, cavity),
                          np.maximum(tube_sdf(tubes, True) - offset, branch_region))

    a, b = anat.body
    for inset, value, label in ((0.0, hu["soft_tissue"], Tissue.SOFT_TISSUE),
                                (anat.skin_mm, hu["fat"], Tissue.FAT),
                                (anat.skin_mm + anat.fat_mm, hu["soft_tissue"], Tissue.SOFT_TISSUE)):
        canvas.paint(_ellipse_sdf(x - cx, y - cy, a - inset, b - inset), value, label)
    cavity = _cavity_sdf(anat, y, x)
    canvas.paint(cavity, hu["fat"], Tissue.FAT)  # mediastinal fat; lungs and organs are painted over it

    # Lungs: textured, denser posteriorly (gravity).
    kvec, phase, amp = anat.texture
    zv = grid.z[k0:k1]
    yv, xv = (v.reshape(-1, SUBSAMPLES).mean(axis=1) for v in (grid.y, grid.x))  # pixel centres
    texture = np.zeros((k1 - k0, len(yv), len(xv)), np.float32)
    for kv, ph, am in zip(kvec.tolist(), phase.tolist(), amp.tolist()):
        texture += am * np.cos(kv[2] * zv[:, None, None] + kv[1] * yv[None, :, None] + kv[0] * xv[None, None, :] + ph)
    texture = np.repeat(np.repeat(texture, SUBSAMPLES, axis=1), SUBSAMPLES, axis=2)
    big_b = anat.cavity[1]
    lung_hu = hu["lung"] + LUNG_GRAVITY_HU * np.clip((y - cy) / big_b, -1.0, 1.0) / 2.0 + texture
    lungs = _lungs_sdf(anat, z, y, x)
    canvas.paint(lungs, lung_hu, Tissue.LUNG)

    heart = _heart_sdf(anat, z, y, x)
    branch_region = np.maximum(lungs, -heart)
    canvas.paint(heart, hu["heart"], Tissue.HEART)
    canvas.paint(heart + 0.3 * min(anat.heart_radii.tolist()), hu["blood"], Tissue.BLOOD)
    canvas.paint(tube_sdf(anat.aortas, False), hu["blood"], Tissue.BLOOD)
    canvas.paint(tube_sdf([anat.oesophagus], False), hu["soft_tissue"], Tissue.SOFT_TISSUE)
    canvas.paint(vessels(anat.airways, anat.airway_wall_mm), hu["soft_tissue"], Tissue.SOFT_TISSUE)
    canvas.paint(vessels(anat.airways), hu["airway"], Tissue.AIRWAY)
    canvas.paint(vessels(anat.veins), hu["vein"], Tissue.BLOOD)

    lumen = vessels(anat.arteries)
    canvas.paint(lumen, hu["artery"], Tissue.ARTERY)
    for embolus in anat.emboli:
        box = grid.box(*embolus.bounds(EDGE_MM), k0, k1)
        if box is not None:
            sdf = np.maximum(embolus.sdf(z[box[0]], y[:, box[1]], x[:, :, box[2]]), lumen[box])  # inside the lumen
            canvas.paint(sdf, embolus.hu, Tissue.EMBOLUS, box, replaces=hu["artery"])

    sp = anat.spine
    arch = _ellipse_sdf(x - sp["x"], y - sp["canal_y"], sp["arch_rx"], sp["arch_ry"])
    canvas.paint(arch, hu["cortical"], Tissue.BONE_CORTICAL)
    canvas.paint(_ellipse_sdf(x - sp["x"], y - sp["process_y"], sp["process_rx"], sp["process_ry"]),
                 hu["cortical"], Tissue.BONE_CORTICAL)
    canvas.paint(_ellipse_sdf(x - sp["x"], y - sp["canal_y"], sp["canal_rx"], sp["canal_ry"]), hu["csf"], Tissue.CSF)
    body = _ellipse_sdf(x - sp["x"], y - sp["y"], sp["rx"], sp["ry"])
    canvas.paint(body, hu["cortical"], Tissue.BONE_CORTICAL)
    canvas.paint(body + sp["shell"], hu["cancellous"], Tissue.BONE_CANCELLOUS)
    dz_disc = np.abs(_wrap(z - sp["disc_phase"], sp["disc_period"]))
    canvas.paint(np.maximum(body + sp["shell"] / 2.0, dz_disc - sp["disc_half"]), hu["disc"], Tissue.DISC)

    # Ribs: one tilted ring per intercostal period, lower anteriorly, absent at the sternum and spine.
    rb = anat.ribs
    theta = np.arctan2((y - cy) / rb["ay"], (x - cx) / rb["ax"])  # +pi/2 = posterior
    ring = np.abs(_ellipse_sdf(x - cx, y - cy, rb["ax"], rb["ay"]))
    dz_rib = _wrap(z - rb["phase"] - rb["drop"] * (1.0 - np.cos(theta - np.pi / 2.0)) / 2.0, rb["period"])
    from_anterior = np.abs(_wrap(theta + np.pi / 2.0, 2.0 * np.pi))
    from_posterior = np.abs(_wrap(theta - np.pi / 2.0, 2.0 * np.pi))
    sector = np.where((from_anterior > 0.45) & (from_posterior > 0.3), np.float32(-np.inf), np.float32(np.inf))
    for shrink, value, label in ((0.0, hu["cortical"], Tissue.BONE_CORTICAL),
                                 (rb["shell"], hu["cancellous"], Tissue.BONE_CANCELLOUS)):
        half_r, half_z = rb["half_r"] - shrink, rb["half_z"] - shrink
        rib = _ellipse_sdf(ring, dz_rib, half_r, half_z)
        canvas.paint(np.maximum(rib, sector), value, label)
    sx, sy, srx, sry = anat.sternum
    canvas.paint(_ellipse_sdf(x - sx, y - sy, srx, sry), hu["cortical"], Tissue.BONE_CORTICAL)
    return _voxel_mean(canvas.hu).astype(np.float32), canvas.labels


def _wrap(v: np.ndarray, period: float) -> np.ndarray:
    """``v`` folded into [-period/2, period/2)."""
    return (v + period / 2.0) % period - period / 2.0
