"""What every training stage (train, sr_reference) shares: resume-or-fresh, checkpoints, per-epoch statistics
and logging, the stop-on-signal flag, and the warm-up/cosine LR schedule.

Each stage keeps its own loop in view (:mod:`ctdiff.training.ldm`, :mod:`ctdiff.training.reference`); this
module holds the bookkeeping around it, so that a fix to resuming or logging reaches both:

- :class:`TrainingRun`: opened with the dict of what shapes the run (:func:`shaping`), it resumes from
  ``last.pt`` when that dict's hash matches and otherwise starts fresh, saying why; it writes checkpoints
  (the stage's state plus the step, the partial epoch's statistics, the best validation value, the RNG
  streams and the hash) and logs each epoch to dvclive.
- :class:`StopFlag`: SIGTERM/SIGINT set a flag instead of killing; the loop finishes its step, writes
  ``last.pt`` and raises :class:`TrainInterrupted`, whose exit code (128 + the signal number: 143, 130) is
  the shell's "killed by that signal", so DVC and a cluster scheduler record the stage as not finished.
- :class:`TrainingDiverged`: a non-finite loss, raised before anything of that step is written.

Checkpoints are plain dicts (:mod:`ctdiff.models.checkpoint`): ``torch.load(weights_only=True)`` reads
them. The hash covers the params that shape the model and its trajectory, the seed, the data (case ids and
fingerprints) and the checkpoint layout (:data:`CHECKPOINT_FORMAT`); the dict it was computed from is
stored too, so a mismatch names the keys that changed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ctdiff.data.processed import Case
from ctdiff.io import digest
from ctdiff.models.checkpoint import diff_keys, load_checkpoint, save_checkpoint

LAST, BEST = "last.pt", "best.pt"  # last: to continue from; best: by the stage's validation value
CHECKPOINT_FORMAT = 3  # 3: first_val kept (the health gates); older ones start fresh


# ------------------------------------------------------------------------------------------- hashing
def shaping(params_group: dict[str, Any], seed: int, train_cases: Sequence[Case], val_cases: Sequence[Case],
            **more: Any) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the stage's shaping params, the seed, the data
    (case ids and :meth:`Case.fingerprint`) and anything else that defines its inputs (``more``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "seed": seed,
        **params_group,
        **more,
        "data": {"train": {c.case_id: c.fingerprint() for c in train_cases},
                 "val": {c.case_id: c.fingerprint() for c in val_cases}},
    }


def resumable(path: Path, shaping_dict: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, why) for ``last.pt``: the checkpoint when it matches ``shaping_dict``, else None and the reason."""
    if not path.is_file():
        return None, f"no {path}: starting fresh"
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # a torn or foreign file: never resume from something we cannot read
        return None, f"{path} is unreadable ({type(exc).__name__}: {exc}): starting fresh"
    if ckpt.get("params_hash") != digest(shaping_dict):
        old = json.loads(ckpt.get("params_shaping", "{}"))
        changed = diff_keys(old, shaping_dict)
        shown = ", ".join(changed[:6]) + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else "")
        return None, f"{path} was written with different params ({shown or 'unknown'}): starting fresh"
    return ckpt, f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt['step']})"


# ---------------------------------------------------------------------------------------------- RNG
def rng_state(numpy_rng: np.random.Generator) -> dict[str, Any]:
    """Every random stream a training loop draws from: torch (CPU and CUDA), numpy's patch RNG, python."""
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


# ----------------------------------------------------------------------------------- epochs and runs
@dataclass
class EpochStats:
    """Running sums of one epoch (kept in last.pt, so a resumed epoch reports the whole epoch)."""

    steps: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        """One optimizer step's values (losses): summed, and the step counted."""
        self.steps += 1
        self.accumulate(**values)

    def accumulate(self, **values: float) -> None:
        """Sums that are not per-step means (sums of latent values and their squares, counts)."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def mean(self, name: str) -> float:
        """Mean of a per-step value over the epoch's steps (0 before the first)."""
        return self.sums.get(name, 0.0) / max(self.steps, 1)

    @property
    def sec_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "sums": dict(self.sums)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        return cls(int(state["steps"]), float(state["seconds"]), dict(state["sums"]))


@dataclass
class TrainResult:
    """What one invocation of a training stage did."""

    steps: int  # optimizer steps done in total (including those of a resumed run)
    start_step: int  # where this invocation began (0 = fresh)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch logged by this invocation
    messages: list[str] = field(default_factory=list)  # why it resumed or started fresh
    scale_factor: float = 1.0  # train: the latent scale factor the model was trained with
    baseline: dict[str, float] = field(default_factory=dict)  # sr_reference: the input's val metrics


class TrainingRun:
    """One invocation of a training stage: where it starts (fresh or resumed), what it writes, what it logs.

    ``step`` (optimizer steps done, a resumed run's included), ``epoch_stats``, ``best_val`` and ``first_val`` (the
    first epoch's validation value, for :meth:`val_never_fell`) are the
    loop's own counters, kept here so that :meth:`save` writes them and a resumed run restores them.
    ``checkpoint`` is the matching ``last.pt`` (None when fresh) for the stage to restore its own state from.
    Only the main process (rank 0) writes files or logs; the others keep the counters.
    """

    def __init__(self, stage: str, ckpt_dir: Path, live_dir: Path, shaping_dict: dict[str, Any],
                 steps_per_epoch: int, is_main: bool = True, say: Callable[..., None] = print) -> None:
        self.stage, self.ckpt_dir, self.live_dir = stage, ckpt_dir, live_dir
        self.shaping, self.steps_per_epoch, self.is_main, self.say = shaping_dict, steps_per_epoch, is_main, say
        self.checkpoint, self.why = resumable(ckpt_dir / LAST, shaping_dict)
        say(f"{stage}: {self.why}")
        ckpt = self.checkpoint
        self.step = int(ckpt["step"]) if ckpt else 0
        self.best_val = float(ckpt["best_val"]) if ckpt else math.inf
        self.first_val = float(ckpt["first_val"]) if ckpt else math.nan
        self.epoch_stats = EpochStats.from_state(ckpt["epoch_stats"]) if ckpt else EpochStats()
        self.start_step = self.step
        self.history: list[dict[str, float]] = []  # per epoch logged by this invocation
        self.live: Live | None = None
        if ckpt is None and is_main:
            for name in (LAST, BEST):
                (ckpt_dir / name).unlink(missing_ok=True)
            shutil.rmtree(live_dir, ignore_errors=True)

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.steps_per_epoch

    def complete(self, total_steps: int) -> bool:
        """True (and says so) when a previous invocation already ran all ``total_steps``."""
        if self.step < total_steps:
            return False
        self.say(f"{self.stage}: already complete ({self.step} steps); delete {self.ckpt_dir} to train again")
        return True

    def record_val(self, value: float) -> bool:
        """Note one epoch's validation value (lower is better); True when it is the best so far."""
        if math.isnan(self.first_val):
            self.first_val = value
        if value < self.best_val:
            self.best_val = value
            return True
        return False

    def val_never_fell(self) -> bool:
        """True after two or more epochs when none reached a validation value below the first epoch's."""
        return self.epoch >= 2 and not self.best_val < self.first_val

    def open_live(self, summary: dict[str, Any]) -> None:
        """The stage's dvclive ``Live`` (continuing its history when resumed), with ``summary`` in it; main only."""
        if self.is_main:
            self.live = Live(str(self.live_dir), resume=self.resumed, dvcyaml=False, save_dvc_exp=False)
            self.live.summary.update(summary)

    def save(self, name: str, state: dict[str, Any], rng: np.random.Generator) -> None:
        """Write checkpoint ``name`` (:data:`LAST`, :data:`BEST`): the stage's ``state`` plus the run's counters,
        RNG streams and params hash. Main process only."""
        if not self.is_main:
            return
        save_checkpoint(self.ckpt_dir / name, {
            **state,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_stats": self.epoch_stats.state(),
            "best_val": self.best_val,
            "first_val": self.first_val,
            "rng": rng_state(rng),
            "params_hash": digest(self.shaping),
            "params_shaping": json.dumps(self.shaping, sort_keys=True),
        })

    def log_epoch(self, epoch: int, metrics: dict[str, float], summary: dict[str, Any] | None = None) -> None:
        """Log one finished epoch's ``metrics`` (dvclive step = epoch; main process only), update the summary,
        start the next epoch's statistics (every process)."""
        if self.is_main:
            self.live.step = epoch
            for metric, value in metrics.items():
                self.live.log_metric(metric, value)
            self.live.summary.update({**(summary or {}), "epoch": epoch + 1, "steps": self.step})
            self.live.next_step()
            self.history.append({"epoch": epoch, "step": self.step, **metrics})
        self.epoch_stats = EpochStats()

    def result(self, **extra: Any) -> TrainResult:
        """This invocation as a :class:`TrainResult` (``extra``: the stage's own fields)."""
        return TrainResult(self.step, self.start_step, self.history, [self.why], **extra)
