"""The train stage: conditional latent diffusion (series 1 -> series 2) with a frozen-then-unfrozen VAE.

One loop, top to bottom (:func:`train`): load the data, build the VAE, UNet and optimizer, resume or
start fresh, encode the training volumes once, then for each epoch either

- **frozen** (``epoch < train.vae_freeze_epochs``): the VAE is in eval mode with ``requires_grad=False``
  and has no optimizer; patches are cut from the cached posteriors (:class:`ctdiff.latents.LatentCache`)
  and sampled, so a step costs only the UNet; or
- **unfrozen**: the VAE (``train.vae_finetune``: ``decoder`` or ``full``) trains with its own optimizer at
  ``train.vae_lr`` and keeps its reconstruction loss on the image-space target patch (L1 in [0, 1] + KL,
  weight ``train.vae_recon_weight``), so the latent space cannot collapse under the diffusion loss. With
  ``full`` the patches are encoded on the fly (the encoder trains); with ``decoder`` the encoder is frozen,
  so the diffusion term keeps reading the cached latents, which are exactly what the encoder would give
  (encoding patches on the fly instead shifted the latents at patch borders: measured on the phantoms,
  latent std 2.02 -> 1.85 and a val loss that rose after the switch). The scale factor stays the one
  computed from the cached latents at the start.

then validate (fixed val patches, noise and timesteps, so the loss is comparable across epochs), log to
dvclive, and checkpoint. ``last.pt`` is written every ``train.checkpoint_every`` steps and at every epoch
end; ``best.pt`` when the val loss improves.

Resume: ``last.pt`` whose params hash matches continues exactly where it stopped (model, optimizers, LR
schedule, RNG streams, partial-epoch statistics); otherwise training starts fresh and says why.
SIGTERM/SIGINT finish the current step, write ``last.pt`` and raise :class:`TrainInterrupted`; the stage
exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's code for "killed by
that signal", so DVC (and a cluster scheduler) records the stage as not finished. A non-finite loss raises
:class:`TrainingDiverged` naming the step, before anything of that step is written.

DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its own share of each epoch's
patches (``DistributedSampler``-style), gradients are averaged, and only rank 0 validates, logs and writes
checkpoints. Each process encodes the whole training set for its cache.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import resource
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dvclive import Live
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ctdiff.checkpoint import (
    StopFlag,
    TrainingDiverged,
    TrainInterrupted,
    params_hash,
    resumable,
    rng_state,
    save_checkpoint,
    set_rng_state,
    warmup_cosine,
)
from ctdiff.denoiser import build_unet
from ctdiff.device import pick_device
from ctdiff.diffusion import LatentTarget, diffusion_loss, training_scheduler
from ctdiff.latents import (
    LatentCache,
    PatchSampler,
    VaeAdapter,
    cut_patch,
    epoch_order,
    latent_patch_shape,
    rank_batches,
    recon_block,
)
from ctdiff.metrics import psnr
from ctdiff.params import Params, TrainParams, to_dict
from ctdiff.vae.data import Case, data_fingerprint, split_cases

LAST, BEST = "last.pt", "best.pt"
LATENT_CACHE_DIR = "latents"
# How long a process waits for the others in a collective before the job fails with an error (gloo and
# NCCL alike): long enough for rank 0's validation and checkpoint writes at the end of an epoch, which the
# other ranks wait for, short enough that a job with a hung or vanished peer fails within the hour.
DIST_TIMEOUT = timedelta(minutes=30)
# train params that change how a run executes or is observed, not the model it produces
NOT_SHAPING = ("device", "precision", "checkpoint_every", "latent_cache")


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those of a resumed run)
    start_step: int  # where this invocation began (0 = fresh)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch logged by this invocation
    scale_factor: float = 1.0
    messages: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- train
def train(params: Params, processed_dir: Path, vae_dir: Path, ckpt_dir: Path, live_dir: Path,
          progress: bool = True) -> TrainResult:
    """Run (or resume) the train stage; see the module docstring. Returns what happened."""
    env = DistEnv.setup(params.train)
    try:
        return _train(params, processed_dir, vae_dir, ckpt_dir, live_dir, progress, env)
    except BaseException as exc:
        # The traceback keeps _train's locals (the DDP model) alive; they must go before the process
        # group does (DistEnv.close). The frames' code and line numbers stay for the error report.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        env.close()


def _train(params: Params, processed_dir: Path, vae_dir: Path, ckpt_dir: Path, live_dir: Path, progress: bool,
           env: DistEnv) -> TrainResult:
    """The body of :func:`train`; returning (or raising) drops the DDP model before ``env`` closes."""
    tp = params.train
    device = env.device
    say = print if env.is_main else (lambda *a, **k: None)
    torch.manual_seed(params.seed + env.rank)
    random.seed(params.seed + env.rank)
    rng = np.random.default_rng([params.seed, env.rank])  # patch corners

    # ---- data: train split to learn from, val split to validate on; the test split is never read here
    train_cases = split_cases(processed_dir, "train")
    val_cases = split_cases(processed_dir, "val")
    if not train_cases or not val_cases:
        raise RuntimeError(f"{processed_dir}/splits.json needs at least one train and one val case "
                           f"(has {len(train_cases)} train, {len(val_cases)} val)")
    volumes = [(c.load("source", mmap=True), c.load("target", mmap=True)) for c in train_cases]

    # ---- models
    vae = VaeAdapter.load(vae_dir, params.vae, device)
    vae.set_trainable("none")
    vae_start = {k: v.detach().cpu().clone() for k, v in vae.module.state_dict().items()}  # for vae/drift
    sampler = PatchSampler(latent_patch_shape(tp.patch, vae.downsample, tp.unet.latent_multiple, vae.name),
                           vae.downsample)
    unet = build_unet(tp.unet, vae.latent_channels).to(device)
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world_size > 1 else unet
    noise_scheduler = training_scheduler(tp)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    steps_per_epoch = math.ceil(len(train_cases) * tp.patches_per_volume / (tp.batch_size * env.world_size))
    total_steps = tp.epochs * steps_per_epoch
    lr_scheduler = warmup_cosine(optimizer, tp.warmup_steps, total_steps, tp.lr_min_ratio)
    amp_dtype = autocast_dtype(tp.precision, device, say)
    grad_scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    vae_params: list[nn.Parameter] = []
    vae_optimizer: torch.optim.Optimizer | None = None  # created when the VAE unfreezes, never before

    # ---- resume or start fresh
    shaping = shaping_params(params, vae, train_cases, val_cases)
    ckpt, why = resumable(ckpt_dir / LAST, shaping)
    say(f"train: {why}")
    step, scale_factor, best_val, residual_gain = 0, None, math.inf, None
    epoch_stats = EpochStats()
    if ckpt is not None:
        unet.load_state_dict(ckpt["unet"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        grad_scaler.load_state_dict(ckpt["grad_scaler"])
        if ckpt["vae"] is not None:
            vae.module.load_state_dict(ckpt["vae"])
        step, scale_factor, best_val = ckpt["step"], ckpt["scale_factor"], ckpt["best_val_loss"]
        residual_gain = ckpt.get("residual_gain")
        epoch_stats = EpochStats(**ckpt["epoch_stats"])
        if env.is_main:
            set_rng_state(ckpt["rng"], rng)
        else:  # rank 0's streams are the ones saved; the others restart theirs from the step
            torch.manual_seed(params.seed + env.rank + 1000 * step)
            rng = np.random.default_rng([params.seed, env.rank, step])
    elif env.is_main:
        for name in (LAST, BEST):
            (ckpt_dir / name).unlink(missing_ok=True)
        shutil.rmtree(live_dir, ignore_errors=True)
    result = TrainResult(steps=step, start_step=step, messages=[why])
    if step >= total_steps:
        say(f"train: already complete ({step} steps); delete {ckpt_dir} to train again")
        result.scale_factor = float(scale_factor)
        return result

    # ---- latents of the frozen VAE: cached posteriors of every training volume; the scale factor from them
    start_epoch = step // steps_per_epoch
    cache = None
    if start_epoch < tp.vae_freeze_epochs or tp.vae_finetune == "decoder" or scale_factor is None:
        cache_dir = ckpt_dir / LATENT_CACHE_DIR if tp.latent_cache == "disk" else None
        cache = LatentCache.build(vae, train_cases, cache_dir, progress=progress and env.is_main)
    if scale_factor is None:
        scale_factor = 1.0 / cache.target_std()
        say(f"train: latent scale factor {scale_factor:.4f} (1 / std of the cached training target latents)")
    if tp.residual and residual_gain is None:
        residual_gain = 1.0 / (cache.residual_std() * scale_factor)
        say(f"train: residual gain {residual_gain:.4f} (1 / std of the scaled target - source latents)")
    latent_target = LatentTarget(tp.residual, residual_gain or 1.0)
    result.scale_factor = scale_factor
    validation = Validation(vae, val_cases, sampler, noise_scheduler, tp, params.seed) if env.is_main else None

    live = Live(str(live_dir), resume=ckpt is not None, dvcyaml=False, save_dvc_exp=False) if env.is_main else None
    if live is not None:
        live.summary.update({"codec": vae.name, "weights": vae.weights, "scale_factor": scale_factor})

    def checkpoint(path: Path, with_optimizers: bool = True) -> None:
        """Everything needed to continue (last.pt) or to sample (best.pt); rank 0 only."""
        save_checkpoint(path, {
            "unet": unet.state_dict(),
            "vae": vae.module.state_dict() if vae_optimizer is not None else None,  # only once fine-tuned
            "optimizer": optimizer.state_dict() if with_optimizers else None,
            "vae_optimizer": vae_optimizer.state_dict() if with_optimizers and vae_optimizer else None,
            "lr_scheduler": lr_scheduler.state_dict() if with_optimizers else None,
            "grad_scaler": grad_scaler.state_dict(),
            "scale_factor": scale_factor,
            "residual_gain": residual_gain,
            "step": step,
            "epoch": step // steps_per_epoch,
            "epoch_stats": epoch_stats.__dict__,
            "best_val_loss": best_val,
            "rng": rng_state(rng),
            "params_hash": params_hash(shaping),
            "params_shaping": json.dumps(shaping, sort_keys=True),
            "train_params": to_dict(tp),
            "codec": vae.name,
            "latent_channels": vae.latent_channels,
        })

    # ---- the loop
    stop = StopFlag.install()
    try:
        for epoch in range(start_epoch, tp.epochs):
            frozen = epoch < tp.vae_freeze_epochs
            if not frozen and vae_optimizer is None:
                # Unfreeze: "decoder" trains the decoder only (the latent space stays put); "full" also the
                # encoder, through the reconstruction and the diffusion loss.
                vae_params = vae.set_trainable(tp.vae_finetune)
                vae_optimizer = torch.optim.AdamW(vae_params, lr=tp.vae_lr, weight_decay=0.0)
                if ckpt is not None and ckpt.get("vae_optimizer") is not None:
                    vae_optimizer.load_state_dict(ckpt["vae_optimizer"])
            unet.train()
            batches = list(rank_batches(epoch_order(len(train_cases), tp.patches_per_volume, params.seed, epoch),
                                        tp.batch_size, env.rank, env.world_size))[:steps_per_epoch]
            done = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{tp.epochs} "
                       f"({'frozen' if frozen else 'unfrozen'} VAE)", unit="step", disable=not (progress and
                                                                                               env.is_main))
            tic = time.perf_counter()
            for indices in batches[done:]:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    corners = sampler.corners(volumes, indices, rng)  # source and target cut at the same place
                    if not frozen:
                        source_hu, target_hu = sampler.image_batch(volumes, indices, corners)
                        x01_target = vae.hu_to_x01(target_hu.to(device))
                    if frozen or tp.vae_finetune == "decoder":
                        # The encoder does not train, so the cached posteriors are exactly what it would give
                        # now (and, encoded whole, what sampling will condition on): read them in both phases.
                        source, target = (p.to(device) for p in sampler.latent_batch(cache, indices, corners))
                    else:  # "full": encode on the fly, so the diffusion gradient reaches the encoder
                        source = vae.posterior_x01(vae.hu_to_x01(source_hu.to(device)))
                        target = vae.posterior_x01(x01_target)
                    z_source, z_target = source.sample() * scale_factor, target.sample() * scale_factor
                    loss_diffusion = diffusion_loss(model, noise_scheduler, latent_target.x0(z_target, z_source),
                                                    z_source)
                    loss_vae = torch.zeros((), device=device)
                    if not frozen:
                        # The VAE keeps its own objective on the target patch (L1 of the reconstruction from
                        # the same latent sample, + KL), so the diffusion loss cannot reshape or collapse the
                        # latent space unopposed. With "decoder" the KL is a constant (frozen encoder) and
                        # the diffusion loss never reaches the VAE: the decoder learns from this term alone.
                        # (decoded on a random block of train.vae_recon_slices latent slices: recon_block)
                        block, x01_block = recon_block(z_target / scale_factor, x01_target, vae.downsample,
                                                       tp.vae_recon_slices, rng)
                        recon01 = vae.decode_x01_train(block)
                        loss_vae = F.l1_loss(recon01.float(), x01_block) + tp.vae_kl_weight * vae.kl(target)
                    loss = loss_diffusion + tp.vae_recon_weight * loss_vae

                # every rank must agree to stop (a diverged loss on one rank, or a signal)
                bad, stop_now = env.any(not torch.isfinite(loss).item(), stop.signum is not None)
                if bad:
                    raise TrainingDiverged(
                        f"step {step + 1} (epoch {epoch + 1}): loss is {loss.item()} (diffusion "
                        f"{loss_diffusion.item()}, VAE {loss_vae.item()}); stopped before writing anything for "
                        f"this step. Lower train.lr / train.vae_lr or set train.precision=fp32")

                optimizer.zero_grad(set_to_none=True)
                if vae_optimizer is not None:
                    vae_optimizer.zero_grad(set_to_none=True)
                grad_scaler.scale(loss).backward()
                env.average_gradients(vae_params)  # the UNet's are averaged by DDP
                for opt, ps in ((optimizer, list(unet.parameters())), (vae_optimizer, vae_params)):
                    if opt is None:
                        continue
                    grad_scaler.unscale_(opt)
                    if tp.grad_clip:
                        torch.nn.utils.clip_grad_norm_(ps, tp.grad_clip)
                    grad_scaler.step(opt)
                grad_scaler.update()
                lr_scheduler.step()
                step += 1

                epoch_stats.add(loss_diffusion.item(), loss_vae.item(), z_target.detach() / scale_factor)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_diffusion.item():.4f}")
                last_of_epoch = step == (epoch + 1) * steps_per_epoch
                if env.is_main and step % tp.checkpoint_every == 0 and not last_of_epoch:
                    checkpoint(ckpt_dir / LAST)  # (the epoch-end one follows validation)
                if stop_now and not last_of_epoch:
                    if env.is_main:
                        checkpoint(ckpt_dir / LAST)
                    raise TrainInterrupted(stop.signum or signal.SIGTERM, step)
            bar.close()
            epoch_stats.seconds += time.perf_counter() - tic

            # ---- end of epoch: validate, log, checkpoint (rank 0)
            if env.is_main:
                val_loss, val_psnr = validation.run(unet, scale_factor, latent_target, encoder_changed=not frozen and
                                                    tp.vae_finetune == "full", decoder_changed=not frozen)
                metrics = {
                    "train/loss": epoch_stats.loss_mean, "val/loss": val_loss,
                    "train/vae_loss": epoch_stats.vae_loss_mean, "val/vae_psnr": val_psnr,
                    "lr/unet": optimizer.param_groups[0]["lr"],
                    "lr/vae": vae_optimizer.param_groups[0]["lr"] if vae_optimizer else 0.0,
                    "latent/std": epoch_stats.latent_std, "latent/std_scaled": epoch_stats.latent_std * scale_factor,
                    "phase": 0.0 if frozen else 1.0,  # 0 = VAE frozen (cached latents), 1 = VAE fine-tuned
                    "perf/sec_per_step": epoch_stats.seconds / max(epoch_stats.steps, 1),
                    "perf/samples_per_s": epoch_stats.steps * tp.batch_size * env.world_size
                    / max(epoch_stats.seconds, 1e-9),
                    "perf/peak_mem_mb": peak_memory_mb(device),
                    "vae/drift": relative_change(vae_start, vae.module.state_dict()),  # 0 while frozen
                }
                live.step = epoch
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.summary.update({"epoch": epoch + 1, "steps": step})
                live.next_step()
                result.history.append({"epoch": epoch, "step": step, **metrics})
                say(f"epoch {epoch + 1}: train {metrics['train/loss']:.4f}  val {val_loss:.4f}  "
                    f"latent std {metrics['latent/std']:.3f}  VAE PSNR {val_psnr:.2f} dB")
            epoch_stats = EpochStats()
            if env.is_main:
                if val_loss < best_val:
                    best_val = val_loss
                    checkpoint(ckpt_dir / BEST, with_optimizers=False)
                checkpoint(ckpt_dir / LAST)
            (stop_now,) = env.any(stop.signum is not None)  # (also the barrier that waits for rank 0's writes)
            if stop_now and epoch + 1 < tp.epochs:
                raise TrainInterrupted(stop.signum or signal.SIGTERM, step)
    finally:
        stop.restore()
    result.steps = step
    return result


# --------------------------------------------------------------------------------------- validation
class Validation:
    """Fixed val patches (same corners, noise and timesteps every epoch), so val loss is comparable.

    The val volumes are encoded whole (posterior mean) once and again only when the encoder trains
    (``full`` fine-tuning); the VAE reconstruction PSNR of the val targets is recomputed only when the
    decoder trains, on the central block of each target as deep as a training patch (the same block every
    time, so epochs compare; decoding whole volumes through the released SD decoder cost ~25 s per epoch
    on 2 CPU cores). Timesteps are spread evenly over [0, T) to lower the variance of the estimate.
    """

    def __init__(self, vae: VaeAdapter, cases: list[Case], sampler: PatchSampler, scheduler: Any,
                 tp: TrainParams, seed: int) -> None:
        self.vae, self.cases, self.sampler, self.scheduler, self.tp = vae, cases, sampler, scheduler, tp
        rng = np.random.default_rng([seed, 0x7A1])
        self._encode()
        self.corners = [[sampler.corner(lat[1].shape[1:], rng) for _ in range(tp.val_patches_per_volume)]
                        for lat in self.latents]
        n = len(cases) * tp.val_patches_per_volume
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((n, vae.latent_channels, *sampler.latent_patch), generator=generator)
        spread = torch.linspace(0, scheduler.num_train_timesteps - 1, n).long()
        self.timesteps = spread[torch.randperm(n, generator=generator)]
        self.psnr: float | None = None

    def _encode(self) -> None:
        self.latents = []  # per case: (source mean, target mean), (C, d, h, w) on the VAE's device
        for case in self.cases:
            pair = [self.vae.encode_posterior_hu(torch.from_numpy(case.load(w).astype(np.float32))[None, None]
                                                 .to(self.vae.codec.device)).mean[0] for w in ("source", "target")]
            self.latents.append(tuple(pair))

    @torch.no_grad()
    def run(self, unet: nn.Module, scale_factor: float, latent_target: LatentTarget, encoder_changed: bool,
            decoder_changed: bool) -> tuple[float, float]:
        """(val diffusion loss, mean VAE reconstruction PSNR of the val targets in dB)."""
        was_training = self.vae.module.training
        if encoder_changed:
            self._encode()
        if decoder_changed or self.psnr is None:
            values = []
            fd = self.vae.downsample[0]
            for case, (_, target) in zip(self.cases, self.latents):
                depth = min(target.shape[1], self.sampler.latent_patch[0])
                start = (target.shape[1] - depth) // 2
                target_hu = torch.from_numpy(case.load("target", mmap=True)[start * fd:(start + depth) * fd]
                                             .astype(np.float32))  # the block only, not the whole volume
                recon_hu = self.vae.decode_hu(target[None, :, start:start + depth], target_hu.shape)[0, 0].cpu()
                values.append(psnr(self.vae.hu_to_x01(recon_hu), self.vae.hu_to_x01(target_hu)))
            self.psnr = float(np.mean(values))
        self.vae.module.train(was_training)
        source = torch.stack([cut_patch(s, c, self.sampler.latent_patch) for (s, _), cs in
                              zip(self.latents, self.corners) for c in cs])
        target = torch.stack([cut_patch(t, c, self.sampler.latent_patch) for (_, t), cs in
                              zip(self.latents, self.corners) for c in cs])
        unet.eval()
        device = next(unet.parameters()).device
        losses = []
        for i in range(0, len(source), self.tp.batch_size):
            sl = slice(i, i + self.tp.batch_size)
            z_source = (source[sl] * scale_factor).to(device)
            x0 = latent_target.x0((target[sl] * scale_factor).to(device), z_source)
            loss = diffusion_loss(unet, self.scheduler, x0, z_source, self.noise[sl].to(device),
                                  self.timesteps[sl].to(device))
            losses.append(loss.item() * len(source[sl]))
        unet.train()
        return sum(losses) / len(source), self.psnr


# ------------------------------------------------------------------------------------------- helpers
@dataclass
class EpochStats:
    """Running sums of one epoch (kept in last.pt so a resumed epoch reports the whole epoch)."""

    steps: int = 0
    loss_sum: float = 0.0
    vae_loss_sum: float = 0.0
    latent_sum: float = 0.0  # of unscaled target latents seen, for their std
    latent_sq_sum: float = 0.0
    latent_n: int = 0
    seconds: float = 0.0

    def add(self, loss: float, vae_loss: float, latent: torch.Tensor) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.vae_loss_sum += vae_loss
        latent = latent.double()
        self.latent_sum += float(latent.sum())
        self.latent_sq_sum += float(latent.pow(2).sum())
        self.latent_n += latent.numel()

    @property
    def loss_mean(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def vae_loss_mean(self) -> float:
        return self.vae_loss_sum / max(self.steps, 1)

    @property
    def latent_std(self) -> float:
        n = max(self.latent_n, 1)
        return math.sqrt(max(self.latent_sq_sum / n - (self.latent_sum / n) ** 2, 0.0))


def shaping_params(params: Params, vae: VaeAdapter, train_cases: list[Case], val_cases: list[Case]) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: train params that shape the model and its
    trajectory (not ``NOT_SHAPING``), the seed, the VAE's identity, and the data (case ids and fingerprints)."""
    train = {k: v for k, v in to_dict(params.train).items() if k not in NOT_SHAPING}
    return {
        "seed": params.seed,
        "train": train,
        "vae": vae.fingerprint,
        "data": {"train": {c.case_id: data_fingerprint(c) for c in train_cases},
                 "val": {c.case_id: data_fingerprint(c) for c in val_cases}},
    }


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all floating-point tensors of two state dicts (0 = unchanged)."""
    diff = sum(float((after[k].detach().cpu().double() - v.double()).pow(2).sum())
               for k, v in before.items() if v.is_floating_point())
    norm = sum(float(v.double().pow(2).sum()) for v in before.values() if v.is_floating_point())
    return math.sqrt(diff / max(norm, 1e-30))


def autocast_dtype(precision: str, device: torch.device, say: Any = print) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None = fp32). CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        say("train: this GPU has no bf16; running fp32 (set train.precision=fp16 for mixed precision)")
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA, reset after reading) or peak resident memory of the process (CPU), MiB."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` job (world size 1 without one)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, tp: TrainParams) -> DistEnv:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(tp.device, local_rank)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        if world_size > 1:
            if not cuda:  # processes share the cores instead of each taking all of them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                                          world_size))))
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
            return cls(dist.get_rank(), world_size, device)
        return cls(0, 1, device)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all processes."""
        if self.world_size == 1:
            return tuple(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average gradients over processes for parameters DDP does not manage (the fine-tuned VAE)."""
        if self.world_size == 1:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def close(self) -> None:
        """Destroy the process group. Drop the DDP model first (:func:`train` does): the group must outlive it.

        Whatever drops the last reference to a gloo group joins its worker threads, and a worker may still
        be freeing the tensors of the last collective, which needs the GIL. The group's Python object joins
        with the GIL released; DDP's C++ reducer, also holding the group, joins while holding it, so when it
        went last the process deadlocked on exit (the job's last epoch done, one rank never exiting: 10 runs
        in 20 of the 2-process CPU test). DDP can sit in a reference cycle, hence the collection here: it
        frees a dropped model while the group is still registered, so the reducer's reference is never the
        last one.
        """
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
