"""Typed view of ``params.yaml``: the single source of truth for every knob.

Each top-level group is a frozen dataclass. :func:`load_params` parses the YAML once, checks every
value against the dataclass field types (naming the dotted key and the expected type on a mismatch),
and rejects unknown keys, so a typo in ``dvc exp run -S`` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A value in params.yaml has the wrong type, an unknown key, or an impossible value."""


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PhantomParams:
    n_cases: int = 20
    ape_fraction: float = 0.5
    shape: tuple[int, int, int] = (48, 96, 96)  # thin series [slices, rows, cols]
    pixel_mm: float = 0.8
    thin_mm: float = 1.0
    thick_mm: float = 5.0
    thick_spacing_mm: float = 0.0  # thick series slice spacing; 0 = thick_mm (contiguous slabs)
    noise_hu: float = 12.0
    body_mm: float = 320.0  # chest width the anatomy is sized for (independent of the image)
    centre: Literal["hilum", "body"] | tuple[float, float] = "hilum"  # in-plane crop centre; [x, y] = mm from body

    def __post_init__(self) -> None:
        _require(self.n_cases >= 1, "data.phantom.n_cases", "must be >= 1")
        _require(0.0 <= self.ape_fraction <= 1.0, "data.phantom.ape_fraction", "must be in [0, 1]")
        _require(all(s >= 4 for s in self.shape), "data.phantom.shape", "every size must be >= 4")
        _require(self.pixel_mm > 0 and self.thin_mm > 0, "data.phantom", "spacings must be > 0")
        _require(self.thick_mm >= self.thin_mm, "data.phantom.thick_mm", "must be >= thin_mm")
        ratio = self.thick_mm / self.thin_mm
        _require(abs(ratio - round(ratio)) < 1e-6, "data.phantom.thick_mm",
                 f"must be a whole multiple of thin_mm (a thick slice averages whole thin slices), got {ratio:g}x")
        step = self.thick_spacing_mm / self.thin_mm
        _require(self.thick_spacing_mm == 0 or (step >= 1 - 1e-6 and abs(step - round(step)) < 1e-6),
                 "data.phantom.thick_spacing_mm",
                 f"must be 0 (= thick_mm) or a whole multiple >= 1 of thin_mm (slabs start on whole thin slices), "
                 f"got {self.thick_spacing_mm:g} mm = {step:g}x thin_mm")
        _require(self.noise_hu >= 0, "data.phantom.noise_hu", "must be >= 0")
        _require(self.body_mm > 0, "data.phantom.body_mm", "must be > 0")
        if isinstance(self.centre, str):
            _require(self.centre in ("hilum", "body"), "data.phantom.centre",
                     f"must be hilum, body or [x, y] mm from the body centre, got {self.centre!r}")
        else:
            ok = isinstance(self.centre, (tuple, list)) and len(self.centre) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.centre)
            _require(ok, "data.phantom.centre", f"must be hilum, body or [x, y] mm from the body centre, "
                     f"got {self.centre!r}")
            object.__setattr__(self, "centre", tuple(float(v) for v in self.centre))

    @property
    def thick_step_mm(self) -> float:
        """Spacing of the thick series' slices: ``thick_spacing_mm``, or ``thick_mm`` when that is 0."""
        return self.thick_spacing_mm or self.thick_mm


@dataclass(frozen=True)
class HfDataParams:
    repo: str = "t2ance/APE-data"
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataParams:
    source: Literal["phantom", "hf", "local"] = "phantom"
    phantom: PhantomParams = field(default_factory=PhantomParams)
    hf: HfDataParams = field(default_factory=HfDataParams)
    local_dir: str = ""

    def __post_init__(self) -> None:
        if self.source == "local":
            _require(bool(self.local_dir), "data.local_dir", "must name a folder when data.source=local")


# ---------------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class SplitParams:
    train: float = 0.6
    val: float = 0.2
    test: float = 0.2

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        _require(all(f >= 0 for f in fractions), "preprocess.split", "fractions must be >= 0")
        _require(abs(sum(fractions) - 1.0) < 1e-6, "preprocess.split", f"fractions must sum to 1, got {sum(fractions)}")


@dataclass(frozen=True)
class PreprocessParams:
    spacing_mm: tuple[float, ...] = ()  # [sx, sy, sz]; empty = keep series 2's spacing
    shape: tuple[int, ...] = ()  # [D, H, W]; empty = keep
    interpolator: Literal["linear", "bspline", "nearest"] = "linear"
    min_slices: int = 5
    allow_gaps: bool = False
    split: SplitParams = field(default_factory=SplitParams)
    workers: int = 0  # 0 = os.cpu_count()
    min_cases: int = 3
    max_zip_members: int = 20000
    max_unzipped_gb: float = 8.0

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


# ----------------------------------------------------------------------------------------------- vae
@dataclass(frozen=True)
class HubParams:
    """One pinned file on the Hugging Face Hub. ``sha256`` empty = not pinned yet (the stage prints it)."""

    repo: str
    revision: str  # a commit hash: the download is reproducible and a cached copy needs no network
    filename: str
    sha256: str = ""


@dataclass(frozen=True)
class SdHubParams(HubParams):
    repo: str = "stabilityai/sd-vae-ft-mse"
    revision: str = "31f26fdeee1355a5c34592e401dd41e45d25a493"
    filename: str = "diffusion_pytorch_model.safetensors"
    sha256: str = "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"
    config_filename: str = "config.json"
    config_sha256: str = "92d3dfb746fca211a2c9e019e285f8597412211728dce3c5bcf4eda0f2d62e7e"


@dataclass(frozen=True)
class MaisiHubParams(HubParams):
    repo: str = "MONAI/maisi_ct_generative"
    revision: str = "02aa18dbb5f0dc42d89460cdcb02d3b21f22aa1b"  # tag 1.0.0
    filename: str = "models/autoencoder.pt"
    sha256: str = "1f8a7a056d0ebc00486edc43c26768bf1c12eaa6df9dd172e34598003be95eb3"


@dataclass(frozen=True)
class MaisiArchParams:
    """Width of an ``AutoencoderKlMaisi``; the rest of the released config is fixed in ctdiff.models.vae.maisi."""

    num_channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        key = "vae.maisi.{arch,scratch}"
        _require(len(self.num_channels) >= 2, f"{key}.num_channels", "needs >= 2 levels")
        _require(len(self.num_res_blocks) == len(self.num_channels), f"{key}.num_res_blocks",
                 "must have one entry per level of num_channels")
        _require(all(c % self.norm_num_groups == 0 for c in self.num_channels), f"{key}.norm_num_groups",
                 "must divide every entry of num_channels")


@dataclass(frozen=True)
class MaisiParams:
    hub: MaisiHubParams = field(default_factory=MaisiHubParams)
    arch: MaisiArchParams = field(default_factory=MaisiArchParams)  # released config: the hub weights match it
    scratch: MaisiArchParams = field(
        default_factory=lambda: MaisiArchParams(num_channels=(8, 16, 32), num_res_blocks=(1, 1, 1), norm_num_groups=4)
    )
    patch: tuple[int, int, int] = (16, 32, 32)  # vae_fit random crop [D, H, W]
    # sliding-window tile [X, Y, Z] of the RAS array MAISI sees (its configs' order; multiples of 16)
    tile: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.25
    num_splits: int = 1  # AutoencoderKlMaisi splits every conv input into this many pieces; 1 = no split
    dim_split: int = 1

    def __post_init__(self) -> None:
        _require(all(t > 0 and t % 16 == 0 for t in self.tile), "vae.maisi.tile", "sizes must be multiples of 16")
        _require(0.0 <= self.overlap < 1.0, "vae.maisi.overlap", "must be in [0, 1)")
        _require(all(p > 0 for p in self.patch) and max(self.patch) <= min(self.tile), "vae.maisi.patch",
                 "sizes must be > 0 and fit in vae.maisi.tile along every axis, whatever the volume's orientation "
                 "(a training patch is never tiled)")
        _require(self.num_splits >= 1, "vae.maisi.num_splits", "must be >= 1")
        _require(self.dim_split in (0, 1, 2), "vae.maisi.dim_split", "must be 0, 1 or 2")


@dataclass(frozen=True)
class SdArchParams:
    """Width of a diffusers ``AutoencoderKL`` trained from scratch (the hub config fixes the pretrained one)."""

    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        _require(len(self.block_out_channels) >= 2, "vae.sd.scratch.block_out_channels", "needs >= 2 levels")
        _require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                 "vae.sd.scratch.norm_num_groups", "must divide every entry of block_out_channels")


@dataclass(frozen=True)
class SdParams:
    hub: SdHubParams = field(default_factory=SdHubParams)
    scratch: SdArchParams = field(default_factory=SdArchParams)
    patch: tuple[int, int, int] = (2, 64, 64)  # vae_fit random crop [slices, H, W]
    slice_batch: int = 16  # axial slices per encoder/decoder call

    def __post_init__(self) -> None:
        _require(all(p > 0 for p in self.patch), "vae.sd.patch", "sizes must be > 0")
        _require(self.slice_batch >= 1, "vae.sd.slice_batch", "must be >= 1")


@dataclass(frozen=True)
class VaeParams:
    use_maisi: bool = False  # false: SD VAE per axial slice; true: MAISI 3D VAE
    pretrained: bool = False  # true: download the pinned released weights; false: vae_fit trains from scratch
    hu_range: tuple[float, float] = (-1000.0, 1000.0)  # clipped and mapped to [0, 1] (SD: [-1, 1])
    latent_channels: int = 4  # MAISI and scratch architectures; pretrained SD reads it from its config
    finetune_epochs: int = 0  # pretrained: epochs of domain fine-tuning (0 = use as downloaded)
    finetune_lr: float = 1.0e-5
    scratch_epochs: int = 36
    scratch_lr: float = 1.0e-3
    patches_per_volume: int = 4  # random crops per training volume (source and target) per epoch
    batch_size: int = 4
    kl_weight: float = 1.0e-6
    recon_loss: Literal["l1", "mse"] = "l1"  # the reconstruction term in [0, 1] (PSNR is an MSE)
    warmup_steps: int = 0  # linear LR warm-up before the cosine decay
    body_crops: float = 0.0  # fraction of training crops centred inside the body (HU > -500), the rest uniform
    logvar_init: float | None = None  # scratch: the encoder's log-variance output starts at this constant
    hub_timeout_s: float = 5.0  # reachability check before a download; offline fails this fast
    maisi: MaisiParams = field(default_factory=MaisiParams)
    sd: SdParams = field(default_factory=SdParams)

    def __post_init__(self) -> None:
        _require(self.hu_range[0] < self.hu_range[1], "vae.hu_range", "must be [low, high] with low < high")
        _require(self.latent_channels >= 1, "vae.latent_channels", "must be >= 1")
        _require(self.finetune_epochs >= 0 and self.scratch_epochs >= 0, "vae", "epochs must be >= 0")
        _require(self.finetune_lr > 0 and self.scratch_lr > 0, "vae", "learning rates must be > 0")
        _require(self.patches_per_volume >= 1 and self.batch_size >= 1, "vae", "patches_per_volume and "
                 "batch_size must be >= 1")
        _require(self.kl_weight >= 0, "vae.kl_weight", "must be >= 0")
        _require(self.warmup_steps >= 0, "vae.warmup_steps", "must be >= 0")
        _require(0.0 <= self.body_crops <= 1.0, "vae.body_crops", "must be in [0, 1]")
        _require(self.hub_timeout_s > 0, "vae.hub_timeout_s", "must be > 0")

    @property
    def codec(self) -> Literal["maisi", "sd"]:
        return "maisi" if self.use_maisi else "sd"


@dataclass(frozen=True)
class VaeCheckParams:
    split: Literal["val", "test", "train"] = "val"  # held-out cases to encode and decode
    max_cases: int = 4  # 0 = every case of the split

    def __post_init__(self) -> None:
        _require(self.max_cases >= 0, "vae_check.max_cases", "must be >= 0 (0 = all)")


# --------------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class UnetParams:
    """Width of the denoiser, ``monai.networks.nets.DiffusionModelUNet`` (3D; in/out channels follow the VAE).

    Latent patches must be divisible by ``2 ** (len(channels) - 1)`` on every axis (the UNet halves them
    at each level but the last); ``train.patch`` is checked against it.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    num_head_channels: int = 16

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


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 80
    vae_freeze_epochs: int = 78  # epochs [0, vae_freeze_epochs) frozen VAE on cached latents; then fine-tuned
    vae_finetune: Literal["decoder", "full"] = "decoder"
    vae_lr: float = 1.0e-5
    vae_recon_weight: float = 1.0  # weight of (L1 in [0, 1] + vae_kl_weight * KL) on the target patch
    vae_kl_weight: float = 1.0e-6  # KL summed over latent elements, as in vae_fit
    vae_recon_slices: int = 2  # latent slices of each target patch decoded for that loss (0 = all)
    patch: tuple[int, int, int] = (16, 64, 64)  # voxels [D, H, W]; multiples of VAE downsampling x UNet multiple
    batch_size: int = 4  # patches per optimizer step (per process under torchrun)
    patches_per_volume: int = 4  # random patches per training volume per epoch
    lr: float = 1.0e-3
    lr_min_ratio: float = 0.1  # cosine decay from lr to lr * lr_min_ratio over all steps
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    scheduler: Literal["ddpm", "rflow"] = "ddpm"  # training noise process; sampling: DDIM for ddpm, RFlow for rflow
    residual: bool = True  # generate the change of the target latent from the condition's latent, not the latent
    # what the denoiser is conditioned on: series 1 interpolated (source.npy), or that projected onto series 1's
    # slabs (evaluate's baseline_consistent, with evaluate.slab_profile)
    condition: Literal["source", "consistent"] = "consistent"
    prediction: Literal["epsilon", "v"] = "v"  # ddpm only; rflow always predicts the velocity
    num_train_timesteps: int = 1000
    val_patches_per_volume: int = 8  # fixed patches (and noise, timesteps) per val volume
    latent_cache: Literal["memory", "disk"] = "memory"  # disk: also under models/checkpoints/latents (resume)
    checkpoint_every: int = 100  # steps between last.pt writes (and one at every epoch end)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on CUDA only; CPU always runs fp32
    unet: UnetParams = field(default_factory=UnetParams)

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


# -------------------------------------------------------------------------------------- sr_reference
@dataclass(frozen=True)
class SrReferenceParams:
    """The supervised reference (``ctdiff.training.reference``): a MONAI ``UNet`` in image space predicting the thin
    series as a residual on the slab-consistent baseline, L1 in [0, 1] over ``vae.hu_range``.

    ``channels``/``strides`` are the UNet's own arguments (``len(strides) == len(channels) - 1``);
    ``patch`` must be divisible by the product of the strides on every axis, so the skip connections line
    up. Inference runs a Gaussian-blended sliding window of ``patch``.
    """

    epochs: int = 12
    batch_size: int = 8  # patches per optimizer step
    patches_per_volume: int = 64  # random patches per training volume per epoch
    patch: tuple[int, int, int] = (16, 64, 64)  # voxels [D, H, W]; also the inference window
    lr: float = 3.0e-3
    lr_min_ratio: float = 0.1  # cosine decay from lr to lr * lr_min_ratio over all steps
    warmup_steps: int = 20
    weight_decay: float = 0.0
    channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2)
    overlap: float = 0.25  # sliding-window overlap at inference (val and evaluate)
    window_batch: int = 8  # windows per network call at inference
    checkpoint_every: int = 100  # steps between last.pt writes (plus one at every epoch end)
    device: Literal["auto", "cpu", "cuda"] = "auto"

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


# ------------------------------------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class EvaluateParams:
    split: Literal["test", "val"] = "test"  # val: to choose levers without looking at the test split
    steps: int = 20  # DDIM (ddpm-trained) or rectified-flow steps per sampled volume
    max_cases: int = 0  # 0 = every case of the test split
    overlap: float = 0.25  # latent windows overlap when a volume exceeds the training patch
    window_batch: int = 16  # latent windows per UNet call (5x faster than 1 on 2 CPU cores; GPU memory)
    bspline_baseline: bool = True  # also report series 1 B-spline-interpolated onto series 2's grid
    window_hu: tuple[float, float] = (-250.0, 450.0)  # display window of the PNG panels (CTPA: L 100, W 700)
    nifti: bool = True  # write predictions as .nii.gz under data/predictions/
    samples: int = 8  # decoded samples averaged per volume (a posterior-mean estimate)
    decode: Literal["sample", "change"] = "sample"  # change: baseline + D(z) - D(E(baseline)) (VAE errors cancel)
    consistency: bool = True  # model = the decoded sample projected onto series 1's slabs; false: the raw decode
    slab_profile: Literal["box", "triangle", "gaussian"] = "box"  # series 1's slice sensitivity profile
    lumen_ring_mm: float = 4.0  # embolus conspicuity: patent lumen within this distance of an embolus
    defect_hu: float = 175.0  # false filling defects: lumen below this HU (midway, phantom lumen 300 / embolus 50)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "evaluate.steps", "must be >= 1")
        _require(self.lumen_ring_mm > 0, "evaluate.lumen_ring_mm", "must be > 0")
        _require(self.samples >= 1, "evaluate.samples", "must be >= 1")
        _require(self.window_batch >= 1, "evaluate.window_batch", "must be >= 1")
        _require(self.max_cases >= 0, "evaluate.max_cases", "must be >= 0 (0 = all)")
        _require(0.0 <= self.overlap < 1.0, "evaluate.overlap", "must be in [0, 1)")
        _require(self.window_hu[0] < self.window_hu[1], "evaluate.window_hu", "must be [low, high]")


# ------------------------------------------------------------------------------------------- all
@dataclass(frozen=True)
class Params:
    seed: int = 0  # the data: phantoms, the split (and evaluate's bootstrap)
    train_seed: int = 0  # everything learnt or drawn after the data: VAE, UNet, reference, evaluate's samples
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    vae: VaeParams = field(default_factory=VaeParams)
    vae_check: VaeCheckParams = field(default_factory=VaeCheckParams)
    train: TrainParams = field(default_factory=TrainParams)
    sr_reference: SrReferenceParams = field(default_factory=SrReferenceParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def __post_init__(self) -> None:
        _require(self.evaluate.steps <= self.train.num_train_timesteps, "evaluate.steps",
                 f"must be <= train.num_train_timesteps ({self.train.num_train_timesteps})")


DEFAULT_PARAMS_PATH = Path("params.yaml")


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_PATH) -> Params:
    """Parse ``params.yaml`` into :class:`Params`; raises :class:`ParamsError` naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"{path} not found: run stages from the repository root") from exc
    return params_from_dict(raw)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from a plain dict (the parsed YAML); missing keys take defaults."""
    return _build(Params, raw, "")


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-able) form of a params dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``vae.use_maisi``, as ``dvc exp run -S`` names them) of every leaf (a value that is not
    a mapping) of a nested params mapping."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix or "top level"
        raise ParamsError(f"params.yaml: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
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
