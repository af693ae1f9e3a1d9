"""Hugging Face Hub access that fails fast and clearly when offline, and pinned, verified files from it.

Every download from the Hub (these model weights; the dataset snapshot of :mod:`ctdiff.data.fetch`) goes through
``huggingface_hub`` (its cache layout, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` all
apply; the token is never printed) and asks :func:`hub_unreachable_reason` first: one quick metadata request
decides whether the Hub answers. ``hf_hub_download`` alone would retry a dead connection for about 20
seconds (and up to minutes when packets are dropped) before it gives up. The local cache is tried before
that, so a pinned commit that is already cached needs no network at all.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

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
    (``HF_HUB_OFFLINE=1``), unreachable within ``timeout_s`` seconds, answers with an HTTP error (gated
    repository, bad token, unknown revision or file), or the connection drops during the download.
    Hashes are not checked here (see :func:`copy_verified`).
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
        names = "; ".join(str(pin) for pin in missing)
        try:
            reason = hub_unreachable_reason(missing[0].repo, "model", missing[0].revision, timeout_s)
            if reason is not None:
                cache = cache_dir or constants.HF_HUB_CACHE
                raise HubError(
                    f"not in the local Hugging Face cache ({cache}) and {reason}: {names}. "
                    f"Connect and rerun, or run fully offline with VAEs trained from scratch: {OFFLINE_SWITCH}"
                )
            for pin in missing:
                paths[pin] = Path(hf_hub_download(pin.repo, pin.filename, revision=pin.revision,
                                                  cache_dir=cache_dir, etag_timeout=timeout_s))
        except HfHubHTTPError as exc:
            # Only the class and status: the error's text is the server's, not ours to vouch for.
            params_key = missing[0].sha256_key.rpartition(".")[0]  # e.g. vae.maisi.hub
            raise HubError(
                f"the Hugging Face Hub did not serve {names} ({type(exc).__name__}, HTTP {http_status(exc)}): "
                f"check {params_key}.repo and .revision in params.yaml and HF_TOKEN, or run fully offline with "
                f"VAEs trained from scratch: {OFFLINE_SWITCH}"
            ) from exc
        except network_errors() as exc:
            raise HubError(
                f"download of {names} interrupted ({type(exc).__name__}): rerun to resume (finished files stay in "
                f"the Hugging Face cache), or run fully offline with VAEs trained from scratch: {OFFLINE_SWITCH}"
            ) from exc
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


def offline_reason() -> str | None:
    """Why the Hub must not be contacted at all (offline mode), or None."""
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the variable is read again for a later change.
    variable = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE or variable else None


def hub_unreachable_reason(repo: str, repo_type: str | None, revision: str | None, timeout_s: float,
                           token: str | None = None) -> str | None:
    """Why ``repo`` (``repo_type`` "model", "dataset", ...) at ``revision`` cannot be downloaded now, or None
    when the Hub answered for it.

    Offline mode needs no request. Otherwise one metadata request with a ``timeout_s`` seconds budget and no
    retries: a dead network costs seconds, not minutes. An answer that refuses (gated or private repository,
    bad token, unknown revision) is not a reason: ``huggingface_hub``'s
    :class:`~huggingface_hub.errors.HfHubHTTPError` propagates, for the caller to name its own fix. The
    reason never holds the token.
    """
    reason = offline_reason()
    if reason is not None:
        return reason
    try:
        HfApi(token=token).repo_info(repo, repo_type=repo_type, revision=revision, timeout=timeout_s)
    except HfHubHTTPError:
        raise  # the Hub answered: an OSError subclass, so it must not reach the next clause
    except network_errors() as exc:
        return f"the Hugging Face Hub cannot be reached ({type(exc).__name__} within {timeout_s:g} s)"
    return None


def network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts of whichever HTTP client this huggingface_hub uses (httpx2 or httpx
    in recent versions, requests in older ones). :class:`~huggingface_hub.errors.HfHubHTTPError` (the Hub
    answered) is an OSError too: catch it first."""
    errors: list[type[BaseException]] = [OSError]  # requests' errors and OfflineModeIsEnabled are OSErrors
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a Hub error's response, if it has one."""
    return getattr(getattr(exc, "response", None), "status_code", None)
