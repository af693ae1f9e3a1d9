"""Typed view of ``params.yaml``: the single source of truth for every knob, and of every default.

Each top-level group is a frozen dataclass that declares the types and the checks of its keys, never their
values: the values, defaults included, live in ``params.yaml`` only. :func:`load_params` parses the YAML
once, requires every key (naming a missing one), checks every value against the field types (naming the
dotted key and the expected type on a mismatch), and rejects unknown keys, so a typo in ``dvc exp run -S``
fails loudly instead of being ignored. Code that needs a variant starts from the committed file
(:func:`load_params`) and changes it with :func:`with_overrides` (dotted keys, as ``-S``).

Ownership (``dvc.yaml`` declares it; ``tests/test_stage_deps.py`` enforces it): each stage reads its own
group and the shared keys of :data:`SHARED`; nothing reads another stage's group. What a trained model
needs later (its sampling defaults, the slab profile, the intensity range, its condition) travels inside
the model's artifacts, not through params.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A value in params.yaml has the wrong type, an unknown or missing key, or an impossible value."""


# Keys every stage may read besides its own group: the data and learning seeds, where torch runs, and the
# intensity range every network and metric maps HU through.
SHARED = ("seed", "train_seed", "device", "hu_range")


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True, kw_only=True)
class CropParams:
    """Where a phantom family's image is cut from the chest, and at what resolution (``data.phantom.families.*``)."""

    shape: tuple[int, int, int]  # thin series [slices, rows, cols]
    pixel_mm: float
    centre: Literal["hilum", "periphery", "body"] | tuple[float, float]  # in-plane; [x, y] = mm from the body centre

    def __post_init__(self) -> None:
        key = "data.phantom.families"
        _require(all(s >= 4 for s in self.shape), f"{key}.*.shape", "every size must be >= 4")
        _require(self.pixel_mm > 0, f"{key}.*.pixel_mm", "must be > 0")
        if isinstance(self.centre, str):
            _require(self.centre in ("hilum", "periphery", "body"), f"{key}.*.centre",
                     f"must be hilum, periphery, body or [x, y] mm from the body centre, got {self.centre!r}")
        else:
            ok = isinstance(self.centre, (tuple, list)) and len(self.centre) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.centre)
            _require(ok, f"{key}.*.centre", f"must be hilum, periphery, body or [x, y] mm from the body centre, "
                     f"got {self.centre!r}")
            object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))


@dataclass(frozen=True, kw_only=True)
class FamiliesParams:
    hilum: CropParams  # the pulmonary hila: arteries and their oblique branches, bronchi, mediastinum, emboli
    periphery: CropParams  # the lung periphery: small vessels in lung, pleura, ribs and chest wall


@dataclass(frozen=True, kw_only=True)
class PhantomParams:
    family: Literal["hilum", "periphery"]  # which crop of families
    families: FamiliesParams
    n_cases: int
    ape_fraction: float
    thin_mm: float
    thick_mm: float
    thick_spacing_mm: float  # thick series slice spacing; 0 = thick_mm (contiguous slabs)
    noise_hu: float
    body_mm: float  # chest width the anatomy is sized for (independent of the image)
    z_subsamples: int  # the field is sampled every thin_mm / z_subsamples along z; each series integrates it
    thin_blur_mm: float  # thin SSP: a thin_mm box blurred by a Gaussian of this FWHM (0: the box)
    thick_blur_mm: float  # thick SSP: a thick_mm box blurred by a Gaussian of this FWHM: bell-shaped
    thick_inplane_blur_mm: float  # thick series only: in-plane Gaussian blur of this FWHM (a softer kernel); 0 = none

    def __post_init__(self) -> None:
        _require(self.n_cases >= 1, "data.phantom.n_cases", "must be >= 1")
        _require(0.0 <= self.ape_fraction <= 1.0, "data.phantom.ape_fraction", "must be in [0, 1]")
        _require(self.thin_mm > 0, "data.phantom.thin_mm", "must be > 0")
        _require(self.thick_mm >= self.thin_mm, "data.phantom.thick_mm", "must be >= thin_mm")
        ratio = self.thick_mm / self.thin_mm
        _require(abs(ratio - round(ratio)) < 1e-6, "data.phantom.thick_mm",
                 f"must be a whole multiple of thin_mm (a thick slab spans whole thin slices), got {ratio:g}x")
        step = self.thick_spacing_mm / self.thin_mm
        _require(self.thick_spacing_mm == 0 or (step >= 1 - 1e-6 and abs(step - round(step)) < 1e-6),
                 "data.phantom.thick_spacing_mm",
                 f"must be 0 (= thick_mm) or a whole multiple >= 1 of thin_mm (slabs start on whole thin slices), "
                 f"got {self.thick_spacing_mm:g} mm = {step:g}x thin_mm")
        _require(self.noise_hu >= 0, "data.phantom.noise_hu", "must be >= 0")
        _require(self.body_mm > 0, "data.phantom.body_mm", "must be > 0")
        _require(self.z_subsamples >= 1, "data.phantom.z_subsamples", "must be >= 1")
        _require(min(self.thin_blur_mm, self.thick_blur_mm, self.thick_inplane_blur_mm) >= 0, "data.phantom",
                 "thin_blur_mm, thick_blur_mm and thick_inplane_blur_mm must be >= 0")

    @property
    def crop(self) -> CropParams:
        """The selected family's crop."""
        return getattr(self.families, self.family)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.crop.shape

    @property
    def pixel_mm(self) -> float:
        return self.crop.pixel_mm

    @property
    def centre(self) -> str | tuple[float, float]:
        return self.crop.centre

    @property
    def thick_step_mm(self) -> float:
        """Spacing of the thick series' slices: ``thick_spacing_mm``, or ``thick_mm`` when that is 0."""
        return self.thick_spacing_mm or self.thick_mm


@dataclass(frozen=True, kw_only=True)
class HfDataParams:
    repo: str
    revision: str
    allow_patterns: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DataParams:
    source: Literal["phantom", "hf", "local"]
    phantom: PhantomParams
    hf: HfDataParams
    local_dir: str

    def __post_init__(self) -> None:
        if self.source == "local":
            _require(bool(self.local_dir), "data.local_dir", "must name a folder when data.source=local")


# ---------------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True, kw_only=True)
class SplitParams:
    train: float
    val: float
    test: float

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        _require(all(f >= 0 for f in fractions), "preprocess.split", "fractions must be >= 0")
        _require(abs(sum(fractions) - 1.0) < 1e-6, "preprocess.split", f"fractions must sum to 1, got {sum(fractions)}")


@dataclass(frozen=True, kw_only=True)
class PreprocessParams:
    spacing_mm: tuple[float, ...]  # [sx, sy, sz]; empty = keep series 2's spacing
    shape: tuple[int, ...]  # [D, H, W]; empty = keep
    interpolator: Literal["linear", "bspline", "nearest"]
    min_slices: int
    allow_gaps: bool
    split: SplitParams
    workers: int  # 0 = os.cpu_count()
    min_cases: int
    max_zip_members: int
    max_unzipped_gb: float

    def __post_init__(self) -> None:
        _require(len(self.spacing_mm) in (0, 3), "preprocess.spacing_mm", "must be [] or [sx, sy, sz]")
        _require(all(s > 0 for s in self.spacing_mm), "preprocess.spacing_mm", "must be > 0")
        _require(len(self.shape) in (0, 3), "preprocess.shape", "must be [] or [D, H, W]")
        _require(all(s > 0 for s in self.shape), "preprocess.shape", "must be > 0")
        _require(self.min_slices >= 2, "preprocess.min_slices", "must be >= 2")
        _require(self.workers >= 0, "preprocess.workers", "must be >= 0 (0 = all cores)")
        _require(self.min_cases >= 1, "preprocess.min_cases", "must be >= 1")

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- slab
@dataclass(frozen=True, kw_only=True)
class SlabParams:
    """Series 1's slice sensitivity profile (the slab stage, :mod:`ctdiff.training.slab`): fitted from the train
    pairs or a named shape, and the projected baseline of every case computed with it."""

    profile: Literal["fitted", "box", "triangle", "gaussian"]
    half_width: float  # fitted: the profile's support each side of the slab centre, in thicknesses
    symmetric: bool  # fitted: an even profile
    smoothness: float  # fitted: weight of the second-difference penalty on the taps
    inplane_sigma_mm: float  # fitted: both series smoothed in-plane by this Gaussian before the fit (0 = off)
    tolerance: float  # the fitted profile may predict val slabs at most this much (relative) worse than a named one
    accept_poor_fit: bool  # true: a fit worse than a named shape is reported, not fatal

    def __post_init__(self) -> None:
        _require(self.half_width > 0, "slab.half_width", "must be > 0")
        _require(self.smoothness >= 0, "slab.smoothness", "must be >= 0")
        _require(self.inplane_sigma_mm >= 0, "slab.inplane_sigma_mm", "must be >= 0")
        _require(self.tolerance >= 0, "slab.tolerance", "must be >= 0")


# ----------------------------------------------------------------------------------------------- vae
@dataclass(frozen=True, kw_only=True)
class HubParams:
    """One pinned file on the Hugging Face Hub. ``sha256`` empty = not pinned yet (the stage prints it)."""

    repo: str
    revision: str  # a commit hash: the download is reproducible and a cached copy needs no network
    filename: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class SdHubParams(HubParams):
    config_filename: str
    config_sha256: str


@dataclass(frozen=True, kw_only=True)
class MaisiArchParams:
    """Width of an ``AutoencoderKlMaisi``; the rest of the released config is fixed in ctdiff.models.vae.maisi."""

    num_channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    norm_num_groups: int

    def __post_init__(self) -> None:
        key = "vae.maisi.{arch,scratch}"
        _require(len(self.num_channels) >= 2, f"{key}.num_channels", "needs >= 2 levels")
        _require(len(self.num_res_blocks) == len(self.num_channels), f"{key}.num_res_blocks",
                 "must have one entry per level of num_channels")
        _require(all(c % self.norm_num_groups == 0 for c in self.num_channels), f"{key}.norm_num_groups",
                 "must divide every entry of num_channels")


@dataclass(frozen=True, kw_only=True)
class MaisiParams:
    hub: HubParams
    arch: MaisiArchParams  # released config: the hub weights match it
    scratch: MaisiArchParams
    patch: tuple[int, int, int]  # vae_fit random crop [D, H, W]
    # sliding-window tile [X, Y, Z] of the RAS array MAISI sees (its configs' order; multiples of 16)
    tile: tuple[int, int, int]
    overlap: float
    num_splits: int  # AutoencoderKlMaisi splits every conv input into this many pieces; 1 = no split
    dim_split: int

    def __post_init__(self) -> None:
        _require(all(t > 0 and t % 16 == 0 for t in self.tile), "vae.maisi.tile", "sizes must be multiples of 16")
        _require(0.0 <= self.overlap < 1.0, "vae.maisi.overlap", "must be in [0, 1)")
        _require(all(p > 0 for p in self.patch) and max(self.patch) <= min(self.tile), "vae.maisi.patch",
                 "sizes must be > 0 and fit in vae.maisi.tile along every axis, whatever the volume's orientation "
                 "(a training patch is never tiled)")
        _require(self.num_splits >= 1, "vae.maisi.num_splits", "must be >= 1")
        _require(self.dim_split in (0, 1, 2), "vae.maisi.dim_split", "must be 0, 1 or 2")


@dataclass(frozen=True, kw_only=True)
class SdArchParams:
    """Width of a diffusers ``AutoencoderKL`` trained from scratch (the hub config fixes the pretrained one)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int

    def __post_init__(self) -> None:
        _require(len(self.block_out_channels) >= 2, "vae.sd.scratch.block_out_channels", "needs >= 2 levels")
        _require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                 "vae.sd.scratch.norm_num_groups", "must divide every entry of block_out_channels")


@dataclass(frozen=True, kw_only=True)
class SdParams:
    hub: SdHubParams
    scratch: SdArchParams
    patch: tuple[int, int, int]  # vae_fit random crop [slices, H, W]
    slice_batch: int  # axial slices per encoder/decoder call

    def __post_init__(self) -> None:
        _require(all(p > 0 for p in self.patch), "vae.sd.patch", "sizes must be > 0")
        _require(self.slice_batch >= 1, "vae.sd.slice_batch", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class VaeParams:
    use_maisi: bool  # false: SD VAE per axial slice; true: MAISI 3D VAE
    pretrained: bool  # true: download the pinned released weights; false: vae_fit trains from scratch
    latent_channels: int  # MAISI and scratch architectures; pretrained SD reads it from its config
    finetune_epochs: int  # pretrained: epochs of domain fine-tuning (0 = use as downloaded)
    finetune_lr: float
    scratch_epochs: int
    scratch_lr: float
    patches_per_volume: int  # random crops per training volume (source and target) per epoch
    batch_size: int
    kl_weight: float
    recon_loss: Literal["l1", "mse"]  # the reconstruction term in [0, 1] (PSNR is an MSE)
    warmup_steps: int  # linear LR warm-up before the cosine decay
    body_crops: float  # fraction of training crops centred inside the body (HU > -500), the rest uniform
    logvar_init: float | None  # scratch: the encoder's log-variance output starts at this constant
    health_cases: int  # train volumes round-tripped after training, against their trivial codes
    min_gain_db: float  # the round trip must beat each volume's mean code by this much (psnr_body) or its low-pass
    retry_unhealthy: bool  # scratch: a VAE no better than that is trained once more (next seed, encoder as built)
    accept_unhealthy: bool  # true: a VAE no better than that is reported, not fatal
    hub_timeout_s: float  # reachability check before a download; offline fails this fast
    maisi: MaisiParams
    sd: SdParams

    def __post_init__(self) -> None:
        _require(self.latent_channels >= 1, "vae.latent_channels", "must be >= 1")
        _require(self.finetune_epochs >= 0 and self.scratch_epochs >= 0, "vae", "epochs must be >= 0")
        _require(self.finetune_lr > 0 and self.scratch_lr > 0, "vae", "learning rates must be > 0")
        _require(self.patches_per_volume >= 1 and self.batch_size >= 1, "vae", "patches_per_volume and "
                 "batch_size must be >= 1")
        _require(self.kl_weight >= 0, "vae.kl_weight", "must be >= 0")
        _require(self.warmup_steps >= 0, "vae.warmup_steps", "must be >= 0")
        _require(0.0 <= self.body_crops <= 1.0, "vae.body_crops", "must be in [0, 1]")
        _require(self.health_cases >= 1, "vae.health_cases", "must be >= 1")
        _require(self.hub_timeout_s > 0, "vae.hub_timeout_s", "must be > 0")

    @property
    def codec(self) -> Literal["maisi", "sd"]:
        return "maisi" if self.use_maisi else "sd"


@dataclass(frozen=True, kw_only=True)
class VaeCheckParams:
    split: Literal["val", "test", "train"]  # held-out cases to encode and decode
    max_cases: int  # 0 = every case of the split
    min_gain_db: float  # the round trip must beat each volume's mean code by this much (psnr_body) or its low-pass
    accept_unhealthy: bool  # true: a VAE no better than that is reported, not fatal

    def __post_init__(self) -> None:
        _require(self.max_cases >= 0, "vae_check.max_cases", "must be >= 0 (0 = all)")


# --------------------------------------------------------------------------------------------- train
@dataclass(frozen=True, kw_only=True)
class UnetParams:
    """Width of the denoiser, ``monai.networks.nets.DiffusionModelUNet`` (3D; in/out channels follow the VAE).

    Latent patches must be divisible by ``2 ** (len(channels) - 1)`` on every axis (the UNet halves them
    at each level but the last); ``train.patch`` is checked against it.
    """

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int
    norm_num_groups: int
    num_head_channels: int

    def __post_init__(self) -> None:
        _require(len(self.channels) >= 2, "train.unet.channels", "needs >= 2 levels")
        _require(len(self.attention_levels) == len(self.channels), "train.unet.attention_levels",
                 "must have one entry per level of channels")
        _require(all(c % self.norm_num_groups == 0 for c in self.channels), "train.unet.norm_num_groups",
                 "must divide every entry of channels")
        _require(self.num_res_blocks >= 1, "train.unet.num_res_blocks", "must be >= 1")
        _require(self.num_head_channels >= 1, "train.unet.num_head_channels", "must be >= 1")

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this (the UNet downsamples by 2 between levels)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the trained model is sampled by default: written into the model (``models/checkpoints/model.json``)
    so evaluate and ``ctdiff predict`` read it from there (predict's flags override it). Changing it reruns
    train only to rewrite that file: a finished run is not retrained."""

    steps: int  # DDIM (ddpm-trained) or rectified-flow steps per sampled volume
    samples: int  # decoded samples averaged per volume (a posterior-mean estimate; cost x samples)
    decode: Literal["sample", "change"]  # change: baseline + D(z) - D(E(baseline)) (VAE errors cancel)
    consistency: bool  # the prediction is the decoded mean projected onto series 1's slabs; false: raw decode
    overlap: float  # latent windows overlap when a volume exceeds the training patch
    window_batch: int  # latent windows per UNet call (execution only: speed and memory, not the result)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.sampling.steps", "must be >= 1")
        _require(self.samples >= 1, "train.sampling.samples", "must be >= 1")
        _require(0.0 <= self.overlap < 1.0, "train.sampling.overlap", "must be in [0, 1)")
        _require(self.window_batch >= 1, "train.sampling.window_batch", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    epochs: int
    vae_freeze_epochs: int  # epochs [0, vae_freeze_epochs) frozen VAE on cached latents; then fine-tuned
    vae_finetune: Literal["decoder", "full"]
    vae_lr: float
    vae_recon_weight: float  # weight of (L1 in [0, 1] + vae_kl_weight * KL) on the target patch
    vae_kl_weight: float  # KL summed over latent elements, as in vae_fit
    vae_recon_slices: int  # latent slices of each target patch decoded for that loss (0 = all)
    patch: tuple[int, int, int]  # voxels [D, H, W]; multiples of VAE downsampling x UNet multiple
    batch_size: int  # patches per optimizer step (per process under torchrun)
    patches_per_volume: int  # random patches per training volume per epoch
    lr: float
    lr_min_ratio: float  # cosine decay from lr to lr * lr_min_ratio over all steps
    warmup_steps: int
    weight_decay: float
    grad_clip: float  # max global grad norm; 0 = off
    scheduler: Literal["ddpm", "rflow"]  # training noise process; sampling: DDIM for ddpm, RFlow for rflow
    residual: bool  # generate the change of the target latent from the condition's latent, not the latent
    # what the denoiser is conditioned on: series 1 interpolated onto the thin grid (source.npy), or that
    # projected onto series 1's slabs (the slab stage's baseline_consistent)
    condition: Literal["interpolated", "consistent"]
    # the condition's latent in training: a posterior sample (as the target's) or its mean (what sampling uses)
    condition_latent: Literal["sample", "mean"]
    prediction: Literal["epsilon", "v"]  # ddpm only; rflow always predicts the velocity
    num_train_timesteps: int
    val_patches_per_volume: int  # fixed patches (and noise, timesteps) per val volume
    latent_cache: Literal["memory", "disk"]  # disk: also under models/checkpoints/latents (resume)
    checkpoint_every: int  # steps between last.pt writes (and one at every epoch end)
    precision: Literal["fp32", "bf16", "fp16"]  # autocast on CUDA only; CPU always runs fp32
    min_latent_spread: float  # the cached target latent means must vary over voxels by more than this (std)
    accept_unhealthy: bool  # true: flat latents or a val loss that never falls are reported, not fatal
    unet: UnetParams
    sampling: SamplingParams

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(0 <= self.vae_freeze_epochs <= self.epochs, "train.vae_freeze_epochs", "must be in [0, train.epochs]")
        _require(self.vae_lr > 0 and self.lr > 0, "train", "lr and vae_lr must be > 0")
        _require(0.0 <= self.lr_min_ratio <= 1.0, "train.lr_min_ratio", "must be in [0, 1]")
        _require(self.vae_recon_weight >= 0 and self.vae_kl_weight >= 0, "train", "vae_recon_weight and "
                 "vae_kl_weight must be >= 0")
        _require(all(p > 0 for p in self.patch), "train.patch", "sizes must be > 0")
        _require(self.vae_recon_slices >= 0, "train.vae_recon_slices", "must be >= 0 (0 = the whole patch)")
        _require(self.batch_size >= 1 and self.patches_per_volume >= 1, "train", "batch_size and "
                 "patches_per_volume must be >= 1")
        _require(self.warmup_steps >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0, "train",
                 "warmup_steps, weight_decay and grad_clip must be >= 0")
        _require(self.num_train_timesteps >= 2, "train.num_train_timesteps", "must be >= 2")
        _require(self.val_patches_per_volume >= 1, "train.val_patches_per_volume", "must be >= 1")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.sampling.steps <= self.num_train_timesteps, "train.sampling.steps",
                 f"must be <= train.num_train_timesteps ({self.num_train_timesteps})")


# -------------------------------------------------------------------------------------- sr_reference
@dataclass(frozen=True, kw_only=True)
class SrReferenceParams:
    """The supervised reference (``ctdiff.training.reference``): a MONAI ``UNet`` in image space predicting the thin
    series as a residual on the slab-consistent baseline, L1 in [0, 1] over ``hu_range``.

    ``channels``/``strides`` are the UNet's own arguments (``len(strides) == len(channels) - 1``);
    ``patch`` must be divisible by the product of the strides on every axis, so the skip connections line
    up. Inference runs a Gaussian-blended sliding window of ``patch``.
    """

    epochs: int
    batch_size: int  # patches per optimizer step
    patches_per_volume: int  # random patches per training volume per epoch
    patch: tuple[int, int, int]  # voxels [D, H, W]; also the inference window
    lr: float
    lr_min_ratio: float  # cosine decay from lr to lr * lr_min_ratio over all steps
    warmup_steps: int
    weight_decay: float
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    overlap: float  # sliding-window overlap at inference (val and evaluate)
    window_batch: int  # windows per network call at inference
    checkpoint_every: int  # steps between last.pt writes (plus one at every epoch end)
    accept_unhealthy: bool  # true: a network worse than its input on val is reported, not fatal

    def __post_init__(self) -> None:
        key = "sr_reference"
        _require(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _require(self.batch_size >= 1 and self.patches_per_volume >= 1, key,
                 "batch_size and patches_per_volume must be >= 1")
        _require(self.lr > 0, f"{key}.lr", "must be > 0")
        _require(0.0 <= self.lr_min_ratio <= 1.0, f"{key}.lr_min_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0 and self.weight_decay >= 0, key, "warmup_steps and weight_decay must be >= 0")
        _require(len(self.channels) >= 2 and all(c >= 1 for c in self.channels), f"{key}.channels",
                 "needs >= 2 levels of >= 1 channel")
        _require(len(self.strides) == len(self.channels) - 1 and all(s >= 1 for s in self.strides),
                 f"{key}.strides", "needs one stride >= 1 per level after the first (len(channels) - 1)")
        multiple = math.prod(self.strides)
        _require(all(p > 0 and p % multiple == 0 for p in self.patch), f"{key}.patch",
                 f"sizes must be multiples of {multiple} (the product of {key}.strides)")
        _require(0.0 <= self.overlap < 1.0, f"{key}.overlap", "must be in [0, 1)")
        _require(self.window_batch >= 1, f"{key}.window_batch", "must be >= 1")
        _require(self.checkpoint_every >= 1, f"{key}.checkpoint_every", "must be >= 1")


# ----------------------------------------------------------------------------------------- calibrate
@dataclass(frozen=True, kw_only=True)
class CalibrateParams:
    """Split-conformal calibration of the model's spread (:mod:`ctdiff.evaluation.calibrate`)."""

    split: Literal["val", "train"]  # held-out cases the scales are fitted on (never the test split)
    max_cases: int  # 0 = every case of the split
    bands_hu: tuple[float, ...]  # edges of the HU bands of the prediction, one scale each; [] = one scale
    slab_phase_bins: int  # x this many groups by where a slice lies between series 1's slab centres; 1 = none

    def __post_init__(self) -> None:
        _require(self.max_cases >= 0, "calibrate.max_cases", "must be >= 0 (0 = all)")
        _require(self.slab_phase_bins >= 1, "calibrate.slab_phase_bins", "must be >= 1 (1 = no phase groups)")
        _require(list(self.bands_hu) == sorted(self.bands_hu), "calibrate.bands_hu", "must be ascending")


# ------------------------------------------------------------------------------------------ evaluate
@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    split: Literal["test", "val"]  # val: to choose levers without looking at the test split
    max_cases: int  # 0 = every case of the split
    bspline_baseline: bool  # also report series 1 B-spline-interpolated onto series 2's grid
    window_hu: tuple[float, float]  # display window of the PNG panels (CTPA: L 100, W 700)
    nifti: bool  # write predictions as .nii.gz under data/predictions/
    lumen_ring_mm: float  # embolus conspicuity: patent lumen within this distance of an embolus
    defect_hu: float  # false filling defects: lumen below this HU (midway, phantom lumen 300 / embolus 50)

    def __post_init__(self) -> None:
        _require(self.lumen_ring_mm > 0, "evaluate.lumen_ring_mm", "must be > 0")
        _require(self.max_cases >= 0, "evaluate.max_cases", "must be >= 0 (0 = all)")
        _require(self.window_hu[0] < self.window_hu[1], "evaluate.window_hu", "must be [low, high]")


# ------------------------------------------------------------------------------------------- all
@dataclass(frozen=True, kw_only=True)
class Params:
    seed: int  # the data: phantoms, the split (and evaluate's bootstrap)
    train_seed: int  # everything learnt or drawn after the data: VAE, UNet, reference, evaluate's samples
    device: Literal["auto", "cpu", "cuda"]  # where the torch stages run
    hu_range: tuple[float, float]  # clipped and mapped to [0, 1] by every VAE, network and metric
    data: DataParams
    preprocess: PreprocessParams
    slab: SlabParams
    vae: VaeParams
    vae_check: VaeCheckParams
    train: TrainParams
    sr_reference: SrReferenceParams
    calibrate: CalibrateParams
    evaluate: EvaluateParams

    def __post_init__(self) -> None:
        _require(self.hu_range[0] < self.hu_range[1], "hu_range", "must be [low, high] with low < high")


DEFAULT_PARAMS_PATH = Path("params.yaml")


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_PATH) -> Params:
    """Parse ``params.yaml`` into :class:`Params`; raises :class:`ParamsError` naming the bad key."""
    return params_from_dict(read_params_yaml(path))


def read_params_yaml(path: str | os.PathLike[str] = DEFAULT_PARAMS_PATH) -> dict[str, Any]:
    """``params.yaml`` as a plain dict (not checked)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"{path} not found: run stages from the repository root") from exc


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from a plain dict (the parsed YAML); every key must be there."""
    return _build(Params, raw, "")


def group_from_dict(cls: type, raw: dict[str, Any], key: str) -> Any:
    """One params group (a dataclass of this module) from a plain dict, checked as :func:`params_from_dict` checks
    it (``key``: its dotted name in messages), e.g. a model's recorded ``train.sampling``."""
    return _build(cls, raw, key)


def with_overrides(params: Params, overrides: Mapping[str, Any]) -> Params:
    """``params`` with dotted keys replaced (``{"train.epochs": 2}``, as ``dvc exp run -S``), checked again.

    A key that does not exist is an error, as it is for ``-S``."""
    raw = set_dotted(to_dict(params), overrides)
    return params_from_dict(raw)


def set_dotted(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the nested dict ``tree`` with dotted keys replaced; every key must exist."""
    tree = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ParamsError(f"params.yaml: {dotted} is not a key")
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"params.yaml: {dotted} is not a key")
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return tree


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``vae.use_maisi``, as ``dvc exp run -S`` names them) of every leaf (a value that is not a
    mapping) of a nested params mapping."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-able) form of a params dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------- parsing
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key} {message}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = prefix or "top level"
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    missing = [_join(prefix, n) for n in names if n not in raw]
    if missing:
        raise ParamsError(f"params.yaml: missing key(s) {missing}: params.yaml holds every knob (compare with the "
                          f"repository's params.yaml)")
    kwargs = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in names}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"params.yaml: {key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[-1] if errors else f"params.yaml: {key} has an invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"params.yaml: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; accept it as the number the user meant.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params.yaml: {key} must be a string, got {value!r}")
        return value
    raise ParamsError(f"params.yaml: {key} has an unsupported type {tp}")  # a bug in this module
