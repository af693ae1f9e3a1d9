"""The ladder evaluate compares: a registry of rungs, each a (D, H, W) HU volume on the common grid.

All rungs of a case come from the same inputs (:class:`LadderInputs`: series 1, one sampled and decoded
model latent, one VAE round trip of the truth, the reference network) and the same slab-consistency
projection (:mod:`ctdiff.data.slab`), so their differences are the differences between the methods, not
between draws. :data:`RUNGS` lists them in the order evaluate reports them; each :class:`Rung` says how it
is built from the inputs (and the rungs it needs), whether it is projected, and how the PNG panels show it:

- ``model``: the decoded sample projected onto series 1's slabs (``sampling.consistency``, default) or
  the raw decode (``consistency: false``). ``data/predictions`` holds this one.
- ``model_raw``: the decoded sample as the decoder produced it.
- ``reference``: the plain supervised super-resolution network (the ``sr_reference`` stage,
  :mod:`ctdiff.models.reference`), a residual on ``baseline_consistent``, projected like ``model``: what a
  user would pick instead of latent diffusion.
- ``baseline``: series 1 linearly interpolated onto the grid (``source.npy``).
- ``baseline_bspline``: the same with a cubic B-spline (``evaluate.bspline_baseline``).
- ``baseline_consistent``: ``baseline`` projected onto the slabs (the slab stage computes it): the honest
  baseline for a projected model.
- ``vae_ceiling`` / ``vae_ceiling_consistent``: the truth encoded and decoded (the best the latent space
  holds), raw and projected.

With ``sampling.decode: change`` a decode ``D(z)`` enters the ladder as the change it makes to the
baseline, ``baseline + D(z) - D(E(baseline))`` (:func:`ctdiff.inference.sampling.decoded_change`), for the
model and the ceiling alike: what the VAE gets wrong in both decodes the same way (in-plane blur, a bias)
cancels, and the ceiling stays the ceiling of what the model's output can reach.

To add a rung, add one :class:`Rung` to :data:`RUNGS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

Project = Callable[[np.ndarray], np.ndarray]


@dataclass
class LadderInputs:
    """What one case's rungs are built from: (D, H, W) HU volumes on the common grid and two maps."""

    model_raw: np.ndarray  # the decoded (averaged) sample
    model_spread: np.ndarray | None  # per-voxel spread of the draws the model rung averages; None for one draw
    vae_ceiling: np.ndarray  # the truth encoded and decoded
    baseline: np.ndarray  # source.npy: series 1 linearly interpolated
    baseline_consistent: np.ndarray  # the slab stage's: baseline projected onto series 1's slabs
    baseline_bspline: np.ndarray | None  # series 1 B-spline-interpolated, or None (evaluate.bspline_baseline)
    project: Project  # onto series 1's slabs
    consistency: bool  # the model's sampling.consistency: project the model and the reference
    reference: Project | None  # baseline_consistent -> the reference network's raw output; None: no rung


@dataclass(frozen=True)
class Rung:
    """One rung: its name (the metrics.json key), how it is built, and how the panels show it."""

    name: str
    build: Callable[[LadderInputs, Ladder], np.ndarray | None]  # None: the rung does not exist for this run
    projected: Callable[[LadderInputs], bool]  # onto series 1's slabs (what A P = series 1 holds for)
    needs: tuple[str, ...] = ()  # rungs its build reads
    column: str | None = None  # PNG panel column title; None: not shown
    headline: bool = False  # its psnr_body in the panel title
    findings: bool = False  # its findings metrics in the panel title


def _projected_if_consistent(inputs: LadderInputs, volume: np.ndarray) -> np.ndarray:
    return inputs.project(volume) if inputs.consistency else volume


def _reference(inputs: LadderInputs, ladder: Ladder) -> np.ndarray | None:
    if inputs.reference is None:
        return None
    return _projected_if_consistent(inputs, inputs.reference(ladder["baseline_consistent"]))


def _always(_: LadderInputs) -> bool:
    return True


def _never(_: LadderInputs) -> bool:
    return False


def _if_consistent(inputs: LadderInputs) -> bool:
    return inputs.consistency


RUNGS: tuple[Rung, ...] = (
    Rung("model", lambda i, _: _projected_if_consistent(i, i.model_raw), _if_consistent, column="model",
         headline=True, findings=True),
    Rung("model_raw", lambda i, _: i.model_raw, _never, column="model_raw", headline=True),
    Rung("reference", _reference, _if_consistent, needs=("baseline_consistent",), column="reference",
         headline=True, findings=True),
    Rung("baseline", lambda i, _: i.baseline, _never),
    Rung("baseline_bspline", lambda i, _: i.baseline_bspline, _never),
    Rung("baseline_consistent", lambda i, _: i.baseline_consistent, _always, column="baseline_consistent",
         headline=True, findings=True),
    Rung("vae_ceiling", lambda i, _: i.vae_ceiling, _never),
    Rung("vae_ceiling_consistent", lambda i, _: i.project(i.vae_ceiling), _always, headline=True),
)
RUNG_NAMES = tuple(r.name for r in RUNGS)
PREDICTION = "model"  # the rung that is the pipeline's prediction: data/predictions, the panels' error column
BY_NAME = {r.name: r for r in RUNGS}


class Ladder:
    """One case's rungs, built on first use (a rung another needs is built once) and released once scored.

    Iterating yields ``(rung, volume)`` in :data:`RUNGS` order for every rung that exists; after the loop
    body, a volume no later rung needs is dropped, so at most a few full volumes are held at a time (a
    real-size case is 315 MB per float32 volume).
    """

    def __init__(self, inputs: LadderInputs) -> None:
        self.inputs = inputs
        self._built: dict[str, np.ndarray | None] = {}

    def __getitem__(self, name: str) -> np.ndarray | None:
        if name not in self._built:
            volume = BY_NAME[name].build(self.inputs, self)
            self._built[name] = None if volume is None else np.asarray(volume, dtype=np.float32)
        return self._built[name]

    def __iter__(self) -> Iterator[tuple[Rung, np.ndarray]]:
        for i, rung in enumerate(RUNGS):
            volume = self[rung.name]
            if volume is not None:
                yield rung, volume
            del volume
            done = {r.name for r in RUNGS[: i + 1]}
            later = {need for r in RUNGS[i + 1:] for need in r.needs}
            for name in [n for n in self._built if n in done and n not in later]:
                self._built[name] = None  # scored and needed no more: released (never rebuilt)
