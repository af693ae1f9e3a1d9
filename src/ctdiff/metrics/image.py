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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms.utils_morphological_ops import dilate, erode

from ctdiff.data.intensity import ArrayLike, to_hu, to_x01

METRIC_NAMES = ("psnr", "ssim", "mae_hu", "psnr_body", "ssim_body", "mae_hu_body")
PSNR_CAP_DB = 100.0
BODY_THRESHOLD_HU = -500.0
BODY_CLOSING_VOXELS = 3  # closing filter size: bridges one-voxel gaps (noise, thin fat planes)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def body_mask(hu: ArrayLike, threshold_hu: float = BODY_THRESHOLD_HU,
              closing_voxels: int = BODY_CLOSING_VOXELS) -> torch.Tensor:
    """(D, H, W) HU -> (D, H, W) bool: voxels above ``threshold_hu`` after a binary closing.

    The threshold keeps soft tissue, vessels and bone and leaves out air and aerated lung (which sits near
    -850 HU), so ``*_body`` metrics measure the structures that matter clinically.
    """
    mask = (torch.as_tensor(hu).float() > threshold_hu).float()[None, None]
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
    window = [_window(s) for s in truth01.shape]
    ssim_map, _ = compute_ssim_and_cs(pred01[None, None], truth01[None, None], spatial_dims=3, kernel_size=window,
                                      kernel_sigma=[SSIM_SIGMA] * 3, data_range=1.0)
    return ssim_map[0, 0]


def mae_hu(pred_hu: torch.Tensor, truth_hu: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean absolute error in HU, over ``mask`` when given."""
    if mask is not None:
        pred_hu, truth_hu = pred_hu[mask], truth_hu[mask]
    if pred_hu.numel() == 0:
        return math.nan
    return float(MAEMetric()(pred_hu.reshape(1, 1, -1), truth_hu.reshape(1, 1, -1)).item())


def reconstruction_metrics(pred_hu: ArrayLike, truth_hu: ArrayLike, hu_range: Sequence[float]) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one (D, H, W) prediction against the truth, both in HU.

    Both volumes are clipped to ``hu_range``; the body mask comes from the (unclipped) truth.
    """
    pred01, truth01 = to_x01(pred_hu, hu_range), to_x01(truth_hu, hu_range)
    if pred01.shape != truth01.shape or pred01.ndim != 3:
        raise ValueError(f"expected two (D, H, W) volumes of one shape, got {tuple(pred01.shape)} "
                         f"and {tuple(truth01.shape)}")
    pred_clipped, truth_clipped = to_hu(pred01, hu_range), to_hu(truth01, hu_range)
    mask = body_mask(truth_hu)
    ssim_map = ssim_map_of(pred01, truth01)  # once for both SSIMs: it is most of the cost
    return {
        "psnr": psnr(pred01, truth01),
        "ssim": ssim(pred01, truth01, ssim_map=ssim_map),
        "mae_hu": mae_hu(pred_clipped, truth_clipped),
        "psnr_body": psnr(pred01, truth01, mask),
        "ssim_body": ssim(pred01, truth01, mask, ssim_map=ssim_map),
        "mae_hu_body": mae_hu(pred_clipped, truth_clipped, mask),
    }


def mean_metrics(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each of :data:`METRIC_NAMES` over cases, ignoring NaN (e.g. a case with an empty body mask)."""
    return {name: float(np.nanmean([case[name] for case in per_case])) for name in METRIC_NAMES}


def _window(size: int) -> int:
    """SSIM window along an axis of ``size`` voxels: 11, or the largest odd size that fits (>= 3)."""
    fitted = min(SSIM_WINDOW, size if size % 2 else size - 1)
    if fitted < 3:
        raise ValueError(f"volume axis of {size} voxels is too short for a 3D SSIM window (needs >= 3)")
    return fitted
