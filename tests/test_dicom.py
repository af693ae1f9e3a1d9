"""The case reader on real DICOM series written by ``dicom_write`` into real zips.

Truth is the HU volume and geometry each test writes; lossless storage must come back exactly.
"""

from __future__ import annotations

import dataclasses
import io
import random
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from paramkit import repo_params
from pydicom.dataset import FileMetaDataset
from pydicom.uid import generate_uid

from ctdiff.data.dicom import CasePair, CaseRejected, read_case
from ctdiff.data.dicom_write import SeriesSpec, encode_series, write_series
from ctdiff.data.grid import AIR_HU
from ctdiff.data.safezip import SafeZip

Files = list[tuple[str, bytes]]
THIN_SHAPE = (20, 12, 16)  # series 2: D, H, W at 1 mm
THICK_SHAPE = (5, 12, 16)  # series 1: at 5 mm, covering the same span
PHI = {
    "patient_name": "Doe^Jane",
    "patient_id": "PID-778899",
    "patient_birth_date": "19700101",
    "accession_number": "ACC-5566",
    "institution_name": "St Phi Hospital",
    "referring_physician": "Dr^Secret",
}
CHINESE_NAME = "张三^李四"
# A rotation of a few degrees about every axis: oblique, but still an axial acquisition.
OBLIQUE = tuple(sitk.VersorRigid3DTransform((0.05, -0.04, 0.2, 0.98)).GetMatrix())


# ------------------------------------------------------------------------------------------ helpers
def read(zip_path: Path, **overrides) -> CasePair:
    """read_case with the params.yaml defaults (preprocess), overridable per test."""
    p = repo_params().preprocess
    kwargs = {"min_slices": p.min_slices, "allow_gaps": p.allow_gaps, "max_members": p.max_zip_members,
              "max_unzipped_bytes": int(p.max_unzipped_gb * 1024**3)}
    return read_case(zip_path, **{**kwargs, **overrides})


def rejection(zip_path: Path, **overrides) -> str:
    with pytest.raises(CaseRejected) as info:
        read(zip_path, **overrides)
    return info.value.reason


def truth_hu(shape: tuple[int, int, int], seed: int, low: float = -1024.0, step: float = 1.0) -> np.ndarray:
    """Random HU on the storage grid (multiples of ``step``) so lossless storage is exact."""
    rng = np.random.default_rng(seed)
    return (low + step * rng.integers(0, int(3000 / step), shape)).astype(np.float32)


def specs(**overrides) -> tuple[SeriesSpec, SeriesSpec]:
    """(thick series 1, thin series 2) of one acquisition: one frame of reference, PHI in headers."""
    for_uid = overrides.pop("frame_of_reference_uid", generate_uid())
    common = {"origin_mm": (-8.0, -5.0, 100.0), "frame_of_reference_uid": for_uid, **PHI, **overrides}
    thick = SeriesSpec(spacing_mm=(0.8, 0.7, 5.0), series_number=1, **common)
    thin = SeriesSpec(spacing_mm=(0.8, 0.7, 1.0), series_number=2, **common)
    return thick, thin


def write_zip(path: Path, folders: dict[str, Files], prefix: str = "case_001/", extra: Files = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, files in folders.items():
            for name, data in files:
                zf.writestr(f"{prefix}{folder}/{name}", data)
        for name, data in extra:
            zf.writestr(name, data)
    return path


def shuffled(files: Files, seed: int = 0, names: str = "keep") -> Files:
    """Files in random order; ``names="random"`` gives random extension-less names."""
    rng = random.Random(seed)
    out = list(files)
    rng.shuffle(out)
    if names == "random":
        out = [(f"{rng.getrandbits(48):012x}", data) for _, data in out]
    return out


def patched(files: Files, edit: Callable[[pydicom.Dataset, int], None]) -> Files:
    """Re-encode each file after ``edit(dataset, slice_index)``."""
    out = []
    for k, (name, data) in enumerate(files):
        ds = pydicom.dcmread(io.BytesIO(data))
        edit(ds, k)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue()))
    return out


def standard_case(tmp_path: Path) -> Path:
    """A valid case with default specs."""
    thick_spec, thin_spec = specs()
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 0), thick_spec),
               "2": encode_series(truth_hu(THIN_SHAPE, 1), thin_spec)}
    return write_zip(tmp_path / "case.zip", folders)


def case_with_thin(tmp_path: Path, thin_files: Files, thin_spec: SeriesSpec, name: str = "case.zip") -> Path:
    """A case whose series 2 is ``thin_files`` (written with ``thin_spec``), series 1 a matching thick one."""
    thick_spec, _ = specs(frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    return write_zip(tmp_path / name, {"1": encode_series(truth_hu(THICK_SHAPE, 99), thick_spec), "2": thin_files})


def assert_geometry(series, spec: SeriesSpec, shape: tuple[int, int, int], atol: float = 1e-4) -> None:
    assert series.hu.shape == shape and series.hu.dtype == np.float32
    np.testing.assert_allclose(series.spacing_mm, spec.spacing_mm, atol=atol)
    np.testing.assert_allclose(series.origin_mm, spec.origin_mm, atol=atol)
    np.testing.assert_allclose(series.direction, spec.direction, atol=atol)
    image = series.to_sitk()
    assert image.GetSize() == shape[::-1]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), series.hu)


# -------------------------------------------------------------------------------------- happy paths
def test_shuffled_random_names_reversed_instance_numbers(tmp_path):
    thick_spec, thin_spec = specs(reverse_instance_numbers=True)
    thick, thin = truth_hu(THICK_SHAPE, 1), truth_hu(THIN_SHAPE, 2)
    folders = {"1": shuffled(encode_series(thick, thick_spec), 1, names="random"),
               "2": shuffled(encode_series(thin, thin_spec), 2, names="random")}
    pair = read(write_zip(tmp_path / "c.zip", folders))
    np.testing.assert_array_equal(pair.series1.hu, thick)
    np.testing.assert_array_equal(pair.series2.hu, thin)
    assert_geometry(pair.series1, thick_spec, THICK_SHAPE)
    assert_geometry(pair.series2, thin_spec, THIN_SHAPE)
    assert pair.series1.slice_thickness_mm == 5.0 and pair.series2.slice_thickness_mm == 1.0
    assert pair.series2.is_uniform and not pair.series2.interpolated_slices.any()
    assert pair.warnings == []


@pytest.mark.parametrize(
    ("unsigned", "intercept", "slope", "rle"),
    [(True, -1024.0, 1.0, False), (False, 0.0, 1.0, False), (False, -1024.0, 0.5, False), (True, -1024.0, 1.0, True)],
    ids=["unsigned-intercept-1024", "signed-intercept-0", "slope-0.5", "rle"],
)
def test_storage_variants_are_exact(tmp_path, unsigned, intercept, slope, rle):
    options = {"unsigned": unsigned, "rescale_intercept": intercept, "rescale_slope": slope, "rle": rle}
    thick_spec, thin_spec = specs(**options)
    thick, thin = truth_hu(THICK_SHAPE, 3, step=slope), truth_hu(THIN_SHAPE, 4, step=slope)
    files = encode_series(thin, thin_spec)
    if rle:
        assert pydicom.dcmread(io.BytesIO(files[0][1])).file_meta.TransferSyntaxUID.is_compressed
    pair = read(write_zip(tmp_path / "c.zip", {"1": encode_series(thick, thick_spec), "2": files}))
    np.testing.assert_array_equal(pair.series2.hu, thin)
    np.testing.assert_array_equal(pair.series1.hu, thick)


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEG2000Lossless",
                                    "JPEGLSLossless"])
def test_gdcm_compressed_series_are_exact(tmp_path, syntax):
    gdcm = pytest.importorskip("gdcm")
    thick_spec, thin_spec = specs(unsigned=False, rescale_intercept=0.0)
    thin = truth_hu(THIN_SHAPE, 5)

    def transcode(data: bytes) -> bytes:
        src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
        src.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return dst.read_bytes()

    files = [(name, transcode(data)) for name, data in encode_series(thin, thin_spec)]
    assert pydicom.dcmread(io.BytesIO(files[0][1])).file_meta.TransferSyntaxUID.is_compressed
    pair = read(write_zip(tmp_path / "c.zip", {"1": encode_series(truth_hu(THICK_SHAPE, 6), thick_spec),
                                               "2": files}))
    np.testing.assert_array_equal(pair.series2.hu, thin)


def test_oblique_geometry_matches_simpleitk(tmp_path):
    thick_spec, thin_spec = specs(direction=OBLIQUE)
    thin = truth_hu(THIN_SHAPE, 7)
    series_dir = tmp_path / "thin"
    write_series(thin, thin_spec, series_dir)
    files = [(p.name, p.read_bytes()) for p in sorted(series_dir.iterdir())]
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 8), thick_spec), "2": shuffled(files, 4)}
    series = read(write_zip(tmp_path / "c.zip", folders)).series2
    assert_geometry(series, thin_spec, THIN_SHAPE)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir)))
    reference = reader.Execute()
    ours = series.to_sitk()
    np.testing.assert_allclose(ours.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference).astype(np.float32), series.hu)
    # And the documented convention: voxel [k, j, i] at origin + direction @ (i*sx, j*sy, k*sz).
    k, j, i = 7, 3, 11
    expected = np.asarray(series.origin_mm) + np.reshape(series.direction, (3, 3)) @ (
        np.array([i, j, k]) * series.spacing_mm)
    np.testing.assert_allclose(ours.TransformIndexToPhysicalPoint((i, j, k)), expected, atol=1e-9)


def test_localizers_and_other_series_are_ignored(tmp_path):
    thick_spec, thin_spec = specs()
    thin = truth_hu(THIN_SHAPE, 9)
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    localizer = SeriesSpec(spacing_mm=(1.0, 1.0, 1.0), direction=coronal, series_number=9,
                           image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                           frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    # A scout that shares the main series' UID and is not flagged: only its orientation gives it away.
    unflagged_scout = SeriesSpec(spacing_mm=(1.0, 1.0, 1.0), direction=coronal, series_uid=thin_spec.series_uid,
                                 frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    smaller_axial = SeriesSpec(spacing_mm=(0.8, 0.7, 2.0), origin_mm=thin_spec.origin_mm, series_number=3,
                               frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    files = [
        *encode_series(thin, thin_spec),
        *[(f"loc{n}", d) for n, d in encode_series(truth_hu((1, 30, 24), 10), localizer)],
        *[(f"scout{n}", d) for n, d in encode_series(truth_hu((1, 30, 24), 11), unflagged_scout)],
        *[(f"ax{n}", d) for n, d in encode_series(truth_hu((6, 12, 16), 12), smaller_axial)],
    ]
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 13), thick_spec), "2": shuffled(files, 3)}
    pair = read(write_zip(tmp_path / "c.zip", folders))
    np.testing.assert_array_equal(pair.series2.hu, thin)
    assert len(pair.warnings) == 1 and "2 axial image series (20, 6 slices)" in pair.warnings[0]


@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 999'")  # pydicom, while the test writes
def test_foreign_and_malformed_character_sets(tmp_path):
    def garble_name(ds: pydicom.Dataset, _: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 999"  # no such character set
        ds.PatientName = b"\xff\xfe\x81\x30\x89\x38garbage"

    thick_spec, thin_spec = specs(specific_character_set="GB18030", patient_name=CHINESE_NAME)
    thin = truth_hu(THIN_SHAPE, 14)
    raw = encode_series(thin, thin_spec)
    assert CHINESE_NAME.encode("gb18030") in raw[0][1]
    thick = truth_hu(THICK_SHAPE, 15)
    folders = {"1": patched(encode_series(thick, thick_spec), garble_name), "2": raw}
    pair = read(write_zip(tmp_path / "c.zip", folders))
    np.testing.assert_array_equal(pair.series1.hu, thick)
    np.testing.assert_array_equal(pair.series2.hu, thin)


def test_junk_files_missing_preambles_and_deeper_layout(tmp_path):
    thick_spec, thin_spec = specs()
    thick, thin = truth_hu(THICK_SHAPE, 16), truth_hu(THIN_SHAPE, 17)

    def raw_dataset(data: bytes) -> bytes:
        """Implicit VR Little Endian without preamble or file meta: what some archives store."""
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return buf.getvalue()

    thin_files = encode_series(thin, thin_spec)
    thin_files = ([(n.removesuffix(".dcm"), d[132:]) for n, d in thin_files[:7]]  # no preamble, meta kept
                  + [(n, raw_dataset(d)) for n, d in thin_files[7:14]]
                  + thin_files[14:])
    junk = [("README.txt", b"series 2 is the thin one\n"), ("DICOMDIR", _dicomdir_like()),
            ("preview.jpg", b"\xff\xd8\xff\xe0" + bytes(200)), ("notes.xml", b"<?xml version='1.0'?><a/>")]
    folders = {"1": encode_series(thick, thick_spec) + junk, "2": thin_files + junk}
    extra = [("export/__MACOSX/case_001/2/._IM00000.dcm", b"\x00\x05\x16\x07junk"),
             ("export/.DS_Store", b"\x00\x00\x00\x01Bud1")]
    pair = read(write_zip(tmp_path / "c.zip", folders, prefix="export/case_001/", extra=extra))
    np.testing.assert_array_equal(pair.series1.hu, thick)
    np.testing.assert_array_equal(pair.series2.hu, thin)
    assert pair.warnings == []


def _dicomdir_like() -> bytes:
    """A Part-10 file with a Media Storage Directory SOP class and no pixel data."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.FileSetID = "JUNK"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_bits_stored_and_pixel_padding(tmp_path):
    """12 of 16 bits stored with garbage (an overlay) in the top bits; padding value -2000 -> air."""
    thick_spec, thin_spec = specs(unsigned=False, rescale_intercept=0.0)
    thin = truth_hu(THIN_SHAPE, 18, low=-2000.0)
    thin[:, 0, :] = -2000.0  # the padded border outside the reconstruction circle

    def twelve_bits(ds: pydicom.Dataset, _: int) -> None:
        stored = ds.pixel_array.astype(np.int16)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelPaddingValue = -2000
        ds["PixelPaddingValue"].VR = "SS"
        ds.PixelData = (stored.view(np.uint16) | np.uint16(0x5000)).tobytes()  # bits 12..15 are not data

    files = patched(encode_series(thin, thin_spec), twelve_bits)
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 19), thick_spec), "2": files}
    expected = np.where(thin == -2000.0, AIR_HU, thin)
    np.testing.assert_array_equal(read(write_zip(tmp_path / "c.zip", folders)).series2.hu, expected)


def test_rescale_is_applied_per_slice(tmp_path):
    def shift_odd_intercepts(ds: pydicom.Dataset, k: int) -> None:
        if k % 2:
            ds.RescaleIntercept = "-1000"

    _, thin_spec = specs()
    thin = truth_hu(THIN_SHAPE, 37)
    files = patched(encode_series(thin, thin_spec), shift_odd_intercepts)
    path = case_with_thin(tmp_path, shuffled(files), thin_spec)
    expected = thin + np.where(np.arange(20) % 2, 24.0, 0.0).astype(np.float32)[:, None, None]
    np.testing.assert_array_equal(read(path).series2.hu, expected)


# --------------------------------------------------------------------------- enhanced (multi-frame) CT
@pytest.mark.parametrize("rle", [False, True], ids=["native", "rle"])
def test_enhanced_series_reads_like_classic_files(tmp_path, rle):
    """One Enhanced CT object (per-frame positions; orientation, spacing and rescale shared) gives the
    volume and geometry of the same phantom stored one file per slice."""
    thick_spec, thin_spec = specs(direction=OBLIQUE)
    thick, thin = truth_hu(THICK_SHAPE, 40), truth_hu(THIN_SHAPE, 41)
    enhanced = encode_series(thin, dataclasses.replace(thin_spec, enhanced=True, rle=rle))
    header = pydicom.dcmread(io.BytesIO(enhanced[0][1]))
    assert len(enhanced) == 1 and header.NumberOfFrames == 20
    assert header.file_meta.TransferSyntaxUID.is_compressed == rle
    assert "ImagePositionPatient" not in header and "RescaleIntercept" not in header  # only in functional groups
    classic = read(write_zip(tmp_path / "classic.zip", {"1": encode_series(thick, thick_spec),
                                                        "2": encode_series(thin, thin_spec)}))
    pair = read(write_zip(tmp_path / "enhanced.zip", {"1": encode_series(thick, thick_spec), "2": enhanced}))
    np.testing.assert_array_equal(pair.series2.hu, thin)
    np.testing.assert_array_equal(pair.series2.hu, classic.series2.hu)
    np.testing.assert_array_equal(pair.series1.hu, classic.series1.hu)
    for attribute in ("spacing_mm", "origin_mm", "direction", "slice_thickness_mm", "acquired_positions_mm"):
        np.testing.assert_array_equal(getattr(pair.series2, attribute), getattr(classic.series2, attribute))
    assert_geometry(pair.series2, thin_spec, THIN_SHAPE)
    assert pair.warnings == classic.warnings == []


def test_enhanced_per_frame_rescale_and_frames_out_of_order(tmp_path, monkeypatch):
    """Every group per frame, each frame its own slope and intercept, frames stored shuffled: the
    object is still read from the zip once for all its frames."""
    _, thin_spec = specs(unsigned=False)
    thin = truth_hu(THIN_SHAPE, 42)
    enhanced_spec = dataclasses.replace(
        thin_spec, enhanced=True, frame_order=[int(k) for k in np.random.default_rng(43).permutation(20)],
        slice_rescale=[(0.5 if k % 2 else 1.0, -1024.0 + 10.0 * k) for k in range(20)],
        per_frame_groups=("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                          "PixelValueTransformationSequence"))
    whole_reads: list[str] = []
    read_member = SafeZip.read
    monkeypatch.setattr(SafeZip, "read", lambda zf, member: whole_reads.append(member.name) or read_member(zf, member))
    pair = read(case_with_thin(tmp_path, encode_series(thin, enhanced_spec), thin_spec))
    np.testing.assert_array_equal(pair.series2.hu, thin)
    assert_geometry(pair.series2, thin_spec, THIN_SHAPE)
    assert pair.series2.slice_thickness_mm == 1.0
    assert [name for name in whole_reads if "/2/" in name] == ["case_001/2/ENH00000.dcm"]


def test_enhanced_localizer_frames_are_ignored(tmp_path):
    _, thin_spec = specs()
    thin = truth_hu((21, *THIN_SHAPE[1:]), 44)
    enhanced_spec = dataclasses.replace(thin_spec, enhanced=True, per_frame_groups=(
        "PlanePositionSequence", "CTImageFrameTypeSequence"))

    def last_frame_is_a_scout(ds: pydicom.Dataset, _: int) -> None:
        frame = ds.PerFrameFunctionalGroupsSequence[-1]
        frame.CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
        frame.PlanePositionSequence[0].ImagePositionPatient = [-8.0, 40.0, 90.0]

    files = patched(encode_series(thin, enhanced_spec), last_frame_is_a_scout)
    np.testing.assert_array_equal(read(case_with_thin(tmp_path, files, thin_spec)).series2.hu, thin[:20])


def test_enhanced_without_per_frame_positions_is_ignored(tmp_path):
    """Positions only shared (one for all frames) or missing: not a stack of slices."""
    _, thin_spec = specs()
    thin = truth_hu(THIN_SHAPE, 45)
    other = SeriesSpec(spacing_mm=thin_spec.spacing_mm, origin_mm=thin_spec.origin_mm, series_number=5,
                       frame_of_reference_uid=thin_spec.frame_of_reference_uid, enhanced=True)

    def drop_positions(ds: pydicom.Dataset, _: int) -> None:
        for frame in ds.PerFrameFunctionalGroupsSequence:
            del frame.PlanePositionSequence

    shared_only = encode_series(thin, dataclasses.replace(other, per_frame_groups=()))
    missing = patched(encode_series(thin, other), drop_positions)
    for n, bad in enumerate((shared_only, missing)):
        alone = case_with_thin(tmp_path, bad, thin_spec, f"alone{n}.zip")
        assert rejection(alone) == ("series 2: no axial CT image series in folder 2/ (found no image series; "
                                    "ignored 1 multi-frame image without per-frame position(s))")
        beside = case_with_thin(tmp_path, encode_series(thin, thin_spec) + bad, thin_spec, f"beside{n}.zip")
        pair = read(beside)
        np.testing.assert_array_equal(pair.series2.hu, thin)
        assert pair.warnings == []


def test_enhanced_colour_object_is_ignored(tmp_path):
    _, thin_spec = specs()

    def to_rgb(ds: pydicom.Dataset, _: int) -> None:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = np.repeat(np.frombuffer(ds.PixelData, np.uint16), 3).tobytes()

    files = patched(encode_series(truth_hu(THIN_SHAPE, 46), dataclasses.replace(thin_spec, enhanced=True)), to_rgb)
    assert rejection(case_with_thin(tmp_path, files, thin_spec)) == (
        "series 2: no axial CT image series in folder 2/ (found no image series; ignored 1 colour image(s))")


# ------------------------------------------------------------------------------------ gaps and tilt
def test_gap_is_rejected_by_default(tmp_path):
    _, thin_spec = specs()
    files = encode_series(truth_hu(THIN_SHAPE, 20), thin_spec)
    path = case_with_thin(tmp_path, shuffled(files[:10] + files[11:]), thin_spec)
    assert rejection(path) == ("series 2 has a 2.0 mm gap between slices 9 and 10 (expected 1.0 mm); "
                               "set preprocess.allow_gaps=true to interpolate across gaps")


def test_gap_allowed_is_interpolated_onto_a_uniform_grid(tmp_path):
    _, thin_spec = specs()
    thin = truth_hu(THIN_SHAPE, 21)
    files = encode_series(thin, thin_spec)
    path = case_with_thin(tmp_path, files[:10] + files[11:], thin_spec)
    pair = read(path, allow_gaps=True)
    series = pair.series2
    assert any("2.0 mm gap between slices 9 and 10" in w and "interpolated" in w for w in pair.warnings)
    assert_geometry(series, thin_spec, THIN_SHAPE)
    assert series.is_uniform
    np.testing.assert_array_equal(np.flatnonzero(series.interpolated_slices), [10])
    np.testing.assert_allclose(series.acquired_positions_mm, np.delete(np.arange(20.0), 10), atol=1e-4)
    kept = np.delete(np.arange(20), 10)
    np.testing.assert_array_equal(series.hu[kept], thin[kept])
    np.testing.assert_allclose(series.hu[10], (thin[9] + thin[11]) / 2, atol=1e-3)


def test_gantry_tilt_is_sheared_back_onto_an_orthogonal_grid(tmp_path):
    # Slices step 0.8 mm along z and 0.6 mm (one row) along y: a 36.9 degree tilt.
    tilted = (1.0, 0.0, 0.0, 0.0, 1.0, 0.6, 0.0, 0.0, 0.8)
    thick_spec, thin_spec = specs()
    thin_spec.direction, thin_spec.spacing_mm = tilted, (0.8, 0.6, 1.0)
    thin = truth_hu(THIN_SHAPE, 22)
    path = case_with_thin(tmp_path, encode_series(thin, thin_spec), thin_spec)
    pair = read(path)
    series = pair.series2
    assert any("gantry tilt of 36.9 deg" in w for w in pair.warnings)
    np.testing.assert_allclose(series.spacing_mm, (0.8, 0.6, 0.8), atol=1e-6)
    np.testing.assert_allclose(series.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1), atol=1e-9)
    for k in range(series.n_slices):  # slice k moved down by k rows; air where nothing was imaged
        moved = min(k, THIN_SHAPE[1])
        np.testing.assert_allclose(series.hu[k, moved:], thin[k, :THIN_SHAPE[1] - moved], atol=1e-3)
        assert (series.hu[k, :moved] == AIR_HU).all()


# --------------------------------------------------------------------------------------- rejections
def test_frames_of_reference_must_match(tmp_path):
    thick_spec, _ = specs()
    _, thin_spec = specs()  # a fresh frame of reference
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 23), thick_spec),
               "2": encode_series(truth_hu(THIN_SHAPE, 24), thin_spec)}
    assert "series 1 and 2 have different frames of reference" in rejection(write_zip(tmp_path / "c.zip", folders))


def test_extents_must_overlap(tmp_path):
    thick_spec, thin_spec = specs()
    thin_spec.origin_mm = (-8.0, -5.0, 300.0)
    folders = {"1": encode_series(truth_hu(THICK_SHAPE, 25), thick_spec),
               "2": encode_series(truth_hu(THIN_SHAPE, 26), thin_spec)}
    reason = rejection(write_zip(tmp_path / "c.zip", folders))
    assert reason.startswith("series 1 and 2 do not overlap in space (along z")


def test_no_dicom_and_missing_folders(tmp_path):
    no_dicom = write_zip(tmp_path / "a.zip", {"1": [("a.txt", b"x")], "2": [("b.jpg", b"\xff\xd8")]})
    assert "no DICOM files" in rejection(no_dicom)
    empty = write_zip(tmp_path / "b.zip", {}, extra=[("readme.txt", b"nothing here")])
    assert rejection(empty) == "no DICOM files in the zip"
    thick_spec, _ = specs()
    only_1 = write_zip(tmp_path / "c.zip", {"1": encode_series(truth_hu(THICK_SHAPE, 27), thick_spec)})
    assert rejection(only_1).startswith("missing folder 2/")


def test_min_slices(tmp_path):
    path = standard_case(tmp_path)
    assert rejection(path, min_slices=6) == "series 1 has only 5 slices (minimum 6, preprocess.min_slices)"


def test_duplicate_slices(tmp_path):
    _, thin_spec = specs()
    thin = truth_hu(THIN_SHAPE, 28)
    files = encode_series(thin, thin_spec)
    same = case_with_thin(tmp_path, files + [("copy", files[4][1])], thin_spec, "same.zip")
    pair = read(same)
    np.testing.assert_array_equal(pair.series2.hu, thin)
    assert pair.warnings == ["series 2: dropped 1 duplicate slice(s) (same position, same pixels)"]

    other_spec = SeriesSpec(spacing_mm=thin_spec.spacing_mm, origin_mm=(-8.0, -5.0, 104.0),
                            series_uid=thin_spec.series_uid, frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    different = [("other", data) for _, data in encode_series(thin[4:5] + 1, other_spec)]
    clash = case_with_thin(tmp_path, files + different, thin_spec, "clash.zip")
    assert "two different images at the position of slice 4" in rejection(clash)


def test_inconsistent_slice_size(tmp_path):
    _, thin_spec = specs()
    files = encode_series(truth_hu(THIN_SHAPE, 29), thin_spec)
    odd_spec = SeriesSpec(spacing_mm=thin_spec.spacing_mm, origin_mm=(-8.0, -5.0, 120.0),
                          series_uid=thin_spec.series_uid, frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    odd = [("odd", d) for _, d in encode_series(truth_hu((1, 10, 16), 30), odd_spec)]
    path = case_with_thin(tmp_path, files + odd, thin_spec)
    assert rejection(path) == "series 2: slices differ in size (Rows x Columns) (12 x 16 and 10 x 16)"


def test_one_series_with_two_orientations(tmp_path):
    _, thin_spec = specs()
    coronal = SeriesSpec(spacing_mm=thin_spec.spacing_mm, direction=(1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0),
                         series_uid=thin_spec.series_uid, frame_of_reference_uid=thin_spec.frame_of_reference_uid)
    files = encode_series(truth_hu((12, 12, 16), 38), thin_spec) + [
        (f"cor{n}", d) for n, d in encode_series(truth_hu((8, 12, 16), 39), coronal)]
    path = case_with_thin(tmp_path, files, thin_spec)
    assert rejection(path) == ("series 2: its image series mixes 2 slice orientations "
                               "(ImageOrientationPatient)")


def test_unsafe_zip_is_a_rejection(tmp_path):
    path = standard_case(tmp_path)
    assert rejection(path, max_members=3).startswith("unsafe or unreadable zip: has 25 members")


def test_swapped_folders_warn(tmp_path):
    thick_spec, thin_spec = specs()
    folders = {"2": encode_series(truth_hu(THICK_SHAPE, 31), thick_spec),
               "1": encode_series(truth_hu(THIN_SHAPE, 32), thin_spec)}
    pair = read(write_zip(tmp_path / "c.zip", folders))
    assert pair.series1.n_slices == 20
    assert pair.warnings == ["series 1 (1.0 mm) is not thicker than series 2 (5.0 mm): are folders 1/ and 2/ "
                             "swapped? The task is thick-to-thin"]


# ---------------------------------------------------------------------------------------------- PHI
def test_no_identifiers_in_reasons_warnings_or_repr(tmp_path):
    thick_spec, thin_spec = specs(specific_character_set="GB18030", patient_name=CHINESE_NAME)
    messages: list[str] = []
    thin_files = encode_series(truth_hu(THIN_SHAPE, 33), thin_spec)
    gap_case = write_zip(tmp_path / "gap.zip", {"2": encode_series(truth_hu(THICK_SHAPE, 34), thick_spec),
                                                "1": thin_files[:3] + thin_files[4:] + [("copy", thin_files[0][1])]})
    pair = read(gap_case, allow_gaps=True)
    messages += [*pair.warnings, repr(pair.series1), repr(pair.series2), repr(pair)]
    messages.append(rejection(gap_case))
    _, other_thin = specs()  # another frame of reference
    mismatch = write_zip(tmp_path / "for.zip", {"1": encode_series(truth_hu(THICK_SHAPE, 35), thick_spec),
                                                "2": encode_series(truth_hu(THIN_SHAPE, 36), other_thin)})
    messages.append(rejection(mismatch))
    assert len(pair.warnings) >= 3  # gap, duplicate, swapped folders: the messages are exercised
    secrets = [*PHI.values(), CHINESE_NAME, thick_spec.frame_of_reference_uid, thick_spec.series_uid,
               thick_spec.study_uid, thin_spec.series_uid, other_thin.frame_of_reference_uid]
    leaked = [(s, m) for m in messages for s in _variants(secrets) if s in m]
    assert leaked == []


def _variants(secrets: Iterable[str]) -> list[str]:
    """Each identifier and its parts ("张三^李四" -> "张三", "李四")."""
    out = []
    for s in secrets:
        out += [s, *[part for part in s.split("^") if len(part) > 1]]
    return out
