"""Resumable training: atomic checkpoints, ``weights_only`` load, RNG states, the hash that decides
resume-or-fresh, the stop-on-signal flag, and the LR schedule a resumed run restores.

Shared by every training stage (train, sr_reference) and free of any model or VAE code, so a stage that
trains something else does not depend on the diffusion stack.

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
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

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


# ------------------------------------------------------------------------------------ stop and resume
class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of the failing step was written."""


class TrainInterrupted(Exception):
    """SIGTERM/SIGINT arrived; ``last.pt`` holds the last finished step."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; last.pt saved, "
                         f"rerun the stage to continue")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """SIGTERM/SIGINT set ``signum`` instead of killing: the loop finishes its step and checkpoints.

    A second signal of the same kind gets the default behaviour (an impatient Ctrl-C twice still kills).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopFlag:
        flag = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in cls.SIGNALS:
                flag._previous[sig] = signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -------------------------------------------------------------------------------------- LR schedule
def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
                  ) -> LRScheduler:
    """Linear warm-up from 1 % of the LR over ``warmup_steps``, then cosine decay to ``min_ratio`` x LR."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=base_lr * min_ratio)
    if not warmup_steps:
        return cosine
    warmup = LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
