"""``ctdiff predict``: the workspace's trained model applied to a new patient's thick series.

Each input is a case zip in the APE-data layout (its folder ``1/``; ``2/`` is not read), a folder of DICOM
files (the thick axial series picked as preprocess picks it) or a NIfTI volume (slice thickness from
``--thickness-mm``, default its z spacing). For each the thin series is sampled on the grid the model was
trained for: series 1's in-plane grid, the training thin spacing along z, covering series 1's slabs. It
goes through exactly the path evaluate's ``model`` rung takes (:func:`ctdiff.inference.sampling.predict_thin`
with the sampling defaults the model carries, the slab projection with the model's slice profile), so a test
case predicted here equals evaluate's ``data/predictions`` for the same seed. The profile is in units of the
slice thickness: a series thicker or thinner than the training pairs gets it scaled to its own thickness
(predict says so). Written per input, each file complete or absent (built in a temporary folder, then renamed
into place):

- ``<name>.nii.gz``: the thin series, int16 HU;
- ``<name>/``: the same volume as a DICOM CT series (``IM00000.dcm`` ...): new SeriesInstanceUID and
  SOPInstanceUIDs; the input's StudyInstanceUID, FrameOfReferenceUID and patient module kept (the same
  patient's derived series; ``--anonymize`` drops the identifiers and derives new study and frame-of-reference
  UIDs from the old ones, one-way); ImageType DERIVED\\SECONDARY\\AXIAL; the thin grid's positions and
  SliceThickness; a SeriesDescription naming the model (VAE arm, checkpoint step);
- ``<name>_std.nii.gz``: the per-voxel uncertainty, float32 HU. With the calibrate stage's scales (the model
  folder's ``calibration/``) it is calibrated: ``prediction +- 1.96 x`` it covered 95 % of the truth on val
  (split conformal, per HU band and slab phase: :mod:`ctdiff.metrics.uncertainty`); without them, the raw
  sample standard deviation of the draws. The NIfTI description says which. With one draw there is no spread
  and none is written (predict says so).

Identifiers never reach a message or a log: errors name the input by the path the user gave.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from tqdm import tqdm

from ctdiff.data.dicom import CaseRejected, read_thick_series
from ctdiff.data.dicom_write import SeriesSpec, write_series
from ctdiff.data.grid import Grid, image_from_array, resample, to_int16_hu
from ctdiff.data.safezip import UnsafeZipError
from ctdiff.data.slab import SlabOperator, consistent_baseline
from ctdiff.inference.sampling import TrainedModel, predict_thin
from ctdiff.metrics.uncertainty import Calibration
from ctdiff.params import Params

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ALLOW_IRREGULAR_FLAG = "--allow-irregular-slices"  # ctdiff predict's flag for read_scan(allow_irregular=True)
GEOMETRY_TOLERANCE = 0.10  # a thick series this much off what the model learnt from gets a warning
# Copied from the input onto the derived series: the patient, general study and frame of reference modules.
PATIENT_STUDY = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                 "PatientSex", "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
                 "EthnicGroup", "PatientComments", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                 "ReferringPhysicianName", "StudyID", "StudyDescription", "FrameOfReferenceUID",
                 "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined", "KVP")
# What --anonymize empties (Type 2 elements stay present, with no value) or leaves out (Type 3).
IDENTIFIERS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
               "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
               "PatientComments", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
               "StudyDescription")
# Type 2 elements the writer would otherwise fill with made-up values: empty when the input has none.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
         "ReferringPhysicianName", "StudyID", "KVP")


class PredictError(RuntimeError):
    """An input cannot be predicted; ``str(exc)`` says why in one line, without identifiers."""


@dataclass(eq=False)
class Scan:
    """A thick series to predict from: (S, H, W) float32 HU on ``grid``, its slice thickness, and the DICOM
    header of its first image (None for a NIfTI input)."""

    name: str
    hu: np.ndarray = field(repr=False)
    grid: Grid
    thickness_mm: float
    header: Dataset | None = field(repr=False)
    warnings: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Prediction:
    """The thin series on ``grid``: ``hu`` (D, H, W) int16 HU as written, ``spread`` float32 HU or None."""

    grid: Grid
    hu: np.ndarray = field(repr=False)
    spread: np.ndarray | None = field(repr=False)
    samples: int
    phase: np.ndarray | None = field(default=None, repr=False)  # (D,) slab phase per slice (SlabOperator.phase)


# -------------------------------------------------------------------------------------------- inputs
def input_name(path: Path) -> str:
    """``case_001.zip`` -> ``case_001``; ``scan.nii.gz`` -> ``scan``; a folder -> its name."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_scan(path: Path, params: Params, thickness_mm: float | None = None, allow_irregular: bool = False) -> Scan:
    """The thick series of one input (see the module docstring); raises :class:`PredictError`.

    ``allow_irregular`` (``--allow-irregular-slices``; predict's own, not ``preprocess.allow_gaps``): uneven
    slice steps (gaps, mixed spacings) are linearly interpolated onto one spacing, the median step, instead of
    refused; mixed slice thicknesses are taken as their median (the reader warns about both).
    """
    if not path.exists():
        raise PredictError("no such file or folder")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, thickness_mm)
    p = params.preprocess
    try:
        thick = read_thick_series(path, min_slices=p.min_slices, allow_gaps=allow_irregular,
                                  max_members=p.max_zip_members, max_unzipped_bytes=int(p.max_unzipped_gb * 1024**3),
                                  gap_fix=f"rerun with {ALLOW_IRREGULAR_FLAG} to interpolate onto one slice spacing")
    except (CaseRejected, UnsafeZipError) as exc:
        raise PredictError(str(exc)) from None
    series = thick.series
    thickness = thickness_mm or series.slice_thickness_mm or float(series.spacing_mm[2])
    return Scan(input_name(path), series.hu, series.grid, float(thickness), thick.header, list(thick.warnings))


def _read_nifti(path: Path, thickness_mm: float | None) -> Scan:
    """A 3D NIfTI in HU with a patient-space orientation (qform or sform) and positive spacings, axial."""
    header = _raw_nifti_header(path)
    pixdim = np.asarray(header["pixdim"][1:4], float)
    if int(header["dim"][0]) != 3:
        raise PredictError(f"a NIfTI of {int(header['dim'][0])} dimensions; expected one 3D volume")
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise PredictError(f"the NIfTI has no voxel spacing (pixdim {pixdim.tolist()}); write it with its spacing")
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise PredictError("the NIfTI has no orientation in patient space (qform_code and sform_code are 0); "
                           "write it with its affine")
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    grid = Grid.of_image(image)
    normal = grid.matrix[:, 2]
    if int(np.argmax(np.abs(normal))) != 2:
        raise PredictError("the NIfTI's third axis is not the patient's head-foot axis: not an axial series")
    thickness = float(thickness_mm or grid.spacing_mm[2])
    return Scan(input_name(path), sitk.GetArrayFromImage(image), grid, thickness, None)


def _raw_nifti_header(path: Path) -> nib.Nifti1Header:
    """The NIfTI-1 or -2 header as stored: nibabel's and ITK's loaders silently turn a zero spacing into 1 mm,
    which would put a volume without geometry on a made-up grid."""
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            raw = f.read(540)
        size = int.from_bytes(raw[:4], "little")
        size = size if size in (348, 540) else int.from_bytes(raw[:4], "big")
        klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}[size]
        return klass.from_fileobj(io.BytesIO(raw), check=False)
    except Exception:  # nibabel and gzip raise several types on damaged or foreign files
        raise PredictError("not a readable NIfTI file") from None


def thin_grid(thick: Grid, thin_mm: float) -> Grid:
    """Series 1's in-plane grid at ``thin_mm`` along its slice normal, covering its slabs as preprocess covers
    them: from half a thick spacing before its first slice centre to half a spacing after its last."""
    spacing = float(thick.spacing_mm[2])
    extent = thick.shape[0] * spacing
    n = max(1, int(math.floor(extent / thin_mm + 1e-6)))
    start = -spacing / 2 + thin_mm / 2 + (extent - n * thin_mm) / 2  # centred when thin_mm does not divide it
    origin = np.asarray(thick.origin_mm) + thick.matrix[:, 2] * start
    return Grid((n, thick.shape[1], thick.shape[2]), (thick.spacing_mm[0], thick.spacing_mm[1], thin_mm),
                tuple(origin.tolist()), thick.direction)


def geometry_warnings(scan: Scan, model: TrainedModel) -> list[str]:
    """Thickness, slice spacing and pixel size of the thick series against what the model was trained on, and
    what becomes of the slice profile (scaled to this thickness)."""
    trained = model.geometry
    pairs = (("slice thickness", scan.thickness_mm, trained.get("series1_thickness_mm")),
             ("slice spacing", float(scan.grid.spacing_mm[2]), trained.get("series1_spacing_mm")),
             ("pixel spacing", float(scan.grid.spacing_mm[0]), trained.get("series1_pixel_mm")))
    out = [f"{what} {value:g} mm differs from the {expected:g} mm the model was trained on by "
           f"{abs(value / expected - 1):.0%}: the prediction may be poor"
           for what, value, expected in pairs if expected and abs(value / expected - 1) > GEOMETRY_TOLERANCE]
    profile = model.profile
    fitted_on = profile.fitted_thickness_mm or trained.get("series1_thickness_mm")
    if fitted_on and abs(scan.thickness_mm / fitted_on - 1) > GEOMETRY_TOLERANCE:
        out.append(f"the {profile.name} slice profile (from {fitted_on:g} mm slices) is scaled to this series' "
                   f"{scan.thickness_mm:g} mm: same shape, {scan.thickness_mm / fitted_on:.2f}x as wide")
    return out


# ------------------------------------------------------------------------------------------ predict
def predict_scan(model: TrainedModel, scan: Scan, seed: int, progress: bool = False) -> Prediction:
    """The thin series for ``scan``: what evaluate's ``model`` rung is for a test case (module docstring)."""
    thin_mm = float((model.geometry.get("thin_spacing_mm") or [0, 0, 0])[2])
    if thin_mm <= 0:
        raise PredictError("the checkpoint does not record the thin spacing it was trained on: rerun the train stage")
    grid = thin_grid(scan.grid, thin_mm)
    # As preprocess and the slab stage have them: series 1 and its interpolation onto the thin grid, int16 HU,
    # and that projected onto series 1's slabs with the model's profile.
    series1 = to_int16_hu(scan.hu)
    source = to_int16_hu(resample(scan.hu, scan.grid, grid, model.card.get("interpolator", "linear")))
    operator = SlabOperator.for_case(grid, scan.grid, scan.thickness_mm, model.profile)
    if operator.n_slabs == 0:
        raise PredictError("no slab of series 1 lies inside the thin grid")
    measured = operator.measurements(series1, scan.grid, grid)
    project = partial(operator.project, measured=measured)
    baseline = consistent_baseline(source, operator, measured)
    thin = predict_thin(model, source, baseline, seed, grid.direction, project, progress=progress)
    hu = to_int16_hu(project(thin.raw) if model.sampling.consistency else thin.raw)
    return Prediction(grid, hu, thin.spread, thin.samples, operator.phase(grid.spacing_mm[2]))


# --------------------------------------------------------------------------------------------- write
def derived_series_spec(scan: Scan, prediction: Prediction, model: TrainedModel, anonymize: bool) -> SeriesSpec:
    """The header of the derived DICOM series (module docstring)."""
    header = scan.header
    source_uid = str(getattr(header, "SeriesInstanceUID", "")) if header is not None else _file_digest(scan)
    weights = model.vae.weights.get("origin", "?")
    description = (f"ctdiff {prediction.grid.spacing_mm[2]:g} mm from {scan.thickness_mm:g} mm; "
                   f"{model.vae.name} VAE {weights}; step {model.checkpoint['step']}")[:64]
    inherited = Dataset()
    if header is not None:
        for keyword in PATIENT_STUDY:
            if keyword in header:
                inherited[keyword] = header[keyword]
    study_uid = str(inherited.get("StudyInstanceUID", "")) or generate_uid(entropy_srcs=["study", source_uid])
    frame_uid = str(inherited.get("FrameOfReferenceUID", "")) or generate_uid(entropy_srcs=["frame", source_uid])
    if anonymize:
        for keyword in IDENTIFIERS:
            if keyword in inherited:
                del inherited[keyword]
        study_uid = generate_uid(entropy_srcs=["anonymized study", study_uid])  # one-way: links nothing back
        frame_uid = generate_uid(entropy_srcs=["anonymized frame", frame_uid])
    for keyword in TYPE2:
        if keyword not in inherited:
            setattr(inherited, keyword, "")
    inherited.StudyInstanceUID, inherited.FrameOfReferenceUID = study_uid, frame_uid
    series_uid = generate_uid(entropy_srcs=["ctdiff predict", source_uid, model.checkpoint["file"],
                                            str(model.checkpoint["step"]), str(prediction.samples), str(anonymize)])
    grid = prediction.grid
    return SeriesSpec(
        spacing_mm=grid.spacing_mm, origin_mm=grid.origin_mm, direction=grid.direction,
        slice_thickness_mm=grid.spacing_mm[2], series_uid=series_uid, study_uid=study_uid,
        frame_of_reference_uid=frame_uid, series_number=int(getattr(header, "SeriesNumber", 0) or 0) + 1000,
        series_description=description, rescale_slope=1.0, rescale_intercept=0.0, unsigned=False,
        image_type=("DERIVED", "SECONDARY", "AXIAL"),
        specific_character_set=str(inherited.get("SpecificCharacterSet", "ISO_IR 100")),
        derivation_description=(f"Thick-to-thin super-resolution by conditional latent diffusion (ctdiff): mean of "
                                f"{prediction.samples} sample(s), consistent with the {scan.thickness_mm:g} mm "
                                f"source series"),
        inherited=inherited)


Z95 = 1.959964  # the standard normal's 97.5 % quantile: a calibrated 95 % half-width read as a standard deviation


def uncertainty_map(prediction: Prediction, calibration: Calibration | None) -> tuple[np.ndarray, str]:
    """(the ``_std`` volume, float32 HU, and its NIfTI description, at most 80 characters)."""
    if calibration is None:
        return prediction.spread.astype(np.float32), "ctdiff: std of the draws, HU (not calibrated)"
    phase = None if prediction.phase is None else prediction.phase[:, None, None]
    half = calibration.half_width(prediction.hu, prediction.spread, 0.95, phase)
    return (half / Z95).astype(np.float32), "ctdiff: calibrated std, HU: +-1.96x covered 95% of val (conformal)"


def write_prediction(out_dir: Path, scan: Scan, prediction: Prediction, model: TrainedModel, anonymize: bool,
                     calibration: Calibration | None = None) -> list[Path]:
    """Write the outputs of one input atomically (each complete or absent); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{scan.name}.", suffix=".tmp", dir=out_dir))
    try:
        written = {f"{scan.name}.nii.gz": staging / "thin.nii.gz", scan.name: staging / "dicom"}
        sitk.WriteImage(image_from_array(prediction.hu, prediction.grid), str(written[f"{scan.name}.nii.gz"]),
                        useCompression=True)
        write_series(prediction.hu, derived_series_spec(scan, prediction, model, anonymize), written[scan.name])
        if prediction.spread is not None:
            written[f"{scan.name}_std.nii.gz"] = staging / "std.nii.gz"
            volume, description = uncertainty_map(prediction, calibration)
            image = image_from_array(volume, prediction.grid)
            image.SetMetaData("ITK_FileNotes", description)  # ITK writes it as the NIfTI header's descrip
            sitk.WriteImage(image, str(written[f"{scan.name}_std.nii.gz"]), useCompression=True)
        final = []
        for name, path in written.items():
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(path, target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _file_digest(scan: Scan) -> str:
    """A stable stand-in for a series UID when the input has none (NIfTI): a digest of its voxels and grid."""
    h = hashlib.sha256(np.ascontiguousarray(scan.hu[:: max(1, scan.hu.shape[0] // 8)]).tobytes())
    h.update(repr(scan.grid).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- run
@dataclass
class Outcome:
    """What became of one input: the files written, warnings, or the one-line error."""

    source: Path
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""


def predict_inputs(inputs: Sequence[Path], out_dir: Path, model: TrainedModel, params: Params, seed: int,
                   thickness_mm: float | None = None, anonymize: bool = False, progress: bool = True,
                   say=print, allow_irregular: bool = False, calibration: Calibration | None = None) -> list[Outcome]:
    """Predict every input in turn; a bad one is reported (``error``) and does not stop the others.
    ``calibration``: the model's (the calibrate stage's), for the calibrated uncertainty map."""
    outcomes: list[Outcome] = []
    names: dict[str, Path] = {}
    for path in tqdm(list(inputs), desc="predict", unit="scan", disable=not progress):
        outcome = Outcome(Path(path))
        outcomes.append(outcome)
        try:
            name = input_name(outcome.source)
            if name in names:
                raise PredictError(f"its output name {name!r} is also that of {names[name]}: rename one")
            scan = read_scan(outcome.source, params, thickness_mm, allow_irregular)
            outcome.warnings = scan.warnings + geometry_warnings(scan, model)
            for warning in outcome.warnings:
                say(f"predict: {outcome.source}: warning: {warning}")
            prediction = predict_scan(model, scan, seed, progress=progress)
            outcome.written = write_prediction(out_dir, scan, prediction, model, anonymize, calibration)
            names[name] = outcome.source
            if prediction.spread is None:
                say(f"predict: {outcome.source}: one sample (--samples 1): no spread to write, so no "
                    f"{scan.name}_std.nii.gz")
        except PredictError as exc:
            outcome.error = str(exc)
        except MemoryError:
            outcome.error = "out of memory"
    return outcomes
