"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) as a :class:`LatentCodec`, one axial slice at a time.

Each (H, W) slice becomes an RGB image in [-1, 1] (the grey value on all three channels), so the latent
of a (D, H, W) volume is (C, D, H/8, W/8): 8x in-plane, none in depth. Decoded channels are averaged
back to grey. Slices go through the network ``slice_batch`` at a time, as the series stores them (rows
anterior to posterior, columns patient right to left: a radiological display, the way 2D images are seen);
the slice direction plays no part, so the codec ignores the volume's ``direction``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL

from ctdiff.models.vae.base import Direction, LatentCodec
from ctdiff.params import SdArchParams


def sd_scratch_config(arch: SdArchParams, latent_channels: int) -> dict[str, Any]:
    """``AutoencoderKL`` arguments for an SD-family VAE of ``arch``'s width (RGB in and out, as the original)."""
    levels = len(arch.block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(arch.block_out_channels),
        "layers_per_block": arch.layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": arch.norm_num_groups,
    }


class SdCodec(LatentCodec):
    """``AutoencoderKL`` applied per axial slice of (B, 1, D, H, W) volumes."""

    name = "sd"

    def __init__(self, module: AutoencoderKL, hu_range: Sequence[float], slice_batch: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(module, hu_range, module.config.latent_channels, device)
        factor = 2 ** (len(module.config.block_out_channels) - 1)
        self.downsample = (1, factor, factor)
        self.slice_batch = slice_batch

    def _posterior_stacked_x01(self, x01: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        def posterior(slices01: torch.Tensor) -> torch.Tensor:
            dist = self.module.encode(self._rgb(slices01)).latent_dist
            return torch.cat([dist.mean, dist.std], dim=1)

        return self._map_slices(posterior, x01)

    def _decode_x01(self, latent: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        return self._map_slices(lambda z: self._grey01(self.module.decode(z).sample), latent)

    def _rgb(self, slices01: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, in_channels, H, W) in [-1, 1]."""
        return (slices01 * 2.0 - 1.0).expand(-1, self.module.config.in_channels, -1, -1)

    @staticmethod
    def _grey01(rgb: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 1, H, W) in [0, 1] units (channel mean, not clamped)."""
        return (rgb.mean(dim=1, keepdim=True) + 1.0) / 2.0

    def _map_slices(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Apply a 2D ``fn`` to every axial slice of (B, C, D, H, W) ``x``, ``slice_batch`` at a time."""
        slices = to_slices(x)
        out = torch.cat([fn(s.to(self.device)).to(x.device) for s in slices.split(self.slice_batch)])
        return from_slices(out, x.shape[0])


def to_slices(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * D, C, H, W), slice-major within each volume."""
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


def from_slices(slices: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * D, C, H, W) -> (B, C, D, H, W); inverse of :func:`to_slices`."""
    n, c, h, w = slices.shape
    return slices.reshape(batch, n // batch, c, h, w).permute(0, 2, 1, 3, 4)
