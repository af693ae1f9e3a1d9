"""``ctdiff predict`` on real (tiny) phantom DICOM with a real trained model, through the command a user runs.

One workspace: phantom zips written by the project's own DICOM writer, preprocessed, a tiny model trained and
evaluated on them. Predict then reads a test case's zip (and the same series as a DICOM folder and as a
NIfTI), and its outputs are read back with SimpleITK and pydicom.
"""

import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from trainkit import tiny_params, write_vae
from vae_helpers import single_torch_thread  # noqa: F401  (fixture)

from ctdiff.data.fetch import fetch_data
from ctdiff.data.preprocess import preprocess
from ctdiff.data.processed import read_splits
from ctdiff.evaluation.calibrate import calibrate
from ctdiff.evaluation.evaluate import evaluate
from ctdiff.inference.calibration import load_calibration, write_calibration
from ctdiff.inference.predict import predict_inputs, thin_grid
from ctdiff.inference.sampling import load_trained_model
from ctdiff.metrics.uncertainty import Calibration, phase_edges
from ctdiff.params import params_from_dict, to_dict, with_overrides
from ctdiff.training.ldm import train
from ctdiff.training.slab import run_slab_stage

REPO = Path(__file__).resolve().parents[1]
DCIODVFY = shutil.which("dciodvfy")
# The CI script installs dicom3tools; elsewhere a machine without it skips only the validator's checks.
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None and not os.environ.get("CI"),
                                    reason="dciodvfy (Debian's dicom3tools) is not installed")


def workspace_params():
    # train_seed unlike seed: predict draws with train_seed, as evaluate does (a test would not see it if both were 0)
    return with_overrides(tiny_params(epochs=1, vae_freeze_epochs=1), {
        "seed": 0, "train_seed": 5, "device": "cpu",
        "data.phantom.n_cases": 5, "data.phantom.families.hilum.shape": [30, 32, 32],
        "data.phantom.families.hilum.pixel_mm": 8.0, "data.phantom.families.hilum.centre": "body",
        "preprocess.workers": 1, "preprocess.min_cases": 3,
        "train.sampling.steps": 2, "train.sampling.samples": 2, "evaluate.bspline_baseline": False})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict")
    params = workspace_params()
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    fetch_data(params, root / "data" / "raw")
    preprocess(params, root / "data" / "raw", root / "data" / "processed", progress=False)
    run_slab_stage(params, root / "data" / "processed", root / "models" / "slab", root / "data" / "slab", None,
                   progress=False)
    write_vae(root / "models" / "vae", params)
    train(params, root / "data" / "processed", root / "data" / "slab", root / "models" / "slab",
          root / "models" / "vae", root / "models" / "checkpoints", root / "dvclive" / "train", progress=False)
    evaluate(params, root / "data" / "processed", root / "data" / "slab", root / "models" / "vae",
             root / "models" / "checkpoints", root / "dvclive" / "evaluate", root / "data" / "predictions",
             progress=False)
    case_id = read_splits(root / "data" / "processed")["test"][0]
    zip_path = next((root / "data" / "raw").rglob(f"{case_id}.zip"))
    return root, params, case_id, zip_path


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "ctdiff.cli", "predict", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def series_file(zip_path: Path, folder: str) -> pydicom.Dataset:
    with zipfile.ZipFile(zip_path) as zf:
        name = sorted(n for n in zf.namelist() if f"/{folder}/" in n)[0]
        return pydicom.dcmread(zf.open(name))


def test_a_test_case_predicts_what_evaluate_scored_and_opens_as_one_dicom_series(ws, tmp_path):
    root, params, case_id, zip_path = ws
    model = load_trained_model(root / "models" / "vae", root / "models" / "checkpoints", torch.device("cpu"))
    assert model.sampling.samples == 2 and model.sampling.steps == 2  # the model carries how it samples
    out = tmp_path / "out"
    (outcome,) = predict_inputs([zip_path], out, model, params, params.train_seed, progress=False)
    assert not outcome.error and sorted(p.name for p in outcome.written) == [
        case_id, f"{case_id}.nii.gz", f"{case_id}_std.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in outcome.written)  # no temporaries

    # One sampling path: the same seed and params give evaluate's prediction, voxel for voxel, on its grid.
    ours = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
    evaluated = sitk.ReadImage(str(root / "data" / "predictions" / f"{case_id}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(evaluated))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(ours, get)(), getattr(evaluated, get)(), atol=1e-4)
    # The command a user runs draws with the same default seed (params train_seed) and the model's sampling;
    # --window-batch (latent windows per UNet call) is speed only: the same voxels.
    assert model.sampling.window_batch != 1 and model.latent_patch[0] < 30  # 30 slices: several latent windows
    result = run_cli(root, str(zip_path), "--out", str(tmp_path / "cli"), "--window-batch", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    # (another batch of windows sums in another order: a voxel may round to the next HU)
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / f"{case_id}.nii.gz"))).astype(int)
    differ = cli != sitk.GetArrayFromImage(evaluated)
    assert differ.mean() < 1e-3 and np.abs(cli - sitk.GetArrayFromImage(evaluated)).max() <= 1

    # The DICOM series: one series for SimpleITK, HU within 1 of the NIfTI, the thin grid's geometry.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out / case_id))
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(out / case_id))) == 1
    image = sitk.ReadImage(files)
    assert np.abs(sitk.GetArrayFromImage(image).astype(float) - sitk.GetArrayFromImage(ours)).max() <= 1
    np.testing.assert_allclose(image.GetSpacing(), ours.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), ours.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), ours.GetDirection(), atol=1e-5)

    # The header: a new series of the same patient and study, derived, naming the model.
    source = series_file(zip_path, "1")
    derived = [pydicom.dcmread(f) for f in files]
    first = derived[0]
    assert first.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in derived}) == len(derived)
    assert not {d.SOPInstanceUID for d in derived} & {source.SOPInstanceUID}
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "PatientBirthDate",
                    "AccessionNumber", "StudyDate"):
        assert first[keyword].value == source[keyword].value, keyword
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert float(first.SliceThickness) == pytest.approx(image.GetSpacing()[2]) == pytest.approx(1.0)
    assert "sd VAE scratch" in first.SeriesDescription and f"step {model.checkpoint['step']}" in first.SeriesDescription

    # The spread of the two draws: positive where the draws differ, on the same grid.
    spread = sitk.ReadImage(str(out / f"{case_id}_std.nii.gz"))
    assert spread.GetSize() == ours.GetSize() and sitk.GetArrayFromImage(spread).max() > 0


def test_the_calibrated_map_scales_the_spread_per_slab_phase_of_the_thick_series(ws, tmp_path):
    root, params, case_id, zip_path = ws
    models = tmp_path / "models"
    for name in ("vae", "checkpoints"):
        shutil.copytree(root / "models" / name, models / name)
    model = load_trained_model(models / "vae", models / "checkpoints", torch.device("cpu"))
    # The stage fits a scale per HU band x slab phase group on val, for this model.
    calibrate(params, root / "data" / "processed", root / "data" / "slab", models / "vae", models / "checkpoints",
              models / "calibration", progress=False)
    fitted = load_calibration(models / "calibration", model)
    assert fitted.phase_edges == pytest.approx(phase_edges(params.calibrate.slab_phase_bins)) != ()
    assert len(fitted.scales[0.95]) == (len(params.calibrate.bands_hu) + 1) * params.calibrate.slab_phase_bins

    # A calibration whose 95 % scale is 1 at slab centres, 2 a third of the way out, 4 midway (every band):
    # the written map over the raw spread says which phase predict gave each slice.
    marked = Calibration((), {0.9: (1.0, 2.0, 4.0), 0.95: (1.0, 2.0, 4.0)}, (), phase_edges(3))
    write_calibration(models / "calibration", marked, model, split="val")
    result = run_cli(root, str(zip_path), "--out", str(tmp_path / "cal"), "--models", str(models), "--quiet")
    assert result.returncode == 0, result.stderr
    (raw_outcome,) = predict_inputs([zip_path], tmp_path / "raw", model, params, params.train_seed, progress=False)
    std = sitk.ReadImage(str(tmp_path / "cal" / f"{case_id}_std.nii.gz"))
    assert "calibrated std" in std.GetMetaData("descrip")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / f"{case_id}_std.nii.gz")))
    scale = sitk.GetArrayFromImage(std) * 1.959964 / np.maximum(raw, 1.0)
    per_slice = scale.reshape(scale.shape[0], -1)
    np.testing.assert_allclose(per_slice, np.broadcast_to(per_slice[:, :1], per_slice.shape), rtol=1e-4)  # per slice

    # The phase from the thick series' own slice positions and the written thin grid (axial, 5 mm contiguous)
    with zipfile.ZipFile(zip_path) as zf:
        thick_z = sorted(float(pydicom.dcmread(zf.open(n)).ImagePositionPatient[2])
                         for n in zf.namelist() if "/1/" in n and not n.endswith("/"))
    thin_z = std.GetOrigin()[2] + np.arange(scale.shape[0]) * std.GetSpacing()[2]
    distance = np.min(np.abs(thin_z[:, None] - np.asarray(thick_z)[None, :]), axis=1) / np.median(np.diff(thick_z))
    expected = np.select([distance < 1 / 6 - 1e-6, distance < 1 / 3 - 1e-6], [1.0, 2.0], 4.0)
    np.testing.assert_allclose(per_slice[:, 0], expected, rtol=1e-4)
    assert set(expected) == {1.0, 2.0, 4.0}


def test_the_thin_grid_covers_the_slabs_at_the_training_spacing():
    thick = sitk.Image(32, 32, 6, sitk.sitkFloat32)
    thick.SetSpacing((0.7, 0.7, 5.0))
    thick.SetOrigin((-10.0, 20.0, 100.0))
    from ctdiff.data.grid import Grid

    grid = thin_grid(Grid.of_image(thick), 1.0)
    assert grid.shape == (30, 32, 32) and grid.spacing_mm == (0.7, 0.7, 1.0)
    assert grid.origin_mm == pytest.approx((-10.0, 20.0, 98.0))  # first slab: 97.5 .. 102.5 mm, centres from 98
    overlapping = thin_grid(Grid((10, 8, 8), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), Grid.of_image(thick).direction), 1.0)
    assert overlapping.shape[0] == 25 and overlapping.origin_mm[2] == pytest.approx(-0.75)


@needs_dciodvfy
def test_derived_and_phantom_series_pass_dciodvfy_with_no_errors(ws, tmp_path):
    root, params, case_id, zip_path = ws
    result = run_cli(root, str(zip_path), "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    derived = sorted((tmp_path / "out" / case_id).iterdir())
    with zipfile.ZipFile(zip_path) as zf:
        for folder in ("/1/", "/2/"):
            name = sorted(n for n in zf.namelist() if folder in n)[0]
            (tmp_path / Path(name).name).write_bytes(zf.read(name))
            derived.append(tmp_path / Path(name).name)
    for path in (derived[0], derived[-2], derived[-1]):
        report = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_a_dicom_folder_and_a_nifti_through_the_command_line(ws, tmp_path):
    root, params, case_id, zip_path = ws
    folder = tmp_path / "scan_dicom"
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if "/1/" in name:
                (folder / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
                (folder / Path(name).name).write_bytes(zf.read(name))
    thick = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(thick, str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "out"
    result = run_cli(root, str(folder), str(tmp_path / "scan.nii.gz"), "--out", str(out), "--samples", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "no spread to write" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["scan", "scan.nii.gz", "scan_dicom", "scan_dicom.nii.gz"]
    from_folder = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan_dicom.nii.gz")))
    from_nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan.nii.gz")))
    np.testing.assert_array_equal(from_folder, from_nifti)  # the same voxels and geometry, either way in
    # A NIfTI has no patient module: the derived series gets empty patient fields and fresh study UIDs.
    nifti_series = pydicom.dcmread(sorted((out / "scan").iterdir())[0])
    assert nifti_series.PatientName == ""
    assert nifti_series.StudyInstanceUID != series_file(zip_path, "1").StudyInstanceUID


def test_anonymize_drops_the_identifiers(ws, tmp_path):
    root, params, case_id, zip_path = ws
    result = run_cli(root, str(zip_path), "--out", str(tmp_path / "out"), "--anonymize", "--quiet")
    assert result.returncode == 0, result.stderr
    source = series_file(zip_path, "1")
    needles = [str(source[k].value) for k in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                                              "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate")]
    for path in (tmp_path / "out" / case_id).iterdir():
        data = path.read_bytes()
        assert not [n for n in needles if n.encode() in data], path.name
    first = pydicom.dcmread(sorted((tmp_path / "out" / case_id).iterdir())[0])
    assert first.PatientName == "" and first.PatientID == "" and "PatientBirthDate" in first


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_bad_inputs_get_one_line_each_and_leave_nothing_behind(ws, tmp_path):
    root, params, case_id, zip_path = ws
    localizer = series_file(zip_path, "1")
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    buf = tmp_path / "loc.dcm"
    localizer.save_as(buf)
    bad = {
        "only_localizer": write_zip(tmp_path / "only_localizer.zip", {"case/1/IM0.dcm": buf.read_bytes()}),
        "no_ct": write_zip(tmp_path / "no_ct.zip", {"case/1/readme.txt": b"not an image"}),
        "slip": write_zip(tmp_path / "slip.zip", {"../../evil.dcm": buf.read_bytes()}),
        "corrupt": tmp_path / "corrupt.zip",
        "nospacing": tmp_path / "nospacing.nii",
        "missing": tmp_path / "missing.zip",
    }
    bad["corrupt"].write_bytes(zip_path.read_bytes()[:2000])
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.diag([0.7, 0.7, 5.0, 1.0])), bad["nospacing"])
    header = bytearray(bad["nospacing"].read_bytes())
    header[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4]: no spacing (nibabel cannot write that)
    bad["nospacing"].write_bytes(bytes(header))
    out = tmp_path / "out"
    result = run_cli(root, *(str(p) for p in bad.values()), "--out", str(out), "--quiet")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(bad)
    for path, line in zip(bad.values(), lines):
        assert line.startswith(f"predict: {path}: "), line
    assert "no axial CT image series" in lines[0] and "localizer" in lines[0]
    assert "no DICOM files" in lines[1] or "no axial CT" in lines[1]
    assert "zip" in lines[2] and "unsafe" in lines[2]
    assert "unsafe or unreadable zip" in lines[3]
    assert "no voxel spacing" in lines[4]
    assert "no such file" in lines[5]
    assert not out.exists() or not list(out.iterdir())  # nothing half-written, no temporaries either


def test_no_trained_model_or_the_other_vae_fail_at_once(ws, tmp_path):
    root, params, case_id, zip_path = ws
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(root / "params.yaml", empty / "params.yaml")
    result = run_cli(empty, str(zip_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "no trained model: no best.pt or last.pt in models/checkpoints" in result.stderr
    assert not (tmp_path / "out").exists()
    # A MAISI VAE in the folder with a checkpoint trained on the SD one.
    other = tmp_path / "other"
    shutil.copytree(root / "models", other / "models")
    maisi = to_dict(params)
    maisi["vae"]["use_maisi"] = True
    (other / "params.yaml").write_text(yaml.safe_dump(maisi))
    shutil.rmtree(other / "models" / "vae")
    write_vae(other / "models" / "vae", params_from_dict(maisi))
    result = run_cli(other, str(zip_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "trained with the sd VAE" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_thick_series_unlike_the_training_data_is_predicted_with_a_warning(ws, tmp_path):
    root, params, case_id, zip_path = ws
    result = run_cli(root, str(zip_path), "--out", str(tmp_path / "out"), "--thickness-mm", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning: slice thickness 3 mm differs from the 5 mm the model was trained on" in result.stdout
    assert (tmp_path / "out" / f"{case_id}.nii.gz").is_file()
