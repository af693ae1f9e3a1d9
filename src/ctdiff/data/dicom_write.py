"""Write a HU volume as a real DICOM CT series (CT Image Storage or Enhanced CT), with pydicom.

Used by the phantom generator and by the tests, which need series with the quirks real scanners and
archives produce (unsigned storage, RLE compression, foreign character sets, shuffled files, reversed
InstanceNumber, per-slice rescale, one multi-frame Enhanced CT object instead of one file per slice).
Geometry follows SimpleITK's conventions (DICOM LPS): voxel [k, j, i] of ``hu`` sits at
``origin + direction @ (i*sx, j*sy, k*sz)``; slice k is one file, or frame k of the enhanced object
(in ``frame_order`` when given).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Functional groups of an enhanced object that the writer fills (FrameContentSequence is always per frame).
FRAME_GROUPS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                "PixelValueTransformationSequence", "CTImageFrameTypeSequence", "FrameVOILUTSequence")


@dataclass
class SeriesSpec:
    """Header content of one series. UIDs default to fresh ones; patient fields are PHI on purpose
    (tests check they never reach the processed data)."""

    spacing_mm: Sequence[float]  # (sx, sy, sz): column, row, slice spacing
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0)
    direction: Sequence[float] = IDENTITY_DIRECTION  # 9 floats, row-major, columns = axis directions
    slice_thickness_mm: float | None = None  # defaults to sz
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_number: int = 1
    series_description: str = ""
    patient_name: str = "ANONYMOUS"
    patient_id: str = "0"
    patient_birth_date: str = ""
    accession_number: str = ""
    institution_name: str = ""
    referring_physician: str = ""
    study_date: str = "20200101"
    study_time: str = "120000"
    patient_sex: str = "O"
    patient_position: str = "HFS"  # head first supine: what the LPS geometry of a chest CT usually is
    specific_character_set: str = "ISO_IR 100"
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    slice_rescale: Sequence[tuple[float, float]] | None = None  # (slope, intercept) per slice; overrides the two above
    unsigned: bool = True  # PixelRepresentation 0 (uint16) vs 1 (int16)
    rle: bool = False  # RLE Lossless transfer syntax instead of Explicit VR Little Endian
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    reverse_instance_numbers: bool = False
    enhanced: bool = False  # one multi-frame Enhanced CT Image Storage object instead of one file per slice
    # Enhanced only: FRAME_GROUPS written per frame; the others are shared (with slice 0's values, so a
    # shared PlanePositionSequence is an object without per-frame positions).
    per_frame_groups: Sequence[str] = ("PlanePositionSequence",)
    frame_order: Sequence[int] | None = None  # enhanced only: frame n holds slice frame_order[n]
    # A derived series: elements copied onto every file last (the source's patient, study and frame of
    # reference modules), and what was done to make it (DerivationDescription).
    inherited: Dataset | None = None
    derivation_description: str = ""


def encode_series(hu: np.ndarray, spec: SeriesSpec) -> list[tuple[str, bytes]]:
    """Encode ``hu`` (D, H, W), Hounsfield units, as one DICOM file per slice, or as one Enhanced CT
    file when ``spec.enhanced``.

    Returns ``[(file_name, dicom_bytes), ...]`` in slice order. Values are rounded to the storage
    grid ``(hu - intercept) / slope`` of each slice and clipped to the stored integer type's range.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be (D, H, W), got shape {hu.shape}")
    rescale = _slice_rescale(spec, hu.shape[0])
    dtype = np.uint16 if spec.unsigned else np.int16
    info = np.iinfo(dtype)
    stored = np.stack([np.clip(np.rint((hu[k] - intercept) / slope), info.min, info.max).astype(dtype)
                       for k, (slope, intercept) in enumerate(rescale)])
    if spec.enhanced:
        return [("ENH00000.dcm", _enhanced_file(stored, rescale, spec))]
    return [(f"IM{k:05d}.dcm", _slice_file(stored, rescale, spec, k)) for k in range(hu.shape[0])]


def write_series(hu: np.ndarray, spec: SeriesSpec, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write :func:`encode_series` output as files under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in encode_series(hu, spec):
        p = out / name
        p.write_bytes(data)
        paths.append(p)
    return paths


def _slice_rescale(spec: SeriesSpec, n_slices: int) -> list[tuple[float, float]]:
    if spec.slice_rescale is None:
        return [(spec.rescale_slope, spec.rescale_intercept)] * n_slices
    if len(spec.slice_rescale) != n_slices:
        raise ValueError(f"slice_rescale has {len(spec.slice_rescale)} entries for {n_slices} slices")
    return [(float(m), float(b)) for m, b in spec.slice_rescale]


def _slice_file(stored: np.ndarray, rescale: list[tuple[float, float]], spec: SeriesSpec, k: int) -> bytes:
    """Slice ``k`` of ``stored`` (D, H, W) as one CT Image Storage file."""
    n_slices = stored.shape[0]
    # Derived, not random: the same series writes byte-identical files, so DVC hashes of
    # regenerated phantom zips do not change and downstream stages are not rerun for nothing.
    ds = _base_dataset(spec, CTImageStorage, generate_uid(entropy_srcs=[spec.series_uid, str(k)]), stored.shape)
    ds.ImageType = list(spec.image_type)
    ds.InstanceNumber = (n_slices - k) if spec.reverse_instance_numbers else (k + 1)
    ds.AcquisitionNumber = 1
    ds.update(_plane_position(spec, k))
    ds.update(_plane_orientation(spec))
    ds.update(_pixel_measures(spec))
    ds.SliceLocation = _ds(float(_position(spec, k) @ _axes(spec)[2]))
    ds.update(_pixel_value_transformation(rescale[k]))
    ds.update(_voi_lut())
    ds.PixelData = stored[k].tobytes()
    return _encoded(ds, spec)


def _enhanced_file(stored: np.ndarray, rescale: list[tuple[float, float]], spec: SeriesSpec) -> bytes:
    """All of ``stored`` (D, H, W) as one Enhanced CT Image Storage object: positions (and the
    ``per_frame_groups``) in the Per-frame Functional Groups Sequence, the rest shared, no geometry
    or rescale at the top level (as the standard has it)."""
    n_slices = stored.shape[0]
    order = list(range(n_slices)) if spec.frame_order is None else [int(k) for k in spec.frame_order]
    if sorted(order) != list(range(n_slices)):
        raise ValueError("frame_order must be a permutation of the slice indices")
    unknown = set(spec.per_frame_groups) - set(FRAME_GROUPS)
    if unknown:
        raise ValueError(f"unknown functional groups {sorted(unknown)}; known: {FRAME_GROUPS}")
    if len(set(rescale)) > 1 and "PixelValueTransformationSequence" not in spec.per_frame_groups:
        raise ValueError("per-slice rescale needs PixelValueTransformationSequence in per_frame_groups")
    frame_type = [*spec.image_type, "NONE"][:4]  # enhanced ImageType/FrameType have four values
    groups: dict[str, Callable[[int], Dataset]] = {
        "PlanePositionSequence": lambda k: _plane_position(spec, k),
        "PlaneOrientationSequence": lambda k: _plane_orientation(spec),
        "PixelMeasuresSequence": lambda k: _pixel_measures(spec),
        "PixelValueTransformationSequence": lambda k: _pixel_value_transformation(rescale[k]),
        "CTImageFrameTypeSequence": lambda k: _item(FrameType=frame_type),
        "FrameVOILUTSequence": lambda k: _voi_lut(),
    }
    ds = _base_dataset(spec, EnhancedCTImageStorage, generate_uid(entropy_srcs=[spec.series_uid, "enhanced"]),
                       stored.shape)
    ds.ImageType = frame_type
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_slices
    ds.SharedFunctionalGroupsSequence = DicomSequence([_item(**{
        name: DicomSequence([make(0)]) for name, make in groups.items() if name not in spec.per_frame_groups})])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_item(
        FrameContentSequence=DicomSequence([_item(StackID="1", InStackPositionNumber=k + 1)]),
        **{name: DicomSequence([groups[name](k)]) for name in spec.per_frame_groups}) for k in order])
    ds.PixelData = stored[order].tobytes()
    return _encoded(ds, spec)


def _base_dataset(spec: SeriesSpec, sop_class: str, sop_uid: str, shape: tuple[int, ...]) -> Dataset:
    """Patient, study, series, frame of reference and image pixel modules shared by both kinds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = spec.specific_character_set
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = spec.study_date
    ds.Modality = "CT"
    ds.Manufacturer = "ctdiff"
    ds.InstitutionName = spec.institution_name
    ds.ReferringPhysicianName = spec.referring_physician
    ds.AccessionNumber = spec.accession_number
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    ds.StudyTime = spec.study_time
    ds.KVP = "120"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.Laterality = ""  # Type 2C: empty (unknown) while the body part is unknown; see the inherited elements
    ds.PatientPosition = spec.patient_position
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = shape[1]
    ds.Columns = shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if spec.unsigned else 1
    if spec.derivation_description:
        ds.DerivationDescription = spec.derivation_description
    if spec.inherited is not None:
        for element in spec.inherited:
            ds[element.tag] = element
        # Laterality (Type 2C) is required of paired body parts only. Where the source names its body part (a
        # real head's BRAIN), an empty one is an error to dciodvfy: it goes unless the source's own is inherited.
        if str(spec.inherited.get("BodyPartExamined", "") or "").strip() and "Laterality" not in spec.inherited:
            del ds.Laterality
    return ds


def _encoded(ds: Dataset, spec: SeriesSpec) -> bytes:
    if spec.rle:
        # Keep the derived SOPInstanceUID: a fresh random one would make the output non-reproducible.
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _axes(spec: SeriesSpec) -> np.ndarray:
    """(3, 3) direction, columns = row direction, column direction, slice normal."""
    return np.asarray(spec.direction, dtype=float).reshape(3, 3).T


def _position(spec: SeriesSpec, k: int) -> np.ndarray:
    return np.asarray(spec.origin_mm, dtype=float) + _axes(spec)[2] * (k * float(spec.spacing_mm[2]))


def _plane_position(spec: SeriesSpec, k: int) -> Dataset:
    return _item(ImagePositionPatient=[_ds(v) for v in _position(spec, k)])


def _plane_orientation(spec: SeriesSpec) -> Dataset:
    row_dir, col_dir, _ = _axes(spec)
    return _item(ImageOrientationPatient=[_ds(v) for v in (*row_dir, *col_dir)])


def _pixel_measures(spec: SeriesSpec) -> Dataset:
    sx, sy, sz = (float(v) for v in spec.spacing_mm)
    thickness = spec.slice_thickness_mm if spec.slice_thickness_mm is not None else sz
    return _item(PixelSpacing=[_ds(sy), _ds(sx)],  # DICOM order: row spacing, column spacing
                 SliceThickness=_ds(thickness))


def _pixel_value_transformation(rescale: tuple[float, float]) -> Dataset:
    slope, intercept = rescale
    return _item(RescaleIntercept=_ds(intercept), RescaleSlope=_ds(slope), RescaleType="HU")


def _voi_lut() -> Dataset:
    return _item(WindowCenter="40", WindowWidth="400")


def _item(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _ds(value: float) -> str:
    """DICOM Decimal String (at most 16 characters)."""
    text = f"{value:.6g}"
    if text == "-0":
        text = "0"
    return text
