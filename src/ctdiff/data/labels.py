"""Voxel-wise structure labels of a case, where the data has them (the phantoms do, real scans do not).

On disk, beside the case zips and outside them (so the zips keep exactly the APE-data layout):

- ``data/raw/labels/<case_id>.nii.gz``: a uint8 label map on the thin series' grid (its geometry in the
  NIfTI header, read back in LPS by SimpleITK);
- ``data/raw/labels/classes.json``: ``{"0": "air", "1": "fat", ...}``, the class id -> name table.

preprocess carries a case's map onto the common grid (nearest neighbour: labels never blend) as
``data/processed/<case_id>/labels.npy`` and records the class table in ``meta.json`` under ``labels``.
A case without a map has neither, and every label-based metric is then absent (:mod:`ctdiff.metrics.structures`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctdiff.data.grid import Grid, image_from_array, resample
from ctdiff.io import atomic_path, atomic_write_json

LABELS_DIR = "labels"
CLASSES_FILE = "classes.json"
OUTSIDE_LABEL = 0  # what voxels of the common grid outside the label map get (the phantoms' air)


@dataclass(frozen=True)
class CaseLabels:
    labels: np.ndarray  # (D, H, W) uint8
    grid: Grid
    classes: dict[int, str]  # class id -> name


def labels_path(raw_dir: Path, case_id: str) -> Path:
    return Path(raw_dir) / LABELS_DIR / f"{case_id}.nii.gz"


def write_classes(raw_dir: Path, classes: Mapping[int, str]) -> None:
    """The class table every label map under ``raw_dir`` uses."""
    (Path(raw_dir) / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(raw_dir) / LABELS_DIR / CLASSES_FILE, {str(k): v for k, v in sorted(classes.items())})


def write_case_labels(raw_dir: Path, case_id: str, labels: np.ndarray, grid: Grid) -> Path:
    """``labels`` (D, H, W) uint8 on ``grid`` as ``raw_dir/labels/<case_id>.nii.gz`` (atomically)."""
    if labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8, got {labels.dtype}")
    path = labels_path(raw_dir, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # SimpleITK picks the format from the name; the temporary name must keep the .nii.gz suffix.
        staged = tmp.with_name(tmp.name + ".nii.gz")
        try:
            sitk.WriteImage(image_from_array(labels, grid), str(staged), useCompression=True)
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return path


def read_classes(raw_dir: Path) -> dict[int, str]:
    """The class table; ValueError when it is missing or malformed (a label map without names is useless)."""
    path = Path(raw_dir) / LABELS_DIR / CLASSES_FILE
    try:
        raw = json.loads(path.read_text())
        classes = {int(k): str(v) for k, v in raw.items()}
    except (OSError, json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: label maps need a class table {{\"0\": \"air\", ...}} ({exc})") from exc
    if not all(0 <= k <= 255 for k in classes):
        raise ValueError(f"{path}: class ids must fit in uint8 (0..255)")
    return classes


def read_case_labels(raw_dir: Path, case_id: str) -> CaseLabels | None:
    """The case's label map and class table, or None when the case has no map."""
    path = labels_path(raw_dir, case_id)
    if not path.is_file():
        return None
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"{path}: a label map must hold integer class ids 0..255")
    return CaseLabels(labels.astype(np.uint8), Grid.of_image(image), read_classes(raw_dir))


def labels_fingerprint(raw_dir: Path, case_id: str) -> str:
    """Content hash of the case's label map and the class table ("" when the case has none)."""
    path = labels_path(raw_dir, case_id)
    if not path.is_file():
        return ""
    h = hashlib.sha256(path.read_bytes())
    classes = Path(raw_dir) / LABELS_DIR / CLASSES_FILE
    h.update(classes.read_bytes() if classes.is_file() else b"")
    return h.hexdigest()[:16]


def labels_on_grid(case_labels: CaseLabels, grid: Grid) -> np.ndarray:
    """The label map resampled onto ``grid`` by nearest neighbour: (D, H, W) uint8."""
    out = resample(case_labels.labels.astype(np.float32), case_labels.grid, grid, "nearest",
                   fill_hu=float(OUTSIDE_LABEL))
    return np.rint(out).astype(np.uint8)
