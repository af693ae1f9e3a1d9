"""vae_fit: train (from scratch) or fine-tune a codec on random patches, then measure its latent scale.

The loop reads top to bottom: each epoch draws ``patches_per_volume`` random crops from every training
volume (source and target series, so the codec sees both the thick-slice input and the thin-slice
output), shuffles them, and steps Adam on L1 reconstruction in [0, 1] intensity plus ``kl_weight`` times
the KL term of the posterior. The learning rate decays on a cosine to 5 % of its start.
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
from monai.transforms import RandSpatialCropSamples
from monai.utils import set_determinism
from tqdm import tqdm

from ctdiff.data.processed import Case, split_cases
from ctdiff.io import atomic_dir
from ctdiff.models.vae.base import LatentCodec, kl_divergence
from ctdiff.models.vae.weights import (
    WeightsError,
    codec_config,
    new_codec,
    pretrained_codec,
    read_source,
    save_weights,
    scratch_config,
    write_manifest,
)
from ctdiff.params import Params

FINAL_LR_FRACTION = 0.05
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
                on_epoch: EpochLog | None = None) -> list[dict[str, float]]:
    """Train ``codec.module`` in place; return per-epoch mean losses {loss, l1, kl} (l1 in [0, 1] units)."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    smallest = np.min([case.load("target", mmap=True).shape for case in cases], axis=0)
    roi = patch_size(patch, smallest, codec.downsample)
    cropper = RandSpatialCropSamples(roi_size=roi, num_samples=patches_per_volume, random_size=False)
    cropper.set_random_state(seed)
    steps_per_epoch = math.ceil(2 * len(cases) * patches_per_volume / batch_size)
    optimizer = torch.optim.Adam(codec.module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch),
                                                          eta_min=lr * FINAL_LR_FRACTION)
    scaler = torch.amp.GradScaler(codec.device.type, enabled=codec.amp)
    codec.module.train()
    history = []
    for epoch in tqdm(range(epochs), desc="vae_fit", unit="epoch"):
        patches, directions = [], []
        for case in cases:
            for which in ("source", "target"):
                crops = cropper(torch.from_numpy(case.load(which))[None])
                patches += [crop.as_tensor() for crop in crops]
                directions += [case.grid.direction] * len(crops)
        sums = {"loss": 0.0, "l1": 0.0, "kl": 0.0}
        order = rng.permutation(len(patches))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x01 = codec.hu_to_x01(torch.stack([patches[i] for i in batch])).to(codec.device)
            with codec.autocast():
                recon, z_mu, z_sigma = codec.reconstruct_train(x01, [directions[i] for i in batch])
            l1 = F.l1_loss(recon.float(), x01)
            kl = kl_divergence(z_mu.float(), z_sigma.float())
            loss = l1 + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            for key, value in (("loss", loss), ("l1", l1), ("kl", kl)):
                sums[key] += float(value.detach())
        history.append({key: value / steps_per_epoch for key, value in sums.items()})
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    codec.module.eval()
    return history


def fit_vae(params: Params, processed_dir: Path, pretrained_dir: Path, out_dir: Path, live: Live | None = None,
            device: torch.device | str = "cpu") -> dict[str, Any]:
    """The vae_fit stage: build or load the codec, train it as the params say, write ``out_dir``.

    Per-epoch losses (``train/loss``, ``train/l1``, ``train/kl``) and a summary (training time, which
    weights) go to ``live``. No latent scale factor here: the train stage computes it from the latents it
    encodes anyway (an encode here would be thrown away). Returns the manifest. Pretrained weights used as downloaded
    (``vae.finetune_epochs=0``) are not copied: the manifest points at ``pretrained_dir`` by relative
    path and sha256.
    """
    vae = params.vae
    source = read_source(pretrained_dir)
    if (source["source"] == "scratch") == vae.pretrained or source.get("codec") != vae.codec:
        raise WeightsError(f"{pretrained_dir} holds {source['source']} {source.get('codec')} weights but params "
                           f"select vae.pretrained={str(vae.pretrained).lower()} {vae.codec}: rerun "
                           f"fetch_weights (dvc repro)")
    if vae.pretrained:
        codec = pretrained_codec(vae, pretrained_dir, device)
        epochs, lr = vae.finetune_epochs, vae.finetune_lr
        weights = {"source": "pretrained", "repo": source["repo"], "revision": source["revision"],
                   "files": source["files"]}
        if epochs:
            weights = {"source": "finetuned", "epochs": epochs, "base": weights}
    else:
        # Seeded here, not only in train_codec: torch starts every process from a random seed, so the
        # initial weights (and with them the whole stage's output) differed from run to run.
        set_determinism(params.train_seed)
        codec = new_codec(vae, scratch_config(vae), device)
        epochs, lr = vae.scratch_epochs, vae.scratch_lr
        weights = {"source": "scratch", "epochs": epochs, "width": _width(codec_config(codec))}

    train = split_cases(processed_dir, "train")
    patch = vae.maisi.patch if vae.use_maisi else vae.sd.patch
    started = time.perf_counter()
    history = train_codec(codec, train, patch, epochs, lr, vae.patches_per_volume, vae.batch_size,
                          vae.kl_weight, params.train_seed, _live_logger(live)) if epochs else []
    train_seconds = time.perf_counter() - started
    if history and not math.isfinite(history[-1]["loss"]):
        raise WeightsError(f"vae_fit: the last epoch's loss is {history[-1]['loss']}: the VAE diverged; lower "
                           f"vae.scratch_lr / vae.finetune_lr")

    with atomic_dir(out_dir) as tmp:
        if epochs:
            files, weights_dir = save_weights(codec, tmp), "."
        else:
            files = source["files"]
            weights_dir = Path(os.path.relpath(pretrained_dir.resolve(), out_dir.resolve())).as_posix()
        manifest = write_manifest(tmp, codec, weights_dir, files, weights, train_seconds=round(train_seconds, 1),
                                  final_loss=history[-1] if history else None)
    if live is not None:
        live.summary.update({key: manifest[key] for key in
                             ("train_seconds", "codec", "weights")})
    return manifest


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
