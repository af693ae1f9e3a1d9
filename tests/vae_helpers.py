"""Fixtures for the VAE tests: tiny processed cases, tiny VAE params, and a real-layout Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ctdiff.params import Params, params_from_dict

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
    """params.yaml content (a dict) for tiny VAEs; ``vae_overrides`` use dotted keys below ``vae``."""
    vae = json.loads(json.dumps(TINY_VAE))
    vae.update(use_maisi=use_maisi, pretrained=pretrained)
    for dotted, value in vae_overrides.items():
        node = vae
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return {"seed": 0, "vae": vae, "vae_check": {"split": "val", "max_cases": 2}}


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


def write_processed(root: Path, shape: tuple[int, int, int] = (16, 24, 24), n_train: int = 3, n_val: int = 2,
                    spacing_mm: tuple[float, float, float] = (5.0, 5.0, 1.0)) -> Path:
    """A ``data/processed`` folder following the contract; the source is a z-smoothed copy of the target."""
    processed = root / "data" / "processed"
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i in range(n_train + n_val):
        case_id = f"case_{i:03d}"
        split = "train" if i < n_train else "val"
        splits[split].append(case_id)
        folder = processed / case_id
        folder.mkdir(parents=True)
        target = synthetic_ct(shape, i)
        source = ((target.astype(np.float32) + np.roll(target, 1, 0) + np.roll(target, -1, 0)) / 3).astype(np.int16)
        np.save(folder / "target.npy", target)
        np.save(folder / "source.npy", source)
        grid = {"shape": list(shape), "spacing": list(spacing_mm), "origin": [0.0, 0.0, 0.0],
                "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}
        meta = {"case_id": case_id, "category": "non-APE", "split": split, "grid": grid}
        (folder / "meta.json").write_text(json.dumps(meta))
    (processed / "splits.json").write_text(json.dumps(splits))
    return processed


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
