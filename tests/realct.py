"""Real CT for the tests: the cropped dcm_qa_ct series in ``tests/fixtures/dcm_qa_ct`` (see its README.md) and what
the tests build from them.

- :func:`processed_real_case`: the real Philips thick/thin pair through ctdiff's own preprocess, as a processed case
  folder (``source.npy``, ``target.npy``, ``series1.npy``, ``meta.json``), for tests that need a real pair on disk.
- Faithful variants of real files (:func:`reencoded`, :func:`implicit_vr`, :func:`edited`, :func:`with_private_bytes`):
  the original headers, changed only in what each variant is about.
- :func:`trained_workspace`: a tiny model trained on phantoms (:mod:`trainkit`'s sizes), for ``ctdiff predict``.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import yaml
from paramkit import merged_params, repo_params
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from trainkit import tiny_params, write_vae

from ctdiff.data.fetch import fetch_data
from ctdiff.data.preprocess import preprocess
from ctdiff.params import Params, to_dict, with_overrides

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dcm_qa_ct"
PAIR_ZIP = FIXTURES / "philips_s21570.zip"  # S21570/1/ = S2010 (5 mm), S21570/2/ = S2020 (1 mm), 64 x 64 px
TILT_NEG_ZIP = FIXTURES / "philips_tilt_neg.zip"  # S21610/S2010, GantryDetectorTilt -18.5, 20 slices, 96 x 64 px
TILT_POS_ZIP = FIXTURES / "philips_tilt_pos.zip"  # S21610/S3010, GantryDetectorTilt +16.5, 20 slices, 96 x 64 px
TILT_NEG_DCM2NIIX = FIXTURES / "philips_tilt_neg_dcm2niix.nii.gz"  # dcm2niix's tilt-corrected TILT_NEG_ZIP
GE_ZIP = FIXTURES / "ge_head.zip"  # In/GE: 14 x 4 mm then 14 x 7 mm slices, tilt +18.5, padding -1500, 64 x 64 px
CASE_ID = "philips_s21570"

Files = list[tuple[str, bytes]]


def limits(**overrides) -> dict:
    """read_case / read_thick_series keyword arguments at the params.yaml defaults."""
    p = repo_params().preprocess
    return {"min_slices": p.min_slices, "allow_gaps": p.allow_gaps, "max_members": p.max_zip_members,
            "max_unzipped_bytes": int(p.max_unzipped_gb * 1024**3), **overrides}


def members(zip_path: Path, folder: str = "") -> Files:
    """(name, bytes) of the zip's files under ``folder`` (a path part such as ``"1"``), in name order."""
    with zipfile.ZipFile(zip_path) as zf:
        return [(name, zf.read(name)) for name in sorted(zf.namelist())
                if not folder or f"/{folder}/" in f"/{name}"]


def write_zip(path: Path, files: Files) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return path


def unzip(zip_path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(folder)
    return folder


def processed_real_case(tmp_dir: Path, **preprocess_params) -> Path:
    """The real Philips pair (S2010 -> S2020, cropped) run through ctdiff's own preprocess; returns the case folder.

    ``tmp_dir/raw/non-APE/philips_s21570.zip`` is the pair in the APE-data layout and ``tmp_dir/processed`` the stage's
    output; the case is the only one, so it is in the train split. ``preprocess_params`` override the preprocess
    group (workers 1, min_cases 1 and the one-case split are set here). Raises AssertionError if it is rejected.
    """
    raw = Path(tmp_dir) / "raw"
    write_zip(raw / "non-APE" / f"{CASE_ID}.zip", members(PAIR_ZIP))
    params = merged_params({"preprocess": {"workers": 1, "min_cases": 1,
                                              "split": {"train": 1.0, "val": 0.0, "test": 0.0},
                                              **preprocess_params}})
    report = preprocess(params, raw, Path(tmp_dir) / "processed", progress=False)
    (entry,) = report["cases"]
    assert entry["status"] == "ok", entry["reason"]
    return Path(tmp_dir) / "processed" / CASE_ID


def read_meta(case_dir: Path) -> dict:
    return json.loads((case_dir / "meta.json").read_text())


# ------------------------------------------------------------------------------------ faithful variants
def edited(files: Files, edit: Callable[[pydicom.Dataset], None]) -> Files:
    """Each file re-saved after ``edit(dataset)``, in its own transfer syntax, every other element as it was."""
    out = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        edit(ds)
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append((name, buf.getvalue()))
    return out


def implicit_vr(files: Files, part10: bool = True) -> Files:
    """The files in Implicit VR Little Endian: as Part-10 files (``part10``), or as bare datasets without
    preamble or file meta, as some archives keep them. Private elements lose their VR on the way, as they do
    when a PACS stores them implicitly."""
    out = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        if part10:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta, ds.preamble = FileMetaDataset(), None
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=part10)
        out.append((name, buf.getvalue()))
    return out


def reencoded(files: Files, syntax: str, tmp_dir: Path) -> Files:
    """The files' pixel data re-encoded by GDCM in ``syntax`` (a ``gdcm.TransferSyntax`` name, e.g.
    ``"JPEG2000Lossless"``); GDCM keeps the rest of the header. Needs python-gdcm (a project dependency)."""
    import gdcm

    src, dst = Path(tmp_dir) / "gdcm_in.dcm", Path(tmp_dir) / "gdcm_out.dcm"
    out = []
    for name, data in files:
        src.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read(), name
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change(), name
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write(), name
        out.append((name, dst.read_bytes()))
    return out


def private_element(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element as raw bytes, ``length`` as declared (default: the value's, even when
    odd, which the standard forbids)."""
    declared = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, element, vr, 0, declared) + value
    return struct.pack("<HH2sH", group, element, vr, declared) + value


def with_private_bytes(files: Files, raw: bytes) -> Files:
    """``raw`` (whole elements) inserted just before the PixelData element of each Explicit VR file: after the
    last private group of these Philips files (07A1), so tag order stays ascending."""
    out = []
    for name, data in files:
        at = data.rfind(b"\xe0\x7f\x10\x00")
        assert at > 0, name
        out.append((name, data[:at] + raw + data[at:]))
    return out


# ------------------------------------------------------------------------------------------- the model
def trained_workspace(root: Path) -> Params:
    """A tiny SD-arm model trained on 5 phantom cases under ``root`` (``models/vae``, ``models/checkpoints``,
    ``params.yaml``), as the predict tests build theirs; returns its params."""
    from ctdiff.training.ldm import train
    from ctdiff.training.slab import run_slab_stage

    params = with_overrides(tiny_params(epochs=1, vae_freeze_epochs=1), {
        "device": "cpu", "data.phantom.n_cases": 5, "data.phantom.families.hilum.shape": [30, 32, 32],
        "data.phantom.families.hilum.pixel_mm": 8.0, "data.phantom.families.hilum.centre": "body",
        "preprocess.workers": 1, "preprocess.min_cases": 3,
        "train.sampling.steps": 2, "train.sampling.samples": 2, "evaluate.bspline_baseline": False})
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    fetch_data(params, root / "data" / "raw")
    preprocess(params, root / "data" / "raw", root / "data" / "processed", progress=False)
    run_slab_stage(params, root / "data" / "processed", root / "models" / "slab", root / "data" / "slab", None,
                   progress=False)
    write_vae(root / "models" / "vae", params)
    train(params, root / "data" / "processed", root / "data" / "slab", root / "models" / "slab",
          root / "models" / "vae", root / "models" / "checkpoints", root / "dvclive" / "train", progress=False)
    return params
