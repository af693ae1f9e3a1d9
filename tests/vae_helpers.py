"""Shared test fixtures: tiny processed cases (the one writer of a ``data/processed`` folder) and their slab-stage
output, tiny VAE params, a real-layout Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from paramkit import ACCEPT_UNHEALTHY, raw_params

from ctdiff.data.grid import Grid
from ctdiff.data.phantom import CATEGORIES
from ctdiff.data.slab import PROFILE_JSON, SliceProfile
from ctdiff.io import atomic_write_json
from ctdiff.params import Params, leaves, params_from_dict
from ctdiff.training.slab import write_cases

MAISI_REPO = "MONAI/maisi_ct_generative"
SD_REPO = "stabilityai/sd-vae-ft-mse"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Same classes as the released VAEs, a few channels wide, so tests run in seconds on 2 CPU cores.
TINY_VAE: dict[str, Any] = {
    "maisi": {
        "arch": {"num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4},
        "scratch": {"num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4},
        "patch": [16, 16, 16],
        "tile": [16, 16, 16],
        "hub": {"revision": COMMIT},
    },
    "sd": {
        "scratch": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
        "patch": [4, 16, 16],
        "slice_batch": 8,
        "hub": {"revision": COMMIT},
    },
    "scratch_epochs": 2,
    "patches_per_volume": 2,
    "batch_size": 2,
}


@pytest.fixture
def single_torch_thread():
    """Run a test on one torch thread, then restore the setting.

    The networks here are a few channels wide, so a second thread buys nothing, while OpenMP threads
    that wait for a busy core (another job on a 2-core machine) slow such tiny convolutions 10-50x.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Child processes (stage scripts) get the same setting through the environment.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


def tiny_params(use_maisi: bool, pretrained: bool = False, **vae_overrides: Any) -> dict[str, Any]:
    """params.yaml content (a dict: the committed file) for tiny VAEs; ``vae_overrides`` use dotted keys below
    ``vae``."""
    overrides = {f"vae.{k}": v for k, v in leaves(TINY_VAE).items()}
    overrides.update({"seed": 0, "vae.use_maisi": use_maisi, "vae.pretrained": pretrained,
                      "vae_check.split": "val", "vae_check.max_cases": 2, **ACCEPT_UNHEALTHY})
    overrides.update({f"vae.{k}": v for k, v in vae_overrides.items()})
    return raw_params(overrides)


def as_params(raw: dict[str, Any]) -> Params:
    return params_from_dict(raw)


def write_params(root: Path, raw: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(D, H, W) int16 HU: air, an elliptic body of fat and muscle, two lungs, a contrast vessel, noise."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    hu = np.full(shape, -1000.0)
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    hu[body] = -100.0
    hu[(y / 0.7) ** 2 + (x / 0.8) ** 2 < 1] = 40.0
    for side in (-0.4, 0.4):
        hu[((y + 0.05) / 0.45) ** 2 + ((x - side) / 0.3) ** 2 < 1] = -850.0
    cx = 0.1 * np.sin(3 * z + seed)
    hu[(y - 0.1) ** 2 + (x - cx) ** 2 < 0.02] = 300.0
    hu += rng.normal(0.0, 10.0, shape)
    return np.round(hu).astype(np.int16)


def write_processed(processed: Path, n_train: int = 3, n_val: int = 2, n_test: int = 0,
                    shape: tuple[int, int, int] = (16, 24, 24),
                    spacing_mm: tuple[float, float, float] = (5.0, 5.0, 1.0), seed: int = 0,
                    target_hu: Callable[[tuple[int, int, int], int], np.ndarray] = synthetic_ct,
                    source_slices: int = 3, series1_slices: int = 4) -> Path:
    """Write the folder ``processed`` as the preprocess stage writes ``data/processed``; returns it.

    Case ``i`` (``case_000``, ...: train, then val, then test cases; categories alternate) gets
    ``target.npy`` = ``target_hu(shape, seed + i)`` as int16 HU and ``source.npy`` = the target's running mean
    over ``source_slices`` slices along z (the window shrinks at the ends), a cheap stand-in for series 1
    interpolated onto the target grid. ``series1.npy`` is series 1 as acquired: slabs of ``series1_slices``
    target slices, each their mean, on a grid of its own (``meta.json["series1"]["grid"]``: z spacing
    ``series1_slices`` times the target's, origin at the first slab's centre), which evaluate resamples as
    it resamples real data. ``spacing_mm`` is (sx, sy, sz) of the target grid.
    """
    if shape[0] % series1_slices:
        raise ValueError(f"{shape[0]} slices do not split into slabs of {series1_slices}: series 1 must cover the "
                         "target, as preprocess guarantees")
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    grid = Grid(shape, spacing_mm, (0.0, 0.0, 0.0), identity)
    slab = series1_slices
    grid1 = Grid((shape[0] // slab, *shape[1:]), (*spacing_mm[:2], spacing_mm[2] * slab),
                 tuple(grid.physical_point(((slab - 1) / 2, 0, 0)).tolist()), identity)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    splits: dict[str, list[str]] = {name: [] for name in counts}
    for i, split in enumerate(name for name, n in counts.items() for _ in range(n)):
        case_id = f"case_{i:03d}"
        splits[split].append(case_id)
        target = np.rint(target_hu(shape, seed + i)).astype(np.int16)
        half = source_slices // 2
        source = np.stack([target[max(k - half, 0):k + half + 1].mean(axis=0) for k in range(shape[0])])
        series1 = target.reshape(grid1.shape[0], slab, *shape[1:]).mean(axis=1)
        folder = processed / case_id
        folder.mkdir(parents=True)
        for name, hu in (("target", target), ("source", source), ("series1", series1)):
            np.save(folder / f"{name}.npy", np.rint(hu).astype(np.int16))
        meta = {"case_id": case_id, "category": CATEGORIES[i % 2], "split": split, "grid": grid.to_meta(),
                "series1": _series_summary(grid1), "series2": _series_summary(grid), "warnings": []}
        (folder / "meta.json").write_text(json.dumps(meta))
    (processed / "splits.json").write_text(json.dumps(splits))
    return processed


def write_slabs(processed: Path, profile: str = "box") -> tuple[Path, Path]:
    """The slab stage's output for every case of ``processed`` (``<root>/data/processed``) with a named profile:
    ``<root>/data/slab`` and ``<root>/models/slab``, written by the stage's own code. Returns both folders."""
    root = processed.parent.parent
    slab_dir, profile_dir = root / "data" / "slab", root / "models" / "slab"
    case_ids = [c for ids in json.loads((processed / "splits.json").read_text()).values() for c in ids]
    write_cases(processed, slab_dir, case_ids, SliceProfile.named(profile), progress=False)
    profile_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(profile_dir / PROFILE_JSON, SliceProfile.named(profile).to_json())
    return slab_dir, profile_dir


def _series_summary(grid: Grid) -> dict[str, Any]:
    """meta.json's acquisition summary of a series on ``grid`` (as preprocess writes it)."""
    return {"grid": grid.to_meta(), "n_slices": grid.shape[0], "spacing": list(grid.spacing_mm),
            "slice_thickness": grid.spacing_mm[2]}


def add_to_hf_cache(cache_dir: Path, repo: str, commit: str, files: dict[str, bytes]) -> dict[str, str]:
    """Store ``files`` ({path in repo: bytes}) in ``cache_dir`` exactly as huggingface_hub lays a cache out.

    ``models--ORG--NAME/blobs/<sha256>``, ``refs/main`` holding the commit (no trailing newline), and
    ``snapshots/<commit>/<path>`` as relative symlinks to the blobs. Returns {path: sha256}.
    """
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    hashes = {}
    for path, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / digest).write_bytes(data)
        link = repo_dir / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
        hashes[path] = digest
    return hashes
