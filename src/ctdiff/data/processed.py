"""The processed format (``data/processed/``, the contract of docs/data-format.md), read in one place.

Written by the preprocess stage (:mod:`ctdiff.data.preprocess`); every later stage reads it through
:class:`Case` and :func:`split_cases`:

    splits.json             {"train": [case ids], "val": [...], "test": [...]}
    <case_id>/source.npy    series 1 on the common grid, int16 HU, (D, H, W)
    <case_id>/target.npy    series 2 on the same grid, int16 HU, (D, H, W)
    <case_id>/series1.npy   series 1 as acquired (its own grid, meta "series1" "grid"), int16 HU
    <case_id>/labels.npy    class ids on the common grid, uint8 (only where the case has a label map)
    <case_id>/meta.json     case_id, category, split, grid, series1/series2 summaries, warnings, labels

Arrays load memory-mapped on request (``mmap=True``), so random crops and per-slice work on a real-size
case (300 x 512 x 512, 157 MB per int16 volume) read only what they touch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctdiff.data.grid import Grid
from ctdiff.io import digest

SPLITS_JSON = "splits.json"
Volume = Literal["source", "target", "series1", "labels"]


class DataError(RuntimeError):
    """The processed data lacks what a stage needs (run preprocess, or change the split params)."""


@dataclass(frozen=True)
class Case:
    """One processed case: its folder, its ``meta.json``, and its arrays on request."""

    case_id: str
    folder: Path
    meta: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def open(cls, folder: Path) -> Case:
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path} not found: rerun the preprocess stage (dvc repro preprocess)")
        return cls(folder.name, folder, json.loads(meta_path.read_text()))

    # ------------------------------------------------------------------------------------------- meta
    @property
    def category(self) -> str:
        return str(self.meta["category"])

    @property
    def grid(self) -> Grid:
        """The common grid of source, target and labels."""
        return Grid.from_meta(self.meta["grid"])

    @property
    def series1_grid(self) -> Grid:
        """Series 1's own grid (``series1.npy``)."""
        return Grid.from_meta(self.meta["series1"]["grid"])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(sx, sy, sz) of the common grid."""
        return tuple(float(s) for s in self.meta["grid"]["spacing"])  # type: ignore[return-value]

    @property
    def has_labels(self) -> bool:
        return "labels" in self.meta and (self.folder / "labels.npy").is_file()

    # ----------------------------------------------------------------------------------------- arrays
    def load(self, which: Volume, mmap: bool = False) -> np.ndarray:
        """(D, H, W) int16 HU (``labels``: uint8 class ids); ``mmap`` reads lazily (copy-on-write: torch can view
        it, and nothing ever writes back to the file)."""
        path = self.folder / f"{which}.npy"
        if not path.is_file():
            raise DataError(f"{self.case_id}: {path} not found: rerun the preprocess stage (dvc repro preprocess)")
        return np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)

    def fingerprint(self) -> str:
        """Identity of the case: its meta.json (which carries preprocess's own fingerprint) and tensor sizes.

        What a resumed training run and a latent cache must find unchanged.
        """
        parts = [(self.folder / "meta.json").read_bytes().decode("utf-8", "replace")]
        parts += [str((self.folder / f"{w}.npy").stat().st_size) for w in ("source", "target")]
        return digest(parts)


def read_splits(processed_dir: Path) -> dict[str, list[str]]:
    """``splits.json``: split name -> case ids."""
    path = processed_dir / SPLITS_JSON
    if not path.is_file():
        raise DataError(f"{path} not found: run the preprocess stage first (dvc repro preprocess)")
    return json.loads(path.read_text())


def split_cases(processed_dir: Path, split: str, max_cases: int = 0) -> list[Case]:
    """Cases of ``split`` in splits.json order (the first ``max_cases`` when > 0); raises :class:`DataError`
    when there are none."""
    case_ids = read_splits(processed_dir).get(split, [])
    if not case_ids:
        raise DataError(f"{processed_dir / SPLITS_JSON} has no '{split}' cases (check preprocess.split and the "
                        f"number of cases)")
    return [Case.open(processed_dir / case_id) for case_id in case_ids[: max_cases or None]]
