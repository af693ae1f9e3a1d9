"""Preprocess benchmark: ctdiff per case vs. ``unzip`` + ``dcm2niix -z n``, and the 2-worker speed-up.

    python benchmarks/bench_preprocess.py            # realistic: 300 x 512^2 thin + 60 x 512^2 thick
    python benchmarks/bench_preprocess.py --slices 60 --size 256   # a quick look

Generates one realistic case zip (APE-data layout, written with the project's DICOM writer), then
times, side by side in one run: the project's whole per-case preprocessing (read both series from the
zip in memory, check, resample series 1 onto series 2's grid, write int16 .npy) against the reference
converter on the same zip (extract with ``unzip``, convert both series with ``dcm2niix -z n``), and the
stage over 2 and 4 cases with 1 and 2 workers. Installs Debian's dcm2niix if it is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from ctdiff.data.dicom_write import SeriesSpec, encode_series
from ctdiff.data.preprocess import preprocess
from ctdiff.params import load_params, with_overrides

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"


def ensure_dcm2niix() -> str:
    exe = shutil.which("dcm2niix")
    if exe:
        return exe
    print("dcm2niix not found: installing Debian's package (needs root)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dcm2niix"], check=True, env=env)
    return shutil.which("dcm2niix") or sys.exit("dcm2niix could not be installed")


def chest_like_volume(n_slices: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(D, H, W) HU: air, an elliptical body, two lungs, a spine, noise: realistic DICOM entropy."""
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    body = (x / 0.42) ** 2 + (y / 0.3) ** 2 < 1
    lungs = ((np.abs(x) - 0.18) / 0.13) ** 2 + (y / 0.2) ** 2 < 1
    spine = (x / 0.05) ** 2 + ((y - 0.2) / 0.05) ** 2 < 1
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    plane[spine] = 500.0
    vol = np.repeat(plane[None].astype(np.float32), n_slices, axis=0)
    vol += np.sin(np.arange(n_slices) / 7.0)[:, None, None].astype(np.float32) * 30 * body
    vol += rng.normal(0, 15, vol.shape).astype(np.float32)
    return vol


def write_case(path: Path, n_thin: int, n_thick: int, size: int) -> None:
    rng = np.random.default_rng(0)
    thin = chest_like_volume(n_thin, size, rng)
    slab = n_thin // n_thick
    thick = thin[: n_thick * slab].reshape(n_thick, slab, size, size).mean(axis=1)
    pixel = 350.0 / size
    common = dict(frame_of_reference_uid="1.2.826.0.1.3680043.10.1", study_uid="1.2.826.0.1.3680043.10.2")
    thin_spec = SeriesSpec(spacing_mm=(pixel, pixel, 1.0), origin_mm=(-175.0, -175.0, -300.0), **common)
    thick_spec = SeriesSpec(spacing_mm=(pixel, pixel, float(slab)),
                            origin_mm=(-175.0, -175.0, -300.0 + (slab - 1) / 2), **common)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for folder, hu, spec in (("1", thick, thick_spec), ("2", thin, thin_spec)):
            for name, data in encode_series(hu, spec):
                zf.writestr(f"{path.stem}/{folder}/{name}", data)


def time_ctdiff(raw: Path, workers: int) -> float:
    params = with_overrides(load_params(REPO / "params.yaml"), {"preprocess.workers": workers,
                                                                "preprocess.min_cases": 1})
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        start = time.perf_counter()
        report = preprocess(params, raw, Path(tmp) / "processed", progress=False)
        elapsed = time.perf_counter() - start
    if report["n_ok"] != report["n_found"]:
        sys.exit(f"benchmark case rejected: {report['cases']}")
    return elapsed


def time_reference(zip_path: Path, dcm2niix: str) -> float:
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        extracted, nifti = Path(tmp) / "x", Path(tmp) / "nii"
        nifti.mkdir()
        start = time.perf_counter()
        subprocess.run(["unzip", "-q", str(zip_path), "-d", str(extracted)], check=True)
        subprocess.run([dcm2niix, "-z", "n", "-o", str(nifti), str(extracted)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if len(list(nifti.glob("*.nii"))) < 2:
            sys.exit("dcm2niix did not write both series")
    return elapsed


def raw_with_copies(zip_path: Path, n: int) -> Path:
    raw = OUT / f"raw_{n}"
    shutil.rmtree(raw, ignore_errors=True)
    for i in range(n):
        dest = raw / ("APE" if i % 2 else "non-APE") / f"case_{i:03d}.zip"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(zip_path, dest)
    return raw


def best_of(repeats: int, fn, *args) -> float:
    return min(fn(*args) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300, help="thin series slices")
    parser.add_argument("--thick", type=int, default=60, help="thick series slices")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for every timing")
    args = parser.parse_args()
    dcm2niix = ensure_dcm2niix()
    OUT.mkdir(exist_ok=True)
    zip_path = OUT / f"case_{args.slices}x{args.size}.zip"
    if not zip_path.exists():
        print(f"writing {zip_path.name} ...", file=sys.stderr)
        write_case(zip_path, args.slices, args.thick, args.size)
    mb = zip_path.stat().st_size / 1e6

    one = raw_with_copies(zip_path, 1)
    t_ctdiff = best_of(args.repeats, time_ctdiff, one, 1)
    t_ref = best_of(args.repeats, time_reference, zip_path, dcm2niix)
    scaling = []
    for n in (2, 4):
        raw = raw_with_copies(zip_path, n)
        scaling.append((n, best_of(args.repeats, time_ctdiff, raw, 1), best_of(args.repeats, time_ctdiff, raw, 2)))

    print(f"\ncase: thin {args.slices}x{args.size}x{args.size} + thick {args.thick}x{args.size}x{args.size}, "
          f"zip {mb:.0f} MB; {os.cpu_count()} cores, {platform.machine()}, python {platform.python_version()}\n")
    print("| per case | ctdiff preprocess s | unzip + dcm2niix -z n s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| 1 case, 1 worker | {t_ctdiff:.2f} | {t_ref:.2f} | {t_ref / t_ctdiff:.2f}x |")
    print("\n| stage | 1 worker s | 2 workers s | speed-up |")
    print("|---|---:|---:|---:|")
    for n, t1, t2 in scaling:
        print(f"| {n} cases | {t1:.2f} | {t2:.2f} | {t1 / t2:.2f}x |")


if __name__ == "__main__":
    main()
