"""vae_fit: train a codec from scratch, fine-tune the released one, or take it as downloaded; write ``models/vae``.

The loop reads top to bottom: each epoch draws ``patches_per_volume`` random crops from every training
volume (source and target series, so the codec sees both the thick-slice input and the thin-slice
output), shuffles them, and steps Adam on L1 reconstruction in [0, 1] intensity plus ``kl_weight`` times
the KL term of the posterior. The learning rate decays on a cosine to 5 % of its start. The manifest it
writes carries what every later stage needs to load and run the codec (:func:`ctdiff.models.vae.weights.load_vae`).
No latent scale factor here: the train stage computes it from the latents it encodes anyway.

A VAE that trained is checked before anything is written (:func:`check_health`, :mod:`ctdiff.metrics.health`):
``vae.health_cases`` train volumes round-tripped must each beat their own best constant by ``vae.min_gain_db``
or match block averaging at the VAE's compression.
A scratch VAE that fails is trained once more from another start (``vae.retry_unhealthy``: the next seed and
the encoder as built, ``logvar_init`` off, since a collapse was seen with the nearly deterministic start); one
that fails again stops the stage with one line (``vae.accept_unhealthy`` writes it anyway), so a collapsed VAE
never reaches the rest of the pipeline. The manifest says whether a retry was needed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dvclive import Live
from monai.transforms import RandCropByPosNegLabel, RandSpatialCropSamples
from monai.utils import set_determinism
from tqdm import tqdm

from ctdiff.data.processed import Case, split_cases
from ctdiff.io import atomic_dir
from ctdiff.metrics.health import CodecCheck, Unhealthy, check_codec, codec_verdict, summarise_checks
from ctdiff.metrics.image import BODY_THRESHOLD_HU, TruthScorer
from ctdiff.models.vae.base import LatentCodec, kl_divergence
from ctdiff.models.vae.weights import (
    WeightsError,
    codec_config,
    new_codec,
    pretrained_codec,
    read_origin,
    runtime_settings,
    save_weights,
    scratch_config,
    write_manifest,
)
from ctdiff.params import Params, VaeParams
from ctdiff.training.scaffold import warmup_cosine

FINAL_LR_FRACTION = 0.05
RETRY_SEED_OFFSET = 1000  # a retried scratch VAE starts from train_seed + this (apart from the other seeds' starts)
EpochLog = Callable[[int, dict[str, float]], None]


def patch_size(patch: Sequence[int], volume_shape: Sequence[int], downsample: Sequence[int]) -> tuple[int, int, int]:
    """``patch`` shrunk to fit ``volume_shape`` and rounded down to multiples of ``downsample``."""
    size = tuple(min(p, s) // f * f for p, s, f in zip(patch, volume_shape, downsample, strict=True))
    if min(size) == 0:
        raise ValueError(f"volumes of shape {tuple(volume_shape)} are smaller than one latent voxel "
                         f"({tuple(downsample)})")
    return size


def train_codec(codec: LatentCodec, cases: Sequence[Case], patch: Sequence[int], epochs: int, lr: float,
                patches_per_volume: int, batch_size: int, kl_weight: float, seed: int,
                on_epoch: EpochLog | None = None, recon_loss: str = "l1", warmup_steps: int = 0,
                body_crops: float = 0.0) -> list[dict[str, float]]:
    """Train ``codec.module`` in place; return per-epoch mean losses {loss, recon, kl} (recon in [0, 1] units:
    ``recon_loss`` ``l1`` or ``mse``). ``body_crops``: the fraction of crops centred inside the body (MONAI
    ``RandCropByPosNegLabel`` on HU > -500), the others uniform (``RandSpatialCropSamples``)."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    smallest = np.min([case.load("target", mmap=True).shape for case in cases], axis=0)
    roi = patch_size(patch, smallest, codec.downsample)
    in_body = round(patches_per_volume * body_crops)
    cropper = RandSpatialCropSamples(roi_size=roi, num_samples=patches_per_volume - in_body, random_size=False)
    cropper.set_random_state(seed)
    body_cropper = RandCropByPosNegLabel(spatial_size=roi, pos=1.0, neg=0.0, num_samples=in_body,
                                         allow_smaller=False)
    body_cropper.set_random_state(seed + 1)
    steps_per_epoch = math.ceil(2 * len(cases) * patches_per_volume / batch_size)
    optimizer = torch.optim.Adam(codec.module.parameters(), lr=lr)
    schedule = warmup_cosine(optimizer, warmup_steps, max(1, epochs * steps_per_epoch), FINAL_LR_FRACTION)
    reconstruction = F.mse_loss if recon_loss == "mse" else F.l1_loss
    scaler = torch.amp.GradScaler(codec.device.type, enabled=codec.amp)
    codec.module.train()
    history = []
    for epoch in tqdm(range(epochs), desc="vae_fit", unit="epoch"):
        patches, directions = [], []
        for case in cases:
            for which in ("source", "target"):
                volume = torch.from_numpy(case.load(which))[None]
                crops = list(cropper(volume)) if patches_per_volume > in_body else []
                if in_body:
                    crops += body_cropper(volume, label=volume > BODY_THRESHOLD_HU)
                patches += [torch.as_tensor(crop) for crop in crops]
                directions += [case.grid.direction] * len(crops)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        order = rng.permutation(len(patches))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x01 = codec.hu_to_x01(torch.stack([patches[i] for i in batch])).to(codec.device)
            with codec.autocast():
                recon, z_mu, z_sigma = codec.reconstruct_train(x01, [directions[i] for i in batch])
            term = reconstruction(recon.float(), x01)
            kl = kl_divergence(z_mu.float(), z_sigma.float())
            loss = term + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            for key, value in (("loss", loss), ("recon", term), ("kl", kl)):
                sums[key] += float(value.detach())
        history.append({key: value / steps_per_epoch for key, value in sums.items()})
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    codec.module.eval()
    return history


def fit_vae(params: Params, processed_dir: Path, pretrained_dir: Path, out_dir: Path, live: Live | None = None,
            device: torch.device | str = "cpu") -> dict[str, Any]:
    """The vae_fit stage: build or load the codec, train it as the params say, write ``out_dir``.

    Per-epoch losses (``train/loss``, ``train/recon``, ``train/kl``) and a summary (training time, which
    weights) go to ``live``. Returns the manifest. Pretrained weights used as downloaded
    (``vae.finetune_epochs=0``) are not copied: the manifest points at ``pretrained_dir`` by relative
    path and sha256.
    """
    vae = params.vae
    origin = read_origin(pretrained_dir)
    if (origin["origin"] == "scratch") == vae.pretrained or origin.get("codec") != vae.codec:
        raise WeightsError(f"{pretrained_dir} holds {origin['origin']} {origin.get('codec')} weights but params "
                           f"select vae.pretrained={str(vae.pretrained).lower()} {vae.codec}: rerun "
                           f"fetch_weights (dvc repro)")
    if vae.pretrained:
        codec = pretrained_codec(vae, params.hu_range, pretrained_dir, device)
        epochs, lr = vae.finetune_epochs, vae.finetune_lr
        weights = {"origin": "pretrained", "repo": origin["repo"], "revision": origin["revision"],
                   "files": origin["files"]}
        if epochs:
            weights = {"origin": "finetuned", "epochs": epochs, "base": weights}
    else:
        codec = scratch_codec(params, params.train_seed, vae.logvar_init, device)
        epochs, lr = vae.scratch_epochs, vae.scratch_lr
        weights = {"origin": "scratch", "epochs": epochs, "width": _width(codec_config(codec))}

    train = split_cases(processed_dir, "train")
    started = time.perf_counter()

    def fit(codec: LatentCodec, seed: int) -> tuple[list[dict[str, float]], list[CodecCheck], str | None]:
        """(per-epoch losses, the health checks, their one-line verdict or None) of one training."""
        history = train_as_params(codec, train, vae, epochs, lr, seed, _live_logger(live))
        if history and not math.isfinite(history[-1]["loss"]):
            raise WeightsError(f"vae_fit: the last epoch's loss is {history[-1]['loss']}: the VAE diverged; lower "
                               f"vae.scratch_lr / vae.finetune_lr")
        checks = check_health(codec, train[:vae.health_cases])
        return history, checks, codec_verdict(checks, vae.min_gain_db, "vae.accept_unhealthy")

    history, health, verdict = fit(codec, params.train_seed) if epochs else ([], [], None)
    if verdict and not vae.pretrained and vae.retry_unhealthy:
        retry_seed = params.train_seed + RETRY_SEED_OFFSET
        print(f"vae_fit: {verdict.split('; set')[0]}; training again from seed {retry_seed} with the encoder as built "
              f"(vae.retry_unhealthy)")
        first = (codec, history, health, verdict)
        codec = scratch_codec(params, retry_seed, None, device)
        history, health, verdict = fit(codec, retry_seed)
        retry_checks, kept = health, "retry"
        # Both failed and the user accepts that: keep the better of the two (mean psnr_body on the health cases),
        # not merely the last one; the manifest names it and holds both attempts' numbers.
        if verdict and _vae_psnr(first[2]) > _vae_psnr(health):
            (codec, history, health, verdict), kept = first, "first_attempt"
        weights = {**weights, "retried": {"seed": retry_seed, "logvar_init": None, "kept": kept,
                                          "first_attempt": _attempt_summary(first[2]),
                                          "retry": _attempt_summary(retry_checks)}}
    if verdict and not vae.accept_unhealthy:
        raise Unhealthy(verdict)
    train_seconds = time.perf_counter() - started

    with atomic_dir(out_dir) as tmp:
        if epochs:
            files, weights_dir = save_weights(codec, tmp), "."
        else:
            files = origin["files"]
            weights_dir = Path(os.path.relpath(pretrained_dir.resolve(), out_dir.resolve())).as_posix()
        manifest = write_manifest(tmp, codec, weights_dir, files, weights, runtime_settings(vae),
                                  train_seconds=round(train_seconds, 1), final_loss=history[-1] if history else None)
    if verdict:
        print(f"vae_fit: {verdict.split('; set')[0]}: written anyway (vae.accept_unhealthy)")
    if live is not None:
        live.summary.update({key: manifest[key] for key in ("train_seconds", "codec", "weights")})
        if health:
            live.summary["health"] = {"cases": [c.case_id for c in health], **_attempt_summary(health)}
    return manifest


def scratch_codec(params: Params, seed: int, logvar_init: float | None, device: torch.device | str) -> LatentCodec:
    """A new codec of the params' family and scratch width, initialised from ``seed``."""
    # Seeded here, not only in train_codec: torch starts every process from a random seed, so the initial
    # weights (and with them the whole stage's output) differed from run to run.
    set_determinism(seed)
    codec = new_codec(params.vae, params.hu_range, scratch_config(params.vae), device)
    if logvar_init is not None:
        init_logvar(codec, logvar_init)
    return codec


def train_as_params(codec: LatentCodec, cases: Sequence[Case], vae: VaeParams, epochs: int, lr: float, seed: int,
                    on_epoch: EpochLog | None = None) -> list[dict[str, float]]:
    """:func:`train_codec` with the crops, batches, loss and schedule of the ``vae`` params (the arm's patch)."""
    return train_codec(codec, cases, vae.maisi.patch if vae.use_maisi else vae.sd.patch, epochs, lr,
                       vae.patches_per_volume, vae.batch_size, vae.kl_weight, seed, on_epoch, vae.recon_loss,
                       vae.warmup_steps, vae.body_crops)


def check_health(codec: LatentCodec, cases: Sequence[Case]) -> list[CodecCheck]:
    """Each case's target round-tripped whole against its trivial codes (:mod:`ctdiff.metrics.health`), scored
    over the codec's own ``hu_range``."""
    codec.module.eval()
    checks = []
    for case in cases:
        truth = case.load("target")
        scorer = TruthScorer(truth, codec.hu_range)
        psnr = scorer.score(codec.round_trip(truth, case.grid.direction))["psnr_body"]
        checks.append(check_codec(case.case_id, psnr, truth, scorer, codec.downsample))
    return checks


def init_logvar(codec: LatentCodec, value: float) -> None:
    """Start the encoder's log-variance output at ``value`` everywhere (weights 0, bias ``value``): a scratch
    VAE then begins nearly deterministic (sigma = exp(value / 2)) instead of drowning its latents in unit
    noise that the tiny KL weight takes many steps to shrink."""
    module = codec.module
    if hasattr(module, "quant_conv_log_sigma"):  # MONAI AutoencoderKlMaisi: a 1x1 conv of its own
        conv = module.quant_conv_log_sigma.conv
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.constant_(conv.bias, value)
        return
    conv = module.quant_conv  # diffusers AutoencoderKL: one 1x1 conv giving [mean, logvar] on channels
    c = codec.latent_channels
    with torch.no_grad():
        conv.weight[c:].zero_()
        conv.bias[c:].fill_(value)


def _vae_psnr(checks: Sequence[CodecCheck]) -> float:
    return float(sum(c.vae for c in checks) / len(checks))


def _attempt_summary(checks: Sequence[CodecCheck]) -> dict[str, float]:
    return {**summarise_checks(checks), "vae_psnr_body": _vae_psnr(checks)}


def _live_logger(live: Live | None) -> EpochLog | None:
    if live is None:
        return None

    def log_epoch(epoch: int, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            live.log_metric(f"train/{name}", value)
        live.next_step()

    return log_epoch


def _width(config: dict[str, Any]) -> list[int]:
    return list(config.get("num_channels") or config["block_out_channels"])
