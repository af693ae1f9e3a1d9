"""What the train stage feeds the UNet: cached posteriors and patches cut at one place from source and target.

Two parts (the VAE is :class:`ctdiff.models.vae.base.LatentCodec`):

- :class:`LatentCache`: every training volume (source and target) encoded once by the frozen VAE, its
  posterior kept in memory (and optionally on disk) so a frozen-phase step costs only the UNet.
- :class:`PatchSampler`: random patches cut at the same place from source and target, in latent space
  (from the cache) and/or in image space (reconstruction targets, on-the-fly encoding); corners are
  drawn on the latent grid, so a latent patch and its image patch cover the same voxels.

Shapes: volumes ``(D, H, W)`` int16 HU on disk, ``(B, 1, D, H, W)`` float tensors here; latents
``(C, d, h, w)`` per case or ``(B, C, d, h, w)`` per batch with ``d, h, w = ceil((D, H, W) / downsample)``.
Latents here are unscaled (the VAE's own units); the training loop multiplies them by the scale factor.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ctdiff.data.processed import Case
from ctdiff.io import atomic_path, digest
from ctdiff.models.vae.base import LatentCodec, Posterior


# --------------------------------------------------------------------------------------------- cache
@dataclass
class CachedCase:
    case_id: str
    source: Posterior  # (C, d, h, w)
    target: Posterior


class LatentCache:
    """Posteriors of every training volume under the frozen VAE, in memory (float32).

    With ``cache_dir`` the posteriors are also written there, one file per case, under a folder named by
    the VAE's and the data's fingerprint, so a resumed run skips the encoding; folders of other
    fingerprints are removed.
    """

    def __init__(self, cases: list[CachedCase]) -> None:
        self.cases = cases

    @classmethod
    def build(cls, vae: LatentCodec, cases: Sequence[Case], cache_dir: Path | None = None,
              progress: bool = True, volumes: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
              condition: str = "interpolated") -> LatentCache:
        """Encode each case's (condition, target) volumes (default: its ``source.npy`` and ``target.npy``;
        ``volumes`` gives others, e.g. the slab-consistent baseline as the condition, named by ``condition``)."""
        folder = None
        if cache_dir is not None:
            folder = cache_dir / digest([vae.fingerprint, [c.fingerprint() for c in cases], condition])
            for stale in cache_dir.glob("*"):
                if stale != folder:
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        vae.set_trainable("none")
        cached = []
        for i, case in enumerate(tqdm(cases, desc="encode train volumes", unit="case", disable=not progress)):
            path = folder / f"{case.case_id}.pt" if folder else None
            if path is not None and path.is_file():
                t = torch.load(path, map_location="cpu", weights_only=True)
            else:
                t = {}
                pair = volumes[i] if volumes is not None else (case.load("source"), case.load("target"))
                for which, volume in zip(("source", "target"), pair):
                    hu = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None]
                    post = vae.encode_posterior_hu(hu, case.grid.direction)
                    t[f"{which}_mean"], t[f"{which}_std"] = post.mean[0], post.std[0]
                if path is not None:
                    with atomic_path(path) as tmp:
                        torch.save(t, tmp)
            cached.append(CachedCase(case.case_id, Posterior(t["source_mean"], t["source_std"]),
                                     Posterior(t["target_mean"], t["target_std"])))
        return cls(cached)

    def mean_spread(self) -> float:
        """How much the target posterior means vary over voxels: the root mean over cases and channels of their
        variance over voxels (0 for a VAE that encodes everything alike)."""
        variances = [c.target.mean.double().flatten(1).var(dim=1, unbiased=False) for c in self.cases]
        return float(torch.cat(variances).mean().sqrt())

    def residual_std(self) -> float:
        """Std of (target - source) latents sampled from the cached posteriors (independent draws)."""
        return _sampled_std([c.target.mean - c.source.mean for c in self.cases],
                            [c.target.std.double().pow(2) + c.source.std.double().pow(2) for c in self.cases])

    def target_std(self) -> float:
        """Std of latents sampled from the cached target posteriors: sqrt(Var(mean) + E[std^2]) over all."""
        return _sampled_std([c.target.mean for c in self.cases], [c.target.std.double().pow(2) for c in self.cases])


def _sampled_std(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor]) -> float:
    """Std of draws from Gaussians with these means and variances, pooled: sqrt(Var(mean) + E[var])."""
    pooled_means = torch.cat([m.flatten() for m in means]).double()
    pooled_variances = torch.cat([v.flatten() for v in variances]).double()
    return float((pooled_means.var(unbiased=False) + pooled_variances.mean()).sqrt())


# ------------------------------------------------------------------------------------------- patches
class PatchSampler:
    """Random (source, target) patch pairs cut at the same place.

    ``latent_patch`` is (d, h, w) in latent voxels; the image patch is ``latent_patch * downsample``. A
    corner is drawn uniformly on the latent grid, so the image-space corner is a multiple of the
    downsampling and the same patch in image space encodes to (up to tile effects) the cached latent patch.
    Volumes smaller than a patch are edge-padded, as the codec pads volumes to its downsampling.
    """

    def __init__(self, latent_patch: Sequence[int], downsample: Sequence[int]) -> None:
        self.latent_patch = tuple(latent_patch)
        self.downsample = tuple(downsample)
        self.image_patch = tuple(p * f for p, f in zip(latent_patch, downsample))

    def corners(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], indices: Sequence[int],
                rng: np.random.Generator) -> list[tuple[int, int, int]]:
        """One random patch corner (latent voxels) per item, uniform over the latent grid of volume ``i``."""
        out = []
        for i in indices:
            grid = [math.ceil(s / f) for s, f in zip(volumes[i][1].shape, self.downsample)]
            out.append(self.corner(grid, rng))
        return out

    def corner(self, latent_grid: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
        """A random corner (latent voxels) of a patch inside a latent grid (d, h, w)."""
        return tuple(int(rng.integers(0, max(g - p, 0) + 1)) for g, p in zip(latent_grid, self.latent_patch))

    def latent_batch(self, cache: LatentCache, indices: Sequence[int], corners: Sequence[Sequence[int]]
                     ) -> tuple[Posterior, Posterior]:
        """Posterior patches (B, C, d, h, w) of source and target of cached cases ``indices`` at ``corners``."""
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for i, corner in zip(indices, corners):
            case = cache.cases[i]
            for bucket, t in zip(parts, (case.source.mean, case.source.std, case.target.mean, case.target.std)):
                bucket.append(cut_patch(t, corner, self.latent_patch))
        src_mean, src_std, tgt_mean, tgt_std = (torch.stack(b) for b in parts)
        return Posterior(src_mean, src_std), Posterior(tgt_mean, tgt_std)

    def image_batch(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], indices: Sequence[int],
                    corners: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """HU patches (B, 1, D, H, W) float32 of source and target at latent ``corners`` x downsampling, from
        (D, H, W) volumes (memory-mapped is fine)."""
        src, tgt = [], []
        for i, corner in zip(indices, corners):
            origin = [c * f for c, f in zip(corner, self.downsample)]
            for out, volume in ((src, volumes[i][0]), (tgt, volumes[i][1])):
                out.append(torch.from_numpy(np.asarray(cut_patch(volume, origin, self.image_patch), dtype=np.float32)))
        return torch.stack(src)[:, None], torch.stack(tgt)[:, None]


def recon_block(latent: torch.Tensor, image: torch.Tensor, downsample: Sequence[int], slices: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random block of ``slices`` latent slices of a (B, C, d, h, w) patch and the image slices it codes.

    The decoder's reconstruction loss in unfrozen epochs is estimated on this block instead of the whole
    patch: an unbiased estimate of the same per-voxel L1 (the block's start is uniform), at a fraction of
    the cost. For SD the decoder is 2D, so a block of slices decodes exactly as it does inside the patch;
    for MAISI the block is a smaller 3D patch, as in vae_fit's patch training. ``image`` is
    (B, 1, d * fd, h * fh, w * fw); ``slices`` 0 or >= d returns both whole. One block per batch.
    """
    depth = latent.shape[2]
    if slices <= 0 or slices >= depth:
        return latent, image
    start = int(rng.integers(0, depth - slices + 1))
    fd = downsample[0]
    return latent[:, :, start:start + slices], image[:, :, start * fd:(start + slices) * fd]


def cut_patch(x: Any, corner: Sequence[int], size: Sequence[int]) -> Any:
    """``x[..., c:c+s]`` over the last three axes, edge-padded at the far end where it runs out.

    ``x`` is a numpy array (int16 HU volume, possibly memory-mapped) or a torch tensor (latent).
    """
    window = x[(..., *(slice(c, c + s) for c, s in zip(corner, size)))]
    short = [s - w for s, w in zip(size, window.shape[-3:])]
    if not any(short):
        return window
    if isinstance(window, np.ndarray):
        return np.pad(window, [(0, 0)] * (window.ndim - 3) + [(0, n) for n in short], mode="edge")
    lead = window.shape[:-3]
    padded = F.pad(window.reshape(1, -1, *window.shape[-3:]), (0, short[2], 0, short[1], 0, short[0]),
                   mode="replicate")
    return padded.reshape(*lead, *size)


def epoch_order(n_cases: int, per_volume: int, seed: int, epoch: int) -> np.ndarray:
    """Case indices of one epoch, each case ``per_volume`` times, shuffled the same way on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(np.repeat(np.arange(n_cases), per_volume))


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """This rank's batches (``DistributedSampler``-style: every ``world_size``-th item from ``rank``), padded by
    wrapping so every rank runs the same number of steps."""
    per_rank = math.ceil(len(order) / (world_size * batch_size)) * batch_size
    padded = np.resize(order, per_rank * world_size)
    mine = padded[rank::world_size]
    for start in range(0, per_rank, batch_size):
        yield [int(i) for i in mine[start:start + batch_size]]
