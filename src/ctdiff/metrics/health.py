"""Did a learning stage learn anything? The trivial codes a VAE must beat, and the one-line failure every gate raises.

A VAE that decodes every volume to one flat grey (a collapse: it happened to the scratch SD VAE on a lung
periphery family while its training loss looked ordinary) still writes weights, metrics and PNGs; nothing
downstream notices, and the diffusion model then learns the latents of a constant decoder. The gates stop
that where it starts:

- **vae_fit and vae_check** compare the VAE's round trip with two codes that learn nothing, on the same
  volumes and with the same metric (psnr_body over ``hu_range``):

  - ``mean``: every voxel set to the volume's mean HU inside the body (the clipped truth averaged over the
    body mask: the constant that scores best on the body metrics). A collapsed decoder scores at most this:
    it decodes to one grey. (The whole volume's mean would be too weak a bar on psnr_body: with much air in
    view it is far below the body's HU, and a decoder stuck at any soft-tissue grey beats it by several dB.)
  - ``lowpass``: the volume averaged over blocks of the VAE's own downsampling (one number per latent voxel,
    a quarter of what a 4-channel latent holds) and trilinearly upsampled: a fixed linear code of the same
    compression.

  The gate: on every case checked the VAE must beat the constant by ``min_gain_db`` (3 dB: half the error
  power) **or** be at least as good as the low-pass code; else the stage fails naming the case and the three
  numbers. A reviewer's reading: a codec that is neither clearly better than the best constant nor as good as
  plain block averaging at its own compression carries no image. Why the second arm: where fine structure
  dominates the body (the lung periphery family, 0.6 mm pixels) block averaging at SD's 8x itself beats the
  constant by only about 1 dB, so a 3 dB bar alone would fail every codec of that compression, even a
  perfect linear one (measured: periphery SD scratch VAE 21.4-21.9 dB against the constant's 19.1 dB and the
  low-pass's about 20 dB). A collapse fails both arms: it scores at most the constant, below the low-pass.

- **train**: latents without spread (a VAE that encodes everything alike) or a val loss that never falls
  below its first epoch's stop the stage; **sr_reference**: a network whose projected prediction is worse
  than its own input on val; **evaluate** does not fail but says when ``vae_ceiling_consistent`` is below
  ``baseline_consistent`` (the model rung then measures a broken VAE, not latent diffusion).

Each gate raises :class:`Unhealthy` with one line and has an ``accept_unhealthy`` param in its stage's group
to accept the result on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ctdiff.metrics.image import TruthScorer


class Unhealthy(RuntimeError):
    """A learning stage learned nothing useful; ``str(exc)`` is one line naming the numbers and the override."""


def mean_code(truth_hu: np.ndarray, scorer: TruthScorer) -> np.ndarray:
    """(D, H, W) HU -> one constant everywhere (float32): the mean over the body mask of the truth clipped to
    ``hu_range``, the best constant for the body metrics (the whole volume's mean where there is no body)."""
    mask = scorer.mask.numpy() if hasattr(scorer.mask, "numpy") else np.asarray(scorer.mask)
    clipped = np.clip(np.asarray(truth_hu, np.float32), *scorer.hu_range)
    value = clipped[mask].mean(dtype=np.float64) if mask.any() else clipped.mean(dtype=np.float64)
    return np.full(truth_hu.shape, float(value), np.float32)


def lowpass_code(truth_hu: np.ndarray, block: Sequence[int], hu_range: Sequence[float]) -> np.ndarray:
    """(D, H, W) HU clipped to ``hu_range``, averaged over ``block`` (the VAE's downsampling; the far edges
    replicated to whole blocks) and trilinearly upsampled back: (D, H, W) float32 HU."""
    x = torch.from_numpy(np.clip(np.asarray(truth_hu, np.float32), *hu_range))[None, None]
    pad = [-size % b for size, b in zip(truth_hu.shape, block)]
    x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    up = F.interpolate(F.avg_pool3d(x, tuple(block)), size=x.shape[2:], mode="trilinear", align_corners=False)
    d, h, w = truth_hu.shape
    return up[0, 0, :d, :h, :w].numpy()


@dataclass(frozen=True)
class CodecCheck:
    """One volume: the VAE's psnr_body beside the trivial codes' (dB)."""

    case_id: str
    vae: float
    mean: float
    lowpass: float

    @property
    def gain_over_mean(self) -> float:
        return self.vae - self.mean

    @property
    def gain_over_lowpass(self) -> float:
        return self.vae - self.lowpass


def check_codec(case_id: str, vae_psnr_body: float, truth_hu: np.ndarray, scorer: TruthScorer,
                downsample: Sequence[int]) -> CodecCheck:
    """The VAE round trip's psnr_body (the caller scored it with ``scorer``, once) beside the two trivial codes of
    ``truth_hu`` (the scorer's truth)."""
    return CodecCheck(case_id, vae_psnr_body, scorer.score(mean_code(truth_hu, scorer))["psnr_body"],
                      scorer.score(lowpass_code(truth_hu, downsample, scorer.hu_range))["psnr_body"])


def codec_verdict(checks: Sequence[CodecCheck], min_gain_db: float, override: str) -> str | None:
    """None when every case beats its mean code by ``min_gain_db`` or its low-pass code at all; else the one-line
    reason (the worst failing case)."""
    failing = [c for c in checks if c.gain_over_mean < min_gain_db and c.gain_over_lowpass < 0.0]
    if not failing:
        return None
    worst = min(failing, key=lambda c: c.gain_over_mean)
    return (f"the VAE reconstructs {worst.case_id} at {worst.vae:.2f} dB psnr_body, no better than that "
            f"volume's best constant, its mean HU in the body ({worst.mean:.2f} dB; it must beat it by {min_gain_db:g} "
            f"dB), nor than block averaging at its own compression ({worst.lowpass:.2f} dB): it learned too "
            f"little to be useful (collapsed, or too small or too briefly trained for these data); set "
            f"{override}=true to accept it")


def summarise_checks(checks: Sequence[CodecCheck]) -> dict[str, float]:
    """Means over cases, for metrics.json: the trivial codes' psnr_body and the VAE's gains over them."""
    return {"trivial_mean_psnr_body": float(np.mean([c.mean for c in checks])),
            "trivial_lowpass_psnr_body": float(np.mean([c.lowpass for c in checks])),
            "gain_over_mean_db": float(np.mean([c.gain_over_mean for c in checks])),
            "min_gain_over_mean_db": float(min(c.gain_over_mean for c in checks)),
            "gain_over_lowpass_db": float(np.mean([c.gain_over_lowpass for c in checks]))}


def never_fell(val_losses: Sequence[float]) -> bool:
    """True when no epoch after the first reached a val loss below the first epoch's (at least two epochs)."""
    finite = [v for v in val_losses if math.isfinite(v)]
    return len(finite) >= 2 and min(finite[1:]) >= finite[0]
