"""raw case zips -> ``data/processed/`` (the format of docs/data-format.md).

Per case: read both DICOM series from the zip (:mod:`ctdiff.data.dicom`), define the common grid from
series 2 (restricted to the slices series 1 physically covers, optionally respaced and cropped/padded),
resample both onto it, and store int16 HU. Cases run in parallel worker processes; a bad case is
recorded in ``report.json`` and never stops the others. Each case folder is written atomically and
carries a fingerprint of its zip and of the params that shaped it, so a rerun after a killed job
redoes only what is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ctdiff.data.dicom import CaseRejected, Series, read_case
from ctdiff.data.grid import Grid, resample, slice_range_covered, to_int16_hu
from ctdiff.data.labels import labels_fingerprint, labels_on_grid, read_case_labels
from ctdiff.io import atomic_dir, atomic_save_npy, atomic_write_json, digest, remove_stale_temporaries
from ctdiff.params import Params, PreprocessParams, SplitParams, to_dict

# Bump when the processing itself changes, so fingerprints of old outputs stop matching.
PROCESSING_VERSION = 2  # 2: labels.npy and meta.json "labels" where the case has a label map
SPLITS = ("train", "val", "test")


class PreprocessError(RuntimeError):
    """The stage as a whole cannot succeed (e.g. too few usable cases)."""


@dataclass(frozen=True)
class CaseInput:
    zip_path: Path
    case_id: str
    category: str
    raw_dir: Path | None = None  # where labels/<case_id>.nii.gz would be (ctdiff.data.labels)


@dataclass
class CaseOutcome:
    case_id: str
    category: str
    status: str  # "ok" | "rejected"
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    reused: bool = False

    def report_entry(self) -> dict:
        return {"case_id": self.case_id, "category": self.category, "status": self.status,
                "reason": self.reason, "warnings": list(self.warnings)}


# ------------------------------------------------------------------------------------------ discovery
def find_cases(raw_dir: Path) -> tuple[list[CaseInput], list[CaseOutcome]]:
    """All ``*.zip`` under ``raw_dir``; category = the folder under ``raw_dir`` (``APE``, ``non-APE``).

    Returns the cases to process and rejections found already here (duplicate case ids).
    """
    inputs: list[CaseInput] = []
    rejected: list[CaseOutcome] = []
    seen: dict[str, Path] = {}
    for zip_path in sorted(raw_dir.rglob("*.zip"), key=lambda p: p.relative_to(raw_dir).as_posix()):
        if any(part.startswith(".") for part in zip_path.relative_to(raw_dir).parts):
            continue  # a temporary file of an interrupted download
        rel = zip_path.relative_to(raw_dir)
        category = rel.parts[0] if len(rel.parts) > 1 else "unknown"
        case_id = zip_path.stem
        if case_id in seen:
            rejected.append(CaseOutcome(case_id, category, "rejected",
                                       f"duplicate case id: also in {seen[case_id].relative_to(raw_dir).parent}"))
            continue
        seen[case_id] = zip_path
        inputs.append(CaseInput(zip_path, case_id, category, raw_dir))
    return inputs, rejected


def zip_fingerprint(zip_path: Path) -> str:
    """Content fingerprint of a zip from its central directory (names, sizes, CRC-32s): cheap even
    for multi-GB archives, and unchanged by copies, links or a DVC checkout (unlike mtimes)."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
    except (zipfile.BadZipFile, OSError):
        h.update(f"unreadable:{zip_path.stat().st_size}".encode())
    return h.hexdigest()


def params_fingerprint(p: PreprocessParams) -> str:
    """Hash of the knobs that shape one case's arrays (not workers, split or min_cases)."""
    shaping = {k: v for k, v in to_dict(p).items() if k not in ("workers", "split", "min_cases")}
    shaping["version"] = PROCESSING_VERSION
    return digest(shaping)


# ------------------------------------------------------------------------------------------ one case
def common_grid(series1: Grid, series2: Grid, p: PreprocessParams) -> tuple[Grid, list[str]]:
    """Series 2's grid, restricted to the slices series 1 covers, then respaced and cropped/padded."""
    warnings: list[str] = []
    grid = series2
    k0, k1 = slice_range_covered(grid, series1)
    if k1 <= k0:
        raise CaseRejected("series 1 does not cover any slice of series 2 along the slice axis")
    if (k0, k1) != (0, grid.shape[0]):
        warnings.append(f"series 2 cropped to slices {k0}..{k1 - 1} of {grid.shape[0]}: "
                        f"series 1 does not cover the rest")
        grid = grid.subgrid((k0, 0, 0), (k1 - k0, grid.shape[1], grid.shape[2]))
    if p.spacing_mm:
        grid = grid.with_spacing(p.spacing_mm)
    if p.shape:
        grid = grid.crop_or_pad(p.shape)
    return grid, warnings


def process_case(case: CaseInput, out_dir: Path, p: PreprocessParams, fingerprint: str) -> CaseOutcome:
    """Read, check, resample and write one case to ``out_dir/<case_id>/`` (atomically).

    ``meta.json`` gets ``split`` later, once all cases are known (:func:`write_splits`).
    """
    try:
        pair = read_case(case.zip_path, min_slices=p.min_slices, allow_gaps=p.allow_gaps,
                         max_members=p.max_zip_members,
                         max_unzipped_bytes=int(p.max_unzipped_gb * 1024**3))
        s1, s2 = pair.series1, pair.series2
        grid, grid_warnings = common_grid(s1.grid, s2.grid, p)
        target_hu = s2.hu if grid == s2.grid else resample(s2.hu, s2.grid, grid, "linear")
        source_hu = resample(s1.hu, s1.grid, grid, p.interpolator)
    except CaseRejected as exc:
        return CaseOutcome(case.case_id, case.category, "rejected", str(exc))
    except MemoryError:
        return CaseOutcome(case.case_id, case.category, "rejected", "out of memory while reading the case")

    meta = {
        "case_id": case.case_id,
        "category": case.category,
        "split": None,
        "grid": grid.to_meta(),
        "series1": _series_summary(pair.series1),
        "series2": _series_summary(pair.series2),
        "warnings": [*pair.warnings, *grid_warnings],
        "interpolator": p.interpolator,  # how source.npy was made from series 1 (a trained model needs the same)
        "fingerprint": fingerprint,
    }
    labels, case_labels = None, None
    if case.raw_dir is not None:
        try:
            case_labels = read_case_labels(case.raw_dir, case.case_id)
            if case_labels is not None and not same_geometry(case_labels.grid, s2.grid):
                raise ValueError(f"its grid {case_labels.grid.shape} at {case_labels.grid.origin_mm} is not series 2's "
                                 f"{s2.grid.shape} at {s2.grid.origin_mm}")
        except (ValueError, RuntimeError) as exc:  # RuntimeError: SimpleITK cannot read the file
            # The case is still a good pair; it only loses its structure metrics.
            meta["warnings"].append(f"label map ignored: {str(exc)[:300]}")
            case_labels = None
    if case_labels is not None:
        labels = labels_on_grid(case_labels, grid)
        meta["labels"] = {"classes": {str(k): v for k, v in sorted(case_labels.classes.items())},
                          "counts": {str(k): int(n) for k, n in zip(*np.unique(labels, return_counts=True))}}
    with atomic_dir(out_dir / case.case_id) as tmp:
        atomic_save_npy(tmp / "source.npy", to_int16_hu(source_hu))
        atomic_save_npy(tmp / "target.npy", to_int16_hu(target_hu))
        # Series 1 as acquired (thick slices, its own grid): evaluate's baselines and panels start from it.
        atomic_save_npy(tmp / "series1.npy", to_int16_hu(s1.hu))
        if labels is not None:  # structure truth on the common grid (nearest neighbour, same crop)
            atomic_save_npy(tmp / "labels.npy", labels)
        atomic_write_json(tmp / "meta.json", meta)
    return CaseOutcome(case.case_id, case.category, "ok", "", meta["warnings"])


def same_geometry(a: Grid, b: Grid, tol_mm: float = 1e-2) -> bool:
    """Same voxel lattice: shape, spacing, origin and direction (to DICOM's decimal-string precision)."""
    return (a.shape == b.shape and np.allclose(a.spacing_mm, b.spacing_mm, rtol=1e-4, atol=0)
            and np.allclose(a.origin_mm, b.origin_mm, atol=tol_mm) and np.allclose(a.direction, b.direction, atol=1e-4))


def _series_summary(series: Series) -> dict:
    """Acquisition geometry worth keeping (no identifiers)."""
    return {
        "grid": series.grid.to_meta(),
        "n_slices": int(series.n_slices),
        "spacing": [round(float(v), 6) for v in series.spacing_mm],
        "slice_thickness": None if series.slice_thickness_mm is None else round(float(series.slice_thickness_mm), 6),
    }


def _reusable(case_dir: Path, fingerprint: str) -> CaseOutcome | None:
    """The finished result already on disk for this fingerprint, if any (resume after a kill)."""
    meta_path = case_dir / "meta.json"
    if not (meta_path.is_file() and (case_dir / "source.npy").is_file() and (case_dir / "target.npy").is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return CaseOutcome(meta["case_id"], meta["category"], "ok", "", list(meta.get("warnings", [])), reused=True)


def _run_case(args: tuple[CaseInput, Path, PreprocessParams, str, int]) -> CaseOutcome:
    case, out_dir, p, fingerprint, itk_threads = args
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    try:
        return process_case(case, out_dir, p, fingerprint)
    except Exception as exc:  # one broken case must never stop the others
        # The type and message only: tracebacks of DICOM parsers can quote header values.
        return CaseOutcome(case.case_id, case.category, "rejected",
                          f"unexpected error: {type(exc).__name__}: {str(exc)[:200]}")


# --------------------------------------------------------------------------------------------- splits
def assign_splits(cases: Iterable[tuple[str, str]], fractions: SplitParams, seed: int) -> dict[str, list[str]]:
    """Patient-level split, stratified by category, deterministic from ``seed``.

    ``cases`` are (case_id, category). Within each category the sorted ids are shuffled with
    ``seed`` and cut by the fractions (largest remainders get the spare cases), so the outcome does
    not depend on discovery order and a case id is in exactly one split. Every split with a nonzero
    fraction gets at least one case: where the per-category cut leaves one empty (5 cases, 3 + 2, at
    0.6 / 0.2 / 0.2 give no test case), a case moves to it from the split with the most cases beyond its
    share. Fewer cases than such splits raise :class:`PreprocessError` naming the fractions and counts.
    """
    by_category: dict[str, list[str]] = {}
    for case_id, category in cases:
        by_category.setdefault(category, []).append(case_id)
    shares = dict(zip(SPLITS, (fractions.train, fractions.val, fractions.test)))
    wanted = [name for name in SPLITS if shares[name] > 0]
    n = sum(len(ids) for ids in by_category.values())
    check_split_counts(n, fractions)
    # blocks[category][split]: that category's cases in that split, in shuffled order
    blocks: dict[str, dict[str, list[str]]] = {}
    for i, category in enumerate(sorted(by_category)):
        ids = sorted(by_category[category])
        rng = np.random.default_rng([seed, i])
        order = [ids[j] for j in rng.permutation(len(ids))]
        counts = _largest_remainder(len(ids), list(shares.values()))
        blocks[category] = {}
        start = 0
        for name, count in zip(SPLITS, counts):
            blocks[category][name] = order[start:start + count]
            start += count
    for empty in wanted:
        totals = {name: sum(len(b[name]) for b in blocks.values()) for name in SPLITS}
        if totals[empty]:
            continue
        donor = max((name for name in SPLITS if totals[name] > 1),
                    key=lambda name: (totals[name] - n * shares[name], -SPLITS.index(name)))
        category = max(sorted(blocks), key=lambda c: len(blocks[c][donor]))
        blocks[category][empty].append(blocks[category][donor].pop())
    return {name: sorted(case_id for b in blocks.values() for case_id in b[name]) for name in SPLITS}


def check_split_counts(n_cases: int, fractions: SplitParams) -> None:
    """Raise :class:`PreprocessError` when ``n_cases`` cannot give every nonzero-fraction split one case."""
    shares = dict(zip(SPLITS, (fractions.train, fractions.val, fractions.test)))
    wanted = [name for name in SPLITS if shares[name] > 0]
    if n_cases < len(wanted):
        shown = ", ".join(f"{name} {shares[name]:g}" for name in SPLITS)
        raise PreprocessError(f"{n_cases} case(s) cannot fill the {len(wanted)} splits with a nonzero fraction "
                              f"(preprocess.split: {shown}); each needs at least one case: add cases or set a "
                              f"fraction to 0")


def _largest_remainder(n: int, fractions: list[float]) -> list[int]:
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    for j in sorted(range(len(exact)), key=lambda j: (counts[j] - exact[j], j))[: n - sum(counts)]:
        counts[j] += 1
    return counts


def write_splits(out_dir: Path, splits: dict[str, list[str]]) -> None:
    for name, ids in splits.items():
        for case_id in ids:
            meta_path = out_dir / case_id / "meta.json"
            meta = json.loads(meta_path.read_text())
            if meta.get("split") != name:
                meta["split"] = name
                atomic_write_json(meta_path, meta)
    atomic_write_json(out_dir / "splits.json", splits)


# ------------------------------------------------------------------------------------------ the stage
def preprocess(params: Params, raw_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Run the preprocess stage; returns the report dict (also written to ``out_dir/report.json``).

    Raises :class:`PreprocessError` (after writing the report) when fewer than
    ``preprocess.min_cases`` cases are usable.
    """
    p = params.preprocess
    if not raw_dir.is_dir():
        raise PreprocessError(f"{raw_dir} does not exist: run the fetch_data stage first")
    inputs, results = find_cases(raw_dir)
    if not inputs:
        raise PreprocessError(f"no case zips under {raw_dir}")
    check_split_counts(len(inputs), p.split)  # before any work: too few zips can never fill the splits
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    _remove_unknown_cases(out_dir, {c.case_id for c in inputs})

    pfp = params_fingerprint(p)
    todo = []
    for case in inputs:
        labels = labels_fingerprint(raw_dir, case.case_id)
        fingerprint = f"{zip_fingerprint(case.zip_path)}:{labels}:{case.category}:{pfp}"
        reused = _reusable(out_dir / case.case_id, fingerprint)
        if reused is not None:
            results.append(reused)
        else:
            shutil.rmtree(out_dir / case.case_id, ignore_errors=True)
            todo.append((case, out_dir, p, fingerprint))

    workers = min(p.n_workers, max(1, len(todo)))
    itk_threads = max(1, (os.cpu_count() or 1) // workers)
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress)
    if workers == 1:
        for args in todo:
            results.append(_run_case((*args, itk_threads)))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_run_case, (*args, itk_threads)) for args in todo]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update()
    bar.close()

    results.sort(key=lambda r: r.case_id)
    ok = [r for r in results if r.status == "ok"]
    report = {
        "n_found": len(results),
        "n_ok": len(ok),
        "n_rejected": len(results) - len(ok),
        "cases": [r.report_entry() for r in results],
    }
    atomic_write_json(out_dir / "report.json", report)
    if len(ok) < p.min_cases:
        raise PreprocessError(
            f"only {len(ok)} usable case(s) of {len(results)} (preprocess.min_cases={p.min_cases}); "
            f"see {out_dir / 'report.json'} for the reasons")
    write_splits(out_dir, assign_splits(((r.case_id, r.category) for r in ok), p.split, params.seed))
    return report


def _remove_unknown_cases(out_dir: Path, case_ids: set[str]) -> None:
    """Drop case folders whose zip is gone (the out is persistent between runs)."""
    for child in out_dir.iterdir():
        if child.is_dir() and not child.name.startswith(".") and child.name not in case_ids:
            shutil.rmtree(child)
