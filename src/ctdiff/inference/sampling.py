"""Sampling from a trained model: the one path evaluate and ``ctdiff predict`` share.

- :func:`load_trained_model`: the UNet of ``models/checkpoints`` (``best.pt``, else ``last.pt``), the VAE of
  ``models/vae`` (with the fine-tuned weights when training changed them), the latent scale factor and the
  latent target (residual or not) the checkpoint was trained with, and ``model.json``: the sampling defaults
  (``train.sampling`` as trained; :meth:`TrainedModel.with_sampling` overrides them, as predict's flags do) and
  the slab profile its predictions are projected with. No params are read: a copy of the models folder
  samples the same anywhere.
- :func:`sample_thin`: series 1 on the thin grid in, series 2 out: the condition is the posterior mean of
  series 1's latent; one latent is sampled per draw (DDIM for a DDPM-trained model, Euler steps for
  rectified flow; one seeded stream, successive draws), decoded, and the decodes averaged in HU (an
  estimate of the posterior mean, which is what PSNR and MAE reward). Volumes larger than the training
  patch are sampled window by window (:class:`WindowedDenoiser`), so any size works.
- :func:`predict_thin`: the one path of evaluate's ``model_raw`` and ``ctdiff predict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn
from tqdm import tqdm

from ctdiff.data.slab import SliceProfile
from ctdiff.models.checkpoint import load_checkpoint, read_model_card
from ctdiff.models.denoiser import build_unet, crop_latent, latent_patch_shape, pad_latent
from ctdiff.models.diffusion import LatentTarget, sample, sampling_scheduler
from ctdiff.models.vae.base import LatentCodec
from ctdiff.models.vae.weights import load_vae
from ctdiff.params import ParamsError, SamplingParams, TrainParams, UnetParams, group_from_dict

CHECKPOINTS = ("best.pt", "last.pt")  # best by val loss; last when no validation improved on the first


@dataclass
class TrainedModel:
    """A trained model ready to sample: the denoiser and the noise process as the checkpoint trained them."""

    unet: nn.Module
    vae: LatentCodec
    scale_factor: float
    latent_target: LatentTarget
    latent_patch: tuple[int, int, int]
    train_params: TrainParams  # the checkpoint's: its UNet, patch, scheduler and prediction
    checkpoint: dict[str, Any]  # file, step, epoch
    card: dict[str, Any]  # model.json (:func:`ctdiff.training.ldm.model_card`)
    sampling: SamplingParams  # how it samples: model.json's train.sampling, or what with_sampling set

    @property
    def unet_params(self) -> UnetParams:
        return self.train_params.unet

    @property
    def geometry(self) -> dict[str, Any]:
        """What the model was trained on (:func:`ctdiff.training.ldm.training_geometry`)."""
        return dict(self.card.get("geometry") or {})

    def condition(self, source_hu: np.ndarray, baseline_hu: np.ndarray) -> np.ndarray:
        """The volume the model is conditioned on, as it was trained (``train.condition``): ``baseline_hu``
        (series 1 interpolated and projected onto its slabs) for ``consistent``, else ``source_hu``; float32."""
        return np.asarray(baseline_hu if self.train_params.condition == "consistent" else source_hu, np.float32)

    @property
    def profile(self) -> SliceProfile:
        """The slab profile the model's predictions are projected with (the slab stage's, when it trained)."""
        return SliceProfile.from_json(self.card["slab_profile"])

    def with_sampling(self, **changes: Any) -> TrainedModel:
        """The same model sampled otherwise (``steps=4``, ``samples=1``, ...); None values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        raw = {**dataclasses.asdict(self.sampling), **changes}
        sampling = group_from_dict(SamplingParams, raw, "sampling")
        if sampling.steps > self.train_params.num_train_timesteps:
            raise ValueError(f"{sampling.steps} sampling steps: the model was trained with "
                             f"{self.train_params.num_train_timesteps} timesteps, the most it can take")
        return dataclasses.replace(self, sampling=sampling)


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


def load_trained_model(vae_dir: Path, ckpt_dir: Path, device: torch.device) -> TrainedModel:
    """The UNet, the VAE (with its fine-tuned weights when training changed them), the scale factor and
    ``model.json``."""
    path = next((ckpt_dir / name for name in CHECKPOINTS if (ckpt_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no trained model: no {' or '.join(CHECKPOINTS)} in {ckpt_dir}: run the train stage "
                                f"(dvc repro)")
    card = read_model_card(ckpt_dir)
    ckpt = load_checkpoint(path)
    vae = load_vae(vae_dir, device)
    if ckpt.get("codec") not in (None, vae.name):
        raise ValueError(f"{path} was trained with the {ckpt['codec']} VAE but {vae_dir} holds {vae.name}: "
                         "rerun the train stage (dvc repro)")
    if ckpt.get("vae") is not None:
        vae.module.load_state_dict(ckpt["vae"])
    vae.set_trainable("none")
    # The denoiser and its noise process as trained (not as params.yaml says now): a copy of the models
    # folder samples with the UNet, patch and scheduler it was trained with.
    try:
        tp = group_from_dict(TrainParams, ckpt["train_params"], "train")
    except ParamsError as exc:
        raise RuntimeError(f"{path} was written by another version of ctdiff ({exc}): rerun the train stage "
                           f"(dvc repro train)") from None
    unet = build_unet(tp.unet, vae.latent_channels)
    unet.load_state_dict(ckpt["unet"])
    unet.to(device).eval()
    latent_patch = latent_patch_shape(tp.patch, vae.downsample, tp.unet.latent_multiple, vae.name)
    latent_target = LatentTarget(tp.residual, float(ckpt.get("residual_gain") or 1.0))
    return TrainedModel(unet, vae, float(ckpt["scale_factor"]), latent_target, tuple(latent_patch), tp,
                        {"file": path.name, "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"])}, card,
                        group_from_dict(SamplingParams, card["sampling"], "sampling"))


@dataclass
class Samples:
    """What :func:`sample_thin` drew for one volume: (D, H, W) float32 HU arrays on the thin grid."""

    mean: np.ndarray  # the average of the decoded draws: an estimate of the posterior mean
    spread: np.ndarray | None  # per-voxel standard deviation (ddof 1) of the draws; None for a single draw
    n: int  # draws


@torch.inference_mode()
def draws(model: TrainedModel, source_hu: np.ndarray, seed: int, direction: Sequence[float] | None = None,
          progress: bool = False) -> Iterator[np.ndarray]:
    """The ``model.sampling.samples`` decoded draws of series 2 given the condition on its grid ((D, H, W) HU: series
    1 interpolated, or its slab projection), one (D, H, W) float32 HU volume at a time, from one seeded stream: the
    first ``n`` draws are the same whatever ``samples`` is. ``direction``: the grid's (SimpleITK, LPS)."""
    ep = model.sampling
    device = next(model.unet.parameters()).device
    hu = torch.from_numpy(source_hu.astype(np.float32))[None, None].to(device)
    # The posterior mean conditions sampling: the deterministic code of series 1.
    condition = model.vae.encode_posterior_hu(hu, direction).mean * model.scale_factor
    del hu
    latent_shape = tuple(condition.shape[2:])
    condition = pad_latent(condition, model.unet_params)
    roi = tuple(min(r, s) for r, s in zip(model.latent_patch, condition.shape[2:]))
    denoiser: nn.Module = model.unet
    if roi != tuple(condition.shape[2:]):
        denoiser = WindowedDenoiser(model.unet, roi, ep.overlap, ep.window_batch)
    generator = torch.Generator(device=device).manual_seed(seed)
    scheduler = sampling_scheduler(model.train_params, ep.steps)
    for _ in tqdm(range(ep.samples), desc="samples", unit="draw", disable=not progress, leave=False):
        latent = model.latent_target.latent(sample(denoiser, scheduler, condition, generator=generator), condition)
        latent = crop_latent(latent, latent_shape) / model.scale_factor
        yield model.vae.decode_hu(latent, source_hu.shape, direction)[0, 0].float().cpu().numpy()
        del latent


class RunningMoments:
    """Mean and spread (sample standard deviation, ddof 1) of volumes added one at a time (Welford), in float32
    and slice by slice: two volumes held, whatever the number."""

    def __init__(self, shape: Sequence[int], spread: bool = True) -> None:
        self.n = 0
        self.mean = np.zeros(shape, np.float32)
        self.m2 = np.zeros(shape, np.float32) if spread else None

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        for k in range(x.shape[0]):  # the temporaries are one slice, not one volume
            delta = x[k] - self.mean[k]
            self.mean[k] += delta / np.float32(self.n)
            if self.m2 is not None:
                delta *= x[k] - self.mean[k]
                self.m2[k] += delta

    def spread(self) -> np.ndarray | None:
        """The per-voxel sample standard deviation (a new array); None before two volumes or without ``spread``."""
        return None if self.m2 is None or self.n < 2 else np.sqrt(self.m2 / np.float32(self.n - 1))


def sample_thin(model: TrainedModel, source_hu: np.ndarray, seed: int, direction: Sequence[float] | None = None,
                spread_of: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = False) -> Samples:
    """The :func:`draws` averaged (see the module docstring): an estimate of the posterior mean, and their spread.

    ``spread_of``: an affine map applied to each draw before its spread is taken (evaluate and predict pass
    the slab projection, so the spread is that of what the ``model`` rung averages); the mean is of the draws
    as decoded.
    """
    several = model.sampling.samples > 1
    mean = RunningMoments(source_hu.shape, spread=several and spread_of is None)
    projected = RunningMoments(source_hu.shape) if several and spread_of is not None else None
    for draw in draws(model, source_hu, seed, direction, progress):
        mean.add(draw)
        if projected is not None:
            projected.add(spread_of(draw))
    return Samples(mean.mean, (projected or mean).spread(), mean.n)


@dataclass
class ThinPrediction:
    """What the model says of one volume before the slab projection: (D, H, W) float32 HU on the thin grid."""

    raw: np.ndarray  # the mean of the draws, read as a change of the condition when evaluate.decode: change
    spread: np.ndarray | None  # per-voxel spread of the (projected) draws; None for one draw
    samples: int
    condition: np.ndarray  # the volume the model was conditioned on (source, or its slab projection)
    anchor: np.ndarray | None  # D(E(condition)) when evaluate.decode: change, else None


def predict_thin(model: TrainedModel, source_hu: np.ndarray, baseline_hu: np.ndarray, seed: int,
                 direction: Sequence[float] | None, project: Callable[[np.ndarray], np.ndarray],
                 progress: bool = False) -> ThinPrediction:
    """Evaluate's ``model_raw`` for one volume: ``source_hu`` (series 1 interpolated onto the thin grid) and
    ``baseline_hu`` (that projected onto its slabs, :func:`ctdiff.data.slab.consistent_baseline`), both (D, H, W)
    HU. The condition is the one the model was trained with (``train.condition``), the draws come from
    :func:`sample_thin` (their spread taken after ``project`` when ``sampling.consistency``), and with
    ``sampling.decode: change`` the mean is read as the change it makes to the condition. The one path of
    evaluate and ``ctdiff predict``."""
    ep = model.sampling
    condition = model.condition(source_hu, baseline_hu)
    samples = sample_thin(model, condition, seed, direction, spread_of=project if ep.consistency else None,
                          progress=progress)
    raw, anchor = samples.mean, None
    if ep.decode == "change":
        anchor = model.vae.round_trip(condition, direction)
        raw = decoded_change(raw, condition, anchor)
    return ThinPrediction(raw, samples.spread, samples.n, condition, anchor)


def decoded_change(decoded: np.ndarray, baseline: np.ndarray, baseline_decoded: np.ndarray) -> np.ndarray:
    """``baseline + decoded - baseline_decoded``: (D, H, W) HU each; a decode read as the change it makes to
    the baseline (``evaluate.decode: change``), so what the VAE gets wrong in both decodes cancels."""
    return (np.asarray(baseline, np.float32) + np.asarray(decoded, np.float32)
            - np.asarray(baseline_decoded, np.float32))

