"""The VAE as the diffusion model uses it: one codec from ``models/vae`` with its posteriors.

:class:`VaeAdapter` is the one place training, sampling and evaluation touch :mod:`ctdiff.models.vae`: it
loads the codec vae_fit wrote, returns posteriors (mean and std, unscaled latent units), decodes (with
gradients for fine-tuning), and says which parameters a fine-tune unfreezes. Shapes: volumes
``(B, 1, D, H, W)`` float tensors in HU or [0, 1] (``x01``), latents ``(B, C, d, h, w)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ctdiff.io import digest
from ctdiff.models.vae.base import Directions, LatentCodec, kl_divergence
from ctdiff.models.vae.weights import load_codec
from ctdiff.params import VaeParams


# --------------------------------------------------------------------------------------- posterior
@dataclass
class Posterior:
    """Diagonal Gaussian posterior of a VAE: ``mean`` and ``std`` of the same shape, unscaled latent units."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self) -> torch.Tensor:
        """A reparameterised draw (differentiable in ``mean`` and ``std``), from the global torch RNG."""
        return self.mean + self.std * torch.randn_like(self.std)

    def to(self, device: torch.device | str) -> Posterior:
        return Posterior(self.mean.to(device), self.std.to(device))


# ----------------------------------------------------------------------------------------- adapter
class VaeAdapter:
    """The codec of ``models/vae`` as training needs it.

    Intensities follow the codec (HU clipped to its ``hu_range``, mapped to [0, 1] = ``x01``). Training,
    sampling and evaluation reach the VAE through this class only, so a change of the codec interface is a change here.
    """

    def __init__(self, codec: LatentCodec, manifest: dict[str, Any]) -> None:
        self.codec = codec
        self.manifest = manifest

    @classmethod
    def load(cls, vae_dir: Path, vae: VaeParams, device: torch.device | str) -> VaeAdapter:
        codec, manifest = load_codec(vae_dir, vae, device)
        return cls(codec, manifest)

    # -------------------------------------------------------------------------------------- facts
    @property
    def module(self) -> nn.Module:
        """The underlying MONAI / diffusers autoencoder (fine-tuned in the unfrozen phase)."""
        return self.codec.module

    @property
    def downsample(self) -> tuple[int, int, int]:
        return tuple(self.codec.downsample)  # type: ignore[return-value]

    @property
    def latent_channels(self) -> int:
        return self.codec.latent_channels

    @property
    def name(self) -> str:
        return str(self.manifest["codec"])

    @property
    def weights(self) -> dict[str, Any]:
        """Where the weights came from (hub repo/revision/sha256, or scratch), as vae_fit recorded it."""
        return dict(self.manifest.get("weights", {}))

    @property
    def fingerprint(self) -> str:
        """Identity of the VAE weights and of what shapes its latents (architecture, HU range)."""
        keys = ("codec", "config", "files", "hu_range", "downsample", "latent_channels")
        return digest({k: self.manifest.get(k) for k in keys})

    def hu_to_x01(self, hu: torch.Tensor) -> torch.Tensor:
        return self.codec.hu_to_x01(hu)

    # ------------------------------------------------------------------------------------ encoding
    def encode_posterior_hu(self, hu: torch.Tensor, direction: Directions = None) -> Posterior:
        """(B, 1, D, H, W) HU, any size -> posterior (B, C, d, h, w) on ``hu.device``; no grad, eval mode, tiled
        (MAISI) or sliced (SD) like the codec's ``encode_hu``. ``direction``: the volume's (SimpleITK, LPS),
        one for the batch or one per item (:mod:`ctdiff.models.vae.base`)."""
        return Posterior(*self.codec.encode_posterior_hu(hu, direction))

    def posterior_x01(self, x01: torch.Tensor, direction: Directions = None) -> Posterior:
        """Differentiable posterior of a patch (B, 1, D, H, W) in [0, 1], sizes multiples of ``downsample``."""
        return Posterior(*self.codec.posterior_x01(x01.to(self.codec.device), direction))

    def decode_x01_train(self, latent: torch.Tensor, direction: Directions = None) -> torch.Tensor:
        """Differentiable decode of a latent patch (B, C, d, h, w) -> (B, 1, D, H, W) in [0, 1] units, unclamped
        (a clamp would stop the gradient wherever the decoder overshoots)."""
        return self.codec.decode_x01(latent.to(self.codec.device), direction)

    def kl(self, posterior: Posterior) -> torch.Tensor:
        """KL of a (B, C, d, h, w) posterior to N(0, 1), normalised as in vae_fit (summed, mean over B)."""
        return kl_divergence(posterior.mean, posterior.std)

    @torch.no_grad()
    def decode_hu(self, latent: torch.Tensor, shape: Sequence[int], direction: Directions = None) -> torch.Tensor:
        """(B, C, d, h, w) unscaled latent -> (B, 1, D, H, W) HU cropped to ``shape``."""
        return self.codec.decode_hu(latent, shape, direction)

    # --------------------------------------------------------------------------------- fine-tuning
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
