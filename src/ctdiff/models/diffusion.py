"""The noise process: MONAI schedulers, the training loss, and the sampling loop (shared with evaluate).

Everything here works on *scaled* latents (unscaled latent x the scale factor, about unit std), shaped
``(B, C, d, h, w)``; the condition is the scaled source latent on the same grid, concatenated on channels
(MONAI ``DiffusionInferer`` with ``mode="concat"``).

- ``train.scheduler=ddpm``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the scaled-linear betas
  of MAISI's (and LDM's) diffusion model; the UNet predicts ``eps`` (``train.prediction=epsilon``) or
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (``v``, the default). Sampling uses DDIM with the same
  betas. Why v: with these betas ``sqrt(abar_T)`` is about 0.012, so DDIM's first steps read the clean
  latent as ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, which multiplies an epsilon model's
  error by ~84; from v it is ``sqrt(abar_t) x_t - sqrt(1 - abar_t) v``, no amplification. Measured on the
  phantoms (SD scratch VAE, 320 training steps): epsilon samples drifted to std 5 (RMSE 5.0 against the
  true unit-std latent), v and rflow landed at RMSE 0.30 and 0.23 and decoded to the VAE's own ceiling.
- ``train.scheduler=rflow``: rectified flow, ``x_t = (1 - t/T) x0 + (t/T) eps``; the UNet predicts the
  velocity ``x0 - eps`` (the direction ``RFlowScheduler.step`` moves a sample, noise to data). Sampling
  uses the scheduler's Euler steps; it is MAISI's faster option (fewer steps for the same quality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from torch import nn

from ctdiff.params import TrainParams

# MAISI's diffusion model uses these betas with the scaled-linear schedule (as did LDM); MONAI's defaults
# (1e-4 .. 2e-2, linear) are the pixel-space DDPM ones.
DDPM_SCHEDULE = "scaled_linear_beta"
BETA_START, BETA_END = 0.0015, 0.0195


def training_scheduler(train: TrainParams) -> Scheduler:
    """The scheduler that noises latents during training (``add_noise``)."""
    if train.scheduler == "rflow":
        return RFlowScheduler(num_train_timesteps=train.num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=train.num_train_timesteps, schedule=DDPM_SCHEDULE, beta_start=BETA_START,
                         beta_end=BETA_END, clip_sample=False, prediction_type=_ddpm_prediction(train))


def sampling_scheduler(train: TrainParams, steps: int) -> Scheduler:
    """DDIM (for a DDPM-trained model) or RFlow, set to ``steps`` steps (``evaluate.steps``).

    ``clip_sample=False``: scaled latents are not bounded to [-1, 1] as pixel-space images are.
    """
    if train.scheduler == "rflow":
        scheduler: Scheduler = RFlowScheduler(num_train_timesteps=train.num_train_timesteps)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=train.num_train_timesteps, schedule=DDPM_SCHEDULE,
                                  beta_start=BETA_START, beta_end=BETA_END, clip_sample=False,
                                  prediction_type=_ddpm_prediction(train))
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass(frozen=True)
class LatentTarget:
    """What the denoiser generates, from scaled latents (B, C, d, h, w): the target latent itself, or
    (``residual``) its change from the source latent times ``gain`` (1 / std of that change over the
    training latents, so the diffusion sees unit-variance data either way).

    The change is small where interpolation is already right, so a residual model starts from "series 1
    as it is" rather than from noise; the same idea as residual diffusion for image super-resolution.
    """

    residual: bool = False
    gain: float = 1.0

    def x0(self, z_target: torch.Tensor, z_source: torch.Tensor) -> torch.Tensor:
        """The clean sample the diffusion is trained on."""
        return (z_target - z_source) * self.gain if self.residual else z_target

    def latent(self, x0: torch.Tensor, z_source: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`x0`: a generated sample back to a scaled target latent."""
        return x0 / self.gain + z_source if self.residual else x0


def _ddpm_prediction(train: TrainParams) -> str:
    return "v_prediction" if train.prediction == "v" else "epsilon"


def sample_timesteps(scheduler: Scheduler, x0: torch.Tensor) -> torch.Tensor:
    """Random training timesteps (B,) in [0, T), from the global torch RNG."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.sample_timesteps(x0)
    return torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)


def regression_target(scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for clean ``x0``, ``noise`` and ``timesteps`` (see the module docstring)."""
    if isinstance(scheduler, RFlowScheduler):
        # RFlowScheduler inherits get_velocity from the DDPM base class, which is not the flow's velocity.
        return x0 - noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


def diffusion_loss(unet: nn.Module, scheduler: Scheduler, target_latent: torch.Tensor, source_latent: torch.Tensor,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction on noised ``target_latent`` (conditioned on ``source_latent``) and its target.

    Both latents scaled, (B, C, d, h, w). ``noise`` and ``timesteps`` default to fresh draws (global RNG);
    validation passes fixed ones so its loss is comparable from epoch to epoch. Returns a float32 scalar.
    """
    noise = torch.randn_like(target_latent) if noise is None else noise
    timesteps = sample_timesteps(scheduler, target_latent) if timesteps is None else timesteps
    prediction = DiffusionInferer(scheduler)(inputs=target_latent, diffusion_model=unet, noise=noise,
                                             timesteps=timesteps, condition=source_latent, mode="concat")
    return F.mse_loss(prediction.float(), regression_target(scheduler, target_latent, noise, timesteps).float())


@torch.inference_mode()
def sample(unet: nn.Module, scheduler: Scheduler, source_latent: torch.Tensor,
           generator: torch.Generator | None = None, verbose: bool = False) -> torch.Tensor:
    """Generate a scaled target latent (B, C, d, h, w) given the scaled source latent of the same shape.

    ``scheduler`` comes from :func:`sampling_scheduler`; sizes must suit the UNet
    (:func:`ctdiff.models.denoiser.pad_latent`). Divide the result by the scale factor before decoding.
    """
    noise = torch.randn(source_latent.shape, generator=generator, device=source_latent.device,
                        dtype=source_latent.dtype)
    device = source_latent.device
    if isinstance(scheduler, RFlowScheduler):
        # the size only matters with use_timestep_transform; passing it keeps the call valid if that is on
        scheduler.set_timesteps(scheduler.num_inference_steps, device=device,
                                input_img_size_numel=math.prod(source_latent.shape[2:]))
    else:
        scheduler.set_timesteps(scheduler.num_inference_steps, device=device)
    return DiffusionInferer(scheduler).sample(input_noise=noise, diffusion_model=unet, scheduler=scheduler,
                                              conditioning=source_latent, mode="concat", verbose=verbose)
