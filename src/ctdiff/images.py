"""PNG panels for eyeballing volumes: mid-slices of a reference, a prediction and their difference.

Figures are built with matplotlib's object API (no pyplot state, no GUI backend), so rendering works on
headless machines and figures are freed with their last reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

ERROR_HU_MAX = 200.0  # colour scale of the |error| column; larger errors saturate


def orthogonal_panel(ref_hu: np.ndarray, pred_hu: np.ndarray, spacing_mm: Sequence[float],
                     hu_range: Sequence[float], title: str = "",
                     labels: tuple[str, str] = ("input", "reconstruction")) -> Figure:
    """Figure with rows axial / coronal / sagittal mid-slices and columns ref | pred | |pred - ref| (HU).

    ``ref_hu`` and ``pred_hu`` are (D, H, W) HU on one grid with ``spacing_mm`` = (sx, sy, sz); the
    coronal and sagittal views are stretched by sz / sy and sz / sx so anatomy keeps its proportions.
    The grey window is ``hu_range``.
    """
    sx, sy, sz = (float(s) for s in spacing_mm)
    error = np.abs(pred_hu.astype(np.float32) - ref_hu.astype(np.float32))
    d, h, w = ref_hu.shape
    views = [
        ("axial", lambda v: v[d // 2], sy / sx),
        ("coronal", lambda v: v[:, h // 2, :], sz / sx),
        ("sagittal", lambda v: v[:, :, w // 2], sz / sy),
    ]
    fig = Figure(figsize=(9, 9))
    axes = fig.subplots(3, 3, squeeze=False)
    for row, (name, cut, aspect) in enumerate(views):
        for col, (volume, label) in enumerate(((ref_hu, labels[0]), (pred_hu, labels[1]))):
            ax = axes[row, col]
            ax.imshow(cut(volume), cmap="gray", vmin=hu_range[0], vmax=hu_range[1], aspect=aspect,
                      origin="upper", interpolation="nearest")
            ax.set_title(f"{name}: {label}", fontsize=9)
        image = axes[row, 2].imshow(cut(error), cmap="magma", vmin=0.0, vmax=ERROR_HU_MAX, aspect=aspect,
                                    origin="upper", interpolation="nearest")
        axes[row, 2].set_title(f"{name}: |error| HU", fontsize=9)
        fig.colorbar(image, ax=axes[row, 2], fraction=0.046, pad=0.04)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
