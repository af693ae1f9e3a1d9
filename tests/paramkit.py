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
