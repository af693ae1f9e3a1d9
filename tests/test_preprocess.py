"""preprocess on real DICOM zips written by the tests (known truth, faults on purpose)."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from paramkit import merged_params
from pydicom.uid import generate_uid

from ctdiff.data.dicom_write import SeriesSpec, encode_series
from ctdiff.data.grid import AIR_HU, Grid
from ctdiff.data.preprocess import PreprocessError, assign_splits, preprocess
from ctdiff.params import SplitParams

PHI = {
    "patient_name": "Zhang^Wei^Secret",
    "patient_id": "PID-998877",
    "patient_birth_date": "19580214",
    "accession_number": "ACC-5551234",
    "institution_name": "Hospital of Nowhere",
    "referring_physician": "Dr^Who^Confidential",
}


def truth_volume(n_slices: int, rows: int = 20, cols: int = 24, seed: int = 0) -> np.ndarray:
    """A smooth HU field (air background, a body with a z gradient) on a 1 mm thin grid."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(n_slices), np.arange(rows), np.arange(cols), indexing="ij")
    body = ((y - rows / 2) / (rows / 2.6)) ** 2 + ((x - cols / 2) / (cols / 2.4)) ** 2 < 1
    hu = np.where(body, 40.0 + 8.0 * z + 30 * np.sin(x / 3.0), -1000.0)
    return hu + rng.normal(0, 1.0, hu.shape)


def write_case_zip(path: Path, thin_hu: np.ndarray, slab: int = 5, *, frame2: str | None = None,
                   drop_thin_slice: int | None = None, phi: dict | None = None) -> None:
    """Series 1 = slab averages of ``thin_hu`` (thick), series 2 = ``thin_hu`` (1 mm), APE-data layout."""
    n_thick = thin_hu.shape[0] // slab
    thick = thin_hu[: n_thick * slab].reshape(n_thick, slab, *thin_hu.shape[1:]).mean(axis=1)
    frame = generate_uid()
    study = generate_uid()
    common = dict(study_uid=study, origin_mm=(-12.0, -10.0, -100.0), **(phi or {}))
    thick_origin = (-12.0, -10.0, -100.0 + (slab - 1) / 2)
    spec1 = SeriesSpec(spacing_mm=(1.0, 1.0, float(slab)), frame_of_reference_uid=frame, series_number=1,
                       **{**common, "origin_mm": thick_origin})
    spec2 = SeriesSpec(spacing_mm=(1.0, 1.0, 1.0), frame_of_reference_uid=frame2 or frame, series_number=2,
                       unsigned=False, rescale_intercept=0.0, **common)
    files2 = encode_series(thin_hu, spec2)
    if drop_thin_slice is not None:
        del files2[drop_thin_slice]
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in encode_series(thick, spec1):
            zf.writestr(f"{path.stem}/1/{name}", data)
        for name, data in files2:
            zf.writestr(f"{path.stem}/2/{name}", data)


TRAIN_ONLY = {"train": 1.0, "val": 0.0, "test": 0.0}  # one case can fill it


def make_params(**preprocess):
    return merged_params({"preprocess": {"workers": 1, "min_cases": 1, "min_slices": 3, **preprocess}})


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "raw"
    for i in range(4):
        write_case_zip(raw / ("APE" if i % 2 else "non-APE") / f"case_{i:03d}.zip", truth_volume(20, seed=i))
    return raw


def test_processed_case_matches_the_truth(raw, tmp_path):
    out = tmp_path / "processed"
    report = preprocess(make_params(), raw, out, progress=False)
    assert report["n_ok"] == 4
    case = out / "case_000"
    meta = json.loads((case / "meta.json").read_text())
    target = np.load(case / "target.npy")
    source = np.load(case / "source.npy")
    truth = truth_volume(20, seed=0)
    np.testing.assert_array_equal(target, np.rint(truth).astype(np.int16))
    assert source.shape == target.shape == (20, 20, 24)
    grid = Grid.from_meta(meta["grid"])
    assert grid.spacing_mm == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(grid.origin_mm, (-12.0, -10.0, -100.0))
    # The thick slab centred at slice 2 equals the mean of thin slices 0..4 at its centre.
    np.testing.assert_allclose(source[2], truth[0:5].mean(axis=0), atol=1.0)
    assert meta["series1"]["spacing"][2] == 5.0 and meta["series2"]["n_slices"] == 20
    series1 = np.load(case / "series1.npy")  # as acquired: 4 slabs of 5 mm on their own grid
    assert series1.shape == tuple(meta["series1"]["grid"]["shape"]) == (4, 20, 24)
    np.testing.assert_allclose(series1[1], truth[5:10].mean(axis=0), atol=0.51)
    np.testing.assert_allclose(meta["series1"]["grid"]["origin"], (-12.0, -10.0, -98.0))
    assert meta["split"] in ("train", "val", "test")


def test_respacing_and_crop_pad(raw, tmp_path):
    out = tmp_path / "processed"
    preprocess(make_params(spacing_mm=[2.0, 2.0, 2.0], shape=[8, 16, 16]), raw, out, progress=False)
    target = np.load(out / "case_001" / "target.npy")
    grid = Grid.from_meta(json.loads((out / "case_001" / "meta.json").read_text())["grid"])
    assert target.shape == grid.shape == (8, 16, 16)
    assert grid.spacing_mm == (2.0, 2.0, 2.0)
    assert (target[:, 0, :] == AIR_HU).all()  # padded rows are air


def test_bad_cases_are_reported_and_do_not_stop_the_others(raw, tmp_path):
    write_case_zip(raw / "APE" / "case_100.zip", truth_volume(20), frame2=generate_uid())
    write_case_zip(raw / "APE" / "case_101.zip", truth_volume(20), drop_thin_slice=9)
    (raw / "APE" / "case_102.zip").write_bytes(b"PK\x03\x04 truncated")
    with zipfile.ZipFile(raw / "non-APE" / "case_103.zip", "w") as zf:
        zf.writestr("case_103/1/notes.txt", "no images here")
        zf.writestr("case_103/2/notes.txt", "no images here")
    out = tmp_path / "processed"
    report = preprocess(make_params(workers=2), raw, out, progress=False)
    by_id = {c["case_id"]: c for c in report["cases"]}
    assert report["n_ok"] == 4 and report["n_rejected"] == 4
    for case_id in ("case_100", "case_101", "case_102", "case_103"):
        assert by_id[case_id]["status"] == "rejected" and by_id[case_id]["reason"]
        assert not (out / case_id).exists()
    assert "frame" in by_id["case_100"]["reason"].lower()
    assert "gap" in by_id["case_101"]["reason"].lower()
    assert set(json.loads((out / "report.json").read_text())["cases"][0]) == {
        "case_id", "category", "status", "reason", "warnings"}


def test_gap_accepted_with_a_warning_when_allowed(raw, tmp_path):
    write_case_zip(raw / "APE" / "case_101.zip", truth_volume(20), drop_thin_slice=9)
    out = tmp_path / "processed"
    report = preprocess(make_params(allow_gaps=True), raw, out, progress=False)
    entry = next(c for c in report["cases"] if c["case_id"] == "case_101")
    assert entry["status"] == "ok" and entry["warnings"]


def test_too_few_usable_cases_fails_after_writing_the_report(tmp_path):
    raw = tmp_path / "raw"
    write_case_zip(raw / "APE" / "case_000.zip", truth_volume(20))
    (raw / "APE" / "case_001.zip").write_bytes(b"not a zip")
    out = tmp_path / "processed"
    with pytest.raises(PreprocessError, match="only 1 usable case"):
        preprocess(make_params(min_cases=2, split=TRAIN_ONLY), raw, out, progress=False)
    assert json.loads((out / "report.json").read_text())["n_rejected"] == 1


def test_no_patient_identifier_reaches_processed_data(tmp_path):
    raw = tmp_path / "raw"
    write_case_zip(raw / "APE" / "case_007.zip", truth_volume(20), phi=PHI)
    out = tmp_path / "processed"
    preprocess(make_params(split=TRAIN_ONLY), raw, out, progress=False)
    with zipfile.ZipFile(raw / "APE" / "case_007.zip") as zf:
        import pydicom

        ds = pydicom.dcmread(zf.open(zf.namelist()[0]))
        uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID}
    needles = [v for v in PHI.values()] + ["Zhang", "Secret", "998877", "5551234", *uids]
    for path in out.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in blob, f"{needle!r} found in {path.relative_to(out)}"


def test_rerun_after_a_kill_redoes_only_what_is_missing(raw, tmp_path):
    out = tmp_path / "processed"
    preprocess(make_params(), raw, out, progress=False)
    before = (out / "case_002" / "source.npy").stat().st_mtime_ns
    # What a kill mid-run leaves: one case never written, a temporary folder of another half written.
    import shutil

    shutil.rmtree(out / "case_001")
    (out / ".case_003.abc.tmp").mkdir()
    (out / ".case_003.abc.tmp" / "source.npy").write_bytes(b"half")
    report = preprocess(make_params(), raw, out, progress=False)
    assert report["n_ok"] == 4
    assert (out / "case_001" / "target.npy").is_file()
    assert not (out / ".case_003.abc.tmp").exists()
    assert (out / "case_002" / "source.npy").stat().st_mtime_ns == before  # reused, not redone
    # A params change that shapes the arrays invalidates every case.
    preprocess(make_params(shape=[16, 20, 24]), raw, out, progress=False)
    assert np.load(out / "case_002" / "source.npy").shape == (16, 20, 24)


def test_splits_are_patient_level_stratified_and_deterministic():
    cases = [(f"case_{i:03d}", "APE" if i < 10 else "non-APE") for i in range(20)]
    fractions = SplitParams(train=0.6, val=0.2, test=0.2)
    splits = assign_splits(cases, fractions, seed=3)
    assert splits == assign_splits(list(reversed(cases)), fractions, seed=3)
    assert splits != assign_splits(cases, fractions, seed=4)
    all_ids = sum(splits.values(), [])
    assert sorted(all_ids) == sorted(c for c, _ in cases) and len(set(all_ids)) == 20
    for name, n in (("train", 6), ("val", 2), ("test", 2)):
        assert sum(1 for c in splits[name] if int(c[-3:]) < 10) == n  # per category


def test_every_split_with_a_share_gets_a_case_even_when_the_per_category_cut_leaves_one_empty():
    """3 APE + 2 non-APE at 0.6 / 0.2 / 0.2: each category's spare case went to train or val, leaving no
    test case; one moves over from the split furthest beyond its share."""
    cases = [("case_001", "APE"), ("case_002", "APE"), ("case_003", "APE"), ("case_004", "non-APE"),
             ("case_005", "non-APE")]
    fractions = SplitParams(train=0.6, val=0.2, test=0.2)
    for seed in range(5):
        splits = assign_splits(cases, fractions, seed=seed)
        assert all(splits[name] for name in ("train", "val", "test")), splits
        assert sorted(sum(splits.values(), [])) == [c for c, _ in cases]
        assert len(splits["train"]) == 3
    # a split with no share stays empty
    assert assign_splits(cases, SplitParams(train=0.8, val=0.2, test=0.0), seed=0)["test"] == []


def test_too_few_cases_for_the_splits_fail_at_once_naming_fractions_and_counts(tmp_path):
    with pytest.raises(PreprocessError, match=r"2 case\(s\) cannot fill the 3 splits .*train 0.6, val 0.2, test 0.2"):
        assign_splits([("a", "APE"), ("b", "non-APE")], SplitParams(train=0.6, val=0.2, test=0.2), seed=0)
    raw = tmp_path / "raw" / "APE"
    raw.mkdir(parents=True)
    for name in ("case_001", "case_002"):
        (raw / f"{name}.zip").write_bytes(b"not read: the stage stops before opening any zip")
    with pytest.raises(PreprocessError, match="cannot fill the 3 splits"):
        preprocess(merged_params({}), tmp_path / "raw", tmp_path / "processed", progress=False)
    assert not (tmp_path / "processed").exists()
