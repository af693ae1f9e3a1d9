"""Params for tests: the repository's ``params.yaml`` (the only source of defaults) with dotted-key overrides, as
``dvc exp run -S`` gives them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctdiff.params import Params, PhantomParams, params_from_dict, read_params_yaml, set_dotted

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# Seconds-long trainings learn little: the health gates (tests/test_health.py, which turns them on) would stop
# the plumbing tests, so these accept what the gates find; a one-epoch scratch VAE is not trained a second time.
ACCEPT_UNHEALTHY = {"vae.accept_unhealthy": True, "vae.retry_unhealthy": False, "vae_check.accept_unhealthy": True,
                    "train.accept_unhealthy": True, "sr_reference.accept_unhealthy": True}

# The whole pipeline in seconds per stage under real DVC (10 phantom patients of 30 x 32 x 32, networks a few
# channels wide, two epochs): the numbers mean nothing, the plumbing is what is under test.
TINY_PIPELINE = {
    **ACCEPT_UNHEALTHY,
    "data.phantom.n_cases": 10,
    "data.phantom.families.hilum.shape": [30, 32, 32],
    "data.phantom.families.hilum.pixel_mm": 8.0,
    "preprocess.workers": 2,
    "vae.pretrained": False,
    "vae.latent_channels": 2,
    "vae.scratch_epochs": 2,
    "vae.maisi.scratch": {"num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 8},
    "vae.maisi.patch": [16, 16, 16],
    "vae.sd.scratch": {"block_out_channels": [8, 8, 8, 16], "layers_per_block": 1, "norm_num_groups": 8},
    "vae.sd.patch": [4, 32, 32],
    "vae_check.max_cases": 1,
    "train.epochs": 2,
    "train.vae_freeze_epochs": 1,
    "train.patch": [8, 16, 16],
    "train.batch_size": 2,
    "train.patches_per_volume": 2,
    "train.val_patches_per_volume": 2,
    "train.unet": {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
                   "norm_num_groups": 8, "num_head_channels": 8},
    "sr_reference.epochs": 2,
    "sr_reference.patch": [8, 16, 16],
    "sr_reference.batch_size": 2,
    "sr_reference.patches_per_volume": 2,
    "sr_reference.channels": [4, 8],
    "sr_reference.strides": [2],
    "train.sampling.steps": 3,
}

def raw_params(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The committed params.yaml as a dict, with ``overrides`` ({"train.epochs": 2}) applied; every key must exist."""
    return set_dotted(read_params_yaml(REPO_PARAMS), overrides or {})


def repo_params(overrides: Mapping[str, Any] | None = None) -> Params:
    """The committed params with ``overrides`` applied, parsed and checked."""
    return params_from_dict(raw_params(overrides))


CROP_KEYS = ("shape", "pixel_mm", "centre")  # of the selected family's crop


def phantom_params(**changes: Any) -> PhantomParams:
    """The committed ``data.phantom`` with some fields changed; ``shape``, ``pixel_mm`` and ``centre`` change the
    selected family's crop (``family`` may select another first)."""
    return with_crop(repo_params().data.phantom, **changes)


def with_crop(p: PhantomParams, **changes: Any) -> PhantomParams:
    """``p`` with some fields changed, ``shape``/``pixel_mm``/``centre`` in its selected family's crop."""
    crop = {k: changes.pop(k) for k in CROP_KEYS if k in changes}
    p = dataclasses.replace(p, **changes)
    if crop:
        family = dataclasses.replace(p.crop, **crop)
        p = dataclasses.replace(p, families=dataclasses.replace(p.families, **{p.family: family}))
    return p


def merged_params(partial: Mapping[str, Any]) -> Params:
    """The committed params with a nested partial dict merged in (``{"data": {"phantom": {"n_cases": 3}}}``)."""
    return params_from_dict(deep_merge(read_params_yaml(REPO_PARAMS), partial))


def deep_merge(base: dict[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``partial``'s leaves written over it (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in partial.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
            else value
    return out
