"""Read the processed-data contract (``data/processed/``): splits and per-case int16 HU volumes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np


class DataError(RuntimeError):
    """The processed data lacks what a VAE stage needs (run preprocess, or change the split params)."""


@dataclass(frozen=True)
class Case:
    """One processed case: ``<processed>/<case_id>/{source,target}.npy`` (int16 HU, (D, H, W)) + meta.json."""

    case_id: str
    folder: Path
    spacing_mm: tuple[float, float, float]  # (sx, sy, sz)

    def load(self, which: Literal["source", "target"], mmap: bool = False) -> np.ndarray:
        """(D, H, W) int16 HU; ``mmap`` reads lazily (random crops from real-size volumes)."""
        return np.load(self.folder / f"{which}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)


def split_cases(processed_dir: Path, split: str, max_cases: int = 0) -> list[Case]:
    """Cases of ``split`` in splits.json order (the first ``max_cases`` when > 0); raises :class:`DataError`
    when there are none."""
    splits_path = processed_dir / "splits.json"
    if not splits_path.is_file():
        raise DataError(f"{splits_path} not found: run the preprocess stage first (dvc repro preprocess)")
    case_ids = json.loads(splits_path.read_text()).get(split, [])
    if not case_ids:
        raise DataError(f"{splits_path} has no '{split}' cases (check preprocess.split and the number of cases)")
    if max_cases:
        case_ids = case_ids[:max_cases]
    cases = []
    for case_id in case_ids:
        meta = json.loads((processed_dir / case_id / "meta.json").read_text())
        cases.append(Case(case_id, processed_dir / case_id, tuple(float(s) for s in meta["grid"]["spacing"])))
    return cases


def data_fingerprint(case: Case) -> str:
    """Identity of a processed case: its meta.json (which carries preprocess's own fingerprint) and tensor sizes.

    What a resumed training run (train, sr_reference) must find unchanged; here, beside :class:`Case`, so a
    stage can check it without loading any VAE code.
    """
    parts = [(case.folder / "meta.json").read_bytes().decode("utf-8", "replace")]
    parts += [str((case.folder / f"{w}.npy").stat().st_size) for w in ("source", "target")]
    return digest(parts)


def digest(obj: Any) -> str:
    """Short content hash of a JSON-able object (keys sorted; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
