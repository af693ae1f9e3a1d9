"""Image-quality metrics for CT volumes (MONAI), shared by vae_check, the training stages' validation and evaluate.

Every metric compares a prediction with the truth (series 2) on the same (D, H, W) grid, both in HU and both
clipped to ``hu_range`` first (the range a VAE can represent, so voxels beyond it, like -1024 HU air or
dense bone, cost nothing that no model could recover):

- ``psnr``: MONAI ``PSNRMetric`` on intensities mapped to [0, 1] over ``hu_range`` (data range 1.0).
  Identical volumes would give +inf, which JSON cannot hold: PSNR is capped at ``PSNR_CAP_DB``.
- ``ssim``: MONAI 3D SSIM (Gaussian window 11, sigma 1.5, data range 1.0) on the same intensities; the
  window shrinks (odd, >= 3) on an axis shorter than 11 voxels.
- ``mae_hu``: mean absolute difference in HU (MONAI ``MAEMetric``).
- ``*_body``: the same inside the body mask of the truth (:func:`body_mask`). ``psnr_body`` and
  ``mae_hu_body`` use the masked voxels only; ``ssim_body`` is the mean of the SSIM map over the window
  centres that lie inside the mask (each window still sees its whole neighbourhood, edges included).

A truth scores many predictions (the rungs of a case): :class:`TruthScorer` keeps what depends on the
truth alone (its [0, 1] intensities, its body mask, the window centres inside it) and scores each
prediction in slabs along D, so that memory stays bounded on full CT volumes (300 x 512 x 512): the SSIM
map of a slab of ``ssim_slab_depth`` centre rows, with the ``window // 2`` slices on either side that its
windows see, is exactly those rows of the whole volume's 'valid' map, and only its sums are kept.
:func:`reconstruction_metrics` is the one-prediction shorthand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms.utils_morphological_ops import dilate, erode

from ctdiff.data.intensity import ArrayLike, as_tensor, to_x01

METRIC_NAMES = ("psnr", "ssim", "mae_hu", "psnr_body", "ssim_body", "mae_hu_body")
PSNR_CAP_DB = 100.0
BODY_THRESHOLD_HU = -500.0
BODY_CLOSING_VOXELS = 3  # closing filter size: bridges one-voxel gaps (noise, thin fat planes)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_SLAB_DEPTH = 16  # SSIM map rows (window centres along D) per slab: ~0.35 GB of temporaries at 512 x 512
BODY_SLAB_DEPTH = 8  # slices per slab of the body mask's closing: MONAI convolves via a 27x im2col buffer (~0.3 GB)


def body_mask(hu: ArrayLike, threshold_hu: float = BODY_THRESHOLD_HU,
              closing_voxels: int = BODY_CLOSING_VOXELS) -> torch.Tensor:
    """(D, H, W) HU -> (D, H, W) bool: voxels above ``threshold_hu`` after a binary closing.

    The threshold keeps soft tissue, vessels and bone and leaves out air and aerated lung (which sits near
    -850 HU), so ``*_body`` metrics measure the structures that matter clinically.
    """
    volume = as_tensor(hu)
    if volume.ndim != 3:
        return _closed_mask(volume, threshold_hu, closing_voxels)
    # In slabs along D: the closing at a slice sees 2 * (closing // 2) slices either side, so a slab with
    # that halo gives exactly the whole volume's values on its own slices.
    depth, halo = volume.shape[0], 2 * (int(closing_voxels) // 2)
    out = torch.empty(volume.shape, dtype=torch.bool, device=volume.device)
    for start in range(0, depth, BODY_SLAB_DEPTH):
        stop = min(depth, start + BODY_SLAB_DEPTH)
        low, high = max(0, start - halo), min(depth, stop + halo)
        out[start:stop] = _closed_mask(volume[low:high], threshold_hu, closing_voxels)[start - low:stop - low]
    return out


def _closed_mask(hu: torch.Tensor, threshold_hu: float, closing_voxels: int) -> torch.Tensor:
    mask = (hu.float() > threshold_hu).float()[None, None]
    closed = erode(dilate(mask, closing_voxels), closing_voxels)
    return closed[0, 0] > 0.5


def psnr(pred01: torch.Tensor, truth01: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of [0, 1] intensities (data range 1), over ``mask`` when given; capped at ``PSNR_CAP_DB``."""
    if mask is not None:
        pred01, truth01 = pred01[mask], truth01[mask]
    if pred01.numel() == 0:
        return math.nan
    value = float(PSNRMetric(max_val=1.0)(pred01.reshape(1, 1, -1), truth01.reshape(1, 1, -1)).item())
    return min(value, PSNR_CAP_DB)


def ssim(pred01: torch.Tensor, truth01: torch.Tensor, mask: torch.Tensor | None = None,
         ssim_map: torch.Tensor | None = None) -> float:
    """3D SSIM of (D, H, W) [0, 1] intensities (data range 1), averaged over ``mask`` when given.

    ``ssim_map`` (from :func:`ssim_map_of`) reuses a map already computed for the same pair.
    """
    window = [_window(s) for s in truth01.shape]
    if ssim_map is None:
        ssim_map = ssim_map_of(pred01, truth01)
    if mask is not None:
        d, h, w = (k // 2 for k in window)
        centres = mask[d:mask.shape[0] - d, h:mask.shape[1] - h, w:mask.shape[2] - w]
        ssim_map = ssim_map[centres]
    return float(ssim_map.mean()) if ssim_map.numel() else math.nan


def ssim_map_of(pred01: torch.Tensor, truth01: torch.Tensor) -> torch.Tensor:
    """The 3D SSIM map of two (D, H, W) [0, 1] volumes: one value per window centre ('valid')."""
    return _ssim_map(pred01, truth01, [_window(s) for s in truth01.shape])


def _ssim_map(pred01: torch.Tensor, truth01: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    ssim_map, _ = compute_ssim_and_cs(pred01[None, None], truth01[None, None], spatial_dims=3,
                                      kernel_size=list(window), kernel_sigma=[SSIM_SIGMA] * 3, data_range=1.0)
    return ssim_map[0, 0]


def mae_hu(pred_hu: torch.Tensor, truth_hu: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean absolute error in HU, over ``mask`` when given."""
    if mask is not None:
        pred_hu, truth_hu = pred_hu[mask], truth_hu[mask]
    if pred_hu.numel() == 0:
        return math.nan
    return float(MAEMetric()(pred_hu.reshape(1, 1, -1), truth_hu.reshape(1, 1, -1)).item())


class TruthScorer:
    """:data:`METRIC_NAMES` of predictions against one (D, H, W) HU truth, built once per truth.

    Holds what the truth alone fixes: ``truth01`` (float32 [0, 1] over ``hu_range``), ``mask`` (its
    :func:`body_mask`, from the unclipped truth) and ``centres`` (the SSIM window centres inside the mask,
    a view of it). :meth:`score` works through the prediction in slabs of ``ssim_slab_depth`` SSIM map rows
    (their halo included), so neither a full-size SSIM map nor a full-size copy of the prediction is made.
    """

    def __init__(self, truth_hu: ArrayLike, hu_range: Sequence[float], ssim_slab_depth: int = SSIM_SLAB_DEPTH,
                 mask: torch.Tensor | None = None):
        """``mask``: the truth's :func:`body_mask` when the caller keeps it (it is most of the cost here)."""
        truth = as_tensor(truth_hu)
        if truth.ndim != 3:
            raise ValueError(f"expected a (D, H, W) truth volume, got shape {tuple(truth.shape)}")
        if ssim_slab_depth < 1:
            raise ValueError(f"ssim_slab_depth must be >= 1, got {ssim_slab_depth}")
        self.shape: tuple[int, int, int] = tuple(truth.shape)  # type: ignore[assignment]
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.window = tuple(_window(s) for s in self.shape)
        self.ssim_slab_depth = int(ssim_slab_depth)
        self.truth01 = to_x01(truth, self.hu_range)
        self.mask = body_mask(truth) if mask is None else mask
        d, h, w = (k // 2 for k in self.window)
        depth, height, width = self.shape
        self.centres = self.mask[d:depth - d, h:height - h, w:width - w]
        self.n_body = int(self.mask.sum())
        self.n_centres = self.centres.numel()
        self.n_centres_body = int(self.centres.sum())

    def score(self, pred_hu: ArrayLike) -> dict[str, float]:
        """:data:`METRIC_NAMES` of one (D, H, W) HU prediction (clipped to ``hu_range``) against the truth."""
        pred = as_tensor(pred_hu)
        if tuple(pred.shape) != self.shape:
            raise ValueError(f"expected a (D, H, W) prediction of the truth's shape {self.shape}, "
                             f"got {tuple(pred.shape)}")
        depth, half = self.shape[0], self.window[0] // 2
        rows = depth - 2 * half  # SSIM map rows: centre row r is slice r + half
        sq = ab = sq_body = ab_body = ssim_all = ssim_body = 0.0
        for first in range(0, rows, self.ssim_slab_depth):
            last = min(rows, first + self.ssim_slab_depth)
            seen = slice(first, last + 2 * half)  # the slices these rows' windows see
            pred01 = to_x01(pred[seen].to(self.truth01.device), self.hu_range)
            ssim_map = _ssim_map(pred01, self.truth01[seen], self.window)
            ssim_all += float(ssim_map.sum(dtype=torch.float64))
            ssim_body += float(ssim_map[self.centres[first:last]].sum(dtype=torch.float64))
            # Voxel-wise errors over this slab's own slices (the first and last slabs take the edges).
            low = 0 if first == 0 else first + half
            high = depth if last == rows else last + half
            diff = pred01[low - first:high - first] - self.truth01[low:high]
            inside = diff[self.mask[low:high]]
            sq += float(diff.square().sum(dtype=torch.float64))
            ab += float(diff.abs().sum(dtype=torch.float64))
            sq_body += float(inside.square().sum(dtype=torch.float64))
            ab_body += float(inside.abs().sum(dtype=torch.float64))
        n, span = self.truth01.numel(), self.hu_range[1] - self.hu_range[0]
        nb, nc = self.n_body, self.n_centres_body
        return {
            "psnr": _psnr_of_mse(sq / n),
            "ssim": ssim_all / self.n_centres,
            "mae_hu": span * ab / n,  # |clip(p) - clip(t)| in HU is span * |p01 - t01|
            "psnr_body": _psnr_of_mse(sq_body / nb) if nb else math.nan,
            "ssim_body": ssim_body / nc if nc else math.nan,
            "mae_hu_body": span * ab_body / nb if nb else math.nan,
        }


def mean_abs01(pred_hu: ArrayLike, truth: TruthScorer, slab_depth: int = SSIM_SLAB_DEPTH) -> float:
    """Mean |pred - truth| over every voxel in [0, 1] units (the L1 the training losses use), slab by slab."""
    pred = as_tensor(pred_hu)
    total = 0.0
    for first in range(0, truth.shape[0], slab_depth):
        rows = slice(first, first + slab_depth)
        total += float((to_x01(pred[rows], truth.hu_range) - truth.truth01[rows]).abs().sum(dtype=torch.float64))
    return total / truth.truth01.numel()


def reconstruction_metrics(pred_hu: ArrayLike, truth_hu: ArrayLike, hu_range: Sequence[float]) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one (D, H, W) prediction against the truth, both in HU.

    Both volumes are clipped to ``hu_range``; the body mask comes from the (unclipped) truth. Scoring several
    predictions against one truth: build one :class:`TruthScorer` and call its ``score``.
    """
    pred, truth = as_tensor(pred_hu), as_tensor(truth_hu)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"expected two (D, H, W) volumes of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(truth.shape)}")
    return TruthScorer(truth, hu_range).score(pred)


def _psnr_of_mse(mse: float) -> float:
    """PSNR in dB at data range 1 (as MONAI's ``PSNRMetric``), capped at ``PSNR_CAP_DB`` (+inf at MSE 0)."""
    return min(-10.0 * math.log10(mse), PSNR_CAP_DB) if mse > 0 else PSNR_CAP_DB


def mean_metrics(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each of :data:`METRIC_NAMES` over cases, ignoring NaN (e.g. a case with an empty body mask)."""
    return {name: float(np.nanmean([case[name] for case in per_case])) for name in METRIC_NAMES}


def _window(size: int) -> int:
    """SSIM window along an axis of ``size`` voxels: 11, or the largest odd size that fits (>= 3)."""
    fitted = min(SSIM_WINDOW, size if size % 2 else size - 1)
    if fitted < 3:
        raise ValueError(f"volume axis of {size} voxels is too short for a 3D SSIM window (needs >= 3)")
    return fitted
