"""The ladder evaluate compares: every rung is a name and a (D, H, W) HU volume on series 2's grid.

All rungs of a case come from the same inputs (series 1, one sampled and decoded model latent, one VAE
round trip of the truth) and the same slab-consistency projection (:mod:`ctdiff.slab`), so their
differences are the differences between the methods, not between draws:

- ``model``: the decoded sample projected onto series 1's slabs (``evaluate.consistency``, default) or
  the raw decode (``consistency: false``). ``data/predictions`` holds this one.
- ``model_raw``: the decoded sample as the decoder produced it.
- ``reference``: the plain supervised super-resolution network (the ``sr_reference`` stage,
  :mod:`ctdiff.reference`), a residual on ``baseline_consistent``, projected like ``model``: what a user
  would pick instead of latent diffusion.
- ``baseline``: series 1 linearly interpolated onto the grid (``source.npy``).
- ``baseline_bspline``: the same with a cubic B-spline (``evaluate.bspline_baseline``).
- ``baseline_consistent``: ``baseline`` projected onto the slabs: the honest baseline for a projected model.
- ``vae_ceiling`` / ``vae_ceiling_consistent``: the truth encoded and decoded (the best the latent space
  holds), raw and projected.

With ``evaluate.decode: change`` a decode ``D(z)`` enters the ladder as the change it makes to the
baseline, ``baseline + D(z) - D(E(baseline))`` (:func:`decoded_change`), for the model and the ceiling
alike: what the VAE gets wrong in both decodes the same way (in-plane blur, a bias) cancels, and the
ceiling stays the ceiling of what the model's output can reach.

To add a rung, add one line to :func:`build_ladder` (and its name to :data:`RUNGS` for the order).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RUNGS = ("model", "model_raw", "reference", "baseline", "baseline_bspline", "baseline_consistent", "vae_ceiling",
         "vae_ceiling_consistent")
Project = Callable[[np.ndarray], np.ndarray]


def build_ladder(model_raw: np.ndarray, vae_ceiling: np.ndarray, baseline: np.ndarray,
                 baseline_bspline: np.ndarray | None, project: Project, consistency: bool,
                 reference: Project | None = None) -> dict[str, np.ndarray]:
    """{rung: (D, H, W) float32 HU} in :data:`RUNGS` order; ``baseline_bspline`` or ``reference`` None
    leaves that rung out. ``reference`` maps ``baseline_consistent`` to the reference network's output."""
    consistent = project(baseline)
    reference_raw = None if reference is None else reference(consistent)
    ladder = {
        "model": project(model_raw) if consistency else model_raw,
        "model_raw": model_raw,
        "reference": None if reference_raw is None else (project(reference_raw) if consistency else reference_raw),
        "baseline": baseline,
        "baseline_bspline": baseline_bspline,
        "baseline_consistent": consistent,
        "vae_ceiling": vae_ceiling,
        "vae_ceiling_consistent": project(vae_ceiling),
    }
    return {rung: np.asarray(ladder[rung], dtype=np.float32) for rung in RUNGS if ladder[rung] is not None}


def decoded_change(decoded: np.ndarray, baseline: np.ndarray, baseline_decoded: np.ndarray) -> np.ndarray:
    """``baseline + decoded - baseline_decoded``: (D, H, W) HU each; the decode read as a change."""
    return (np.asarray(baseline, np.float32) + np.asarray(decoded, np.float32)
            - np.asarray(baseline_decoded, np.float32))
