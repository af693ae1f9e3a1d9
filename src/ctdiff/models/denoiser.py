"""The denoiser: MONAI's 3D ``DiffusionModelUNet`` conditioned by concatenation.

Input ``(B, 2C, d, h, w)`` = the noisy target latent (series 2) and the source latent (series 1 on the
same grid) stacked on channels, both scaled by the latent scale factor; output ``(B, C, d, h, w)`` = the
noise (DDPM epsilon), the v target (DDPM v) or the velocity (rectified flow). ``d, h, w`` must be
multiples of :meth:`UnetParams.latent_multiple`; :func:`pad_latent` gets whole-volume latents there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet

from ctdiff.models.vae.base import crop, pad_to_multiple
from ctdiff.params import ParamsError, UnetParams


def build_unet(unet: UnetParams, latent_channels: int) -> DiffusionModelUNet:
    """A randomly initialised denoiser for latents with ``latent_channels`` channels."""
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=2 * latent_channels,  # noisy target latent + source latent
        out_channels=latent_channels,
        channels=list(unet.channels),
        attention_levels=list(unet.attention_levels),
        num_res_blocks=unet.num_res_blocks,
        norm_num_groups=unet.norm_num_groups,
        num_head_channels=unet.num_head_channels,
    )


def pad_latent(latent: torch.Tensor, unet: UnetParams) -> torch.Tensor:
    """Edge-replicate (B, C, d, h, w) up to multiples of the UNet's downsampling (undo with :func:`crop_latent`)."""
    return pad_to_multiple(latent, (unet.latent_multiple,) * 3)


def crop_latent(latent: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Keep the leading (d, h, w) ``shape`` of a padded (B, C, d', h', w') latent."""
    return crop(latent, shape)


def latent_patch_shape(patch: Sequence[int], downsample: Sequence[int], latent_multiple: int,
                       vae_name: str) -> tuple[int, int, int]:
    """``train.patch`` (voxels, [D, H, W]) -> its latent size, checked so both the VAE and the UNet divide it."""
    multiple = [f * latent_multiple for f in downsample]
    if any(p % m for p, m in zip(patch, multiple)):
        suggestion = [max(m, round(p / m) * m) for p, m in zip(patch, multiple)]
        raise ParamsError(
            f"params.yaml: train.patch {list(patch)} must be a multiple of {multiple} per axis [D, H, W] for the "
            f"{vae_name} VAE (downsampling {list(downsample)}) and the UNet (latent sizes divisible by "
            f"{latent_multiple} = 2^(len(train.unet.channels) - 1)); try {suggestion}")
    return tuple(p // f for p, f in zip(patch, downsample))  # type: ignore[return-value]
