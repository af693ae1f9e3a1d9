"""Sampling from a trained model: the one path evaluate and ``ctdiff predict`` share.

- :func:`load_trained_model`: the UNet of ``models/checkpoints`` (``best.pt``, else ``last.pt``), the VAE of
  ``models/vae`` (with the fine-tuned weights when training changed them), the latent scale factor and the
  latent target (residual or not) the checkpoint was trained with.
- :func:`sample_thin`: series 1 on the thin grid in, series 2 out: the condition is the posterior mean of
  series 1's latent; one latent is sampled per draw (DDIM for a DDPM-trained model, Euler steps for
  rectified flow; one seeded stream, successive draws), decoded, and the decodes averaged in HU (an
  estimate of the posterior mean, which is what PSNR and MAE reward). Volumes larger than the training
  patch are sampled window by window (:class:`WindowedDenoiser`), so any size works.
- :func:`vae_round_trip`: encode (posterior mean) and decode, for the VAE ceiling and ``decode: change``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from ctdiff.models.checkpoint import load_checkpoint
from ctdiff.models.denoiser import build_unet, crop_latent, latent_patch_shape, pad_latent
from ctdiff.models.diffusion import LatentTarget, sample, sampling_scheduler
from ctdiff.models.vae.adapter import VaeAdapter
from ctdiff.params import Params

CHECKPOINTS = ("best.pt", "last.pt")  # best by val loss; last when no validation improved on the first


@dataclass
class TrainedModel:
    unet: nn.Module
    vae: VaeAdapter
    scale_factor: float
    latent_target: LatentTarget
    latent_patch: tuple[int, int, int]
    checkpoint: dict[str, Any]  # file, step, epoch


class WindowedDenoiser(nn.Module):
    """The UNet applied over overlapping latent windows of the training patch size, blended.

    Same call signature as ``DiffusionModelUNet``, so MONAI's sampling loop uses it unchanged; the noise
    is drawn once for the whole volume, so neighbouring windows denoise the same sample.
    """

    def __init__(self, unet: nn.Module, roi: tuple[int, int, int], overlap: float, window_batch: int = 1) -> None:
        super().__init__()
        self.unet = unet
        self.inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=window_batch, overlap=overlap,
                                            mode="gaussian")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.inferer(x, self.unet, timesteps=timesteps, context=context)


def load_trained_model(params: Params, vae_dir: Path, ckpt_dir: Path, device: torch.device) -> TrainedModel:
    """The UNet, the VAE (with its fine-tuned weights when training changed them) and the scale factor."""
    path = next((ckpt_dir / name for name in CHECKPOINTS if (ckpt_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (expected one of {CHECKPOINTS}): run the train stage")
    ckpt = load_checkpoint(path)
    vae = VaeAdapter.load(vae_dir, params.vae, device)
    if ckpt.get("codec") not in (None, vae.name):
        raise ValueError(f"{path} was trained with the {ckpt['codec']} VAE but {vae_dir} holds {vae.name}: "
                         "rerun the train stage (dvc repro)")
    if ckpt.get("vae") is not None:
        vae.module.load_state_dict(ckpt["vae"])
    vae.set_trainable("none")
    unet = build_unet(params.train.unet, vae.latent_channels)
    unet.load_state_dict(ckpt["unet"])
    unet.to(device).eval()
    latent_patch = latent_patch_shape(params.train.patch, vae.downsample, params.train.unet.latent_multiple, vae.name)
    latent_target = LatentTarget(bool(ckpt.get("train_params", {}).get("residual", False)),
                                 float(ckpt.get("residual_gain") or 1.0))
    return TrainedModel(unet, vae, float(ckpt["scale_factor"]), latent_target, tuple(latent_patch),
                        {"file": path.name, "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"])})


@torch.no_grad()
def sample_thin(model: TrainedModel, params: Params, source_hu: np.ndarray, seed: int) -> np.ndarray:
    """Sample series 2 given series 1 on its grid: (D, H, W) HU in, (D, H, W) float32 HU out, the mean of
    ``evaluate.samples`` decoded draws (see the module docstring)."""
    device = next(model.unet.parameters()).device
    hu = torch.from_numpy(source_hu.astype(np.float32))[None, None].to(device)
    # The posterior mean conditions sampling: the deterministic code of series 1.
    condition = model.vae.encode_posterior_hu(hu).mean * model.scale_factor
    latent_shape = tuple(condition.shape[2:])
    condition = pad_latent(condition, params.train.unet)
    roi = tuple(min(r, s) for r, s in zip(model.latent_patch, condition.shape[2:]))
    denoiser: nn.Module = model.unet
    if roi != tuple(condition.shape[2:]):
        denoiser = WindowedDenoiser(model.unet, roi, params.evaluate.overlap, params.evaluate.window_batch)
    generator = torch.Generator(device=device).manual_seed(seed)
    scheduler = sampling_scheduler(params.train, params.evaluate.steps)
    total = np.zeros(source_hu.shape, np.float64)
    for _ in range(params.evaluate.samples):
        latent = model.latent_target.latent(sample(denoiser, scheduler, condition, generator=generator), condition)
        latent = crop_latent(latent, latent_shape) / model.scale_factor
        total += model.vae.decode_hu(latent, source_hu.shape)[0, 0].float().cpu().numpy()
    return (total / params.evaluate.samples).astype(np.float32)


@torch.no_grad()
def vae_round_trip(vae: VaeAdapter, hu: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode: (D, H, W) HU -> (D, H, W) float32 HU."""
    device = next(vae.module.parameters()).device
    x = torch.from_numpy(hu.astype(np.float32))[None, None].to(device)
    return vae.decode_hu(vae.encode_posterior_hu(x).mean, hu.shape)[0, 0].float().cpu().numpy()
