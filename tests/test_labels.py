"""Phantom tissue labels: written beside the zips, carried by preprocess onto the common grid."""

import json
import shutil

import numpy as np
import pytest
from paramkit import merged_params, phantom_params

from ctdiff.data.fetch import fetch_data
from ctdiff.data.grid import Grid
from ctdiff.data.labels import labels_path, read_case_labels, write_case_labels
from ctdiff.data.phantom import TISSUE_CLASSES, Tissue, ape_case_numbers, make_case
from ctdiff.data.preprocess import preprocess

SEED = 0
# Overlapping thick slabs (4 mm apart, 5 mm thick) over 22 thin slices: preprocess crops series 2 to the
# slices series 1 covers, so the common grid is a strict sub-block of the label map's grid.
PHANTOM = {"n_cases": 3, "families": {"hilum": {"shape": [22, 40, 40], "pixel_mm": 1.6}}, "thick_spacing_mm": 4.0}


def params(**preprocess):
    return merged_params({"seed": SEED, "data": {"source": "phantom", "phantom": PHANTOM},
                             "preprocess": {"workers": 1, "min_cases": 1, **preprocess}})


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw_dir = tmp_path_factory.mktemp("labels") / "raw"
    fetch_data(params(), raw_dir)
    return raw_dir


def phantom_case(number):
    p = phantom_params(n_cases=3, shape=(22, 40, 40), pixel_mm=1.6, thick_spacing_mm=4.0)
    return make_case(number, p, SEED, ape=number in ape_case_numbers(p, SEED))


def test_fetch_writes_labels_outside_the_zips_on_the_thin_grid(raw):
    assert sorted(p.name for p in (raw / "labels").iterdir()) == [
        "case_001.nii.gz", "case_002.nii.gz", "case_003.nii.gz", "classes.json"]
    assert not list(raw.rglob("*.zip"))[0].is_relative_to(raw / "labels")
    case = phantom_case(1)
    stored = read_case_labels(raw, "case_001")
    np.testing.assert_array_equal(stored.labels, case.labels)
    assert stored.classes == TISSUE_CLASSES and stored.classes[int(Tissue.EMBOLUS)] == "embolus"
    assert stored.grid.shape == case.labels.shape
    np.testing.assert_allclose(stored.grid.origin_mm, case.thin_origin_mm, atol=1e-4)
    np.testing.assert_allclose(stored.grid.spacing_mm, case.thin_spacing_mm, atol=1e-6)


def test_labels_survive_preprocess_on_the_common_grid(raw, tmp_path):
    out = tmp_path / "processed"
    preprocess(params(), raw, out, progress=False)
    for number in (1, 2, 3):
        case = phantom_case(number)
        folder = out / case.case_id
        meta = json.loads((folder / "meta.json").read_text())
        labels = np.load(folder / "labels.npy")
        assert labels.dtype == np.uint8 and labels.shape == np.load(folder / "target.npy").shape
        # The same crop as target.npy: the common grid's first slice is thin slice k0 of the phantom.
        k0 = round((Grid.from_meta(meta["grid"]).origin_mm[2] - case.thin_origin_mm[2]) / case.thin_spacing_mm[2])
        assert 0 < labels.shape[0] < case.labels.shape[0]  # really cropped: the test checks the offset
        expected = case.labels[k0:k0 + labels.shape[0]]
        np.testing.assert_array_equal(labels, expected)
        ids, counts = np.unique(expected, return_counts=True)
        assert meta["labels"]["counts"] == {str(i): int(n) for i, n in zip(ids, counts)}
        assert meta["labels"]["classes"][str(int(Tissue.ARTERY))] == "artery"
        assert (int(Tissue.EMBOLUS) in ids) == (case.category == "APE")


def test_labels_follow_respacing_by_nearest_neighbour(raw, tmp_path):
    out = tmp_path / "processed"
    preprocess(params(spacing_mm=[3.2, 3.2, 1.0], shape=[16, 24, 24]), raw, out, progress=False)
    labels = np.load(out / "case_001" / "labels.npy")
    assert labels.shape == (16, 24, 24) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(TISSUE_CLASSES)  # nearest neighbour never blends two ids


def test_a_case_without_labels_has_none_and_no_error(raw, tmp_path):
    raw_copy = tmp_path / "raw"
    shutil.copytree(raw, raw_copy)
    labels_path(raw_copy, "case_002").unlink()
    out = tmp_path / "processed"
    report = preprocess(params(), raw_copy, out, progress=False)
    assert report["n_ok"] == 3
    assert not (out / "case_002" / "labels.npy").exists()
    assert "labels" not in json.loads((out / "case_002" / "meta.json").read_text())
    assert (out / "case_001" / "labels.npy").is_file()
    # Adding the map back is a change of input: the case is processed again and gains its labels.
    shutil.copy(labels_path(raw, "case_002"), labels_path(raw_copy, "case_002"))
    preprocess(params(), raw_copy, out, progress=False)
    assert (out / "case_002" / "labels.npy").is_file()


def test_a_label_map_on_the_wrong_grid_is_ignored_with_a_warning(raw, tmp_path):
    raw_copy = tmp_path / "raw"
    shutil.copytree(raw, raw_copy)
    other = read_case_labels(raw, "case_001")
    shorter = other.grid.subgrid((0, 0, 0), (other.grid.shape[0] - 2, *other.grid.shape[1:]))
    write_case_labels(raw_copy, "case_003", other.labels[:-2], shorter)
    out = tmp_path / "processed"
    report = preprocess(params(), raw_copy, out, progress=False)
    entry = next(c for c in report["cases"] if c["case_id"] == "case_003")
    assert entry["status"] == "ok" and any("label map ignored" in w for w in entry["warnings"])
    assert not (out / "case_003" / "labels.npy").exists()


def test_a_local_source_with_label_maps_brings_them_along(raw, tmp_path):
    """Real data with a segmentation: the same layout as the phantoms' (labels/ beside the category folders)."""
    source = tmp_path / "ape-data"
    shutil.copytree(raw, source)
    labels_path(source, "case_003").unlink()  # one case without a map
    raw_dir = tmp_path / "data" / "raw"
    fetch_data(merged_params({"data": {"source": "local", "local_dir": str(source)}}), raw_dir)
    assert sorted(p.name for p in (raw_dir / "labels").iterdir()) == ["case_001.nii.gz", "case_002.nii.gz",
                                                                       "classes.json"]
    out = tmp_path / "processed"
    preprocess(params(), raw_dir, out, progress=False)
    assert (out / "case_001" / "labels.npy").is_file() and not (out / "case_003" / "labels.npy").exists()
    # Without the class table the maps mean nothing: none is linked.
    (source / "labels" / "classes.json").unlink()
    fetch_data(merged_params({"data": {"source": "local", "local_dir": str(source)}}), raw_dir)
    assert not (raw_dir / "labels").exists()
