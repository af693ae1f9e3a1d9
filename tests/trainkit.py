"""Tiny, real inputs for the train-stage tests: processed cases on disk and a small VAE in ``models/vae`` form.

The processed folder is :func:`vae_helpers.write_processed`'s (the preprocess contract, ``series1.npy``
included) with textured volumes (:func:`smooth_field`). The VAE is built with the VAE package's own constructors
(``new_codec`` at a small width) and written with its own ``save_weights``/``write_manifest``, so the train
stage loads it exactly as it loads vae_fit's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import GaussianSmooth
from paramkit import ACCEPT_UNHEALTHY, repo_params
from vae_helpers import write_processed, write_slabs

from ctdiff.io import atomic_dir
from ctdiff.models.vae.weights import new_codec, runtime_settings, save_weights, scratch_config, write_manifest
from ctdiff.params import Params

SHAPE = (16, 32, 32)  # (D, H, W) voxels


def tiny_params(use_maisi: bool = False, **train: Any) -> Params:
    """Params for a seconds-long CPU run: a 2-level UNet of width 8 and a VAE of width 8."""
    train_defaults: dict[str, Any] = {
        "epochs": 2, "vae_freeze_epochs": 1, "patch": [8, 16, 16], "batch_size": 2, "patches_per_volume": 2,
        "lr": 1e-3, "warmup_steps": 2, "val_patches_per_volume": 2, "checkpoint_every": 2,
        "unet": {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
                 "norm_num_groups": 8, "num_head_channels": 8},
    }
    train_defaults.update(train)
    return repo_params({
        "seed": 0, "train_seed": 0,
        **ACCEPT_UNHEALTHY,
        "vae.use_maisi": use_maisi, "vae.pretrained": False, "vae.latent_channels": 2,
        "vae.maisi.scratch": {"num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8},
        "vae.sd.scratch": {"block_out_channels": [8, 8, 8, 16], "layers_per_block": 1, "norm_num_groups": 8},
        **{f"train.{k}": v for k, v in train_defaults.items()},
        # The supervised reference (evaluate's `reference` rung) at the same seconds-long scale.
        **{f"sr_reference.{k}": v for k, v in {"epochs": 1, "patch": [8, 16, 16], "batch_size": 2,
                                                "patches_per_volume": 2, "channels": [4, 8], "strides": [2],
                                                "warmup_steps": 1, "checkpoint_every": 2}.items()},
    })


def smooth_field(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(D, H, W) float32 HU: smoothed noise scaled to -300 +- 400 HU, clipped to [-1024, 1500].

    Texture everywhere, unlike :func:`vae_helpers.synthetic_ct`'s flat tissue classes: a random training patch
    is never plain air.
    """
    noise = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape))).float()
    field = GaussianSmooth(sigma=2.0)(noise)
    return (field / field.std() * 400.0 - 300.0).clamp(-1024, 1500)[0].numpy()


def write_vae(vae_dir: Path, params: Params, seed: int = 0) -> Path:
    """A randomly initialised small codec of ``params.vae``'s family, saved as vae_fit saves its output."""
    torch.manual_seed(seed)
    codec = new_codec(params.vae, params.hu_range, scratch_config(params.vae))
    with atomic_dir(vae_dir) as tmp:
        files = save_weights(codec, tmp)
        write_manifest(tmp, codec, ".", files, {"origin": "scratch", "epochs": 0, "width": [8]},
                       runtime_settings(params.vae))
    return vae_dir


def workspace(tmp_path: Path, params: Params, profile: str = "box") -> dict[str, Path]:
    """processed data, the slab stage's output (a named ``profile``) and models/vae under ``tmp_path``; the paths
    :func:`ctdiff.training.ldm.train` takes."""
    processed = write_processed(tmp_path / "data" / "processed", n_train=3, n_val=1, n_test=1, shape=SHAPE,
                                target_hu=smooth_field, source_slices=5)
    slab_dir, profile_dir = write_slabs(processed, profile)
    vae_dir = write_vae(tmp_path / "models" / "vae", params)
    return {"processed_dir": processed, "slab_dir": slab_dir, "profile_dir": profile_dir, "vae_dir": vae_dir,
            "ckpt_dir": tmp_path / "models" / "checkpoints", "live_dir": tmp_path / "dvclive" / "train"}
