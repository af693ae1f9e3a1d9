"""The fetch_data stage: fill ``data/raw/`` with case zips in the APE-data layout.

``data.source`` picks where the zips come from:

- ``phantom``: generated (:mod:`ctdiff.data.phantom`), offline, deterministic from ``seed``.
- ``hf``: the Hugging Face dataset ``data.hf.repo`` at ``data.hf.revision``, downloaded with
  ``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), then
  linked into ``data/raw``. The token comes from the ``HF_TOKEN`` environment variable and is never
  printed or written. ``HF_HUB_OFFLINE=1`` uses the cache only.
- ``local``: a folder ``data.local_dir`` of zips, linked into ``data/raw``.

Layout of the output, whatever the source: ``raw_dir/APE/*.zip`` and ``raw_dir/non-APE/*.zip`` (the
category folder names of APE-data). For ``hf`` and ``local`` the source folders ``APE/`` and ``non-APE/``
are recognised case-insensitively (``ape``, ``Non-APE``, ``non_ape`` ...) and written under their
canonical names; zips directly in the source root are linked into the root of ``raw_dir``, which the
preprocess stage reads as category ``unknown``; other folders and files are ignored. A missing or empty
category folder is fine as long as some zip is found. Case ids are zip stems and must be unique across
folders. Label maps travel along where the source has them (``labels/<case_id>.nii.gz`` with
``labels/classes.json``, :mod:`ctdiff.data.labels`; the phantoms always do): they are linked into
``raw_dir/labels/`` for the cases linked, and preprocess carries them onto the common grid.

Links, not copies: each zip is hard-linked (same inode, no extra space; needs the same filesystem), else
symlinked (absolute path to the resolved file), else copied. The output folder is rebuilt whole in a
temporary sibling and swapped in (:func:`ctdiff.io.atomic_dir`), so a killed run leaves the previous
``raw_dir`` (or none) and never a half-written one.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ctdiff.data.labels import CLASSES_FILE, LABELS_DIR
from ctdiff.data.phantom import CATEGORIES, write_phantom_dataset
from ctdiff.io import atomic_dir
from ctdiff.params import HfDataParams, Params

ROOT_CATEGORY = "unknown"  # what the preprocess stage calls zips that sit in no category folder
DEFAULT_HF_PATTERNS = ("APE/*.zip", "non-APE/*.zip")
_PHANTOM_HINT = "or run on the built-in phantom data with `-S data.source=phantom`"


class DataFetchError(RuntimeError):
    """fetch_data cannot produce ``data/raw``; the message is one line that names the fix."""


@dataclass(frozen=True)
class FetchSummary:
    """What :func:`fetch_data` put into ``raw_dir``."""

    source: str
    raw_dir: Path
    counts: dict[str, int]  # category -> number of zips
    how: dict[str, int] = field(default_factory=dict)  # "generated" / "hardlink" / "symlink" / "copy" -> zips

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        """One-line report, e.g. ``fetch_data (phantom): 12 zips in data/raw: 6 APE, 6 non-APE [12 generated]``."""
        counts = ", ".join(f"{n} {category}" for category, n in self.counts.items())
        how = ", ".join(f"{n} {mode}" for mode, n in self.how.items())
        return f"fetch_data ({self.source}): {self.total} zips in {self.raw_dir}: {counts} [{how}]"


def fetch_data(params: Params, raw_dir: Path, progress: bool = False) -> FetchSummary:
    """Rebuild ``raw_dir`` from ``params.data.source``; raises :class:`DataFetchError` with the fix."""
    raw_dir = Path(raw_dir)
    data = params.data
    _remove_stale_builds(raw_dir)
    if data.source == "phantom":
        with atomic_dir(raw_dir) as tmp:
            paths = write_phantom_dataset(tmp, data.phantom, params.seed, progress=progress)
            counts = {category: sum(1 for p in paths if p.parent.name == category) for category in CATEGORIES}
        return FetchSummary("phantom", raw_dir, counts, {"generated": len(paths)})
    if data.source == "local":
        root = Path(data.local_dir).expanduser()
        if not root.is_dir():
            raise DataFetchError(
                f"data.local_dir={data.local_dir!r} is not a folder (resolved: {root.resolve()}); "
                f"point it at the folder holding APE/ and non-APE/ zips, {_PHANTOM_HINT}"
            )
        if root.resolve().is_relative_to(raw_dir.resolve()):
            # Rebuilding raw_dir swaps the old one out and deletes it: that must never hold the source.
            raise DataFetchError(f"data.local_dir={data.local_dir!r} lies inside the output folder {raw_dir}; "
                                 "keep the source zips in a folder of their own")
        zips = find_zips(root)
        if not zips:
            raise DataFetchError(
                f"data.local_dir={data.local_dir!r} holds no .zip files in APE/, non-APE/ or its top level; "
                f"point it at the APE-data folder, {_PHANTOM_HINT}"
            )
        return _link_all("local", zips, raw_dir, find_labels(root, zips))
    if data.source == "hf":
        snapshot = download_hf_snapshot(data.hf)
        zips = find_zips(snapshot, _hf_patterns(data.hf))
        if not zips:
            raise DataFetchError(
                f"the snapshot of {data.hf.repo}@{data.hf.revision} holds no zips matching "
                f"{list(_hf_patterns(data.hf))}; check data.hf.allow_patterns, {_PHANTOM_HINT}"
            )
        return _link_all("hf", zips, raw_dir, find_labels(snapshot, zips))
    raise DataFetchError(f"data.source={data.source!r} is not one of phantom, hf, local")


# ---------------------------------------------------------------------------------------- folders
def find_zips(root: Path, patterns: tuple[str, ...] | None = None) -> list[tuple[str, Path]]:
    """``(category, zip path)`` for the zips in ``root``'s category folders and top level.

    Category is ``APE`` or ``non-APE`` (folder names matched case-insensitively, ``_`` = ``-``), or
    :data:`ROOT_CATEGORY` for zips directly in ``root``. Hidden files (partial downloads) are skipped.
    ``patterns`` (fnmatch on the ``/``-separated path relative to ``root``, as huggingface_hub's
    ``allow_patterns``) keeps only matching zips. Raises :class:`DataFetchError` on a duplicate case id.
    """
    canonical = {c.lower().replace("_", "-"): c for c in CATEGORIES}
    found: list[tuple[str, Path]] = []
    folders = [(ROOT_CATEGORY, root)]
    folders += sorted((canonical[d.name.lower().replace("_", "-")], d) for d in root.iterdir()
                      if d.is_dir() and d.name.lower().replace("_", "-") in canonical)
    for category, folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() == ".zip" and not path.name.startswith(".") and path.is_file():
                found.append((category, path))
    if patterns:
        from huggingface_hub.utils import filter_repo_objects

        keep = set(filter_repo_objects([p.relative_to(root).as_posix() for _, p in found],
                                       allow_patterns=list(patterns)))
        found = [(c, p) for c, p in found if p.relative_to(root).as_posix() in keep]
    seen: dict[str, Path] = {}
    for _, path in found:
        if path.stem in seen:
            raise DataFetchError(
                f"case id {path.stem!r} appears twice ({seen[path.stem]} and {path}); case ids (zip names) must be "
                "unique across APE/ and non-APE/"
            )
        seen[path.stem] = path
    return found


def find_labels(root: Path, zips: list[tuple[str, Path]]) -> list[Path]:
    """Label maps the source holds for the cases being linked: ``root/labels/<case_id>.nii.gz`` and the
    class table ``root/labels/classes.json`` (:mod:`ctdiff.data.labels`); none without the table."""
    folder = root / LABELS_DIR
    if not (folder / CLASSES_FILE).is_file():
        return []
    maps = [folder / f"{path.stem}.nii.gz" for _, path in zips]
    return [folder / CLASSES_FILE, *(m for m in maps if m.is_file())]


def link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` show ``src``'s bytes without copying where possible; returns how:
    ``hardlink``, ``symlink`` or ``copy``. ``src`` symlinks (the HF cache's) are resolved first."""
    src = src.resolve()
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        pass  # another filesystem, or links not allowed there
    try:
        os.symlink(src, dst)
        return "symlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _link_all(source: str, zips: list[tuple[str, Path]], raw_dir: Path, labels: list[Path]) -> FetchSummary:
    how: Counter[str] = Counter()
    with atomic_dir(raw_dir) as tmp:
        for category in CATEGORIES:
            (tmp / category).mkdir()
        for category, path in zips:
            folder = tmp if category == ROOT_CATEGORY else tmp / category
            how[link_or_copy(path, folder / path.name)] += 1
        if labels:
            (tmp / LABELS_DIR).mkdir()
            for path in labels:
                link_or_copy(path, tmp / LABELS_DIR / path.name)
    counts = Counter(category for category, _ in zips)
    ordered = {c: counts.get(c, 0) for c in (*CATEGORIES, ROOT_CATEGORY) if c in CATEGORIES or counts.get(c)}
    return FetchSummary(source, raw_dir, ordered, dict(how))


def _remove_stale_builds(raw_dir: Path) -> None:
    """Delete the temporary siblings a killed run of this stage left (``.raw.*.tmp``, ``.raw.old``)."""
    parent = raw_dir.parent
    if not parent.is_dir():
        return
    for stale in [*parent.glob(f".{raw_dir.name}.*.tmp"), parent / f".{raw_dir.name}.old"]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------- Hugging Face
def _hf_patterns(hf: HfDataParams) -> tuple[str, ...]:
    return hf.allow_patterns or DEFAULT_HF_PATTERNS


def download_hf_snapshot(hf: HfDataParams) -> Path:
    """Download (or find in the HF cache) ``hf.repo`` at ``hf.revision``; returns the snapshot folder.

    Online, one short request (:func:`ctdiff.data.hub.hub_unreachable_reason`, ``HF_HUB_ETAG_TIMEOUT`` seconds,
    default 10, no retries) first resolves the revision and checks access, so a dead network or a missing
    token fails in seconds instead of hanging; when it cannot reach the Hub the cache is used as with
    ``HF_HUB_OFFLINE=1``. Every failure becomes one :class:`DataFetchError` line that names the fix and never
    contains the token.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from ctdiff.data.hub import http_status, hub_unreachable_reason, network_errors

    token = os.environ.get("HF_TOKEN") or None
    where = f"{hf.repo}@{hf.revision}"
    denied = (
        f"access to dataset {hf.repo} was refused (gated, private or bad token): set HF_TOKEN to a token of an "
        f"account that accepted the dataset's terms at https://huggingface.co/datasets/{hf.repo}, {_PHANTOM_HINT}"
    )
    try:
        why_cache_only = hub_unreachable_reason(hf.repo, "dataset", hf.revision, constants.HF_HUB_ETAG_TIMEOUT, token)
    except RevisionNotFoundError as exc:
        raise DataFetchError(f"{where}: revision not found; set data.hf.revision to a branch, tag or "
                             "commit of the dataset") from exc
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise DataFetchError(denied) from exc
    except HfHubHTTPError as exc:
        if http_status(exc) in (401, 403):
            raise DataFetchError(denied) from exc
        # Hub trouble (5xx): the cache may still hold the snapshot.
        why_cache_only = f"the Hugging Face Hub answered HTTP {http_status(exc)}"
    try:
        folder = snapshot_download(
            hf.repo,
            repo_type="dataset",
            revision=hf.revision,  # not the resolved commit: the cache then records refs/<branch> for offline runs
            allow_patterns=list(_hf_patterns(hf)),
            token=token,
            local_files_only=why_cache_only is not None,
            etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise DataFetchError(denied) from exc
    except LocalEntryNotFoundError as exc:
        why = why_cache_only or "the Hugging Face Hub cannot be reached"  # the connection dropped after the check
        raise DataFetchError(
            f"{where}: {why} and the Hugging Face cache ({constants.HF_HUB_CACHE}) holds no complete snapshot of it; "
            f"download it once online (unset HF_HUB_OFFLINE, set HF_TOKEN), {_PHANTOM_HINT}"
        ) from exc
    except HfHubHTTPError as exc:
        if http_status(exc) in (401, 403):
            raise DataFetchError(denied) from exc
        raise DataFetchError(f"{where}: download failed (HTTP {http_status(exc)}); rerun later, "
                             f"{_PHANTOM_HINT}") from exc
    except network_errors() as exc:
        # Only the class name: a transport error's text is not ours to vouch for.
        raise DataFetchError(f"{where}: download interrupted ({type(exc).__name__}); rerun to resume (finished "
                             f"files stay in the Hugging Face cache), {_PHANTOM_HINT}") from exc
    return Path(folder)
