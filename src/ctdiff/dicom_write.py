"""Write a HU volume as a real DICOM CT series (CT Image Storage), with pydicom.

Used by the phantom generator and by the tests, which need series with the quirks real scanners and
archives produce (unsigned storage, RLE compression, foreign character sets, shuffled files, reversed
InstanceNumber). Geometry follows SimpleITK's conventions (DICOM LPS): voxel [k, j, i] of ``hu`` sits at
``origin + direction @ (i*sx, j*sy, k*sz)``; slice k is one file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


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
    specific_character_set: str = "ISO_IR 100"
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    unsigned: bool = True  # PixelRepresentation 0 (uint16) vs 1 (int16)
    rle: bool = False  # RLE Lossless transfer syntax instead of Explicit VR Little Endian
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    reverse_instance_numbers: bool = False


def encode_series(hu: np.ndarray, spec: SeriesSpec) -> list[tuple[str, bytes]]:
    """Encode ``hu`` (D, H, W), Hounsfield units, as one DICOM file per slice.

    Returns ``[(file_name, dicom_bytes), ...]`` in slice order. Values are rounded to the storage
    grid ``(hu - intercept) / slope`` and clipped to the stored integer type's range.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be (D, H, W), got shape {hu.shape}")
    n_slices, rows, cols = hu.shape
    sx, sy, sz = (float(v) for v in spec.spacing_mm)
    direction = np.asarray(spec.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(spec.origin_mm, dtype=float)
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    dtype = np.uint16 if spec.unsigned else np.int16
    info = np.iinfo(dtype)
    stored = np.clip(np.rint((hu - spec.rescale_intercept) / spec.rescale_slope), info.min, info.max).astype(dtype)
    sop_class = CTImageStorage
    files = []
    for k in range(n_slices):
        # Derived, not random: the same series writes byte-identical files, so DVC hashes of
        # regenerated phantom zips do not change and downstream stages are not rerun for nothing.
        sop_uid = generate_uid(entropy_srcs=[spec.series_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = spec.specific_character_set
        ds.ImageType = list(spec.image_type)
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
        ds.PatientSex = "O"
        ds.SliceThickness = _ds(spec.slice_thickness_mm if spec.slice_thickness_mm is not None else sz)
        ds.KVP = "120"
        ds.StudyInstanceUID = spec.study_uid
        ds.SeriesInstanceUID = spec.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = (n_slices - k) if spec.reverse_instance_numbers else (k + 1)
        position = origin + normal * (k * sz)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = spec.frame_of_reference_uid
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # DICOM order: row spacing, column spacing
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0 if spec.unsigned else 1
        ds.RescaleIntercept = _ds(spec.rescale_intercept)
        ds.RescaleSlope = _ds(spec.rescale_slope)
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        if spec.rle:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"IM{k:05d}.dcm", buf.getvalue()))
    return files


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


def _ds(value: float) -> str:
    """DICOM Decimal String (at most 16 characters)."""
    text = f"{value:.6g}"
    if text == "-0":
        text = "0"
    return text
