"""Where VAE weights come from and how they become a codec: ``models/pretrained`` and ``models/vae``.

``models/pretrained/`` (fetch_weights): the pinned hub files copied out of the Hugging Face cache under
fixed names (MAISI ``autoencoder.pt``; SD ``config.json`` + ``diffusion_pytorch_model.safetensors``) and
``origin.json`` = {origin: "hub", codec, repo, revision, files: {name: sha256}}, or {origin: "scratch"}.

``models/vae/`` (vae_fit): ``manifest.json`` (:func:`write_manifest`) naming the codec, its architecture,
the weight files by path *relative to models/vae* with their sha256, where the weights came from, the
intensity range and the run-time settings (MAISI's tiles and splits, SD's slice batch): everything
:func:`load_vae` needs, so the stages after vae_fit read no ``vae`` params.
Trained weights live next to the manifest; weights used as downloaded are not
copied: the manifest points at ``../pretrained`` (itself a DVC output and a dependency of vae_fit) and
the hashes make the pointer exact.

Every load is strict: MAISI checkpoints go through ``torch.load(weights_only=True)`` (no arbitrary
pickled objects) and must carry exactly the architecture's keys; SD weights load through diffusers from
safetensors and must match their config key for key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ctdiff.data.hub import PinnedFile, copy_verified, resolve, sha256_file, unpinned_note
from ctdiff.io import atomic_dir, atomic_write_json
from ctdiff.models.vae.base import LatentCodec
from ctdiff.models.vae.maisi import MaisiCodec, maisi_config
from ctdiff.models.vae.sd import SdCodec, sd_scratch_config
from ctdiff.params import VaeParams

Runtime = dict[str, Any]  # how a codec runs (not its weights): MAISI tile/overlap/num_splits/dim_split, SD slice_batch

ORIGIN_JSON = "origin.json"
MANIFEST_JSON = "manifest.json"
MAISI_WEIGHTS = "autoencoder.pt"
SD_CONFIG = "config.json"
SD_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Wrappers a MAISI checkpoint may come in instead of a bare state_dict (training scripts save these).
_STATE_DICT_WRAPPERS = ("state_dict", "autoencoder_state_dict", "unet_state_dict", "model")
_KEYS_SHOWN = 12


class WeightsError(RuntimeError):
    """Weights that cannot be trusted or do not fit the architecture."""


# ------------------------------------------------------------------------------------ fetch_weights
def pinned_files(vae: VaeParams) -> list[tuple[PinnedFile, str]]:
    """The hub files the params select, each with the local name it gets in ``models/pretrained``."""
    if vae.use_maisi:
        hub = vae.maisi.hub
        return [(PinnedFile(hub.repo, hub.revision, hub.filename, hub.sha256, "vae.maisi.hub.sha256"), MAISI_WEIGHTS)]
    hub = vae.sd.hub
    return [
        (PinnedFile(hub.repo, hub.revision, hub.config_filename, hub.config_sha256, "vae.sd.hub.config_sha256"),
         SD_CONFIG),
        (PinnedFile(hub.repo, hub.revision, hub.filename, hub.sha256, "vae.sd.hub.sha256"), SD_WEIGHTS),
    ]


def fetch_pretrained(vae: VaeParams, out_dir: Path, cache_dir: str | os.PathLike[str] | None = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """Fill ``out_dir`` (models/pretrained) for ``vae``; return (source record, notes to print).

    Pretrained: resolve the pinned files (cache first, fail fast offline), copy them verifying sha256,
    and load them strictly into the selected architecture before anything is written. Scratch: only the
    record. Raises :class:`ctdiff.data.hub.HubError` or :class:`WeightsError`; ``out_dir`` is then unchanged.
    """
    if not vae.pretrained:
        record: dict[str, Any] = {"origin": "scratch", "codec": vae.codec}
        with atomic_dir(out_dir) as tmp:
            atomic_write_json(tmp / ORIGIN_JSON, record)
        return record, []
    pins = pinned_files(vae)
    paths = resolve([pin for pin, _ in pins], cache_dir, vae.hub_timeout_s)
    with atomic_dir(out_dir) as tmp:
        files = {name: copy_verified(path, tmp / name, pin) for (pin, name), path in zip(pins, paths, strict=True)}
        # refuse pickled objects and wrong keys before the folder appears (run-time settings play no part here)
        config = maisi_config(vae.maisi.arch, vae.latent_channels) if vae.use_maisi else None
        build_codec(vae.codec, config, CHECK_HU_RANGE, CHECK_RUNTIME[vae.codec], "cpu", tmp)
        hub = vae.maisi.hub if vae.use_maisi else vae.sd.hub
        record = {"origin": "hub", "codec": vae.codec, "repo": hub.repo, "revision": hub.revision, "files": files}
        atomic_write_json(tmp / ORIGIN_JSON, record)
    notes = [unpinned_note(pin, files[name]) for pin, name in pins if not pin.sha256]
    return record, notes


def read_origin(pretrained_dir: Path) -> dict[str, Any]:
    path = pretrained_dir / ORIGIN_JSON
    if not path.is_file():
        raise WeightsError(f"{path} not found: run the fetch_weights stage first (dvc repro fetch_weights)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ codecs
def scratch_config(vae: VaeParams) -> dict[str, Any]:
    """Architecture of a from-scratch VAE of the selected family at the params' width."""
    if vae.use_maisi:
        return maisi_config(vae.maisi.scratch, vae.latent_channels)
    return sd_scratch_config(vae.sd.scratch, vae.latent_channels)


# fetch_weights only checks that the weights load into the architecture: any range and run-time settings will do
CHECK_HU_RANGE = (-1000.0, 1000.0)
CHECK_RUNTIME: dict[str, Runtime] = {"maisi": {"tile": [64, 64, 64], "overlap": 0.25, "num_splits": 1, "dim_split": 1},
                                     "sd": {"slice_batch": 1}}


def runtime_settings(vae: VaeParams) -> Runtime:
    """How the selected codec runs, from its params (vae_fit records it in the manifest)."""
    if vae.use_maisi:
        m = vae.maisi
        return {"tile": list(m.tile), "overlap": m.overlap, "num_splits": m.num_splits, "dim_split": m.dim_split}
    return {"slice_batch": vae.sd.slice_batch}


def build_codec(codec: str, config: dict[str, Any] | None, hu_range: Sequence[float], runtime: Runtime,
                device: torch.device | str = "cpu", weights_dir: Path | None = None) -> LatentCodec:
    """A codec of family ``codec`` ("maisi" or "sd"): random weights of architecture ``config``, or loaded strictly
    from ``weights_dir`` (the fixed file names of this module; SD's architecture is then the folder's config.json)."""
    if codec == "maisi":
        model = MaisiCodec(config, hu_range, runtime["tile"], runtime["overlap"], runtime["num_splits"],
                           runtime["dim_split"], device)
        if weights_dir is not None:
            path = weights_dir / MAISI_WEIGHTS
            load_strict(model.module, read_maisi_checkpoint(path), path)
        return model
    module = load_sd_module(weights_dir) if weights_dir is not None else AutoencoderKL(**config)
    return SdCodec(module, hu_range, runtime["slice_batch"], device)


def new_codec(vae: VaeParams, hu_range: Sequence[float], config: dict[str, Any],
              device: torch.device | str = "cpu") -> LatentCodec:
    """A randomly initialised codec of the selected family with architecture ``config``."""
    return build_codec(vae.codec, config, hu_range, runtime_settings(vae), device)


def pretrained_codec(vae: VaeParams, hu_range: Sequence[float], weights_dir: Path,
                     device: torch.device | str = "cpu") -> LatentCodec:
    """The selected family's codec loaded strictly from ``weights_dir`` (MAISI: the released architecture of
    ``vae.maisi.arch``; SD: the folder's config.json)."""
    config = maisi_config(vae.maisi.arch, vae.latent_channels) if vae.use_maisi else None
    return build_codec(vae.codec, config, hu_range, runtime_settings(vae), device, weights_dir)


def read_maisi_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a MAISI autoencoder checkpoint, bare or wrapped, loaded with ``weights_only=True``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on the payload
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: refused to load: not a plain tensor checkpoint (torch.load with "
                           f"weights_only=True failed: {first_line})") from exc
    if isinstance(obj, dict):
        for key in _STATE_DICT_WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state_dict of tensors (bare or under one of "
                           f"{list(_STATE_DICT_WRAPPERS)}), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: Path) -> None:
    """``load_state_dict(strict=True)``, raising :class:`WeightsError` that lists missing/unexpected keys."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise WeightsError(f"{where}: checkpoint does not match the {type(module).__name__} architecture in "
                           f"params.yaml: {_key_list('missing', missing)}; {_key_list('unexpected', unexpected)}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same keys, different tensor shapes: another width
        raise WeightsError(f"{where}: checkpoint does not fit the architecture in params.yaml: {exc}") from exc


def load_sd_module(weights_dir: Path) -> AutoencoderKL:
    """diffusers ``AutoencoderKL`` from a folder with config.json + safetensors; every key must match."""
    try:
        # low_cpu_mem_usage=False: without `accelerate` diffusers falls back to it anyway, but first prints
        # an "install accelerate" hint in every stage that loads the VAE. Loading allocates the weights
        # twice for a moment (2 x 335 MB for the released SD VAE), which every machine here can afford.
        module, info = AutoencoderKL.from_pretrained(weights_dir, use_safetensors=True, output_loading_info=True,
                                                     low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{weights_dir}: diffusers could not load an AutoencoderKL: {exc}") from exc
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = [str(m) for m in info["mismatched_keys"]]
    if missing or unexpected or mismatched:
        raise WeightsError(f"{weights_dir}: weights do not match config.json: {_key_list('missing', missing)}; "
                           f"{_key_list('unexpected', unexpected)}; {_key_list('mismatched', mismatched)}")
    return module


def _key_list(what: str, keys: list[str]) -> str:
    if not keys:
        return f"no {what} keys"
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return f"{len(keys)} {what} key(s): {shown}{more}"


# ----------------------------------------------------------------------------------------- manifest
def save_weights(codec: LatentCodec, out_dir: Path) -> dict[str, str]:
    """Write ``codec``'s weights into ``out_dir`` under this module's file names; name -> sha256."""
    if isinstance(codec, MaisiCodec):
        torch.save(codec.module.state_dict(), out_dir / MAISI_WEIGHTS)
        names = [MAISI_WEIGHTS]
    else:
        codec.module.save_pretrained(out_dir, safe_serialization=True)
        names = [SD_CONFIG, SD_WEIGHTS]
    return {name: sha256_file(out_dir / name) for name in names}


def codec_config(codec: LatentCodec) -> dict[str, Any]:
    """JSON-able architecture of ``codec`` (MAISI constructor arguments or the diffusers config)."""
    if isinstance(codec, MaisiCodec):
        return dict(codec.config)
    return {k: v for k, v in dict(codec.module.config).items() if not k.startswith("_")}


def write_manifest(out_dir: Path, codec: LatentCodec, weights_dir: str, files: dict[str, str],
                   weights: dict[str, Any], runtime: Runtime, **extra: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into ``out_dir``; ``weights_dir`` is relative to the final models/vae."""
    manifest = {
        "codec": codec.name,
        "config": codec_config(codec),
        "weights_dir": weights_dir,
        "files": files,
        "weights": weights,
        "hu_range": list(codec.hu_range),
        "downsample": list(codec.downsample),
        "latent_channels": codec.latent_channels,
        "runtime": runtime,
        **extra,
    }
    atomic_write_json(out_dir / MANIFEST_JSON, manifest)
    return manifest


def read_manifest(vae_dir: Path) -> dict[str, Any]:
    path = vae_dir / MANIFEST_JSON
    if not path.is_file():
        raise WeightsError(f"{path} not found: run the vae_fit stage first (dvc repro vae_fit)")
    return json.loads(path.read_text())


def load_vae(vae_dir: Path, device: torch.device | str = "cpu") -> LatentCodec:
    """The VAE of ``models/vae`` as its manifest describes it (hashes verified, strict load), manifest attached:
    architecture, weights, intensity range and run-time settings all come from there."""
    manifest = read_manifest(vae_dir)
    if "runtime" not in manifest or "hu_range" not in manifest:
        raise WeightsError(f"{vae_dir / MANIFEST_JSON} was written by an older vae_fit: rerun it (dvc repro)")
    weights_dir = vae_dir / manifest["weights_dir"]
    for name, expected in manifest["files"].items():
        path = weights_dir / name
        if not path.is_file():
            raise WeightsError(f"{path} (named by {vae_dir / MANIFEST_JSON}) is missing: rerun dvc repro")
        observed = sha256_file(path)
        if observed != expected:
            raise WeightsError(f"{path}: sha256 {observed} differs from {expected} recorded by vae_fit; the "
                               f"weights changed after vae_fit ran: rerun dvc repro")
    codec = build_codec(manifest["codec"], manifest["config"], manifest["hu_range"], manifest["runtime"], device,
                        weights_dir)
    codec.manifest = manifest
    return codec
