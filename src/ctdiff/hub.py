"""Pinned, verified files from the Hugging Face Hub that fail fast and clearly when offline.

A file is resolved through ``huggingface_hub`` (its cache layout, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` all apply; the token is never printed). The local cache is tried first,
so a pinned commit that is already cached needs no network at all. When a file is missing, one quick
metadata request (``vae.hub_timeout_s``) decides whether the hub is reachable before downloading:
``hf_hub_download`` alone would retry a dead connection for about 20 seconds (and up to minutes when
packets are dropped) before it gives up.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import LocalEntryNotFoundError

OFFLINE_SWITCH = "dvc exp run -S vae.pretrained=false"
_CHUNK = 1 << 20


class HubError(RuntimeError):
    """A pinned file is unavailable or is not the file that was pinned."""


@dataclass(frozen=True)
class PinnedFile:
    """One file of a Hub repository at a fixed revision, with the sha256 its bytes must have."""

    repo: str
    revision: str
    filename: str  # path inside the repository, e.g. "models/autoencoder.pt"
    sha256: str  # expected hex digest; "" = not pinned yet (the observed one is reported)
    sha256_key: str  # the params.yaml key holding ``sha256``, named in messages

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision[:12]} {self.filename}"


def resolve(files: Sequence[PinnedFile], cache_dir: str | os.PathLike[str] | None = None,
            timeout_s: float = 5.0) -> list[Path]:
    """Local paths (inside the Hugging Face cache) of ``files``, in order, downloading what is not cached.

    Raises :class:`HubError` naming every missing file and the offline switch when the hub is offline
    (``HF_HUB_OFFLINE=1``) or unreachable within ``timeout_s`` seconds. Hashes are not checked here
    (see :func:`copy_verified`).
    """
    paths: dict[PinnedFile, Path] = {}
    for pin in files:
        try:
            paths[pin] = Path(hf_hub_download(pin.repo, pin.filename, revision=pin.revision,
                                              cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    missing = [pin for pin in files if pin not in paths]
    if missing:
        reason = _unreachable_reason(missing[0], timeout_s)
        if reason is not None:
            cache = cache_dir or constants.HF_HUB_CACHE
            names = "; ".join(str(pin) for pin in missing)
            raise HubError(
                f"not in the local Hugging Face cache ({cache}) and {reason}: {names}. "
                f"Connect and rerun, or run fully offline with VAEs trained from scratch: {OFFLINE_SWITCH}"
            )
        for pin in missing:
            paths[pin] = Path(hf_hub_download(pin.repo, pin.filename, revision=pin.revision,
                                              cache_dir=cache_dir, etag_timeout=timeout_s))
    return [paths[pin] for pin in files]


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_verified(src: str | os.PathLike[str], dst: str | os.PathLike[str], pin: PinnedFile) -> str:
    """Copy ``src`` to ``dst`` hashing on the way; return the sha256.

    Raises :class:`HubError` (printing the observed hash and how to pin it) when it differs from
    ``pin.sha256``; ``dst`` may then hold the bad copy, so callers write into a temporary folder.
    """
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    observed = digest.hexdigest()
    if pin.sha256 and observed != pin.sha256.lower():
        raise HubError(
            f"{pin}: sha256 {observed} does not match the pinned {pin.sha256} ({pin.sha256_key} in "
            f"params.yaml). Nothing was written. If you trust this file, pin it: "
            f"dvc exp run -S {pin.sha256_key}={observed} (or set it in params.yaml)"
        )
    return observed


def unpinned_note(pin: PinnedFile, observed: str) -> str:
    """What to tell the user when ``pin`` has no expected hash yet."""
    return (f"{pin}: no sha256 pinned ({pin.sha256_key} is empty); observed {observed}. Pin it: "
            f"dvc exp run -S {pin.sha256_key}={observed} (or set it in params.yaml)")


def _unreachable_reason(pin: PinnedFile, timeout_s: float) -> str | None:
    """Why ``pin`` cannot be downloaded now, or None when the hub answers for it."""
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    if constants.HF_HUB_OFFLINE:
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    try:
        get_hf_file_metadata(hf_hub_url(pin.repo, pin.filename, revision=pin.revision), timeout=timeout_s)
    except _transport_errors() as exc:
        return f"the hub is unreachable ({type(exc).__name__} within {timeout_s:g} s)"
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]  # requests' errors and OfflineModeIsEnabled are OSErrors
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)

