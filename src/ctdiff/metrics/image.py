"""Image-quality metrics for CT volumes, shared by vae_check, the training stages' validation and evaluate.

Every metric compares a prediction with the truth (series 2) on the same (D, H, W) grid, both in HU and both
clipped to ``hu_range`` first (the range a VAE can represent, so voxels beyond it, like -1024 HU air or
dense bone, cost nothing that no model could recover):

- ``psnr``: PSNR in dB of intensities mapped to [0, 1] over ``hu_range`` (data range 1.0, as MONAI's
  ``PSNRMetric``). Identical volumes would give +inf, which JSON cannot hold: PSNR is capped at
  ``PSNR_CAP_DB``. :func:`psnr_of_mse` is the one formula every PSNR here goes through.
- ``ssim``: 3D SSIM (Gaussian window 11, sigma 1.5, data range 1.0, K1 0.01, K2 0.03: MONAI's
  ``compute_ssim_and_cs`` / ``SSIMMetric``) on the same intensities, the mean of its 'valid' map (one value
  per window centre); the window shrinks (odd, >= 3) on an axis shorter than 11 voxels.
- ``mae_hu``: mean absolute difference in HU.
- ``*_body``: the same inside the body mask of the truth (:func:`body_mask`). ``psnr_body`` and
  ``mae_hu_body`` use the masked voxels only; ``ssim_body`` is the mean of the SSIM map over the window
  centres that lie inside the mask (each window still sees its whole neighbourhood, edges included).

A truth scores many predictions (the rungs of a case): :class:`TruthScorer` computes what depends on the
truth alone once (its body mask, and its local Gaussian mean, which every SSIM map against it shares) and
scores each prediction in one pass over it, a few slices at a time, so that memory stays bounded on full CT
volumes (300 x 512 x 512). :func:`reconstruction_metrics` is the one-prediction shorthand (it filters the
truth inside that one pass instead of keeping its mean).

Why the SSIM is written here rather than called from MONAI: speed. ``compute_ssim_and_cs`` convolves five
maps with a dense 11 x 11 x 11 kernel (1331 multiply-adds per voxel and map), which made scoring a real-size
volume take a minute and more on two cores. The Gaussian window is separable (MONAI builds it as the outer
product of three normalised 1-D Gaussians), so the same local means come from three 1-D passes, here banded
matrix products (:class:`_Window`); and the two local variances enter SSIM only as their sum, so three
channels are filtered per prediction (x, x^2 + y^2, xy) where MONAI filters five. The results equal MONAI's
to float32 rounding, and are closer to the float64 value than MONAI's own float32 map (:func:`_gaussian_1d`
says why; ``tests/test_metrics.py`` checks against ``compute_ssim_and_cs``, ``SSIMMetric`` and float64).
The body mask's closing likewise: MONAI's ``dilate``/``erode`` convolve through a 27x buffer; a box closing
is separable too, so it is a boolean OR then AND of shifted copies along each axis in turn, the same result
bit for bit.

Everything is torch: a scorer built with ``device="cuda"`` (or from a CUDA truth) keeps its arrays on the
GPU and scores predictions there (a host prediction is copied there once per score). On the CPU the work is
split along D between one thread per intra-op thread (:func:`_in_parallel` says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from ctdiff.data.intensity import ArrayLike, as_tensor, to_x01

T = TypeVar("T")

METRIC_NAMES = ("psnr", "ssim", "mae_hu", "psnr_body", "ssim_body", "mae_hu_body")
PSNR_CAP_DB = 100.0
BODY_THRESHOLD_HU = -500.0
BODY_CLOSING_VOXELS = 3  # closing filter size: bridges one-voxel gaps (noise, thin fat planes)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # MONAI's stability constants (data range 1)
SSIM_SLAB_DEPTH = 16  # SSIM map rows (window centres along D) per slab: ~0.15 GB of slices per worker at 512 x 512
BODY_SLAB_DEPTH = 32  # slices per slab of the body mask's closing (booleans: 8 MB per slab at 512 x 512)
TILE_ROWS = 32  # SSIM map rows (H) per tile of a slab: a few MB per channel, so its arithmetic stays in cache
BAND_BLOCK = 64  # outputs per banded matrix product along W (64 + window - 1 inputs each)
MAX_WORKERS = 4  # threads that sweep a volume at once on the CPU (~0.15 GB of slices each at 512 x 512)


# ------------------------------------------------------------------------------------------ body mask
def body_mask(hu: ArrayLike, threshold_hu: float = BODY_THRESHOLD_HU, closing_voxels: int = BODY_CLOSING_VOXELS,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(D, H, W) HU -> (D, H, W) bool: voxels above ``threshold_hu`` after a binary closing (a box of
    ``closing_voxels``, odd; MONAI's ``erode(dilate(mask))``: outside the volume counts as background for the
    dilation and as foreground for the erosion). On ``device`` (default: the volume's own; CPU for NumPy).

    The threshold keeps soft tissue, vessels and bone and leaves out air and aerated lung (which sits near
    -850 HU), so ``*_body`` metrics measure the structures that matter clinically.
    """
    if closing_voxels < 1 or closing_voxels % 2 == 0:
        raise ValueError(f"closing_voxels must be odd and >= 1, got {closing_voxels}")
    device = _device_of(hu, device)
    radius = int(closing_voxels) // 2
    if np.ndim(hu) != 3:
        above = _slab(hu, slice(None), device) > threshold_hu
        return _closing(above, torch.empty_like(above), radius)
    # In slabs along D: the closing at a slice sees 2 * radius slices either side, so a slab with that halo
    # gives exactly the whole volume's values on its own slices.
    depth, halo = hu.shape[0], 2 * radius
    out = torch.empty(tuple(hu.shape), dtype=torch.bool, device=device)

    def close(first: int, last: int) -> None:
        slab = (min(BODY_SLAB_DEPTH, last - first) + 2 * halo, *hu.shape[1:])
        above, spare = (torch.empty(slab, dtype=torch.bool, device=device) for _ in range(2))
        for start in range(first, last, BODY_SLAB_DEPTH):
            stop = min(last, start + BODY_SLAB_DEPTH)
            low, high = max(0, start - halo), min(depth, stop + halo)
            part = above[:high - low]
            torch.gt(_slab(hu, slice(low, high), device), threshold_hu, out=part)
            out[start:stop] = _closing(part, spare[:high - low], radius)[start - low:stop - low]

    _in_parallel([partial(close, *part) for part in _split(depth, _workers(device))], device)
    return out


def _closing(mask: torch.Tensor, spare: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary closing of a bool tensor by a box of side 2 * radius + 1: a max filter, then a min filter, each
    one axis at a time (a box is the product of its axes' intervals). ``mask`` and ``spare`` (its shape) are
    overwritten; the result is one of them."""
    for grow in (True, False):
        for axis in range(mask.ndim):
            mask, spare = _box_along(mask, spare, axis, radius, grow), mask
    return mask


def _box_along(mask: torch.Tensor, out: torch.Tensor, axis: int, radius: int, grow: bool) -> torch.Tensor:
    """OR (``grow``) or AND of each voxel's neighbours within ``radius`` along ``axis``, written into ``out``;
    neighbours beyond the edge are left out, which is padding with False for OR and with True for AND."""
    out.copy_(mask)
    size = mask.shape[axis]
    combine = torch.Tensor.logical_or_ if grow else torch.Tensor.logical_and_
    for shift in range(1, min(radius, size - 1) + 1):
        combine(out.narrow(axis, shift, size - shift), mask.narrow(axis, 0, size - shift))
        combine(out.narrow(axis, 0, size - shift), mask.narrow(axis, shift, size - shift))
    return out


# ------------------------------------------------------------------------------------------ PSNR
def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of [0, 1] intensities (data range 1: ``-10 log10(mse)``, as MONAI's
    ``PSNRMetric``), capped at ``PSNR_CAP_DB`` (+inf at MSE 0); NaN for a NaN MSE (no voxels)."""
    if math.isnan(mse):
        return math.nan
    return min(-10.0 * math.log10(mse), PSNR_CAP_DB) if mse > 0 else PSNR_CAP_DB


def psnr(pred01: torch.Tensor, truth01: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of [0, 1] intensities (any shape, data range 1), over ``mask`` when given; capped at
    ``PSNR_CAP_DB``, NaN over an empty mask."""
    diff = pred01.float() - truth01.float()
    if mask is not None:
        diff = diff[mask]
    if diff.numel() == 0:
        return math.nan
    return psnr_of_mse(float(diff.square().sum(dtype=torch.float64)) / diff.numel())


# ------------------------------------------------------------------------------------------ SSIM
def ssim(pred01: torch.Tensor, truth01: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """3D SSIM of (D, H, W) [0, 1] intensities (data range 1), averaged over the window centres inside
    ``mask`` when given (NaN when none is)."""
    values = ssim_map(pred01, truth01)
    if mask is not None:
        values = values[_Window(tuple(truth01.shape), values.device).centres(mask.to(values.device))]
    return float(values.mean(dtype=torch.float64)) if values.numel() else math.nan


def ssim_map(pred01: torch.Tensor, truth01: torch.Tensor, slab_depth: int = SSIM_SLAB_DEPTH) -> torch.Tensor:
    """The 3D SSIM map of two (D, H, W) [0, 1] volumes, one value per window centre ('valid'): MONAI's
    ``compute_ssim_and_cs(...)[0][0, 0]`` to float32 rounding. The whole map is returned (small volumes;
    :class:`TruthScorer` keeps only its sums)."""
    window = _Window(tuple(truth01.shape), truth01.device)
    x, y = pred01.float().to(window.device), truth01.float()
    out = torch.empty(window.valid_shape(window.rows), device=window.device)

    def fill(slices: slice, ring: torch.Tensor) -> None:  # x, x^2 + y^2, x y, y
        for channel, value in enumerate((x[slices], x[slices] ** 2 + y[slices] ** 2, x[slices] * y[slices],
                                         y[slices])):
            ring[channel] = value

    for first, last, top, bottom, means in window.sweep(4, fill, slab_depth):
        out[first:last, top:bottom] = _ssim_map_(means[:3], means[3], torch.empty_like(means[3]))
    return out


class _Window:
    """The SSIM window of a (D, H, W) volume and its 'valid' Gaussian means as three 1-D passes, computed in a
    sweep along D that holds only a ring of slices and one tile of the map at a time.

    The ring holds the ``slab_depth + kd - 1`` slices that one slab of map rows sees; each slab only adds the
    slices it newly reaches, so every slice's channels are computed once. The slab's map rows are then made
    a tile of ``TILE_ROWS`` rows (H) at a time: the means along D, H and W are each a banded matrix product
    (row i of a band holds the 1-D kernel at columns i .. i + k - 1): along D the ring's slots are the rows of
    the product (the band's columns follow the slots), along H a band multiplies each slice from the left, and
    along W (contiguous) the rows of the tile multiply blocks of ``BAND_BLOCK`` output columns. A band does a
    few times the multiply-adds of the 11 taps, but as matrix products they run near the machine's arithmetic
    peak, where a tap-by-tap sum would be one pass over memory per tap; a tile (a few MB) stays in cache for
    the arithmetic that follows.
    """

    def __init__(self, shape: tuple[int, int, int], device: torch.device):
        self.shape, self.device = shape, device
        self.size = tuple(_window(s) for s in shape)
        self.half = tuple(k // 2 for k in self.size)
        self.rows, self.height, self.width = (s - k + 1 for s, k in zip(shape, self.size))
        self.kernels = [_gaussian_1d(k) for k in self.size]
        self._bands: dict[tuple, torch.Tensor] = {}

    def valid_shape(self, rows: int) -> tuple[int, int, int]:
        return rows, self.height, self.width

    def centres(self, mask: torch.Tensor, first: int = 0, last: int | None = None, top: int = 0,
                bottom: int | None = None) -> torch.Tensor:
        """The window centres of map rows ``first:last`` (D) and ``top:bottom`` (H) in a (D, H, W) mask (a
        view)."""
        last = self.rows if last is None else last
        bottom = self.height if bottom is None else bottom
        (d, h, w) = self.half
        return mask[first + d:last + d, top + h:bottom + h, w:w + self.width]

    def band(self, axis: int, outputs: int, slots: int | None = None, first: int = 0) -> torch.Tensor:
        """(outputs, outputs + k - 1) float32: row i holds the axis's kernel at columns i .. i + k - 1; with
        ``slots``, (outputs, slots) with row i's kernel at columns (first + i .. first + i + k - 1) % slots."""
        key = (axis, outputs, slots, first % slots if slots else 0)
        if key not in self._bands:
            kernel = self.kernels[axis]
            width = outputs + len(kernel) - 1
            band = torch.zeros(outputs, width)
            for tap, weight in enumerate(kernel.tolist()):
                band.diagonal(tap).fill_(weight)
            if slots is not None:
                band = torch.zeros(outputs, slots).index_add_(1, (torch.arange(width) + first) % slots, band)
            self._bands[key] = band.to(self.device)
        return self._bands[key]

    def sweep(self, channels: int, fill, slab_depth: int, rows: tuple[int, int] | None = None):
        """Yield ``(first, last, top, bottom, means)`` for every tile of the map rows ``rows`` (default: all):
        ``means`` (channels, last - first, bottom - top, width), contiguous (reused: valid until the next
        tile), the Gaussian means of each channel at map rows first:last (D), top:bottom (H) and every column.
        ``fill(slices, out)`` writes the channels of volume slices ``slices`` into ``out`` (channels, n, H,
        W); each slice the rows see goes through it once."""
        row_first, row_last = rows if rows is not None else (0, self.rows)
        depth, (kd, kh, kw) = min(row_last - row_first, slab_depth), self.size
        slots, (height, width) = depth + kd - 1, self.shape[1:]
        tile_rows = min(self.height, TILE_ROWS)
        ring = torch.empty((channels, slots, height, width), device=self.device)
        along_d = torch.empty(channels * depth * (tile_rows + kh - 1) * width, device=self.device)
        along_h = torch.empty(channels * depth * tile_rows * width, device=self.device)
        along_w = torch.empty(channels * depth * tile_rows * self.width, device=self.device)
        filled = row_first  # slices [row_first, filled) have been through the ring
        for first in range(row_first, row_last, depth):
            last = min(row_last, first + depth)
            n = last - first
            while filled < last + kd - 1:  # the new slices, in runs of consecutive slots
                slot = filled % slots
                run = min(last + kd - 1 - filled, slots - slot)
                fill(slice(filled, filled + run), ring[:, slot:slot + run])
                filled += run
            along_slots = self.band(0, n, slots, first)
            for top in range(0, self.height, tile_rows):
                bottom = min(self.height, top + tile_rows)
                rows_in, rows_out = bottom - top + kh - 1, bottom - top
                seen = ring.view(channels, slots, height * width)[:, :, top * width:(top + rows_in) * width]
                d = _head(along_d, (channels, n, rows_in * width))
                torch.matmul(along_slots, seen, out=d)
                h = _head(along_h, (channels * n, rows_out, width))
                torch.matmul(self.band(1, rows_out), d.view(channels * n, rows_in, width), out=h)
                flat, means = h.view(-1, width), _head(along_w, (channels, n, rows_out, self.width))
                flat_means = means.view(-1, self.width)
                for start in range(0, self.width, BAND_BLOCK):
                    stop = min(self.width, start + BAND_BLOCK)
                    torch.mm(flat[:, start:stop + kw - 1], self.band(2, stop - start).T,
                             out=flat_means[:, start:stop])
                yield first, last, top, bottom, means


def _gaussian_1d(size: int) -> torch.Tensor:
    """MONAI's normalised 1-D Gaussian of ``size`` taps and ``SSIM_SIGMA`` as float32 taps whose exact sum is 1
    to about 1e-10 (each within 1e-8 of MONAI's).

    Normalised in float32 as MONAI does, the taps sum to 1 - 5e-8, and a 3-D window to 1 - 1.5e-7; every
    local variance E[x^2] - E[x]^2 then comes out about 1.5e-7 E[x]^2 too large, which is not small beside
    the variance of flat soft tissue (~5e-5): it raised a CT's mean SSIM by ~1e-5 (MONAI's own map by more).
    So the residual of the rounded taps is pushed into them from the largest to the smallest, whose ulps are
    finest."""
    dist = torch.arange(start=(1 - size) / 2, end=(1 + size) / 2, step=1, dtype=torch.float64)
    gauss = torch.exp(-torch.pow(dist / SSIM_SIGMA, 2) / 2)
    taps = (gauss / gauss.sum()).float()
    for tap in torch.argsort(taps, descending=True).tolist():
        residual = 1.0 - float(taps.double().sum())
        taps[tap] = taps[tap].double() + residual
    return taps


def _ssim_map_(maps: torch.Tensor, mu_y: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """The SSIM map from the Gaussian means ``maps`` (3, ...) = (E[x], E[x^2 + y^2], E[xy]) and ``mu_y`` = E[y];
    in place (``maps`` and ``tmp`` are overwritten), returned as a view of ``maps[2]``.

    MONAI's formula, ``(2 mu_x mu_y + C1) (2 cov + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2))``, with
    the two variances taken together: var_x + var_y = E[x^2 + y^2] - mu_x^2 - mu_y^2, so one filtered channel
    serves both (and the truth keeps one map, its mean)."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, e_squares, e_xy = maps[0], maps[1], maps[2]
    torch.mul(mu_x, mu_y, out=tmp)
    e_xy.sub_(tmp).mul_(2.0).add_(c2)  # 2 cov(x, y) + C2
    tmp.mul_(2.0).add_(c1)  # 2 mu_x mu_y + C1
    e_xy.mul_(tmp)
    torch.mul(mu_x, mu_x, out=tmp).addcmul_(mu_y, mu_y)  # mu_x^2 + mu_y^2
    e_squares.sub_(tmp).add_(c2)  # var(x) + var(y) + C2
    tmp.add_(c1)
    e_squares.mul_(tmp)
    return e_xy.div_(e_squares)


# ------------------------------------------------------------------------------------------ one truth
class TruthScorer:
    """:data:`METRIC_NAMES` of predictions against one (D, H, W) HU truth, built once per truth.

    Holds what the truth alone fixes: ``mask`` (its :func:`body_mask`, from the unclipped truth), ``centres``
    (the SSIM window centres inside the mask, a view of it) and, with ``keep_maps`` (the default), the
    truth's SSIM map ``mu_y`` (its Gaussian mean at every window centre: float32, 290 MB at 300 x 512 x 512),
    so that each :meth:`score` filters three channels (x, x^2 + y^2, xy); without it each :meth:`score`
    filters y as well (one prediction: less work and memory in all). The truth itself is kept as given, not copied (on
    CPU a NumPy or memory-mapped truth is read a few slices at a time).

    :meth:`score` makes one pass over a prediction, a few slices at a time (``ssim_slab_depth`` SSIM map
    rows and the slices their windows see), so neither a full-size map nor a full-size copy of the
    prediction is made. ``device``: where the scorer's arrays live and predictions are scored (default: the
    truth's device, CPU for NumPy); a CUDA scorer copies the truth there once, and each prediction once per
    :meth:`score`.
    """

    def __init__(self, truth_hu: ArrayLike, hu_range: Sequence[float], ssim_slab_depth: int = SSIM_SLAB_DEPTH,
                 mask: torch.Tensor | None = None, device: torch.device | str | None = None,
                 keep_maps: bool = True):
        """``mask``: the truth's :func:`body_mask` when the caller keeps it."""
        if np.ndim(truth_hu) != 3:
            raise ValueError(f"expected a (D, H, W) truth volume, got shape {tuple(np.shape(truth_hu))}")
        if ssim_slab_depth < 1:
            raise ValueError(f"ssim_slab_depth must be >= 1, got {ssim_slab_depth}")
        self.device = _device_of(truth_hu, device)
        self.truth_hu = truth_hu if self.device.type == "cpu" else as_tensor(truth_hu).to(self.device)
        self.shape: tuple[int, int, int] = tuple(truth_hu.shape)  # type: ignore[assignment]
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.ssim_slab_depth = int(ssim_slab_depth)
        self.mask = body_mask(self.truth_hu, device=self.device) if mask is None else mask.to(self.device)
        self._window = _Window(self.shape, self.device)
        self.window = self._window.size
        self.centres = self._window.centres(self.mask)
        self.n_body = int(torch.count_nonzero(self.mask))
        self.n_centres = self.centres.numel()
        self.n_centres_body = int(torch.count_nonzero(self.centres))
        self.mu_y: torch.Tensor | None = None
        if keep_maps:
            self._keep_maps()

    def x01(self, rows: slice) -> torch.Tensor:
        """The truth's slices ``rows`` as float32 [0, 1] over ``hu_range``, on the scorer's device."""
        return to_x01(_slab(self.truth_hu, rows, self.device), self.hu_range)

    def _keep_maps(self) -> None:
        """``mu_y`` at every window centre, one sweep per worker."""
        w = self._window
        self.mu_y = mu_y = torch.empty(w.valid_shape(w.rows), device=self.device)

        def fill(slices: slice, ring: torch.Tensor) -> None:  # y
            _x01_into(_slab(self.truth_hu, slices, self.device), self.hu_range, ring[0])

        def sweep(rows: tuple[int, int]) -> None:
            for first, last, top, bottom, means in w.sweep(1, fill, self.ssim_slab_depth, rows):
                mu_y[first:last, top:bottom] = means[0]

        _in_parallel([partial(sweep, rows) for rows in _split(w.rows, _workers(self.device))], self.device)

    def score(self, pred_hu: ArrayLike) -> dict[str, float]:
        """:data:`METRIC_NAMES` of one (D, H, W) HU prediction (clipped to ``hu_range``) against the truth.

        One pass: each slice's [0, 1] intensities give its voxel errors and its channels, whose Gaussian
        means give the SSIM map a tile at a time, summed over all window centres and over those in the body.
        """
        if tuple(np.shape(pred_hu)) != self.shape:
            raise ValueError(f"expected a (D, H, W) prediction of the truth's shape {self.shape}, "
                             f"got {tuple(np.shape(pred_hu))}")
        if self.device.type != "cpu":
            pred_hu = as_tensor(pred_hu).to(self.device)  # the whole prediction in one transfer, then read in place
        chunks = _split(self._window.rows, _workers(self.device))
        # Each worker sums the errors of the slices from its first map row to the next worker's (the last to
        # the end), so every slice counts once although the workers' windows overlap.
        owned = [(first, chunks[i + 1][0] if i + 1 < len(chunks) else self.shape[0])
                 for i, (first, _) in enumerate(chunks)]
        tasks = [partial(self._score_rows, pred_hu, rows, own) for rows, own in zip(chunks, owned)]
        sq, ab, sq_body, ab_body, ssim_all, ssim_body = sum(_in_parallel(tasks, self.device)).tolist()
        n, span = math.prod(self.shape), self.hu_range[1] - self.hu_range[0]
        nb, nc = self.n_body, self.n_centres_body
        return {
            "psnr": psnr_of_mse(sq / n),
            "ssim": ssim_all / self.n_centres,
            "mae_hu": span * ab / n,  # |clip(p) - clip(t)| in HU is span * |p01 - t01|
            "psnr_body": psnr_of_mse(sq_body / nb) if nb else math.nan,
            "ssim_body": ssim_body / nc if nc else math.nan,
            "mae_hu_body": span * ab_body / nb if nb else math.nan,
        }

    def _score_rows(self, pred_hu: ArrayLike, rows: tuple[int, int], owned: tuple[int, int]) -> torch.Tensor:
        """(6,) float64 sums over SSIM map rows ``rows`` and the errors of slices ``owned``: squared and
        absolute errors (all, body), SSIM (all centres, body centres)."""
        w, device, kept = self._window, self.device, self.mu_y is not None
        slices = min(rows[1] - rows[0], self.ssim_slab_depth) + self.window[0] - 1
        y = torch.empty((slices, *self.shape[1:]), device=device)  # the truth (with a kept mu_y), the error
        squared = torch.empty_like(y)
        inside = self.mask.view(torch.uint8)  # 0/1 to multiply by (the same bytes)
        sums = torch.zeros(6, dtype=torch.float64, device=device)

        def fill(batch: slice, ring: torch.Tensor) -> None:  # x, x^2 + y^2, x y (, y); the owned slices' errors
            n = batch.stop - batch.start
            x, truth = ring[0], y[:n] if kept else ring[3]
            _x01_into(_slab(pred_hu, batch, device), self.hu_range, x)
            _x01_into(_slab(self.truth_hu, batch, device), self.hu_range, truth)
            torch.mul(x, x, out=ring[1]).addcmul_(truth, truth)
            torch.mul(x, truth, out=ring[2])
            low, high = max(batch.start, owned[0]), min(batch.stop, owned[1])
            if low < high:
                own = slice(low - batch.start, high - batch.start)
                err = truth[own] if kept else y[:high - low]  # with a kept mu_y the truth is not needed again
                _error_sums(torch.sub(x[own], truth[own], out=err), squared[:high - low], inside[low:high], sums[:4])

        for first, last, top, bottom, means in w.sweep(3 if kept else 4, fill, self.ssim_slab_depth, rows):
            mu_y = self.mu_y[first:last, top:bottom] if kept else means[3]
            tile = _ssim_map_(means[:3], mu_y, _head(squared, means.shape[1:]))
            sums[4] += tile.sum()
            sums[5] += tile.mul_(w.centres(inside, first, last, top, bottom)).sum()
        return sums


def _error_sums(err: torch.Tensor, squared: torch.Tensor, inside: torch.Tensor, sums: torch.Tensor) -> None:
    """Add sum(err^2), sum(|err|) and the same over the voxels ``inside`` (uint8 0/1) to ``sums`` (4,); ``err``
    and ``squared`` (a buffer of its size) are overwritten. float32 sums (cascaded: accurate to float32
    rounding, where a BLAS dot product or a float32 norm is not) added up in float64. Masks multiply (0/1)
    rather than ``masked_fill``: 8x faster on the CPU."""
    torch.mul(err, err, out=squared)
    sums[0] += squared.sum()
    sums[2] += squared.mul_(inside).sum()
    err.abs_()
    sums[1] += err.sum()
    sums[3] += err.mul_(inside).sum()


def mean_abs01(pred_hu: ArrayLike, truth: TruthScorer, slab_depth: int = SSIM_SLAB_DEPTH) -> float:
    """Mean |pred - truth| over every voxel in [0, 1] units (the L1 the training losses use), slab by slab
    (``mae_hu / span`` of the same prediction's :meth:`TruthScorer.score`)."""
    total = 0.0
    for first in range(0, truth.shape[0], slab_depth):
        rows = slice(first, first + slab_depth)
        pred01 = to_x01(_slab(pred_hu, rows, truth.device), truth.hu_range)
        total += float((pred01 - truth.x01(rows)).abs().sum(dtype=torch.float64))
    return total / math.prod(truth.shape)


def reconstruction_metrics(pred_hu: ArrayLike, truth_hu: ArrayLike, hu_range: Sequence[float],
                           device: torch.device | str | None = None) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one (D, H, W) prediction against the truth, both in HU.

    Both volumes are clipped to ``hu_range``; the body mask comes from the (unclipped) truth. Scoring several
    predictions against one truth: build one :class:`TruthScorer` and call its ``score``.
    """
    if np.shape(pred_hu) != np.shape(truth_hu) or np.ndim(pred_hu) != 3:
        raise ValueError(f"expected two (D, H, W) volumes of one shape, got {tuple(np.shape(pred_hu))} "
                         f"and {tuple(np.shape(truth_hu))}")
    return TruthScorer(truth_hu, hu_range, device=device, keep_maps=False).score(pred_hu)


def mean_metrics(per_case: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each of :data:`METRIC_NAMES` over cases, ignoring NaN (e.g. a case with an empty body mask)."""
    return {name: float(np.nanmean([case[name] for case in per_case])) for name in METRIC_NAMES}


# ------------------------------------------------------------------------------------------ helpers
def _window(size: int) -> int:
    """SSIM window along an axis of ``size`` voxels: 11, or the largest odd size that fits (>= 3)."""
    fitted = min(SSIM_WINDOW, size if size % 2 else size - 1)
    if fitted < 3:
        raise ValueError(f"volume axis of {size} voxels is too short for a 3D SSIM window (needs >= 3)")
    return fitted


def _split(size: int, parts: int) -> list[tuple[int, int]]:
    """``range(size)`` cut into ``parts`` (at most ``size``) contiguous (start, stop) pieces of near-equal size."""
    parts = max(1, min(parts, size))
    edges = [round(i * size / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _workers(device: torch.device) -> int:
    """Workers that sweep a volume at once: one per intra-op thread on the CPU (at most ``MAX_WORKERS``, each
    holding its own slices), one on a GPU."""
    return min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1


def _in_parallel(tasks: list[Callable[[], T]], device: torch.device) -> list[T]:
    """The tasks' results: on the CPU each task run in a thread of its own, the intra-op threads shared out
    between them (one each on up to ``MAX_WORKERS`` cores); on a GPU one after another.

    Why: a sweep is thousands of operations on a few MB each. With torch's intra-op threads every one of
    them ends at a barrier, and on a machine whose cores are shared (CI, a box running other jobs) a
    barrier waits for a descheduled thread: 4 ms per operation was measured on 2 busy cores, 30x the
    operation itself. Whole chunks in threads of their own never wait for each other (torch releases the
    GIL inside an operation), and on idle cores they run as fast as intra-op threads would. torch's thread
    count is the process's: it is lowered for the call (new threads take it up when they first run an
    operation) and restored after.
    """
    if device.type != "cpu":
        # One after another on the GPU, its matrix products in full float32: TF32 (which a training script may
        # have switched on for the process) would cost the SSIM maps three of their digits.
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return [task() for task in tasks]
        finally:
            torch.set_float32_matmul_precision(precision)
    if len(tasks) == 1:
        return [task() for task in tasks]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(tasks)))
    try:
        with ThreadPoolExecutor(len(tasks)) as pool:
            return [future.result() for future in [pool.submit(task) for task in tasks]]
    finally:
        torch.set_num_threads(threads)


def _device_of(volume: ArrayLike, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return volume.device if isinstance(volume, torch.Tensor) else torch.device("cpu")


def _slab(volume: ArrayLike, rows: slice, device: torch.device) -> torch.Tensor:
    """Slices ``rows`` of a (D, ...) array or tensor as a tensor on ``device``: a view where it can be (a
    read-only NumPy slab, e.g. memory-mapped, is copied, only that slab)."""
    return as_tensor(volume[rows]).to(device)


def _head(buffer: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The first ``prod(shape)`` elements of a contiguous ``buffer`` as a contiguous tensor of ``shape``."""
    return buffer.view(-1)[:math.prod(shape)].view(tuple(shape))


def _x01_into(hu: torch.Tensor, hu_range: tuple[float, float], out: torch.Tensor) -> torch.Tensor:
    """:func:`ctdiff.data.intensity.to_x01` written into ``out`` (float32, ``hu``'s shape), the same arithmetic.

    Not folded into one multiply-add (``0.5 + hu / span``): near the bottom of the range (air) that cancels,
    and a 10 HU error over air would lose five digits."""
    low, high = hu_range
    torch.sub(hu, low, out=out)
    return out.div_(high - low).clamp_(0.0, 1.0)
