"""Checkpoints: plain dicts of tensors, numbers, strings, lists and dicts, written atomically and read
with ``torch.load(weights_only=True)``.

No pickled objects, nothing executed on load. A checkpoint is written to a temporary sibling and renamed
into place (:func:`ctdiff.io.atomic_path`), so a run killed mid-write leaves the previous one intact.
Training writes them (:mod:`ctdiff.training.scaffold`); sampling and evaluation read them.

Beside the train stage's checkpoints, ``model.json`` (:func:`write_model_card`) says how the trained model is
used: its sampling defaults, the slab profile its prediction is projected with, the intensity range, its
condition, the geometry it learnt from. evaluate and ``ctdiff predict`` read it instead of params, as a MONAI
bundle carries its inference config.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ctdiff.io import atomic_path, atomic_write_json

MODEL_JSON = "model.json"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_model_card(ckpt_dir: str | os.PathLike[str], card: dict[str, Any]) -> None:
    """Write ``model.json`` into the checkpoint folder (atomically)."""
    atomic_write_json(os.path.join(ckpt_dir, MODEL_JSON), card)


def read_model_card(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of a trained model's checkpoint folder."""
    path = os.path.join(ckpt_dir, MODEL_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trained model: {path} not found: run the train stage (dvc repro train)")
    with open(path) as f:
        return json.load(f)


def diff_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as ``key: old -> new``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_keys(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
