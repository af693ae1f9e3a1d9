"""Where a model's calibration lives and whose it is: ``models/calibration/calibration.json``.

The calibrate stage (:mod:`ctdiff.evaluation.calibrate`) fits it; evaluate and ``ctdiff predict`` read it with
:func:`load_calibration`, which refuses one fitted for another model or other sampling settings (the spread's
scale depends on both).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ctdiff.inference.sampling import TrainedModel
from ctdiff.io import atomic_dir, atomic_write_json, digest
from ctdiff.metrics.uncertainty import Calibration

CALIBRATION_JSON = "calibration.json"


def model_identity(model: TrainedModel) -> str:
    """What a calibration holds for: the checkpoint (file, step) and how it is sampled (as now set: a model sampled
    with other steps or draws has another spread) and projected."""
    sampling = {k: v for k, v in dataclasses.asdict(model.sampling).items() if k != "window_batch"}  # speed only
    return digest({"checkpoint": model.checkpoint, "sampling": sampling, "profile": model.card["slab_profile"]})


def write_calibration(out_dir: Path, calibration: Calibration | None, model: TrainedModel, **extra: Any) -> None:
    """``out_dir/calibration.json`` (None: no scales, ``extra`` says why), the folder swapped in whole."""
    scales = calibration.to_json() if calibration is not None else {}
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / CALIBRATION_JSON, {**scales, "model": model_identity(model), **extra})


def load_calibration(cal_dir: Path, model: TrainedModel) -> Calibration | None:
    """The calibration of ``model`` in ``cal_dir``, None when there is none; an error when it is another model's."""
    path = Path(cal_dir) / CALIBRATION_JSON
    if not path.is_file():
        return None
    obj = json.loads(path.read_text())
    if obj.get("model") != model_identity(model):
        raise RuntimeError(f"{path} was fitted for another model (or other sampling settings): rerun the calibrate "
                           f"stage (dvc repro calibrate)")
    return Calibration.from_json(obj) if "scales" in obj else None  # (a one-draw model: nothing to calibrate)
