"""The VAE interface: HU volume <-> latent, the same for the 3D MAISI VAE and the 2D SD VAE.

:class:`LatentCodec` is the one interface every stage uses (vae_fit trains it, vae_check round-trips it,
train caches its posteriors and fine-tunes it, evaluate and ``ctdiff predict`` sample through it); a codec
loaded from ``models/vae`` (:func:`ctdiff.models.vae.weights.load_vae`) carries its manifest (which weights,
its architecture and run-time settings), so nothing downstream reads the ``vae`` params.

Shapes follow MONAI: volumes are ``(B, 1, D, H, W)`` float tensors in Hounsfield units (``hu``) or in
[0, 1] (``x01``: HU clipped to ``hu_range`` and mapped linearly); latents are ``(B, C, d, h, w)`` with
``d, h, w = ceil(D / fd), ceil(H / fh), ceil(W / fw)`` for the codec's ``downsample = (fd, fh, fw)``.
Inputs of any size are padded (edge-replicated) to a multiple of the downsampling and decoded volumes
are cropped back when the original shape is given.

``encode_hu`` returns the posterior mean (deterministic, so cached latents and metrics are reproducible);
``encode_posterior_hu`` the whole :class:`Posterior` for callers that sample; :meth:`LatentCodec.round_trip`
encodes (the mean) and decodes a volume: the VAE ceiling, vae_check and ``decode: change`` all use it.
Latents are unscaled: the diffusion model multiplies them by its scale factor (1 / std of the training
latents), which the train stage computes from the latents it caches and stores in its checkpoints; the
codec knows nothing of it.

Orientation: every volume comes with the direction of its voxel axes (SimpleITK's LPS ``direction``, 9
floats row-major; None = the identity of a head-first supine axial series), for the whole batch or one per
item. A codec whose network was trained on another array convention (MAISI: RAS, (X, Y, Z)) reorients
inside its hooks and back, so latents and decodes always come out in the caller's (D, H, W) layout; items
of one batch with different directions are run apart.

A codec implements two hooks, ``_posterior_stacked_x01`` and ``_decode_x01``, which handle any size (tiles
or slices as the codec needs), one direction at a time, and are differentiable; everything else (intensity
mapping, padding and cropping, fp16 autocast on CUDA, the sampled training pass, grouping by direction)
lives here once.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctdiff.data.intensity import to_hu, to_x01
from ctdiff.io import digest

Direction = Sequence[float]  # 9 floats, row-major: the LPS directions of a volume's i, j, k axes (columns)
Directions = Direction | Sequence[Direction] | None  # one for the batch, one per item, or None (identity)
IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class Posterior(NamedTuple):
    """Diagonal Gaussian posterior of a VAE: ``mean`` and ``std`` of the same shape, unscaled latent units."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self) -> torch.Tensor:
        """A reparameterised draw (differentiable in ``mean`` and ``std``), from the global torch RNG."""
        return self.mean + self.std * torch.randn_like(self.std)

    def to(self, device: torch.device | str) -> Posterior:
        return Posterior(self.mean.to(device), self.std.to(device))


class LatentCodec(ABC):
    """A VAE behind one interface. Subclasses wrap a MONAI or diffusers module (``self.module``)."""

    #: "maisi" or "sd": the arm
    name: ClassVar[str]
    #: spatial downsampling (fd, fh, fw) between a volume and its latent
    downsample: tuple[int, int, int]
    #: whether the network sees the volume's orientation (a 3D codec reorients; a per-slice one does not)
    uses_direction: bool = False
    #: ``models/vae/manifest.json`` of a loaded codec (which weights, architecture, run-time settings); {} when new
    manifest: dict[str, Any]

    def __init__(self, module: nn.Module, hu_range: Sequence[float], latent_channels: int,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.latent_channels = latent_channels
        # fp16 autocast is a GPU memory/speed path; on CPU everything stays float32.
        self.amp = self.device.type == "cuda"
        self.manifest = {}

    # ------------------------------------------------------------------------------------------ identity
    @property
    def weights(self) -> dict[str, Any]:
        """Where the weights came from (hub repo/revision/sha256, or scratch), as vae_fit recorded it."""
        return dict(self.manifest.get("weights", {}))

    @property
    def fingerprint(self) -> str:
        """Identity of the VAE weights and of what shapes its latents (architecture, HU range)."""
        keys = ("codec", "config", "files", "hu_range", "downsample", "latent_channels")
        return digest({k: self.manifest.get(k) for k in keys})

    # ------------------------------------------------------------------------------------- intensities
    def hu_to_x01(self, hu: torch.Tensor) -> torch.Tensor:
        """HU -> [0, 1] over ``hu_range`` (clipped): the mapping the metrics use too."""
        return to_x01(hu, self.hu_range)

    def x01_to_hu(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> HU over ``hu_range`` (input clipped to [0, 1] first)."""
        return to_hu(x01, self.hu_range)

    # ------------------------------------------------------------------------------------------ shapes
    def latent_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """(C, d, h, w) of the latent of a (D, H, W) volume."""
        d, h, w = (math.ceil(s / f) for s, f in zip(volume_shape, self.downsample, strict=True))
        return (self.latent_channels, d, h, w)

    def compression_ratio(self, volume_shape: Sequence[int]) -> float:
        """Voxels of the volume per latent value (channels included)."""
        return math.prod(volume_shape) / math.prod(self.latent_shape(volume_shape))

    # ------------------------------------------------------------------------------------------- codec
    @torch.no_grad()
    def encode_hu(self, hu: torch.Tensor, direction: Directions = None) -> torch.Tensor:
        """(B, 1, D, H, W) HU, any size -> (B, C, d, h, w) unscaled latent (posterior mean), on ``hu.device``."""
        return self.encode_posterior_hu(hu, direction)[0]

    @torch.no_grad()
    def encode_posterior_hu(self, hu: torch.Tensor, direction: Directions = None) -> Posterior:
        """(B, 1, D, H, W) HU, any size -> posterior (mean, std), each (B, C, d, h, w) on ``hu.device``.

        Tiled (MAISI) or sliced (SD) exactly like :meth:`encode_hu`; for latent caches that sample.
        """
        self.module.eval()
        with self.inference():
            mean, std = self.posterior_x01(self.pad(self.hu_to_x01(hu.to(self.device))), direction)
        return Posterior(mean.float().to(hu.device), std.float().to(hu.device))

    @torch.no_grad()
    def decode_hu(self, latent: torch.Tensor, shape: Sequence[int] | None = None,
                  direction: Directions = None) -> torch.Tensor:
        """(B, C, d, h, w) unscaled latent -> (B, 1, D, H, W) HU in ``hu_range``, cropped to ``shape`` (D, H, W)."""
        self.module.eval()
        with self.inference():
            x01 = self.decode_x01(latent, direction).float().to(latent.device)
        return self.x01_to_hu(crop(x01, shape) if shape is not None else x01)

    @torch.no_grad()
    def round_trip(self, hu: np.ndarray, direction: Directions = None) -> np.ndarray:
        """Encode (the posterior mean) and decode one volume: (D, H, W) HU -> (D, H, W) float32 HU, on the CPU."""
        x = torch.from_numpy(np.asarray(hu, dtype=np.float32))[None, None]
        latent = self.encode_posterior_hu(x, direction).mean
        return self.decode_hu(latent, hu.shape, direction)[0, 0].float().cpu().numpy()

    def posterior_x01(self, x01: torch.Tensor, direction: Directions = None) -> Posterior:
        """(B, 1, D, H, W) in [0, 1], sizes multiples of ``downsample`` -> (mean, std), each (B, C, d, h, w).

        Differentiable when gradients are enabled (fine-tuning); on ``self.device``.
        """
        stacked = self._per_direction(x01.to(self.device), direction, self._posterior_stacked_x01)
        return Posterior(stacked[:, : self.latent_channels], stacked[:, self.latent_channels :])

    def kl(self, posterior: Posterior) -> torch.Tensor:
        """KL of a (B, C, d, h, w) posterior to N(0, 1), as vae_fit's loss has it (summed, mean over B)."""
        return kl_divergence(posterior.mean, posterior.std)

    def set_trainable(self, part: Literal["none", "decoder", "full"]) -> list[nn.Parameter]:
        """Freeze the VAE (``none``: eval mode, no grads) or unfreeze ``decoder`` / ``full``; returns the trainable
        parameters. ``decoder`` = the decoder and the convolution in front of it (``post_quant_conv``), the
        same names in MONAI's and diffusers' autoencoders."""
        self.module.train(part != "none")
        trainable = []
        for name, p in self.module.named_parameters():
            in_decoder = name.startswith(("decoder.", "post_quant_conv."))
            p.requires_grad_(part == "full" or (part == "decoder" and in_decoder))
            if p.requires_grad:
                trainable.append(p)
        return trainable

    def decode_x01(self, latent: torch.Tensor, direction: Directions = None) -> torch.Tensor:
        """(B, C, d, h, w) -> (B, 1, d*fd, h*fh, w*fw) in [0, 1] units, not clamped (a clamp would stop the
        gradient wherever the decoder overshoots); differentiable."""
        return self._per_direction(latent.to(self.device), direction, self._decode_x01)

    def reconstruct_train(self, x01: torch.Tensor, direction: Directions = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on a patch whose sizes are multiples of ``downsample``, with gradients.

        Returns ``(recon_x01, z_mu, z_sigma)``: the reconstruction (B, 1, D, H, W) in [0, 1] units (not
        clamped) decoded from a latent sampled from the posterior, and the posterior mean and standard
        deviation (B, C, d, h, w) for the KL term.
        """
        z_mu, z_sigma = self.posterior_x01(x01, direction)
        recon = self.decode_x01(z_mu + z_sigma * torch.randn_like(z_sigma), direction)
        return recon, z_mu, z_sigma

    @abstractmethod
    def _posterior_stacked_x01(self, x01: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1], sizes multiples of ``downsample``, one direction -> (B, 2C, d, h, w):
        posterior mean then std on the channel axis (stacked so that tiles blend both alike), on ``self.device``."""

    @abstractmethod
    def _decode_x01(self, latent: torch.Tensor, direction: Direction | None) -> torch.Tensor:
        """(B, C, d, h, w), one direction -> (B, 1, d*fd, h*fh, w*fw) in [0, 1] units, not clamped; differentiable."""

    def _per_direction(self, x: torch.Tensor, direction: Directions,
                       fn: Callable[[torch.Tensor, Direction | None], torch.Tensor]) -> torch.Tensor:
        """``fn`` on the items of ``x`` that share a direction, reassembled in batch order."""
        if not self.uses_direction or direction is None or not isinstance(direction[0], Sequence):
            return fn(x, direction)  # type: ignore[arg-type]
        keys = [tuple(round(float(v), 6) for v in d) for d in direction]  # type: ignore[union-attr]
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} directions for a batch of {x.shape[0]}")
        if len(set(keys)) == 1:
            return fn(x, keys[0])
        order, parts = [], []
        for key in dict.fromkeys(keys):
            items = [i for i, k in enumerate(keys) if k == key]
            order += items
            parts.append(fn(x[items], key))
        return torch.cat(parts)[torch.argsort(torch.tensor(order))]

    def autocast(self) -> torch.autocast:
        """fp16 autocast on CUDA, a no-op elsewhere."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def inference(self) -> contextlib.AbstractContextManager:
        """The context of the no-grad encode and decode: :meth:`autocast` (a codec may add to it)."""
        return self.autocast()

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Edge-replicate (B, C, D, H, W) up to multiples of ``downsample``."""
        return pad_to_multiple(x, self.downsample)


def pad_to_multiple(x: torch.Tensor, multiples: Sequence[int]) -> torch.Tensor:
    """Pad the spatial (last three) axes of a (B, C, D, H, W) tensor at their far ends, replicating the edge.

    Replication rather than a constant keeps the convolution from seeing an artificial edge where the
    body touches the field of view.
    """
    sizes = x.shape[-3:]
    extra = [-s % m for s, m in zip(sizes, multiples, strict=True)]
    if not any(extra):
        return x
    # F.pad takes (last axis first) pairs: (W_left, W_right, H_left, H_right, D_left, D_right).
    return F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]), mode="replicate")


def crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Keep the leading ``shape`` (D, H, W) of a (B, C, D', H', W') tensor (undoes :func:`pad_to_multiple`)."""
    d, h, w = shape
    return x[..., :d, :h, :w]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent elements, averaged over the batch (first) axis."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()
