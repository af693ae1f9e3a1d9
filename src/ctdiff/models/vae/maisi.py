"""MAISI's CT VAE (MONAI ``AutoencoderKlMaisi``) as a :class:`LatentCodec`: 3D, 4x on every axis.

As MAISI's own pipeline runs it (NV-Generate-CTMR ``scripts/transforms.py``, the MONAI bundle's
``configs/inference.json``):

- **Orientation.** MAISI reorients every volume to RAS and feeds the array as (X, Y, Z)
  (``Orientationd(axcodes="RAS")``): its convolutions were trained on that layout. ctdiff's volumes are
  (Z, Y, X) = (D, H, W) arrays in the series' own LPS frame, so :class:`RasOrientation` permutes and flips
  each one (from its direction; never a resampling) before the network sees it, and the latent and the
  decode back exactly afterwards: callers keep their (D, H, W) layout, the network sees what it knows.
- **Intensity.** HU clipped to ``hu_range`` ([-1000, 1000]) and mapped to [0, 1] (:class:`LatentCodec`).
- **Windows.** Volumes larger than ``tile`` (X, Y, Z in the RAS array, as MAISI's configs give them) are
  encoded tile by tile with MONAI's ``SlidingWindowInferer`` (Gaussian blending) and decoded the same way
  in latent space with a tile of ``tile / 4``, so peak memory follows the tile, not the volume. Group
  norms see one tile at a time: tiles much smaller than MAISI's ([320, 320, 160] on a GPU) cost quality
  and add seams; tests bound the difference.

``num_splits`` is MONAI's other memory knob: every convolution splits its input into that many pieces
along ``dim_split`` (an axis of the RAS array, with a 3-voxel halo) and concatenates the results. It only
pays on a GPU with large tiles; 1 (no splitting) is the safe CPU value. MONAI does not check its size
constraints: unless the window's deepest level (``1 / downsample`` of it along ``dim_split``) divides into
``num_splits`` pieces of at least 3 voxels, it fails or, worse, returns wrongly shaped latents (measured: a
36-voxel axis with 2 splits gave 8 latent voxels instead of 9). :meth:`MaisiCodec._check_splits` refuses
such a window. MONAI >= 1.6 is required: earlier releases move split tensors to CUDA unconditionally once
a dimension reaches 500 voxels (MONAI issue #8735, fixed by PR #8736).

``norm_float16`` (MAISI's group-norm output in fp16, a GPU memory saving) is on only inside the codec's
own no-grad inference on CUDA, where its fp16 autocast covers every convolution; the training paths
(vae_fit, the train stage's fine-tuning, in whatever precision the caller runs) always see fp32 norms, so
an fp16 norm output never meets an fp32 convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D
from monai.inferers import SlidingWindowInferer

from ctdiff.models.vae.base import IDENTITY_DIRECTION, Direction, LatentCodec
from ctdiff.params import MaisiArchParams

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


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


@dataclass(frozen=True)
class RasOrientation:
    """A (B, C, D, H, W) tensor of voxel axes (k, j, i) in LPS <-> MAISI's (B, C, X, Y, Z) array in RAS.

    ``dims[a]``: the tensor dim (2, 3 or 4) that becomes RAS axis ``a`` (0 = R, 1 = A, 2 = S); ``flips[a]``:
    whether it runs opposite to that axis. Only permutations and flips (nibabel's ``io_orientation``, the
    closest axis for an oblique direction), so :meth:`from_ras` undoes :meth:`to_ras` bit for bit.
    """

    dims: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def of(cls, direction: Direction | None) -> RasOrientation:
        """From SimpleITK's direction (9 floats, row-major; columns = the i, j, k axes in LPS)."""
        matrix = np.asarray(direction if direction is not None else IDENTITY_DIRECTION, float).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = LPS_TO_RAS @ matrix  # the voxel axes in RAS
        ornt = nib.orientations.io_orientation(affine)  # row v (i, j, k): (RAS axis, +1 or -1)
        tensor_dim = {0: 4, 1: 3, 2: 2}  # voxel axis i, j, k -> dim of (B, C, k, j, i)
        dims, flips = [0, 0, 0], [False, False, False]
        for voxel_axis, (ras_axis, sign) in enumerate(ornt):
            dims[int(ras_axis)] = tensor_dim[voxel_axis]
            flips[int(ras_axis)] = bool(sign < 0)
        return cls(tuple(dims), tuple(flips))  # type: ignore[arg-type]

    def _flipped(self) -> list[int]:
        return [2 + a for a in range(3) if self.flips[a]]

    def to_ras(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) in the volume's LPS layout -> (B, C, X, Y, Z) RAS."""
        y = x.permute(0, 1, *self.dims)
        return y.flip(self._flipped()) if any(self.flips) else y

    def from_ras(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_ras`."""
        if any(self.flips):
            y = y.flip(self._flipped())
        inverse = [0, 1, 0, 0, 0]
        for a, dim in enumerate(self.dims):
            inverse[dim] = 2 + a
        return y.permute(*inverse)

    def ras_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(X, Y, Z) sizes of a (D, H, W) volume."""
        return tuple(int(shape[d - 2]) for d in self.dims)  # type: ignore[return-value]


class MaisiCodec(LatentCodec):
    """``AutoencoderKlMaisi`` on (B, 1, D, H, W) volumes; intensities [0, 1] over ``hu_range``."""

    name = "maisi"
    uses_direction = True

    def __init__(self, config: dict[str, Any], hu_range: Sequence[float], tile: Sequence[int], overlap: float,
                 num_splits: int = 1, dim_split: int = 1, device: torch.device | str = "cpu",
                 norm_float16: bool | None = None) -> None:
        device = torch.device(device)
        module = AutoencoderKlMaisi(**config, num_splits=num_splits, dim_split=dim_split, norm_float16=False)
        super().__init__(module, hu_range, config["latent_channels"], device)
        self.config = dict(config)
        # fp16 norms where the fp16 autocast runs (CUDA) unless asked otherwise; see the module docstring
        self.norm_float16 = self.amp if norm_float16 is None else bool(norm_float16)
        factor = 2 ** (len(config["num_channels"]) - 1)
        self.downsample = (factor, factor, factor)
        self.num_splits, self.dim_split = int(num_splits), int(dim_split)
        self.tile = tuple(int(t) for t in tile)  # (X, Y, Z) of the RAS array
        self.overlap = float(overlap)
        for t in self.tile:
            step = int(t * (1.0 - self.overlap))
            if t % (4 * factor) or step % factor:
                raise ValueError(f"vae.maisi.tile {list(self.tile)} with overlap {self.overlap}: tiles must be "
                                 f"multiples of {4 * factor} and their step ({step}) a multiple of {factor}, so "
                                 f"every tile starts on a latent voxel")

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """The fp16 autocast, with MAISI's fp16 group-norm outputs when ``norm_float16`` (and only here)."""
        norms = [m for m in self.module.modules() if isinstance(m, MaisiGroupNorm3D)]
        with self.autocast():
            for norm in norms:
                norm.norm_float16 = self.norm_float16
            try:
                yield
            finally:
                for norm in norms:
                    norm.norm_float16 = False

    def _posterior_stacked_x01(self, x01: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        orientation = RasOrientation.of(direction)
        stacked = self._windowed(orientation.to_ras(x01), self.tile, lambda x: torch.cat(self.module.encode(x), dim=1),
                                 self.downsample[0])
        return orientation.from_ras(stacked)

    def _decode_x01(self, latent: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        orientation = RasOrientation.of(direction)
        latent_tile = tuple(t // f for t, f in zip(self.tile, self.downsample, strict=True))
        return orientation.from_ras(self._windowed(orientation.to_ras(latent), latent_tile, self.module.decode, 1))

    def _check_splits(self, deepest: int, window: Sequence[int]) -> None:
        """Refuse a window whose deepest level (``deepest`` voxels along ``dim_split``) ``num_splits`` cannot split."""
        n = self.num_splits
        if n > 1 and (deepest % n or deepest // n < 3):
            fits = [k for k in range(1, n) if deepest % k == 0 and deepest // k >= 3] or [1]
            raise ValueError(f"vae.maisi.num_splits={n} cannot split a window of {list(window)} (X, Y, Z) along "
                             f"axis {self.dim_split} (vae.maisi.dim_split): its deepest level has {deepest} voxels "
                             f"there, and MONAI's split convolution needs pieces of >= 3 that divide it evenly "
                             f"(it silently returns wrong shapes otherwise). Use num_splits in {fits} or a larger "
                             f"vae.maisi.tile")

    def _windowed(self, x: torch.Tensor, roi: Sequence[int], fn: Callable[[torch.Tensor], torch.Tensor],
                  per_deepest: int) -> torch.Tensor:
        """``fn`` on the whole of ``x`` (a RAS array) when it fits in ``roi``, else on overlapping ``roi`` windows.

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
        inferer = SlidingWindowInferer(roi_size=window, sw_batch_size=1, overlap=self.overlap, mode="gaussian",
                                       sw_device=self.device, device=x.device)
        return inferer(x, fn)
