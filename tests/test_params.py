import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from paramkit import merged_params, raw_params

import ctdiff.params as params_module
from ctdiff.device import pick_device
from ctdiff.params import Params, ParamsError, load_params, params_from_dict, to_dict, with_overrides

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_parses(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "phantom"


def test_round_trip_through_dict(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params_from_dict(to_dict(params)) == params
    assert with_overrides(params, {"train.epochs": 300}).train.epochs == 300
    with pytest.raises(ParamsError, match="train.epoch is not a key"):
        with_overrides(params, {"train.epoch": 3})


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"data": {"sourse": "phantom"}}, "unknown key(s) ['sourse'] in data"),
        ({"data": {"source": "s3"}}, "data.source must be one of"),
        ({"data": {"phantom": {"n_cases": "many"}}}, "data.phantom.n_cases must be an integer"),
        ({"data": {"phantom": {"families": {"hilum": {"shape": [4, 4]}}}}},
         "data.phantom.families.hilum.shape must be a list of 3 values"),
        ({"preprocess": {"allow_gaps": "yes"}}, "preprocess.allow_gaps must be true or false"),
        ({"preprocess": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}}, "must sum to 1"),
        ({"preprocess": {"spacing_mm": [1.0, 1.0]}}, "preprocess.spacing_mm must be [] or [sx, sy, sz]"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"data": {"source": "local"}}, "data.local_dir must name a folder"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ParamsError) as exc:
        merged_params(raw)
    assert needle in str(exc.value)


def test_float_written_without_dot_is_accepted(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params({"preprocess.max_unzipped_gb": "2e1"})))
    assert load_params(path).preprocess.max_unzipped_gb == 20.0


def test_missing_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="repository root"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("stage", sorted(p.stem for p in (REPO / "stages").glob("*.py")))
def test_every_stage_reports_a_bad_params_file_in_one_line(tmp_path, stage):
    raw = raw_params()
    raw["vae"]["bogus_knob"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"{stage}: ") and "bogus_knob" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="device=cuda"):
            pick_device("cuda")


def test_params_yaml_is_the_one_source_of_defaults(repo_root, tmp_path):
    """No params dataclass carries a default of its own (two sources would drift apart: they did, seven of them),
    so params.yaml names every knob (`dvc exp run -S key=value` overrides only keys the file has) and a file
    without one is an error naming it, never a silent fallback."""
    classes = [cls for cls in vars(params_module).values()
               if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == params_module.__name__]
    with_defaults = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_defaults == []
    raw = raw_params()
    del raw["train"]["sampling"]["steps"]
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['train.sampling.steps'\]"):
        params_from_dict(raw)
