"""The committed presets: every key is a params.yaml key, the merged params are valid, and DVC's own override
parser (what ``dvc exp run -S`` runs) reads the printed overrides back to the same values."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from ctdiff.params import ParamsError, load_params
from ctdiff.presets import leaves, preset_overrides

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_applies_through_dvcs_own_override_parser(name, tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = preset_overrides(name, REPO / "params.yaml", REPO / "presets")
    overrides = args[1::2]
    assert args[::2] == ["-S"] * len(overrides) and all(" " not in o for o in overrides)
    apply_overrides(str(tmp_path / "params.yaml"), overrides)
    applied = leaves(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    for dotted, value in leaves(yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())).items():
        assert applied[dotted] == value, dotted
    load_params(tmp_path / "params.yaml")  # valid


def test_the_real_comparison_preset_is_the_released_weights_on_ape_data_with_maisis_windows():
    preset = leaves(yaml.safe_load((REPO / "presets" / "real.yaml").read_text()))
    assert preset["vae.pretrained"] is True and preset["data.source"] == "hf"
    assert preset["vae.maisi.tile"] == [320, 320, 160] and preset["vae.maisi.overlap"] == 0.4


def test_the_committed_params_are_the_offline_demo():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "phantom" and params.vae.pretrained is False


def test_an_unknown_preset_or_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ParamsError, match="no preset 'nope'.*known: .*real"):
        preset_overrides("nope", REPO / "params.yaml", REPO / "presets")
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ParamsError, match="train.epoch is not a key"):
        preset_overrides("bad", REPO / "params.yaml", tmp_path)


def test_the_command_prints_the_overrides(repo_root):
    out = subprocess.run([sys.executable, "-m", "ctdiff.cli", "preset", "real"], cwd=repo_root, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("-S data.source=hf ") and "-S vae.maisi.tile=[320,320,160]" in out
