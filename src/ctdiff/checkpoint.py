"""Training checkpoints: atomic save, ``weights_only`` load, RNG states, and the hash that decides resume-or-fresh.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (state dicts, RNG states,
counters), so ``torch.load(weights_only=True)`` reads it: no pickled objects, nothing executed on load.
It is written to a temporary sibling and renamed into place (:func:`ctdiff.io.atomic_path`), so a run
killed mid-write leaves the previous checkpoint intact.

The params hash covers what shapes the model and the training trajectory (see
:func:`ctdiff.train.shaping_params`); the dict it was computed from is stored too, so a mismatch can say
which keys changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctdiff.io import atomic_path


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- hashing
def params_hash(shaping: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict."""
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def resumable(path: Path, shaping: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, why) for ``last.pt``: the checkpoint when it matches ``shaping``, else None and the reason."""
    if not path.is_file():
        return None, f"no {path}: starting fresh"
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # a torn or foreign file: never resume from something we cannot read
        return None, f"{path} is unreadable ({type(exc).__name__}: {exc}): starting fresh"
    if ckpt.get("params_hash") != params_hash(shaping):
        old = json.loads(ckpt.get("params_shaping", "{}"))
        changed = diff_keys(old, shaping)
        shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
        return None, f"{path} was written with different params ({shown or 'unknown'}): starting fresh"
    return ckpt, f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt['step']})"


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


# ---------------------------------------------------------------------------------------------- RNG
def rng_state(numpy_rng: np.random.Generator) -> dict[str, Any]:
    """Every random stream the training loop draws from: torch (CPU and CUDA), numpy's patch RNG, python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_rng.bit_generator.state,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], numpy_rng: np.random.Generator) -> None:
    """Restore :func:`rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_rng.bit_generator.state = state["numpy"]
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(x: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may give lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
