"""MAISI's CT VAE (MONAI ``AutoencoderKlMaisi``) as a :class:`LatentCodec`: 3D, 4x on every axis.

Volumes larger than ``tile`` are encoded tile by tile with MONAI's ``SlidingWindowInferer`` (Gaussian
blending of overlapping tiles) and decoded the same way in latent space with a tile of ``tile / 4``, so
peak memory follows the tile, not the volume. Group norms see one tile at a time, which is why tiled and
untiled results differ slightly (tests bound the difference).

``num_splits`` is MONAI's other memory knob: every convolution splits its input into that many pieces
along ``dim_split`` (with a 3-voxel halo) and concatenates the results. It only pays on a GPU with large
tiles; 1 (no splitting) is the safe CPU value. MONAI does not check its size constraints: unless the
window's deepest level (``1 / downsample`` of it along ``dim_split``) divides into ``num_splits`` pieces of
at least 3 voxels, it fails or, worse, returns wrongly shaped latents (measured: a 36-voxel axis with 2
splits gave 8 latent voxels instead of 9). :meth:`MaisiCodec._check_splits` refuses such a window.
``norm_float16`` (group-norm output in fp16) is on only on CUDA, where the codec runs under fp16
autocast; on CPU it would feed fp16 into fp32 convolutions and fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.inferers import SlidingWindowInferer

from ctdiff.models.vae.base import LatentCodec
from ctdiff.params import MaisiArchParams


def maisi_config(arch: MaisiArchParams, latent_channels: int) -> dict[str, Any]:
    """JSON-able ``AutoencoderKlMaisi`` arguments: the released config with ``arch``'s width.

    Device-dependent arguments (``num_splits``, ``dim_split``, ``norm_float16``) are left out: they change
    how the network runs, not its weights.
    """
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": latent_channels,
        "num_channels": list(arch.num_channels),
        "num_res_blocks": list(arch.num_res_blocks),
        "norm_num_groups": arch.norm_num_groups,
        "norm_eps": 1e-6,
        "attention_levels": [False] * len(arch.num_channels),
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False,
        "use_convtranspose": False,
    }


class MaisiCodec(LatentCodec):
    """``AutoencoderKlMaisi`` on (B, 1, D, H, W) volumes; intensities [0, 1] over ``hu_range``."""

    def __init__(self, config: dict[str, Any], hu_range: Sequence[float], tile: Sequence[int], overlap: float,
                 num_splits: int = 1, dim_split: int = 1, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        module = AutoencoderKlMaisi(**config, num_splits=num_splits, dim_split=dim_split,
                                    norm_float16=device.type == "cuda")
        super().__init__(module, hu_range, config["latent_channels"], device)
        self.config = dict(config)
        factor = 2 ** (len(config["num_channels"]) - 1)
        self.downsample = (factor, factor, factor)
        self.num_splits, self.dim_split = int(num_splits), int(dim_split)
        self.tile = tuple(int(t) for t in tile)
        self.overlap = float(overlap)
        for t in self.tile:
            step = int(t * (1.0 - self.overlap))
            if t % (4 * factor) or step % factor:
                raise ValueError(f"vae.maisi.tile {list(self.tile)} with overlap {self.overlap}: tiles must be "
                                 f"multiples of {4 * factor} and their step ({step}) a multiple of {factor}, so "
                                 f"every tile starts on a latent voxel")

    def posterior_stacked_x01(self, x01: torch.Tensor) -> torch.Tensor:
        return self._windowed(x01, self.tile, lambda x: torch.cat(self.module.encode(x), dim=1), self.downsample[0])

    def decode_x01(self, latent: torch.Tensor) -> torch.Tensor:
        latent_tile = tuple(t // f for t, f in zip(self.tile, self.downsample, strict=True))
        return self._windowed(latent, latent_tile, self.module.decode, 1)

    def _check_splits(self, deepest: int, window: Sequence[int]) -> None:
        """Refuse a window whose deepest level (``deepest`` voxels along ``dim_split``) ``num_splits`` cannot split."""
        n = self.num_splits
        if n > 1 and (deepest % n or deepest // n < 3):
            fits = [k for k in range(1, n) if deepest % k == 0 and deepest // k >= 3] or [1]
            raise ValueError(f"vae.maisi.num_splits={n} cannot split a window of {list(window)} along axis "
                             f"{self.dim_split} (vae.maisi.dim_split): its deepest level has {deepest} voxels "
                             f"there, and MONAI's split convolution needs pieces of >= 3 that divide it evenly "
                             f"(it silently returns wrong shapes otherwise). Use num_splits in {fits} or a larger "
                             f"vae.maisi.tile")

    def _windowed(self, x: torch.Tensor, roi: Sequence[int], fn: Callable[[torch.Tensor], torch.Tensor],
                  per_deepest: int) -> torch.Tensor:
        """``fn`` on the whole of ``x`` when it fits in ``roi``, else on overlapping ``roi`` windows.

        ``per_deepest``: voxels of ``x`` per voxel of the network's deepest level (the downsampling for
        images, 1 for latents).
        """
        size = x.shape[2:]
        # An axis shorter than the tile is taken whole rather than padded to it: padding would be cropped
        # away again, and padded latents are not what the decoder was trained on.
        window = tuple(min(r, s) for r, s in zip(roi, size, strict=True))
        self._check_splits(window[self.dim_split] // per_deepest, window)
        if window == tuple(size):
            return fn(x.to(self.device)).to(x.device)
        roi = window
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=self.overlap, mode="gaussian",
                                       sw_device=self.device, device=x.device)
        return inferer(x, fn)
