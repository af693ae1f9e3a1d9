"""The train stage: conditional latent diffusion (series 1 -> series 2) with a frozen-then-unfrozen VAE.

The loop is :func:`_train`, top to bottom; each phase around it is a named step (as MAISI's
``diff_model_train.py`` has them): :func:`prepare_data` (the condition: ``source.npy``, or the slab stage's
``baseline_consistent`` with ``train.condition: consistent``), :func:`load_models`, :func:`make_optimizer`,
:func:`restore` (resume or start fresh, :class:`~ctdiff.training.scaffold.TrainingRun`),
:func:`encode_training_latents` (the latent cache and the scale factor), then for each epoch either

- **frozen** (``epoch < train.vae_freeze_epochs``): the VAE is in eval mode with ``requires_grad=False``
  and has no optimizer; patches are cut from the cached posteriors (:class:`ctdiff.training.latents.LatentCache`)
  and sampled, so a step costs only the UNet; or
- **unfrozen** (:func:`unfreeze_vae`): the VAE (``train.vae_finetune``: ``decoder`` or ``full``) trains with
  its own optimizer at ``train.vae_lr`` and keeps its reconstruction loss on the image-space target patch
  (L1 in [0, 1] + KL, weight ``train.vae_recon_weight``), so the latent space cannot collapse under the
  diffusion loss. With ``full`` the patches are encoded on the fly (the encoder trains); with ``decoder``
  the encoder is frozen, so the diffusion term keeps reading the cached latents, which are exactly what the
  encoder would give (encoding patches on the fly instead shifted the latents at patch borders: measured on
  the phantoms, latent std 2.02 -> 1.85 and a val loss that rose after the switch). The scale factor stays
  the one computed from the cached latents at the start.

each step being :func:`step_losses` then :func:`optimizer_step`; then validate (:class:`Validation`: fixed
val patches, noise and timesteps, so the loss is comparable across epochs), log to dvclive, and checkpoint.
``last.pt`` is written every ``train.checkpoint_every`` steps and at every epoch end; ``best.pt`` when the
val loss improves. ``model.json`` (:func:`ctdiff.models.checkpoint.write_model_card`) is written last, also by a
run that finds its training already complete: what evaluate and ``ctdiff predict`` need to use the model
(``train.sampling``, the slab profile, the intensity range, the condition, the training geometry), so a
change of the sampling defaults reruns this stage only to rewrite it.

The latent scale factor (1 / std of the cached training target latents, MAISI's method) is computed here
once, from the latents this stage encodes anyway, and stored in every checkpoint; sampling reads it from
there. Resume: ``last.pt`` whose params hash matches continues exactly where it stopped (model,
optimizers, LR schedule, RNG streams, partial-epoch statistics); otherwise training starts fresh and says
why. The hash covers what shapes the model: the train params but ``NOT_SHAPING``, the seed, the VAE, the data
and, for a consistent condition, the slab profile it was projected with. SIGTERM/SIGINT finish the current
step, write ``last.pt`` and raise :class:`~ctdiff.training.scaffold.TrainInterrupted`; a non-finite loss
raises :class:`~ctdiff.training.scaffold.TrainingDiverged` naming the step, before anything of that step is
written. Under ``torchrun`` see :mod:`ctdiff.training.distributed`: each process encodes the whole training
set for its cache.
"""

from __future__ import annotations

import math
import random
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ctdiff.data.processed import Case, split_cases
from ctdiff.data.slab import SlabCase, SliceProfile, read_profile
from ctdiff.metrics.health import Unhealthy
from ctdiff.metrics.image import psnr
from ctdiff.models.checkpoint import write_model_card
from ctdiff.models.denoiser import build_unet, latent_patch_shape
from ctdiff.models.diffusion import LatentTarget, diffusion_loss, training_scheduler
from ctdiff.models.vae.base import LatentCodec
from ctdiff.models.vae.weights import load_vae
from ctdiff.params import Params, TrainParams, to_dict
from ctdiff.training.distributed import DistEnv, autocast_dtype, peak_memory_mb
from ctdiff.training.latents import LatentCache, PatchSampler, cut_patch, epoch_order, rank_batches, recon_block
from ctdiff.training.scaffold import (
    BEST,
    LAST,
    StopFlag,
    TrainingDiverged,
    TrainingRun,
    TrainInterrupted,
    TrainResult,
    set_rng_state,
    shaping,
    warmup_cosine,
)

LATENT_CACHE_DIR = "latents"
# train params that change how a run executes, is observed or is sampled later, not the weights it produces
NOT_SHAPING = ("precision", "checkpoint_every", "latent_cache", "sampling")


# ------------------------------------------------------------------------------------------- train
def train(params: Params, processed_dir: Path, slab_dir: Path, profile_dir: Path, vae_dir: Path, ckpt_dir: Path,
          live_dir: Path, progress: bool = True) -> TrainResult:
    """Run (or resume) the train stage; see the module docstring. Returns what happened.

    ``slab_dir``/``profile_dir``: the slab stage's ``data/slab`` and ``models/slab``."""
    env = DistEnv.setup(params.device)
    try:
        return _train(params, processed_dir, slab_dir, profile_dir, vae_dir, ckpt_dir, live_dir, progress, env)
    except BaseException as exc:
        # The traceback keeps _train's locals (the DDP model) alive; they must go before the process
        # group does (DistEnv.close). The frames' code and line numbers stay for the error report.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        env.close()


def _train(params: Params, processed_dir: Path, slab_dir: Path, profile_dir: Path, vae_dir: Path, ckpt_dir: Path,
           live_dir: Path, progress: bool, env: DistEnv) -> TrainResult:
    """The loop. Returning (or raising) drops the DDP model before ``env`` closes."""
    tp = params.train
    say = print if env.is_main else (lambda *a, **k: None)
    torch.manual_seed(params.train_seed + env.rank)
    random.seed(params.train_seed + env.rank)
    rng = np.random.default_rng([params.train_seed, env.rank])  # patch corners

    profile = read_profile(profile_dir)
    data = prepare_data(processed_dir, slab_dir, tp.condition)
    m = load_models(params, vae_dir, env)
    steps_per_epoch = math.ceil(len(data.train) * tp.patches_per_volume / (tp.batch_size * env.world_size))
    total_steps = tp.epochs * steps_per_epoch
    make_optimizer(m, tp, total_steps)
    run = TrainingRun("train", ckpt_dir, live_dir, shaping_params(params, m.vae, data, profile),
                      steps_per_epoch, env.is_main, say)
    rng = restore(run, m, params, env, rng)
    if run.complete(total_steps):
        if env.is_main:  # (validation runs on rank 0 only)
            check_val_fell(run, tp, say)
            write_model_card(ckpt_dir, model_card(tp, m.vae, profile, data))
        return run.result(scale_factor=float(run.checkpoint["scale_factor"]))

    frozen_later = run.epoch < tp.vae_freeze_epochs or tp.vae_finetune == "decoder"
    cache, scale_factor, latent_target = encode_training_latents(m.vae, data, tp, run, ckpt_dir, frozen_later,
                                                                 progress and env.is_main, say)
    if cache is not None:
        check_latent_spread(cache, tp, say)
    validation = Validation(m.vae, data.val, data.val_conditions, m.sampler, m.noise_scheduler, tp,
                            params.train_seed) if env.is_main else None
    run.open_live({"codec": m.vae.name, "weights": m.vae.weights, "scale_factor": scale_factor})

    def save(name: str, with_optimizers: bool = True) -> None:
        """Everything needed to continue (last.pt) or to sample (best.pt); rank 0 only."""
        run.save(name, {
            "unet": m.unet.state_dict(),
            "vae": m.vae.module.state_dict() if m.vae_optimizer is not None else None,  # only once fine-tuned
            "optimizer": m.optimizer.state_dict() if with_optimizers else None,
            "vae_optimizer": m.vae_optimizer.state_dict() if with_optimizers and m.vae_optimizer else None,
            "lr_scheduler": m.lr_scheduler.state_dict() if with_optimizers else None,
            "grad_scaler": m.grad_scaler.state_dict(),
            "scale_factor": scale_factor,
            "residual_gain": latent_target.gain if latent_target.residual else None,
            "train_params": to_dict(tp),
            "codec": m.vae.name,
            "latent_channels": m.vae.latent_channels,
            "geometry": training_geometry(data.train),
        }, rng)

    # ---- the loop
    stop = StopFlag.install()
    try:
        for epoch in range(run.epoch, tp.epochs):
            frozen = epoch < tp.vae_freeze_epochs
            if not frozen and m.vae_optimizer is None:
                unfreeze_vae(m, tp, run.checkpoint)
            m.unet.train()
            batches = list(rank_batches(epoch_order(len(data.train), tp.patches_per_volume, params.train_seed, epoch),
                                        tp.batch_size, env.rank, env.world_size))[:steps_per_epoch]
            done = run.step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{tp.epochs} "
                       f"({'frozen' if frozen else 'unfrozen'} VAE)", unit="step", disable=not (progress and
                                                                                               env.is_main))
            tic = time.perf_counter()
            for indices in batches[done:]:
                loss, loss_diffusion, loss_vae, z_target = step_losses(m, data, cache, indices, frozen, tp,
                                                                       scale_factor, latent_target, rng)
                # every rank must agree to stop (a diverged loss on one rank, or a signal)
                bad, stop_now = env.any(not torch.isfinite(loss).item(), stop.signum is not None)
                if bad:
                    raise TrainingDiverged(
                        f"step {run.step + 1} (epoch {epoch + 1}): loss is {loss.item()} (diffusion "
                        f"{loss_diffusion.item()}, VAE {loss_vae.item()}); stopped before writing anything for "
                        f"this step. Lower train.lr / train.vae_lr or set train.precision=fp32")
                optimizer_step(m, loss, tp, env)
                run.step += 1

                run.epoch_stats.add(loss=loss_diffusion.item(), vae_loss=loss_vae.item())
                latent = (z_target.detach() / scale_factor).double()
                run.epoch_stats.accumulate(latent=float(latent.sum()), latent_sq=float(latent.pow(2).sum()),
                                           latent_n=latent.numel())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_diffusion.item():.4f}")
                last_of_epoch = run.step == (epoch + 1) * steps_per_epoch
                if run.step % tp.checkpoint_every == 0 and not last_of_epoch:
                    save(LAST)  # (the epoch-end one follows validation)
                if stop_now and not last_of_epoch:
                    save(LAST)
                    raise TrainInterrupted(stop.signum or signal.SIGTERM, run.step)
            bar.close()
            run.epoch_stats.seconds += time.perf_counter() - tic

            # ---- end of epoch: validate, log, checkpoint (rank 0)
            val_loss = math.inf
            metrics: dict[str, float] = {}
            if env.is_main:
                val_loss, val_psnr = validation.run(m.unet, scale_factor, latent_target,
                                                    encoder_changed=not frozen and tp.vae_finetune == "full",
                                                    decoder_changed=not frozen)
                metrics = epoch_metrics(m, run, tp, env, frozen, val_loss, val_psnr, scale_factor)
                say(f"epoch {epoch + 1}: train {metrics['train/loss']:.4f}  val {val_loss:.4f}  "
                    f"latent std {metrics['latent/std']:.3f}  VAE PSNR {val_psnr:.2f} dB")
            run.log_epoch(epoch, metrics)
            if run.record_val(val_loss):
                save(BEST, with_optimizers=False)
            save(LAST)
            (stop_now,) = env.any(stop.signum is not None)  # (also the barrier that waits for rank 0's writes)
            if stop_now and epoch + 1 < tp.epochs:
                raise TrainInterrupted(stop.signum or signal.SIGTERM, run.step)
    finally:
        stop.restore()
    if env.is_main:  # (validation runs on rank 0 only)
        check_val_fell(run, tp, say)
        write_model_card(ckpt_dir, model_card(tp, m.vae, profile, data))
    return run.result(scale_factor=scale_factor)


# ------------------------------------------------------------------------------------------- health
def check_latent_spread(cache: LatentCache, tp: TrainParams, say: Any) -> None:
    """The VAE must encode the train targets into latents that vary (:mod:`ctdiff.metrics.health`)."""
    spread = cache.mean_spread()
    if spread >= tp.min_latent_spread:
        return
    message = (f"the VAE's latents of the train targets barely vary (std {spread:.2e} over voxels, below "
               f"train.min_latent_spread {tp.min_latent_spread:g}): it encodes every volume alike, so there is "
               f"nothing to learn; check vae_check, or set train.accept_unhealthy=true")
    if not tp.accept_unhealthy:
        raise Unhealthy(message)
    say(f"train: warning: {message.split('; check')[0]} (accepted)")


def check_val_fell(run: TrainingRun, tp: TrainParams, say: Any) -> None:
    """After two or more epochs the val loss must have fallen below the first epoch's at least once."""
    if not run.val_never_fell():
        return
    message = (f"the val loss never fell below its first epoch's ({run.first_val:.4f}; best {run.best_val:.4f} over "
               f"{run.epoch} epochs): the denoiser learned nothing; lower train.lr, or set train.accept_unhealthy=true")
    if not tp.accept_unhealthy:
        raise Unhealthy(message)
    say(f"train: warning: {message.split('; lower')[0]} (accepted)")


# ------------------------------------------------------------------------------------------ the steps
@dataclass
class TrainData:
    """The train split to learn from ((condition, target) volumes, memory-mapped: the condition is ``source.npy``
    or the slab stage's ``baseline_consistent``) and the val split to validate on (its conditions); the test
    split is never read here."""

    train: list[Case]
    val: list[Case]
    volumes: list[tuple[np.ndarray, np.ndarray]]
    val_conditions: list[np.ndarray]
    condition: str
    profile_digests: set[str]  # of the slab stage's profile the consistent conditions were projected with


def prepare_data(processed_dir: Path, slab_dir: Path, condition: str) -> TrainData:
    """The train and val cases with their (condition, target) volumes, every one memory-mapped (copy-on-write:
    torch can view them, the files never change)."""
    train_cases, val_cases = split_cases(processed_dir, "train"), split_cases(processed_dir, "val")
    digests: set[str] = set()

    def condition_of(case: Case) -> np.ndarray:
        if condition == "interpolated":
            return case.load("source", mmap=True)
        slabs = SlabCase.open(slab_dir, case.case_id)
        digests.add(slabs.profile_digest)
        return slabs.baseline(mmap=True)

    volumes = [(condition_of(c), c.load("target", mmap=True)) for c in train_cases]
    return TrainData(train_cases, val_cases, volumes, [condition_of(c) for c in val_cases], condition, digests)


def model_card(tp: TrainParams, vae: LatentCodec, profile: SliceProfile, data: TrainData) -> dict[str, Any]:
    """``model.json``: how the trained model is used (module docstring)."""
    if data.profile_digests - {profile.digest}:
        raise RuntimeError("data/slab and models/slab disagree on the slab profile: rerun the slab stage (dvc repro)")
    return {
        "codec": vae.name,
        "weights": vae.weights,
        "hu_range": list(vae.hu_range),
        "condition": tp.condition,
        "interpolator": str(data.train[0].meta.get("interpolator", "linear")),
        "sampling": to_dict(tp.sampling),
        "slab_profile": profile.to_json(),
        "geometry": training_geometry(data.train),
    }


def training_geometry(cases: list[Case]) -> dict[str, Any]:
    """What the model learnt from, the median over the train cases: the thin grid's spacing [sx, sy, sz] mm
    and series 1's slice thickness and spacing mm. ``ctdiff predict`` samples onto that z spacing and warns
    when a new thick series differs."""
    thin = np.median([c.spacing_mm for c in cases], axis=0)
    thickness = [c.meta["series1"].get("slice_thickness") or c.meta["series1"]["spacing"][2] for c in cases]
    return {"thin_spacing_mm": [round(float(v), 6) for v in thin],
            "series1_thickness_mm": round(float(np.median(thickness)), 6),
            "series1_spacing_mm": round(float(np.median([c.meta["series1"]["spacing"][2] for c in cases])), 6),
            "series1_pixel_mm": round(float(np.median([c.meta["series1"]["spacing"][0] for c in cases])), 6)}


@dataclass
class Models:
    """What the loop trains and with what: the VAE (frozen at first), the UNet (``model``: its DDP wrapper
    under torchrun), the noise process, the optimizers and their schedule."""

    vae: LatentCodec
    vae_start: dict[str, torch.Tensor]  # the VAE's weights before training, for vae/drift
    sampler: PatchSampler
    unet: nn.Module
    model: nn.Module
    noise_scheduler: Any
    amp_dtype: torch.dtype | None
    grad_scaler: torch.amp.GradScaler
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    vae_params: list[nn.Parameter] | None = None
    vae_optimizer: torch.optim.Optimizer | None = None  # created when the VAE unfreezes, never before


def load_models(params: Params, vae_dir: Path, env: DistEnv) -> Models:
    """The frozen VAE of ``models/vae``, a fresh UNet for its latents, the noise process and the precision."""
    tp, device = params.train, env.device
    vae = load_vae(vae_dir, device)
    vae.set_trainable("none")
    vae_start = {k: v.detach().cpu().clone() for k, v in vae.module.state_dict().items()}
    sampler = PatchSampler(latent_patch_shape(tp.patch, vae.downsample, tp.unet.latent_multiple, vae.name),
                           vae.downsample)
    unet = build_unet(tp.unet, vae.latent_channels).to(device)
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world_size > 1 else unet
    noise_scheduler = training_scheduler(tp)
    amp_dtype = autocast_dtype(tp.precision, device, print if env.is_main else (lambda *a, **k: None))
    grad_scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    return Models(vae, vae_start, sampler, unet, model, noise_scheduler, amp_dtype, grad_scaler, device)


def make_optimizer(m: Models, tp: TrainParams, total_steps: int) -> None:
    """AdamW on the UNet and its warm-up/cosine LR schedule over ``total_steps``."""
    m.optimizer = torch.optim.AdamW(m.unet.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    m.lr_scheduler = warmup_cosine(m.optimizer, tp.warmup_steps, total_steps, tp.lr_min_ratio)


def restore(run: TrainingRun, m: Models, params: Params, env: DistEnv, rng: np.random.Generator
            ) -> np.random.Generator:
    """Load a resumed run's state into the models; returns the patch RNG to continue with."""
    ckpt = run.checkpoint
    if ckpt is None:
        return rng
    m.unet.load_state_dict(ckpt["unet"])
    m.optimizer.load_state_dict(ckpt["optimizer"])
    m.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    m.grad_scaler.load_state_dict(ckpt["grad_scaler"])
    if ckpt["vae"] is not None:
        m.vae.module.load_state_dict(ckpt["vae"])
    if env.is_main:
        set_rng_state(ckpt["rng"], rng)
        return rng
    # rank 0's streams are the ones saved; the others restart theirs from the step
    torch.manual_seed(params.train_seed + env.rank + 1000 * run.step)
    return np.random.default_rng([params.train_seed, env.rank, run.step])


def encode_training_latents(vae: LatentCodec, data: TrainData, tp: TrainParams, run: TrainingRun, ckpt_dir: Path,
                            needed: bool, progress: bool, say: Any) -> tuple[LatentCache | None, float, LatentTarget]:
    """The frozen VAE's posteriors of every training volume (when the loop reads them: ``needed``, or a fresh
    run that needs its scale factor), the latent scale factor (1 / std of the cached target latents) and the
    residual gain; a resumed run keeps the ones in its checkpoint."""
    ckpt = run.checkpoint
    scale_factor = None if ckpt is None else ckpt["scale_factor"]
    residual_gain = None if ckpt is None else ckpt.get("residual_gain")
    cache = None
    if needed or scale_factor is None:
        cache_dir = ckpt_dir / LATENT_CACHE_DIR if tp.latent_cache == "disk" else None
        cache = LatentCache.build(vae, data.train, cache_dir, progress=progress, volumes=data.volumes,
                                  condition=data.condition)
    if scale_factor is None:
        scale_factor = 1.0 / cache.target_std()
        say(f"train: latent scale factor {scale_factor:.4f} (1 / std of the cached training target latents)")
    if tp.residual and residual_gain is None:
        residual_gain = 1.0 / (cache.residual_std() * scale_factor)
        say(f"train: residual gain {residual_gain:.4f} (1 / std of the scaled target - source latents)")
    return cache, scale_factor, LatentTarget(tp.residual, residual_gain or 1.0)


def unfreeze_vae(m: Models, tp: TrainParams, ckpt: dict[str, Any] | None) -> None:
    """Unfreeze: ``decoder`` trains the decoder only (the latent space stays put); ``full`` also the encoder,
    through the reconstruction and the diffusion loss. Gets its own optimizer (restored when resuming)."""
    m.vae_params = m.vae.set_trainable(tp.vae_finetune)
    m.vae_optimizer = torch.optim.AdamW(m.vae_params, lr=tp.vae_lr, weight_decay=0.0)
    if ckpt is not None and ckpt.get("vae_optimizer") is not None:
        m.vae_optimizer.load_state_dict(ckpt["vae_optimizer"])


def step_losses(m: Models, data: TrainData, cache: LatentCache | None, indices: list[int], frozen: bool,
                tp: TrainParams, scale_factor: float, latent_target: LatentTarget, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch forward: (loss, diffusion loss, VAE loss, the scaled target latent sample)."""
    vae, device = m.vae, m.device
    with torch.autocast(device.type, dtype=m.amp_dtype or torch.float32, enabled=m.amp_dtype is not None):
        corners = m.sampler.corners(data.volumes, indices, rng)  # source and target cut at the same place
        directions = [data.train[i].grid.direction for i in indices]
        if not frozen:
            source_hu, target_hu = m.sampler.image_batch(data.volumes, indices, corners)
            x01_target = vae.hu_to_x01(target_hu.to(device))
        if frozen or tp.vae_finetune == "decoder":
            # The encoder does not train, so the cached posteriors are exactly what it would give now (and,
            # encoded whole, what sampling will condition on): read them in both phases.
            source, target = (p.to(device) for p in m.sampler.latent_batch(cache, indices, corners))
        else:  # "full": encode on the fly, so the diffusion gradient reaches the encoder
            source = vae.posterior_x01(vae.hu_to_x01(source_hu.to(device)), directions)
            target = vae.posterior_x01(x01_target, directions)
        z_source = (source.mean if tp.condition_latent == "mean" else source.sample()) * scale_factor
        z_target = target.sample() * scale_factor
        loss_diffusion = diffusion_loss(m.model, m.noise_scheduler, latent_target.x0(z_target, z_source), z_source)
        loss_vae = torch.zeros((), device=device)
        if not frozen:
            # The VAE keeps its own objective on the target patch (L1 of the reconstruction from the same
            # latent sample, + KL), so the diffusion loss cannot reshape or collapse the latent space unopposed.
            # With "decoder" the KL is a constant (frozen encoder) and the diffusion loss never reaches the VAE:
            # the decoder learns from this term alone. (Decoded on a random block of train.vae_recon_slices
            # latent slices: recon_block.)
            block, x01_block = recon_block(z_target / scale_factor, x01_target, vae.downsample, tp.vae_recon_slices,
                                           rng)
            recon01 = vae.decode_x01(block, directions)
            loss_vae = F.l1_loss(recon01.float(), x01_block) + tp.vae_kl_weight * vae.kl(target)
        loss = loss_diffusion + tp.vae_recon_weight * loss_vae
    return loss, loss_diffusion, loss_vae, z_target


def optimizer_step(m: Models, loss: torch.Tensor, tp: TrainParams, env: DistEnv) -> None:
    """Backward, gradients averaged over processes, clipped, one step of each optimizer and of the schedule."""
    m.optimizer.zero_grad(set_to_none=True)
    if m.vae_optimizer is not None:
        m.vae_optimizer.zero_grad(set_to_none=True)
    m.grad_scaler.scale(loss).backward()
    env.average_gradients(m.vae_params or [])  # the UNet's are averaged by DDP
    for opt, ps in ((m.optimizer, list(m.unet.parameters())), (m.vae_optimizer, m.vae_params)):
        if opt is None:
            continue
        m.grad_scaler.unscale_(opt)
        if tp.grad_clip:
            torch.nn.utils.clip_grad_norm_(ps, tp.grad_clip)
        m.grad_scaler.step(opt)
    m.grad_scaler.update()
    m.lr_scheduler.step()


def epoch_metrics(m: Models, run: TrainingRun, tp: TrainParams, env: DistEnv, frozen: bool, val_loss: float,
                  val_psnr: float, scale_factor: float) -> dict[str, float]:
    """What dvclive logs for one epoch (rank 0)."""
    stats = run.epoch_stats
    n = max(stats.sums.get("latent_n", 0.0), 1)
    latent_std = math.sqrt(max(stats.sums.get("latent_sq", 0.0) / n - (stats.sums.get("latent", 0.0) / n) ** 2, 0.0))
    return {
        "train/loss": stats.mean("loss"), "val/loss": val_loss,
        "train/vae_loss": stats.mean("vae_loss"), "val/vae_psnr": val_psnr,
        "lr/unet": m.optimizer.param_groups[0]["lr"],
        "lr/vae": m.vae_optimizer.param_groups[0]["lr"] if m.vae_optimizer else 0.0,
        "latent/std": latent_std, "latent/std_scaled": latent_std * scale_factor,
        "phase": 0.0 if frozen else 1.0,  # 0 = VAE frozen (cached latents), 1 = VAE fine-tuned
        "perf/sec_per_step": stats.sec_per_step,
        "perf/samples_per_s": stats.steps * tp.batch_size * env.world_size / max(stats.seconds, 1e-9),
        "perf/peak_mem_mb": peak_memory_mb(m.device),
        "vae/drift": relative_change(m.vae_start, m.vae.module.state_dict()),  # 0 while frozen
    }


def shaping_params(params: Params, vae: LatentCodec, data: TrainData, profile: SliceProfile) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: train params that shape the model and its
    trajectory (not ``NOT_SHAPING``), the seed, the VAE's identity, the data (case ids and fingerprints) and,
    for a consistent condition, the slab profile that made it."""
    train = {k: v for k, v in to_dict(params.train).items() if k not in NOT_SHAPING}
    condition = {"slab_profile": profile.digest} if data.condition == "consistent" else {}
    return shaping({"train": train}, params.train_seed, data.train, data.val, vae=vae.fingerprint, **condition)


# --------------------------------------------------------------------------------------- validation
class Validation:
    """Fixed val patches (same corners, noise and timesteps every epoch), so val loss is comparable.

    The val volumes are encoded whole (posterior mean) once and again only when the encoder trains
    (``full`` fine-tuning); the VAE reconstruction PSNR of the val targets is recomputed only when the
    decoder trains, on the central block of each target as deep as a training patch (the same block every
    time, so epochs compare; decoding whole volumes through the released SD decoder cost ~25 s per epoch
    on 2 CPU cores). Timesteps are spread evenly over [0, T) to lower the variance of the estimate.
    """

    def __init__(self, vae: LatentCodec, cases: list[Case], conditions: list[np.ndarray], sampler: PatchSampler,
                 scheduler: Any, tp: TrainParams, seed: int) -> None:
        self.vae, self.cases, self.sampler, self.scheduler, self.tp = vae, cases, sampler, scheduler, tp
        self.conditions = conditions
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
        for case, condition in zip(self.cases, self.conditions):
            pair = [self.vae.encode_posterior_hu(torch.from_numpy(np.asarray(v, dtype=np.float32))[None, None]
                                                 .to(self.vae.device), case.grid.direction).mean[0]
                    for v in (condition, case.load("target"))]
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
                recon_hu = self.vae.decode_hu(target[None, :, start:start + depth], target_hu.shape,
                                              case.grid.direction)[0, 0].cpu()
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
def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all floating-point tensors of two state dicts (0 = unchanged)."""
    diff = sum(float((after[k].detach().cpu().double() - v.double()).pow(2).sum())
               for k, v in before.items() if v.is_floating_point())
    norm = sum(float(v.double().pow(2).sum()) for v in before.values() if v.is_floating_point())
    return math.sqrt(diff / max(norm, 1e-30))
