"""The one intensity mapping the models and the metrics share: HU clipped to a range, mapped to [0, 1].

``x01`` in a name means these units. ``hu_range`` is ``vae.hu_range`` (default [-1000, 1000] HU): the
range a VAE represents and every metric scores in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def to_x01(hu: ArrayLike, hu_range: Sequence[float]) -> torch.Tensor:
    """HU (any shape) -> float32 tensor in [0, 1] over ``hu_range`` (clipped)."""
    low, high = float(hu_range[0]), float(hu_range[1])
    return ((as_tensor(hu).float() - low) / (high - low)).clamp(0.0, 1.0)


def as_tensor(x: ArrayLike) -> torch.Tensor:
    """A tensor sharing ``x``'s memory where torch can; a read-only (memory-mapped) array is copied as float32,
    which torch cannot view safely."""
    if isinstance(x, torch.Tensor):
        return x
    array = np.asarray(x)
    return torch.from_numpy(array if array.flags.writeable else array.astype(np.float32))


def to_hu(x01: torch.Tensor, hu_range: Sequence[float]) -> torch.Tensor:
    """[0, 1] (clipped first) -> HU over ``hu_range``; inverse of :func:`to_x01` inside the range."""
    low, high = float(hu_range[0]), float(hu_range[1])
    return x01.clamp(0.0, 1.0) * (high - low) + low
