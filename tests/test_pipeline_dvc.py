"""End-to-end: the real pipeline under real DVC in a temporary git repository (slow)."""

import json

import numpy as np
import pytest
from dvc_repo import DvcRepo

from ctdiff.data.grid import Grid

pytestmark = pytest.mark.slow

TINY_DATA = {
    "data.phantom.n_cases": 5,
    "data.phantom.families.hilum.shape": [30, 32, 32],
    "data.phantom.families.hilum.pixel_mm": 8.0,
    "preprocess.workers": 2,
    "preprocess.min_cases": 3,
}


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    repo = DvcRepo(tmp_path_factory.mktemp("pipeline"), TINY_DATA)
    repo.commit("tiny phantom params")
    repo.dvc("repro", "preprocess")
    return repo


def test_repro_preprocess_builds_the_processed_contract(data_repo):
    processed = data_repo.root / "data" / "processed"
    report = json.loads((processed / "report.json").read_text())
    splits = json.loads((processed / "splits.json").read_text())
    ok = [c["case_id"] for c in report["cases"] if c["status"] == "ok"]
    assert len(report["cases"]) == 5 and len(ok) == 5
    assert sorted(sum(splits.values(), [])) == sorted(ok)
    zips = sorted(p.stem for p in (data_repo.root / "data" / "raw").rglob("*.zip"))
    assert zips == sorted(ok)
    for case_id in ok:
        meta = json.loads((processed / case_id / "meta.json").read_text())
        assert meta["case_id"] == case_id and meta["category"] in ("APE", "non-APE")
        assert case_id in splits[meta["split"]]
        source = np.load(processed / case_id / "source.npy")
        target = np.load(processed / case_id / "target.npy")
        assert source.dtype == target.dtype == np.int16
        grid = Grid.from_meta(meta["grid"])
        assert source.shape == target.shape == grid.shape
        # The phantom's tissue labels came along, on the same grid, with their class names.
        labels = np.load(processed / case_id / "labels.npy")
        assert labels.dtype == np.uint8 and labels.shape == grid.shape
        assert meta["labels"]["classes"]["7"] == "artery" and sum(meta["labels"]["counts"].values()) == labels.size
        # Thick-to-thin: the source is a smoothed version of the same anatomy.
        assert np.corrcoef(source.ravel(), target.ravel())[0, 1] > 0.8


def test_noop_repro_reruns_nothing(data_repo):
    data_repo.commit("after first repro")
    out = data_repo.dvc("repro", "preprocess").stdout
    assert "didn't change, skipping" in out
    assert "Running stage" not in out


def test_param_change_reruns_only_what_depends_on_it(data_repo):
    data_repo.set_params({"preprocess.shape": [16, 32, 32]})
    out = data_repo.dvc("repro", "preprocess").stdout
    assert "Running stage 'preprocess'" in out
    assert "Running stage 'fetch_data'" not in out
    case_dir = next(p for p in (data_repo.root / "data" / "processed").iterdir() if p.is_dir())
    assert np.load(case_dir / "source.npy").shape == (16, 32, 32)
