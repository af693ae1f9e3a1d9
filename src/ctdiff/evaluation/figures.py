"""PNG panels for eyeballing volumes: planes of the truth, predictions and their difference.

Figures are built with matplotlib's object API (no pyplot state, no GUI backend), so rendering works on
headless machines and figures are freed with their last reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

ERROR_HU_MAX = 200.0  # colour scale of the |error| column; larger errors saturate


def densest_plane(mask: np.ndarray) -> tuple[int, int] | None:
    """(k, j): the axial slice holding most of ``mask`` (D, H, W), and in it the row holding most; None if empty."""
    if not mask.any():
        return None
    k = int(mask.sum(axis=(1, 2)).argmax())
    return k, int(mask[k].sum(axis=1).argmax())


def orthogonal_panel(truth_hu: np.ndarray, pred_hu: np.ndarray, spacing_mm: Sequence[float],
                     hu_range: Sequence[float], title: str = "",
                     labels: tuple[str, str] = ("input", "reconstruction")) -> Figure:
    """Figure with rows axial / coronal / sagittal mid-slices and columns truth | pred | |pred - truth| (HU).

    ``truth_hu`` and ``pred_hu`` are (D, H, W) HU on one grid with ``spacing_mm`` = (sx, sy, sz); the
    coronal and sagittal views are stretched by sz / sy and sz / sx so anatomy keeps its proportions.
    The grey window is ``hu_range``.
    """
    sx, sy, sz = (float(s) for s in spacing_mm)
    error = np.abs(pred_hu.astype(np.float32) - truth_hu.astype(np.float32))
    d, h, w = truth_hu.shape
    views = [
        ("axial", lambda v: v[d // 2], sy / sx),
        ("coronal", lambda v: v[:, h // 2, :], sz / sx),
        ("sagittal", lambda v: v[:, :, w // 2], sz / sy),
    ]
    fig = Figure(figsize=(9, 9))
    axes = fig.subplots(3, 3, squeeze=False)
    for row, (name, cut, aspect) in enumerate(views):
        for col, (volume, label) in enumerate(((truth_hu, labels[0]), (pred_hu, labels[1]))):
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


Planes = tuple[np.ndarray, np.ndarray]  # (axial (H, W), coronal (D, W) head up) of one volume


def cut_planes(volume: np.ndarray, through: tuple[int, int]) -> Planes:
    """The axial slice ``k`` and the coronal row ``j`` of a (D, H, W) volume (``through = (k, j)``), copied.

    The coronal plane is flipped head up (the k axis runs inferior to superior in LPS). Panels keep only
    these planes, not the volumes, so a real-size case is shown without holding every rung in memory.
    """
    k, j = through
    return np.array(volume[k], dtype=np.float32), np.array(volume[::-1, j, :], dtype=np.float32)


def ladder_panel(columns: list[tuple[str, Planes]], truth: Planes, maps: list[tuple[str, Planes]],
                 spacing_mm: Sequence[float], window_hu: Sequence[float], title: str,
                 through: tuple[int, int]) -> Figure:
    """Axial and coronal planes (:func:`cut_planes`) of each (label, planes) column in grey, the truth, then
    the ``maps`` columns (label, planes in HU: |prediction - truth|, the spread of the samples) in one colour
    scale from 0 to ``ERROR_HU_MAX``, so an error and the spread that should announce it compare by eye.

    Coronal planes are shown at the true aspect ratio (slice spacing / pixel), each row as tall as its
    anatomy, so thick slabs look as thick as they are and a thin series' z detail is visible.
    """
    sx, sy, sz = (float(s) for s in spacing_mm)
    (h, w), d = truth[0].shape, truth[1].shape[0]
    k, j = through
    views = [(f"axial {k}", 0, sy / sx), (f"coronal {j}", 1, sz / sx)]
    shown = [*columns, ("truth", truth)]
    heights = [h * sy / (w * sx), d * sz / (w * sx)]
    width_in = 2.6
    # dpi 80: the panels of a real-size case stay a few hundred KB
    fig = Figure(figsize=(width_in * (len(shown) + len(maps)) + 0.6 * len(maps), width_in * sum(heights) + 0.9),
                 dpi=80)
    axes = fig.subplots(2, len(shown) + len(maps), squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, (view, plane, aspect) in enumerate(views):
        for col, (label, planes) in enumerate(shown):
            axes[row, col].imshow(planes[plane], cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect=aspect,
                                  interpolation="nearest")
            axes[row, col].set_title(f"{view}: {label}", fontsize=8)
        for col, (label, planes) in enumerate(maps, start=len(shown)):
            image = axes[row, col].imshow(planes[plane], cmap="magma", vmin=0, vmax=ERROR_HU_MAX, aspect=aspect,
                                          interpolation="nearest")
            axes[row, col].set_title(label, fontsize=8)
            fig.colorbar(image, ax=axes[row, col], fraction=0.046, pad=0.04)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.6)  # room for the second row's titles under the first row's images
    return fig
