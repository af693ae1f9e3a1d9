"""The supervised reference network (the ``sr_reference`` stage's output, evaluate's ``reference`` rung).

A plain super-resolution network in image space, the yardstick the conditional latent-diffusion model is
judged against:

- **input**: the slab-consistent baseline of a case (the slab stage's ``baseline_consistent``): series 1
  interpolated onto the common grid (``source.npy``), projected onto series 1's slabs with the slab stage's
  profile; exactly the volume evaluate hands it, so the network is scored on the input it learnt from;
- **output**: a residual added to that input (:func:`predict_reference`), so it only has to learn what the
  slabs cannot see (detail along the slice axis), and an untrained network returns its input.

Both are clipped to ``hu_range`` and mapped to [0, 1]; the predicted residual is added in HU to the
unclipped input, so voxels beyond the range keep their values. The network is MONAI's ``UNet`` (3D, one
channel in and out), run on whole volumes through MONAI's Gaussian-blended ``SlidingWindowInferer`` with
``sr_reference.patch`` as the window (it pads volumes smaller than the window). The VAE plays no part: the
rung is the same for the SD and the MAISI arm. Its training loop is :mod:`ctdiff.training.reference`; its
checkpoint carries what inference needs (:class:`Reference`), so evaluate reads no ``sr_reference`` params.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from torch import nn

from ctdiff.data.intensity import to_x01
from ctdiff.models.checkpoint import load_checkpoint
from ctdiff.params import SrReferenceParams, group_from_dict

CHECKPOINTS = ("best.pt", "last.pt")  # best by projected val L1; last when no epoch improved


def build_reference_net(sp: SrReferenceParams) -> nn.Module:
    """MONAI 3D ``UNet``, (B, 1, D, H, W) [0, 1] intensities -> (B, 1, D, H, W) residual in the same units.

    ``num_res_units=0``: the top layer is then a plain transposed convolution (linear output). With residual
    units MONAI puts a norm and an activation on the top layer's single output channel, which normalises
    each patch's residual away, and it cost more time than it gained on the phantoms (val, paired). The top
    layer starts at zero, so an untrained network returns its input (the baseline) instead of noise.
    """
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=sp.channels, strides=sp.strides,
               num_res_units=0)
    top = net.model[-1].conv  # the last layer applied: Sequential(down, skip(...), up)[-1], conv only
    nn.init.zeros_(top.weight)
    nn.init.zeros_(top.bias)
    return net


def net_contract(sp: SrReferenceParams, hu_range: Sequence[float], profile_digest: str) -> dict[str, Any]:
    """What the checkpoint records of the network's inputs: the architecture, the intensity range and the slab
    profile of its input (``baseline_consistent``)."""
    return {"channels": list(sp.channels), "strides": list(sp.strides), "hu_range": list(hu_range),
            "slab_profile": profile_digest}


@dataclass
class Reference:
    """A trained reference network and how it runs (from its checkpoint): patch-sized Gaussian-blended windows,
    ``window_batch`` at a time, intensities [0, 1] over ``hu_range``."""

    net: nn.Module
    params: SrReferenceParams
    hu_range: tuple[float, float]
    profile_digest: str  # of the slab profile its input was projected with

    def predict(self, baseline_consistent_hu: np.ndarray) -> np.ndarray:
        """(D, H, W) HU ``baseline_consistent`` -> (D, H, W) float32 HU, not projected (:func:`predict_reference`)."""
        return predict_reference(self.net, self.params, self.hu_range, baseline_consistent_hu)


@torch.no_grad()
def predict_reference(net: nn.Module, sp: SrReferenceParams, hu_range: Sequence[float],
                      baseline_consistent_hu: np.ndarray) -> np.ndarray:
    """(D, H, W) HU input (``baseline_consistent``, any shape) -> (D, H, W) float32 HU: input + predicted residual.

    Not projected onto the slabs (the caller does that). The volume stays on the CPU; windows of ``sp.patch``
    run on the network's device, ``sp.window_batch`` at a time, blended with a Gaussian.
    """
    hu = np.asarray(baseline_consistent_hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {hu.shape}")
    low, high = hu_range
    inferer = SlidingWindowInferer(roi_size=sp.patch, sw_batch_size=sp.window_batch, overlap=sp.overlap,
                                   mode="gaussian", padding_mode="replicate",
                                   sw_device=next(net.parameters()).device, device=torch.device("cpu"))
    residual01 = inferer(to_x01(hu, (low, high))[None, None], net)
    return hu + residual01[0, 0].float().numpy() * (high - low)


def load_reference(ckpt_dir: Path, device: torch.device) -> Reference:
    """The trained network in eval mode on ``device`` (``best.pt``, else ``last.pt``) with the settings it was
    trained with."""
    path = next((ckpt_dir / name for name in CHECKPOINTS if (ckpt_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {' or '.join(str(ckpt_dir / n) for n in CHECKPOINTS)}: run the sr_reference "
                                f"stage first (dvc repro sr_reference)")
    ckpt = load_checkpoint(path)
    if "sr_reference_params" not in ckpt or "contract" not in ckpt:
        raise RuntimeError(f"{path} was written by an older sr_reference: rerun it (dvc repro sr_reference)")
    sp = group_from_dict(SrReferenceParams, ckpt["sr_reference_params"], "sr_reference")
    net = build_reference_net(sp)
    net.load_state_dict(ckpt["net"])
    contract = ckpt["contract"]
    return Reference(net.to(device).eval(), sp, tuple(contract["hu_range"]), str(contract["slab_profile"]))
