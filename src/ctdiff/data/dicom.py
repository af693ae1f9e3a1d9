"""Read a case zip (DICOM CT series in folders ``1/`` and ``2/``) into two HU volumes with geometry.

The zip is never extracted: members are read into memory through :class:`ctdiff.data.safezip.SafeZip`.
Headers are parsed from the first few KB of each member (pydicom, ``stop_before_pixels``), so
localizers, reports and other series are never inflated whole; the chosen series' pixel data is then
read member by member straight into the output array (uncompressed syntaxes with ``np.frombuffer``,
compressed ones through pydicom's decoders: RLE natively, JPEG Lossless / JPEG-LS / JPEG 2000
through python-gdcm or pylibjpeg where installed). A multi-frame object (Enhanced CT Image Storage,
one object for the whole series) is one image per frame: it is read from the zip once and decoded
frame by frame (uncompressed frames viewed at their offset, compressed ones through pydicom's
``pixel_array(ds, index=i)``), so memory holds one object and one frame besides the output.

Geometry follows SimpleITK's conventions (DICOM LPS): voxel ``[k, j, i]`` of ``hu`` (D, H, W) sits at
``origin + direction @ (i*sx, j*sy, k*sz)`` mm; the direction's columns are the row direction
(ImageOrientationPatient[0:3]), the column direction (IOP[3:6]) and the slice normal
``row x col``, and slices are ordered by increasing position along that normal, never by
InstanceNumber or file name.

Every problem that makes a case unusable raises :class:`CaseRejected` with a one-line reason that
names the series ("series 1" = folder ``1/``, "series 2" = folder ``2/``), slice indices (0-based,
in the sorted order) and spacings, and where useful the fix. Reasons and warnings never quote header
text: patient name, IDs, dates, institutions and UIDs stay out of them (pydicom's own warnings,
which can quote values, are silenced while reading).

Decisions on irregular input (each is tested):

- Files without the 128-byte preamble are read; DICOMDIR, non-DICOM files (txt, jpg, xml...),
  objects without pixel data (SR, presentation states), colour images (multi-frame ones included),
  images without position/orientation/spacing, ImageType LOCALIZER and single-image series are
  ignored.
- Each frame of a multi-frame object takes position, orientation, pixel spacing, slice thickness and
  rescale from its Per-frame Functional Groups, else from the Shared Functional Groups, else from
  the top level; frames then go through the same checks as files. An object without a position in
  every frame's Per-frame Functional Groups (a cine loop, a screen capture) is ignored; frames whose
  FrameType says LOCALIZER are ignored like localizer files.
- Within one SeriesInstanceUID, slices whose orientation differs from the majority are scouts and
  ignored when they are at most 10 % of the series (or one image); a larger mix is rejected if that
  series is the one chosen.
- Of the remaining axial series (slice normal closest to the patient's z axis) the one with the most
  slices wins; several candidates give a warning.
- Slices at the same position: dropped with a warning when their pixels are identical (a file
  stored twice), rejected when they differ (two acquisitions in one series).
- A slice step more than 10 % off the median is a gap (a missing slice) or an irregular step:
  rejected (:class:`IrregularSlices`; preprocess and predict each name their own fix), or with
  ``allow_gaps`` interpolated linearly onto a uniform grid at the median step (see :class:`Series`).
- Slice thicknesses more than 10 % apart (a GE head with 4 mm and 7 mm slices): the series' thickness is
  their median, with a warning that lists them.
- Gantry tilt (slices shifted in-plane along the stack): each slice is shifted back onto the
  orthogonal grid (bilinear, air outside), as dcm2niix does, with a warning; geometry stays
  orthonormal so downstream resampling and NIfTI export need no special case.
- Padding pixels (PixelPaddingValue, up to PixelPaddingRangeLimit) become air (``AIR_HU``); unused
  high bits (BitsStored < BitsAllocated) are masked and the value sign-extended, as the standard says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import struct
import warnings as pywarnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctdiff.data.grid import AIR_HU, Grid, image_from_array
from ctdiff.data.safezip import Member, SafeZip, UnsafeZipError

SERIES_FOLDERS = ("1", "2")  # folder 1: thick series (the condition), folder 2: thin series (the target)
HEAD_BYTES = 16 * 1024  # first read per member; grown x4 while the header is longer
DUPLICATE_TOL_MM = 0.01  # slices closer than this along the normal share a position
GAP_REL_TOL = 0.10  # a step further than 10 % from the median step is irregular ...
GAP_ABS_TOL_MM = 0.002  # ... plus the rounding of 6-digit decimal strings in ImagePositionPatient
ORIENTATION_TOL = 1e-3  # direction cosines closer than this belong to one orientation
SCOUT_FRACTION = 0.10  # minority orientations up to this share of a series are scouts
TILT_MIN_PX = 0.05  # in-plane drift of the stack below this (pixels) is rounding, not tilt

_NOT_DICOM = "non-DICOM file"
_NO_PIXEL_DATA = -1  # pixel offset of a DICOM object that has none (SR, presentation state, DICOMDIR)
_NO_FRAME_POSITIONS = "multi-frame image without per-frame position"
_IGNORED_KINDS = ("localizer", "non-image object", _NO_FRAME_POSITIONS, "colour image",
                  "image without geometry", "image with unsupported pixel format", "single-image series")
# Where enhanced (multi-frame) objects keep per-image attributes: functional group sequences, each
# either per frame or shared by all frames.
_FRAME_GROUPS = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "FrameType": "CTImageFrameTypeSequence",
}
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


class CaseRejected(Exception):
    """The case cannot be used; ``reason`` (also ``str(exc)``) says why in one line, without PHI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IrregularSlices(CaseRejected):
    """A series whose slice steps are not uniform (a gap, mixed spacings). The reason says where; each
    entry point adds the fix its users can apply (preprocess's param, predict's flag)."""

    def with_fix(self, fix: str) -> CaseRejected:
        return CaseRejected(f"{self.reason}; {fix}")


PREPROCESS_GAP_FIX = "set preprocess.allow_gaps=true to interpolate across gaps"


@dataclass(eq=False)
class Series:
    """One CT series as a HU volume on a grid in patient space (SimpleITK conventions, LPS, mm).

    ``hu`` (D, H, W) float32 Hounsfield units, slice ``k`` at distance ``slice_positions_mm[k]`` from
    ``origin_mm`` along the slice normal ``direction[:, 2]``. Series returned by :func:`read_case` are
    always uniform (``slice_positions_mm == k * sz``), so ``hu`` and :meth:`to_sitk` describe the same
    voxels. Where gaps were bridged (``allow_gaps``), ``acquired_positions_mm`` (N,) keeps where the
    scanner really put slices and :attr:`interpolated_slices` marks the slices of ``hu`` that were
    interpolated rather than acquired. ``frame_of_reference_uid`` is for pairing checks only: it is
    kept out of ``repr`` and must never be written anywhere.
    """

    hu: np.ndarray = field(repr=False)
    spacing_mm: tuple[float, float, float]  # (sx, sy, sz): along columns (i), rows (j), slices (k)
    origin_mm: tuple[float, float, float]  # LPS position of voxel [0, 0, 0]
    direction: tuple[float, ...]  # 9 floats, row-major 3x3, columns = i, j, k axis directions
    slice_positions_mm: np.ndarray = field(repr=False)  # (D,) along direction[:, 2], from origin
    acquired_positions_mm: np.ndarray = field(repr=False)  # (N,) same frame, the slices in the files
    slice_thickness_mm: float | None  # SliceThickness (median over slices); None if absent
    frame_of_reference_uid: str = field(repr=False)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def grid(self) -> Grid:
        """The voxel grid of ``hu`` (only meaningful when :attr:`is_uniform`)."""
        return Grid(tuple(int(v) for v in self.hu.shape), self.spacing_mm, self.origin_mm, self.direction)

    @property
    def is_uniform(self) -> bool:
        """True when slice ``k`` sits at ``k * sz``, i.e. ``hu`` is a regular grid."""
        sz = self.spacing_mm[2]
        ideal = sz * np.arange(self.n_slices)
        return bool(np.allclose(self.slice_positions_mm, ideal, rtol=0.0, atol=1e-6 + 1e-4 * sz))

    @property
    def interpolated_slices(self) -> np.ndarray:
        """(D,) bool: slice ``k`` of ``hu`` lies further than 10 % of a spacing from any acquired slice."""
        distance = np.abs(self.slice_positions_mm[:, None] - self.acquired_positions_mm[None, :]).min(axis=1)
        return distance > GAP_REL_TOL * self.spacing_mm[2]

    @property
    def effective_thickness_mm(self) -> float:
        """SliceThickness where the header has it, else the slice spacing."""
        return self.slice_thickness_mm if self.slice_thickness_mm is not None else self.spacing_mm[2]

    def to_sitk(self) -> sitk.Image:
        """``hu`` as a float32 SimpleITK image with this geometry (requires a uniform series)."""
        if not self.is_uniform:
            raise ValueError("slices are not evenly spaced: call resampled_uniform() first")
        return image_from_array(self.hu, self.grid)

    def resampled_uniform(self) -> Series:
        """This series with slices linearly interpolated onto a uniform grid along the normal.

        The grid spans the same first-to-last extent with ``n = round(extent / sz) + 1`` slices,
        ``sz`` the median step, so a missing slice is filled in and every acquired slice that falls
        on the grid is kept exactly. In-plane geometry and origin are unchanged.
        """
        if self.is_uniform:
            return self
        positions = self.slice_positions_mm
        extent = float(positions[-1] - positions[0])
        n = int(round(extent / self.spacing_mm[2])) + 1
        sz = extent / (n - 1)
        targets = positions[0] + sz * np.arange(n)
        upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
        lower = upper - 1
        weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
        hu = np.empty((n, *self.hu.shape[1:]), np.float32)
        for k in range(n):  # slice by slice: no (n, H, W) temporaries
            np.multiply(self.hu[lower[k]], np.float32(1.0 - weight[k]), out=hu[k])
            hu[k] += np.float32(weight[k]) * self.hu[upper[k]]
        normal = np.asarray(self.direction).reshape(3, 3)[:, 2]
        return dataclasses.replace(
            self, hu=hu, spacing_mm=(*self.spacing_mm[:2], sz),
            origin_mm=tuple(float(v) for v in np.asarray(self.origin_mm) + positions[0] * normal),
            slice_positions_mm=targets - positions[0],
            acquired_positions_mm=self.acquired_positions_mm - positions[0])

    def bounds_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lo, hi), each (3,) LPS mm, of the voxels' physical extent
        (voxel centres widened by half a voxel: a slice covers its spacing)."""
        grid = self.grid
        corners = np.array([grid.physical_point((k, j, i))
                            for k in (-0.5, grid.shape[0] - 0.5)
                            for j in (-0.5, grid.shape[1] - 0.5)
                            for i in (-0.5, grid.shape[2] - 0.5)])
        return corners.min(axis=0), corners.max(axis=0)


@dataclass(eq=False)
class CasePair:
    """The two series of one case: ``series1`` from folder ``1/`` (thick, the condition) and
    ``series2`` from folder ``2/`` (thin, the target), with warnings worth reporting (no PHI)."""

    series1: Series
    series2: Series
    warnings: list[str] = field(default_factory=list)


def read_case(zip_path: str | Path, *, min_slices: int, allow_gaps: bool, max_members: int,
              max_unzipped_bytes: int) -> CasePair:
    """Read and check both series of a case zip.

    ``min_slices``: fewest slices a series may have. ``allow_gaps``: bridge missing slices by linear
    interpolation (with a warning) instead of rejecting. ``max_members`` / ``max_unzipped_bytes``:
    zip-bomb bounds (see :class:`ctdiff.data.safezip.SafeZip`).
    Raises :class:`CaseRejected` for any unusable case, unsafe or corrupt zips included.
    """
    warnings: list[str] = []
    with _quiet_pydicom():
        try:
            with SafeZip(zip_path, max_members=max_members, max_unzipped_bytes=max_unzipped_bytes) as zf:
                members1, members2 = _series_folders(zf)
                options = {"min_slices": min_slices, "allow_gaps": allow_gaps, "warnings": warnings}
                series1, _ = _read_series(zf, members1, SERIES_FOLDERS[0], **options)
                series2, _ = _read_series(zf, members2, SERIES_FOLDERS[1], **options)
        except UnsafeZipError as exc:
            raise CaseRejected(f"unsafe or unreadable zip: {exc}") from None
        except IrregularSlices as exc:
            raise exc.with_fix(PREPROCESS_GAP_FIX) from None
    _check_pair(series1, series2, warnings)
    return CasePair(series1, series2, warnings)


@dataclass(eq=False)
class ThickSeries:
    """Series 1 of a new scan, as ``ctdiff predict`` reads it: the volume, the header of its first image (the
    patient, study and frame-of-reference modules a derived series keeps; never logged), warnings."""

    series: Series
    header: Dataset = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def read_thick_series(source: str | Path, *, min_slices: int, allow_gaps: bool, max_members: int,
                      max_unzipped_bytes: int, gap_fix: str = "pass allow_gaps=True to interpolate across gaps"
                      ) -> ThickSeries:
    """Read the thick axial series of a case zip or a folder of DICOM files.

    A zip or folder in the APE-data layout gives its folder ``1/`` (``2/`` is not read); anything else is
    searched whole, and the axial image series is picked as preprocess picks it (the one with the most
    slices; localizers, other orientations and non-image files ignored). Zips are opened as safely as in
    preprocess (:class:`ctdiff.data.safezip.SafeZip`). Raises :class:`CaseRejected` with a one-line reason;
    irregular slice steps end it with ``gap_fix``, the caller's way to accept them.
    """
    source = Path(source)
    warnings: list[str] = []
    with _quiet_pydicom():
        try:
            archive: Archive = DicomFolder(source) if source.is_dir() else SafeZip(
                source, max_members=max_members, max_unzipped_bytes=max_unzipped_bytes)
            with archive:
                members, where = _thick_members(archive)
                series, first = _read_series(archive, members, SERIES_FOLDERS[0], min_slices=min_slices,
                                             allow_gaps=allow_gaps, warnings=warnings, where=where)
                header = _read_header(archive, first)
        except UnsafeZipError as exc:
            raise CaseRejected(f"unsafe or unreadable zip: {exc}") from None
        except IrregularSlices as exc:
            raise exc.with_fix(gap_fix) from None
    if header is None:  # pragma: no cover - the member was parsed a moment ago
        raise CaseRejected("series 1: its first image can no longer be read")
    return ThickSeries(series, header[0], warnings)


def _thick_members(archive: Archive) -> tuple[list[Member], str]:
    """(members of the shallowest folder named ``1``, "folder 1/"), or (all members, "the input") when there is
    no such folder; a folder ``2/`` (the thin series) without a ``1/`` is an error."""
    folders: set[tuple[int, str, str]] = set()  # (depth, name, prefix) of every folder named 1 or 2
    for member in archive.members:
        parts = member.name.split("/")[:-1]
        for depth, part in enumerate(parts):
            if part in SERIES_FOLDERS:
                folders.add((depth, part, "/".join(parts[:depth + 1]) + "/"))
    ones = [f for f in folders if f[1] == SERIES_FOLDERS[0]]
    if ones:
        depth = min(f[0] for f in ones)
        shallowest = sorted(f[2] for f in ones if f[0] == depth)
        if len(shallowest) > 1:
            raise CaseRejected(f"the input holds {len(shallowest)} folders 1/; expected one case")
        return [m for m in archive.members if m.name.startswith(shallowest[0])], "folder 1/"
    if folders:
        raise CaseRejected("missing folder 1/ (the thick series): the input has a folder 2/ only")
    return list(archive.members), "the input"


class DicomFolder:
    """A folder of DICOM files read like a :class:`ctdiff.data.safezip.SafeZip` (regular files below it, by
    relative path, in sorted order), so folders and zips go through one reader."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        paths = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink()
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        self.members = tuple(Member(p.relative_to(self.root).as_posix(), i, p.stat().st_size, None)
                             for i, p in enumerate(paths))

    def read(self, member: Member) -> bytes:
        return (self.root / member.name).read_bytes()

    def read_head(self, member: Member, n_bytes: int) -> bytes:
        with open(self.root / member.name, "rb") as f:
            return f.read(n_bytes)

    def __enter__(self) -> DicomFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


Archive = SafeZip | DicomFolder


# --------------------------------------------------------------------------------------- zip layout
def _series_folders(zf: Archive) -> tuple[list[Member], list[Member]]:
    """Members under the shallowest sibling folders named ``1`` and ``2`` (at any depth, any files
    below them)."""
    labels_by_parent: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for member in zf.members:
        folders = member.name.split("/")[:-1]
        for depth, part in enumerate(folders):
            if part in SERIES_FOLDERS:
                labels_by_parent[tuple(folders[:depth])].add(part)
    pairs = [parent for parent, labels in labels_by_parent.items() if labels.issuperset(SERIES_FOLDERS)]
    if not pairs:
        found = set().union(*labels_by_parent.values())
        raise CaseRejected(_missing_folder_reason(zf, found))
    depth = min(len(p) for p in pairs)
    shallowest = [p for p in pairs if len(p) == depth]
    if len(shallowest) > 1:
        raise CaseRejected(f"the zip holds {len(shallowest)} pairs of folders 1/ and 2/; expected one case per zip")
    prefixes = ["/".join((*shallowest[0], label)) + "/" for label in SERIES_FOLDERS]
    members1, members2 = ([m for m in zf.members if m.name.startswith(p)] for p in prefixes)
    return members1, members2


def _missing_folder_reason(zf: Archive, found: set[str]) -> str:
    if not any(_looks_like_dicom(zf.read_head(m, 132)) for m in zf.members):
        return "no DICOM files in the zip"
    if found == {"1"}:
        return "missing folder 2/ (the thin series); expected case_XXX/1/ and case_XXX/2/"
    if found == {"2"}:
        return "missing folder 1/ (the thick series); expected case_XXX/1/ and case_XXX/2/"
    if found:
        return "folders 1/ and 2/ are not side by side; expected case_XXX/1/ and case_XXX/2/"
    return "no folders named 1/ and 2/; expected case_XXX/1/ and case_XXX/2/"


def _looks_like_dicom(head: bytes) -> bool:
    """Part-10 preamble, or a raw dataset starting with a file-meta (0002) or identifying (0008)
    group tag in either byte order: cheap, and it keeps jpg/txt/xml files away from the parser."""
    if head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


# ------------------------------------------------------------------------------------------ headers
@dataclass
class _Image:
    """What the reader needs from one image (a single-frame file, or one frame of a multi-frame
    object), parsed without its pixel data."""

    member: Member
    frame: int  # 0-based frame in the member's pixel data (0 for single-frame files)
    pixel_offset: int | None  # file offset of the (7FE0,0010) element; None: decode with pydicom
    encoding: tuple[bool, bool]  # (implicit VR, little endian) of the dataset
    series_uid: str
    series_number: int
    iop: np.ndarray  # (6,) ImageOrientationPatient
    ipp: np.ndarray  # (3,) ImagePositionPatient, mm
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # DICOM order: (between rows = sy, between columns = sx), mm
    thickness_mm: float | None
    frame_of_reference_uid: str
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool
    padding: tuple[int, int] | None  # stored values [lo, hi] that mark padding


def _parse_member(zf: Archive, member: Member) -> list[_Image | str]:
    """The member's images (one per frame), each replaced by the kind of thing it is when it is not a
    usable image."""
    header = _read_header(zf, member)
    if header is None:
        return [_NOT_DICOM]
    ds, pixel_offset = header
    try:
        return _images_from_header(member, ds, pixel_offset)
    except Exception:  # a damaged header can fail in any of pydicom's value converters
        return ["image without geometry"]


def _read_header(zf: Archive, member: Member) -> tuple[Dataset, int | None] | None:
    """(dataset without pixel data, file offset of the PixelData element), or None if not DICOM.

    The offset is ``_NO_PIXEL_DATA`` for objects without pixel data, and None where only a full
    pydicom parse can find the pixels (a deflated dataset; the returned dataset is then complete).

    Reads the member's head only, growing it until the parse reaches the PixelData tag or the end.
    """
    n_bytes = HEAD_BYTES
    while True:
        head = zf.read_head(member, n_bytes)
        if not _looks_like_dicom(head):
            return None
        whole = len(head) < n_bytes
        buffer = io.BytesIO(head)
        try:
            ds = pydicom.dcmread(buffer, force=True, stop_before_pixels=True)
        except Exception:  # pydicom raises many exception types on damaged or cut-off input
            ds = None
        if ds is not None and _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
            # The dataset itself is deflated: offsets in the head mean nothing; parse it whole.
            full = pydicom.dcmread(io.BytesIO(zf.read(member)), force=True)
            return (full, None) if "PixelData" in full else (full, _NO_PIXEL_DATA)
        if ds is not None:
            at = buffer.tell()
            if head[at:at + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
                return ds, at
            if whole:
                return ds, _NO_PIXEL_DATA
        elif whole:
            return None
        n_bytes *= 4


def _images_from_header(member: Member, ds: Dataset, pixel_offset: int | None) -> list[_Image | str]:
    """One image for a classic file, one per frame for a multi-frame object; a kind where ignored."""
    if pixel_offset == _NO_PIXEL_DATA:
        return ["non-image object"]
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return ["colour image"]
    if _is_localizer(ds.get("ImageType")):
        return ["localizer"]
    if _int_or(ds.get("NumberOfFrames"), 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _frame_images(member, ds, pixel_offset)
    return [_image_from_header(member, ds, ds, pixel_offset, frame=0)]


def _frame_images(member: Member, ds: Dataset, pixel_offset: int | None) -> list[_Image | str]:
    """One image per frame of an enhanced (multi-frame) object.

    Each frame needs its own position in the Per-frame Functional Groups Sequence: a position shared
    by all frames (or only at the top level) is a series over time or a screen capture, not a stack
    of slices, and would otherwise pass as one slice stored many times.
    """
    n_frames = _int_or(ds.get("NumberOfFrames"), 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    if len(per_frame) != n_frames or not all(_group_has(item, "ImagePositionPatient") for item in per_frame):
        return [_NO_FRAME_POSITIONS]
    out: list[_Image | str] = []
    for frame, item in enumerate(per_frame):
        attributes = _FrameAttributes(ds, (item, shared))
        is_localizer = _is_localizer(attributes.get("FrameType"))
        out.append("localizer" if is_localizer else _image_from_header(member, ds, attributes, pixel_offset, frame))
    return out


@dataclass
class _FrameAttributes:
    """Dataset-like ``get`` for one frame of an enhanced object: its per-frame functional groups,
    then the shared ones, then the top level (the standard lets a group be either per frame or
    shared; top-level values are what converters and older writers leave)."""

    top: Dataset
    groups: tuple[Dataset, Dataset]  # (this frame's item, the shared item)

    def get(self, keyword: str, default: object = None) -> object:
        for group in self.groups:
            if _group_has(group, keyword):
                return group[_FRAME_GROUPS[keyword]][0].get(keyword)
        return self.top.get(keyword, default)


def _group_has(group: Dataset, keyword: str) -> bool:
    """True when ``group`` (a functional groups item) holds ``keyword`` in its sequence for it."""
    sequence = _FRAME_GROUPS.get(keyword)
    items = group.get(sequence) if sequence else None
    return bool(items) and keyword in items[0]


def _is_localizer(image_type: object) -> bool:
    """ImageType or FrameType says LOCALIZER (a scout, not part of the volume)."""
    values = [] if image_type is None else [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _image_from_header(member: Member, ds: Dataset, attributes: Dataset | _FrameAttributes,
                       pixel_offset: int | None, frame: int) -> _Image | str:
    """The image of ``frame``: per-image attributes from ``attributes`` (the dataset itself, or a
    frame's functional groups), per-object ones (pixel format, UIDs) from ``ds``."""
    iop = _floats(attributes, "ImageOrientationPatient", 6)
    ipp = _floats(attributes, "ImagePositionPatient", 3)
    spacing = _floats(attributes, "PixelSpacing", 2)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if iop is None or ipp is None or spacing is None or min(spacing) <= 0 or rows < 1 or cols < 1:
        return "image without geometry"
    if np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
        return "image without geometry"  # degenerate orientation
    bits_allocated = int(ds.get("BitsAllocated", 16))
    if bits_allocated not in (8, 16, 32):
        return "image with unsupported pixel format"
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    thickness = _floats(attributes, "SliceThickness", 1)
    slope = _floats(attributes, "RescaleSlope", 1)
    intercept = _floats(attributes, "RescaleIntercept", 1)
    return _Image(
        member=member,
        frame=frame,
        pixel_offset=pixel_offset,
        encoding=_encoding(ds),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=_int_or(ds.get("SeriesNumber"), 0),
        iop=iop,
        ipp=ipp,
        rows=rows,
        cols=cols,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        thickness_mm=float(thickness[0]) if thickness is not None and thickness[0] > 0 else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        # A zero slope is a broken header, not a request to blank the image.
        slope=float(slope[0]) if slope is not None and slope[0] != 0 else 1.0,
        intercept=float(intercept[0]) if intercept is not None else 0.0,
        bits_allocated=bits_allocated,
        bits_stored=min(bits_stored, bits_allocated),
        high_bit=int(ds.get("HighBit", bits_stored - 1)),
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
        padding=_padding_range(ds),
    )


def _floats(ds: Dataset | _FrameAttributes, keyword: str, n: int) -> np.ndarray | None:
    """``n`` numbers of a DS/FD element as float64, or None when missing or malformed."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        values = np.array([float(v) for v in (value if _is_multi(value) else [value])])
    except (TypeError, ValueError):
        return None
    return values if values.size == n and np.isfinite(values).all() else None


def _is_multi(value: object) -> bool:
    return isinstance(value, (list, tuple, MultiValue))


def _int_or(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Stored values [lo, hi] that mark padding (pydicom resolves their US/SS VR from
    PixelRepresentation)."""
    if ds.get("PixelPaddingValue") is None:
        return None
    value = _int_or(ds.PixelPaddingValue, 0)
    limit = _int_or(ds.get("PixelPaddingRangeLimit"), value)
    return min(value, limit), max(value, limit)


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _encoding(ds: Dataset) -> tuple[bool, bool]:
    implicit, little = ds.original_encoding
    return (bool(implicit) if implicit is not None else True, bool(little) if little is not None else True)


# ---------------------------------------------------------------------------------- series choice
@dataclass
class _Stack:
    """One candidate series: images of one SeriesInstanceUID and one orientation."""

    images: list[_Image]
    n_orientations: int  # orientations in its SeriesInstanceUID beyond ignorable scouts

    @property
    def normal(self) -> np.ndarray:
        return _axes(self.images[0].iop)[2]

    @property
    def is_axial(self) -> bool:
        return bool(np.argmax(np.abs(self.normal)) == 2)


def _read_series(zf: Archive, members: list[Member], label: str, *, min_slices: int, allow_gaps: bool,
                 warnings: list[str], where: str | None = None) -> tuple[Series, Member]:
    """The chosen series of ``members`` (and the member of its first image); ``label`` names it in messages
    ("series 1"), ``where`` the place it was looked for (default "folder 1/")."""
    name = f"series {label}"
    where = where or f"folder {label}/"
    images: list[_Image] = []
    ignored: Counter[str] = Counter()
    for member in members:
        if member.name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
            continue
        for parsed in _parse_member(zf, member):
            if isinstance(parsed, str):
                ignored[parsed] += 1
            else:
                images.append(parsed)
    if not images and not (set(ignored) - {_NOT_DICOM}):
        raise CaseRejected(f"{name}: no DICOM files in {where}")
    stack = _pick_stack(images, ignored, name, where, warnings)
    series = _assemble(zf, stack, name, min_slices=min_slices, allow_gaps=allow_gaps, warnings=warnings)
    return series, min(stack, key=lambda im: float(im.ipp @ _axes(im.iop)[2])).member


def _pick_stack(images: list[_Image], ignored: Counter[str], name: str, where: str,
                warnings: list[str]) -> list[_Image]:
    """The axial image series with the most slices (see the module notes for what is ignored)."""
    by_uid: dict[str, list[_Image]] = defaultdict(list)
    for image in images:
        by_uid[image.series_uid].append(image)
    stacks: list[_Stack] = []
    for group in by_uid.values():
        clusters = _orientation_clusters(group)
        scouts = len(group) - len(clusters[0])
        scouts_only = scouts <= max(1.0, SCOUT_FRACTION * len(group))
        kept = clusters[:1] if scouts_only else clusters
        ignored["localizer"] += scouts if scouts_only else 0
        for cluster in kept:
            if len(cluster) < 2:
                ignored["single-image series"] += len(cluster)
            else:
                stacks.append(_Stack(cluster, 1 if scouts_only else len(clusters)))
    axial = sorted((s for s in stacks if s.is_axial),
                   key=lambda s: (-len(s.images), s.images[0].series_number, s.images[0].series_uid))
    if not axial:
        found = f"{len(stacks)} non-axial series" if stacks else "no image series"
        skipped = ", ".join(f"{n} {kind}(s)" for kind in _IGNORED_KINDS if (n := ignored[kind]))
        raise CaseRejected(f"{name}: no axial CT image series in {where} (found {found}"
                           f"{'; ignored ' + skipped if skipped else ''})")
    chosen = axial[0]
    if len(axial) > 1:
        sizes = ", ".join(str(len(s.images)) for s in axial)
        warnings.append(f"{name}: {where} holds {len(axial)} axial image series ({sizes} slices); "
                        f"using the first with the most slices")
    if chosen.n_orientations > 1:
        raise CaseRejected(f"{name}: its image series mixes {chosen.n_orientations} slice orientations "
                           f"(ImageOrientationPatient)")
    return chosen.images


def _orientation_clusters(images: list[_Image]) -> list[list[_Image]]:
    """Images grouped by orientation (within ORIENTATION_TOL), largest group first."""
    clusters: list[list[_Image]] = []
    for image in images:
        for cluster in clusters:
            if np.abs(cluster[0].iop - image.iop).max() <= ORIENTATION_TOL:
                cluster.append(image)
                break
        else:
            clusters.append([image])
    return sorted(clusters, key=len, reverse=True)


def _axes(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal (row, col, normal) from ImageOrientationPatient (6-digit strings are rarely exact)."""
    row = iop[:3] / np.linalg.norm(iop[:3])
    col = iop[3:] - (iop[3:] @ row) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


# ------------------------------------------------------------------------------------ the volume
def _assemble(zf: Archive, stack: list[_Image], name: str, *, min_slices: int, allow_gaps: bool,
              warnings: list[str]) -> Series:
    """Check, sort, decode and place the slices of one chosen stack."""
    first = stack[0]
    _require_same(stack, lambda im: f"{im.rows} x {im.cols}", name, "size (Rows x Columns)")
    _require_same(stack, lambda im: " x ".join(_mm(v) for v in im.pixel_spacing) + " mm", name, "pixel spacing")
    row, col, normal = _axes(first.iop)
    sy, sx = first.pixel_spacing

    ipp = np.array([im.ipp for im in stack])  # (N, 3)
    order = np.argsort(ipp @ normal, kind="stable")
    stack, ipp = [stack[i] for i in order], ipp[order]
    along = ipp @ normal
    is_new = np.r_[True, np.diff(along) > DUPLICATE_TOL_MM]  # first image at each position
    positions = along[is_new] - along[0]
    if len(positions) < min_slices:
        raise CaseRejected(f"{name} has only {len(positions)} slices (minimum {min_slices}, "
                           f"preprocess.min_slices)")
    sz, uniform = _slice_spacing(positions, name, allow_gaps, warnings)

    hu = np.empty((len(positions), first.rows, first.cols), np.float32)
    n_duplicates = _decode_stack(zf, stack, is_new, hu, name)
    if n_duplicates:
        warnings.append(f"{name}: dropped {n_duplicates} duplicate slice(s) (same position, same pixels)")

    # In-plane drift of each slice's corner relative to the first: gantry tilt (or a sheared stack).
    drift_mm = (ipp[is_new] - ipp[0]) @ np.stack([row, col], axis=1)  # (D, 2): along row, along col
    drift_px = drift_mm / (sx, sy)
    if np.abs(drift_px).max() > TILT_MIN_PX:
        for k in range(len(positions)):
            hu[k] = _shift_image(hu[k], dx=drift_px[k, 0], dy=drift_px[k, 1], fill=AIR_HU)
        tilt_deg = math.degrees(math.atan2(float(np.hypot(*drift_mm[-1])), float(positions[-1])))
        warnings.append(f"{name}: gantry tilt of {tilt_deg:.1f} deg; slices shifted in-plane onto an "
                        f"orthogonal grid")

    thicknesses = [im.thickness_mm for im, new in zip(stack, is_new) if new and im.thickness_mm is not None]
    thickness = float(np.median(thicknesses)) if thicknesses else None
    if thickness is not None and max(thicknesses) - min(thicknesses) > GAP_REL_TOL * thickness + GAP_ABS_TOL_MM:
        counts = Counter(_mm(t) for t in thicknesses)
        shown = ", ".join(f"{n} x {t} mm" for t, n in sorted(counts.items(), key=lambda item: float(item[0])))
        warnings.append(f"{name} mixes slice thicknesses ({shown}); its thickness is taken as their median, "
                        f"{_mm(thickness)} mm")
    series = Series(
        hu=hu,
        spacing_mm=(float(sx), float(sy), sz),
        origin_mm=tuple(float(v) for v in ipp[0]),
        direction=tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()),
        slice_positions_mm=sz * np.arange(len(positions)) if uniform else positions,
        acquired_positions_mm=positions,
        slice_thickness_mm=thickness,
        frame_of_reference_uid=next((im.frame_of_reference_uid for im in stack if im.frame_of_reference_uid), ""),
    )
    return series if uniform else series.resampled_uniform()


def _decode_stack(zf: Archive, stack: list[_Image], is_new: np.ndarray, hu: np.ndarray, name: str) -> int:
    """Decode the sorted ``stack`` into ``hu`` (D, H, W), the first image at each position into its
    slice; returns how many later images at a position (identical copies) were dropped.

    Images are decoded in storage order (file, then frame), not slice order, so each member is read
    once per pass even when the frames of a multi-frame object are stored out of order.
    """
    slice_of = np.cumsum(is_new) - 1  # (N,) slice of hu for each image of the stack
    storage_order = sorted(range(len(stack)), key=lambda n: (stack[n].member.index, stack[n].frame))
    pixels = _MemberPixels(zf, name)
    for n in (n for n in storage_order if is_new[n]):
        pixels.decode_into(stack[n], hu[slice_of[n]])
    duplicates = [n for n in storage_order if not is_new[n]]
    for n in duplicates:
        again = np.empty_like(hu[0])
        pixels.decode_into(stack[n], again)
        if not np.array_equal(again, hu[slice_of[n]]):
            raise CaseRejected(f"{name} has two different images at the position of slice {slice_of[n]}: "
                               f"two acquisitions in one series?")
    return len(duplicates)


def _require_same(stack: list[_Image], shown: Callable[[_Image], str], name: str, what: str) -> None:
    """Reject unless ``shown(image)`` (a value as printed in the reason) is the same for all."""
    values = Counter(shown(im) for im in stack)
    if len(values) > 1:
        raise CaseRejected(f"{name}: slices differ in {what} ({' and '.join(v for v, _ in values.most_common(2))})")


def _slice_spacing(positions: np.ndarray, name: str, allow_gaps: bool, warnings: list[str]) -> tuple[float, bool]:
    """(sz, uniform) of sorted slice ``positions`` (D,) mm; irregular steps reject or warn."""
    steps = np.diff(positions)
    median = float(np.median(steps))
    irregular = np.flatnonzero(np.abs(steps - median) > GAP_REL_TOL * median + GAP_ABS_TOL_MM)
    if irregular.size == 0:
        return float(positions[-1] / (len(positions) - 1)), True  # mean step: best for a uniform stack
    at = int(irregular[0])
    kind = "gap" if steps[at] > median else "step"
    what = (f"a {_mm(steps[at])} mm {kind} between slices {at} and {at + 1} (expected {_mm(median)} mm)"
            + (f" and {irregular.size - 1} more irregular step(s)" if irregular.size > 1 else ""))
    if not allow_gaps:
        raise IrregularSlices(f"{name} has {what}")
    warnings.append(f"{name} has {what}; slices linearly interpolated onto a uniform grid")
    return median, False


def _mm(value: float) -> str:
    """A length for a message: up to 3 decimals, at least one ("2.0", "0.625")."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


# -------------------------------------------------------------------------------------- pixel data
class _MemberPixels:
    """Decodes images of one series, keeping the last member read (its bytes, or for compressed data
    its parsed dataset): the frames of a multi-frame object then cost one read of the zip member and
    at most one parse, and memory stays at one copy of the member plus one frame."""

    def __init__(self, zf: Archive, name: str) -> None:
        self._zf, self._name = zf, name
        self._member: Member | None = None
        self._data = b""
        self._dataset: Dataset | None = None

    def decode_into(self, image: _Image, out: np.ndarray) -> None:
        """Decode one image into ``out`` (H, W) float32 as HU (see :func:`_to_hu`)."""
        if image.member is not self._member:
            self._member, self._data, self._dataset = image.member, self._zf.read(image.member), None
        stored = _native_pixels(self._data, image, self._name) if self._dataset is None else None
        if stored is None:
            if self._dataset is None:  # the parse holds the pixel data: drop the bytes, one copy is enough
                self._dataset, self._data = _full_dataset(self._data, image), b""
            stored = _pydicom_pixels(self._dataset, image, self._name)
        _to_hu(stored, image, out, self._name)


def _to_hu(stored: np.ndarray, image: _Image, out: np.ndarray, name: str) -> None:
    """Stored values (H, W) into ``out`` (H, W) float32 as HU: stored value * slope + intercept,
    padding pixels as air."""
    if stored.shape != out.shape:
        raise CaseRejected(f"{name}: a slice decodes to {stored.shape} pixels, its header says {out.shape}")
    stored = _clean_bits(stored, image)
    out[...] = stored
    if image.slope != 1.0:
        out *= np.float32(image.slope)
    if image.intercept != 0.0:
        out += np.float32(image.intercept)
    if image.padding is not None:
        lo, hi = image.padding
        out[(stored >= lo) & (stored <= hi)] = AIR_HU


def _native_pixels(data: bytes, image: _Image, name: str) -> np.ndarray | None:
    """Stored values (H, W) of uncompressed pixel data, without a copy; None when encapsulated."""
    at = image.pixel_offset
    if at is None:
        return None
    implicit, little = image.encoding
    order = "<" if little else ">"
    if implicit:
        length_format, start = "I", at + 8
    elif data[at + 4:at + 6] in _LONG_LENGTH_VRS:
        length_format, start = "I", at + 12
    else:
        length_format, start = "H", at + 8
    if len(data) < start:
        raise CaseRejected(f"{name}: a slice file is truncated inside its pixel data header")
    (length,) = struct.unpack_from(order + length_format, data, start - struct.calcsize(length_format))
    if length == 0xFFFFFFFF:
        return None  # encapsulated (compressed) frames
    n_pixels, itemsize = image.rows * image.cols, image.bits_allocated // 8
    end = (image.frame + 1) * n_pixels * itemsize  # frames are stored back to back
    if len(data) < start + end or length < end:
        raise CaseRejected(f"{name}: a slice has less pixel data than Rows x Columns needs (truncated file?)")
    dtype = np.dtype(f"{order}{'i' if image.signed else 'u'}{itemsize}")
    offset = start + image.frame * n_pixels * itemsize
    return np.frombuffer(data, dtype, count=n_pixels, offset=offset).reshape(image.rows, image.cols)


def _full_dataset(data: bytes, image: _Image) -> Dataset:
    """The whole dataset with its pixel data, with a transfer syntax pydicom's decoders can use."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID") is None:  # a raw dataset without file meta: say how it was encoded
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if image.encoding[0] else ExplicitVRLittleEndian
    return ds


def _pydicom_pixels(ds: Dataset, image: _Image, name: str) -> np.ndarray:
    """Stored values (H, W) of the image's frame through pydicom's decoders (compressed transfer
    syntaxes); only that frame is decoded."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        return np.asarray(pixel_array(ds, index=image.frame))
    except Exception as exc:  # decoder plugins raise many types; the reason says what to do
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        why = ("no decoder installed for it (install pylibjpeg with its plugins, or python-gdcm)"
               if not available else f"corrupt or unsupported data ({type(exc).__name__})")
        raise CaseRejected(f"{name}: cannot decode pixel data in {UID(syntax).name}: {why}") from None


def _clean_bits(stored: np.ndarray, image: _Image) -> np.ndarray:
    """Keep bits ``HighBit - BitsStored + 1 .. HighBit`` of each stored value and sign-extend
    signed data: the standard says the other bits are not part of the value (old files put overlays
    there)."""
    bits, shift = image.bits_stored, image.high_bit + 1 - image.bits_stored
    if shift == 0:
        if bits >= stored.dtype.itemsize * 8:
            return stored
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if image.signed else (0, (1 << bits) - 1)
        if stored.min() >= lo and stored.max() <= hi:
            return stored  # the usual case: nothing in the unused bits (a cheap test, no copy)
    # Two's-complement bit pattern of the allocated width, then the stored bits, then the sign.
    values = (stored.astype(np.int64) & ((1 << stored.dtype.itemsize * 8) - 1)) >> shift
    values &= (1 << bits) - 1
    if image.signed:
        values -= (values >> (bits - 1)) << bits
    return values


def _shift_image(img: np.ndarray, *, dx: float, dy: float, fill: float) -> np.ndarray:
    """``img`` (H, W) moved by (dx, dy) pixels: ``out[j, i] = img[j - dy, i - dx]``, bilinear,
    ``fill`` where the source lies outside."""
    return _shift_axis(_shift_axis(img, dy, 0, fill), dx, 1, fill)


def _shift_axis(img: np.ndarray, shift: float, axis: int, fill: float) -> np.ndarray:
    n = img.shape[axis]
    source = np.arange(n) - shift
    lower = np.floor(source).astype(int)
    weight = (source - lower).astype(np.float32)
    a = np.take(img, np.clip(lower, 0, n - 1), axis=axis)
    b = np.take(img, np.clip(lower + 1, 0, n - 1), axis=axis)
    shape = (n, 1) if axis == 0 else (1, n)
    out = a + (b - a) * weight.reshape(shape)
    # A border pixel whose source is off by rounding (shift 2.0000000004) is inside, not air.
    outside = ((source < -1e-3) | (source > n - 1 + 1e-3)).reshape(shape)
    return np.where(outside, np.float32(fill), out).astype(np.float32)


# ------------------------------------------------------------------------------------------ pairing
def _check_pair(series1: Series, series2: Series, warnings: list[str]) -> None:
    """Same frame of reference, overlapping extents; warn when series 1 is not the thicker one."""
    uid1, uid2 = series1.frame_of_reference_uid, series2.frame_of_reference_uid
    if uid1 and uid2 and uid1 != uid2:
        raise CaseRejected("series 1 and 2 have different frames of reference (FrameOfReferenceUID): "
                           "not one acquisition, so their coordinates cannot be compared")
    if not (uid1 and uid2):
        warnings.append("series 1 or 2 has no FrameOfReferenceUID; pairing checked by physical extent only")
    lo1, hi1 = series1.bounds_lps()
    lo2, hi2 = series2.bounds_lps()
    overlap = np.minimum(hi1, hi2) - np.maximum(lo1, lo2)
    if (overlap <= 0).any():
        axis = int(np.argmin(overlap))
        raise CaseRejected(
            f"series 1 and 2 do not overlap in space (along {'xyz'[axis]}: series 1 covers "
            f"{lo1[axis]:.1f}..{hi1[axis]:.1f} mm, series 2 {lo2[axis]:.1f}..{hi2[axis]:.1f} mm)")
    t1, t2 = series1.effective_thickness_mm, series2.effective_thickness_mm
    if t1 <= t2:
        warnings.append(f"series 1 ({_mm(t1)} mm) is not thicker than series 2 ({_mm(t2)} mm): are folders "
                        f"1/ and 2/ swapped? The task is thick-to-thin")


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while reading: they quote header values, which can
    be patient identifiers."""
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled
