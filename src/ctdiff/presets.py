"""Params presets: committed partial ``params.yaml`` trees under ``presets/`` (the real comparison, the
real-size phantoms), applied with DVC's own ``-S`` overrides so an experiment records exactly what changed:

    dvc exp run -n real-sd $(ctdiff preset real)

:func:`preset_overrides` turns a preset into ``-S dotted.key=value`` arguments (Hydra override syntax, no
spaces, so the shell splits them where it should); every key must exist in ``params.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ctdiff.params import ParamsError, leaves, params_from_dict, read_params_yaml, set_dotted

PRESETS_DIR = Path("presets")


def preset_path(name: str, presets_dir: Path = PRESETS_DIR) -> Path:
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir.glob("*.yaml")) if presets_dir.is_dir() else []
        raise ParamsError(f"no preset {name!r} in {presets_dir}/ (known: {', '.join(known) or 'none'}): run "
                          f"ctdiff from the repository root")
    return path


def hydra_value(value: Any) -> str:
    """A YAML value as Hydra's override grammar writes it: ``true``, ``1e-4``, ``[64,128,128]``, ``hf``."""
    if isinstance(value, str):
        if any(c in value for c in " ,[]{}'\"=") or value.lower() in ("true", "false", "null"):
            raise ParamsError(f"preset value {value!r} needs quoting, which a shell substitution cannot carry")
        return value
    return json.dumps(value, separators=(",", ":"))


def preset_overrides(name: str, params_file: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR
                     ) -> list[str]:
    """``["-S", "data.source=hf", ...]`` for preset ``name``, checked against ``params_file``: every key
    exists there, and the merged params are valid."""
    preset = yaml.safe_load(preset_path(name, presets_dir).read_text()) or {}
    try:
        merged = set_dotted(read_params_yaml(params_file), leaves(preset))
    except ParamsError as exc:  # "params.yaml: X is not a key"
        raise ParamsError(f"preset {name}: {str(exc).removeprefix('params.yaml: ')} of {params_file}") from None
    params_from_dict(merged)  # the preset must give valid params (names the bad key otherwise)
    return [arg for dotted, value in leaves(preset).items() for arg in ("-S", f"{dotted}={hydra_value(value)}")]
