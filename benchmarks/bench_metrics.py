"""Evaluation-code benchmark on full CT volumes: wall seconds and peak memory, old whole-volume code vs new.

    python benchmarks/bench_metrics.py                          # 300 x 512 x 512, 2 predictions (~5 min, 2 cores)
    python benchmarks/bench_metrics.py --shape 40 128 128 --rungs 3
    python benchmarks/bench_metrics.py --old-shape 150 512 512  # the old paths on a smaller volume (less memory)

Scores ``--rungs`` noisy predictions against one synthetic truth (smoothed noise in HU over [-1000, 1000]
inside an elliptical body, air outside; the body mask (> -500 HU) has real edges) and projects each onto a
synthetic series 1 (5 mm box slabs on a 1 mm grid):

- image metrics, old: ``reconstruction_metrics`` as it was before :class:`ctdiff.metrics.image.TruthScorer`
  (reimplemented below from the same MONAI calls: the whole volume's [0, 1] and clipped HU copies, body
  mask and SSIM map, once per prediction); new: one ``TruthScorer`` per truth, ``score`` per prediction.
- slab projection, old: ``SlabOperator.project`` as it was (the whole volume in float64, ``pinv`` per call);
  new: ``SlabOperator.project`` (blocks of rows, cached ``pinv``).

Each variant runs in a fresh interpreter that first imports everything and loads the volumes (``.npy``
written once by another child); ``peak growth`` is that process's ``getrusage`` peak RSS minus its RSS just
before the variant started, so it is what the computation itself costs on top of its inputs. The old and new
results are compared too (largest difference over the predictions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HU_RANGE = (-1000.0, 1000.0)
SLAB_MM, THIN_MM = 5.0, 1.0
OLD_BYTES_PER_VOXEL = 64  # generous bound on the old image-metric path's peak (about 16 float32 volumes)
OLD_LIMIT_BYTES = 14 << 30


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ the old code
def old_reconstruction_metrics(pred_hu, truth_hu, hu_range):
    """reconstruction_metrics before TruthScorer: every step on the whole volume, per prediction."""
    import torch
    from monai.metrics import MAEMetric, PSNRMetric
    from monai.metrics.regression import compute_ssim_and_cs
    from monai.transforms.utils_morphological_ops import dilate, erode

    from ctdiff.data.intensity import to_hu, to_x01
    from ctdiff.metrics.image import PSNR_CAP_DB, _window

    pred01, truth01 = to_x01(pred_hu, hu_range), to_x01(truth_hu, hu_range)
    pred_clipped, truth_clipped = to_hu(pred01, hu_range), to_hu(truth01, hu_range)
    raw = (torch.as_tensor(truth_hu).float() > -500.0).float()[None, None]
    mask = erode(dilate(raw, 3), 3)[0, 0] > 0.5
    window = [_window(s) for s in truth01.shape]
    ssim_map = compute_ssim_and_cs(pred01[None, None], truth01[None, None], spatial_dims=3, kernel_size=window,
                                   kernel_sigma=[1.5] * 3, data_range=1.0)[0][0, 0]

    def psnr(p, t):
        return min(float(PSNRMetric(max_val=1.0)(p.reshape(1, 1, -1), t.reshape(1, 1, -1)).item()), PSNR_CAP_DB)

    def mae(p, t):
        return float(MAEMetric()(p.reshape(1, 1, -1), t.reshape(1, 1, -1)).item())

    d, h, w = (k // 2 for k in window)
    centres = mask[d:mask.shape[0] - d, h:mask.shape[1] - h, w:mask.shape[2] - w]
    return {
        "psnr": psnr(pred01, truth01),
        "ssim": float(ssim_map.mean()),
        "mae_hu": mae(pred_clipped, truth_clipped),
        "psnr_body": psnr(pred01[mask], truth01[mask]),
        "ssim_body": float(ssim_map[centres].mean()),
        "mae_hu_body": mae(pred_clipped[mask], truth_clipped[mask]),
    }


def old_project(op, thin, measured):
    """SlabOperator.project before the row blocks: the whole volume in float64."""
    import numpy as np

    thin64 = np.asarray(thin, dtype=np.float64)
    residual = np.asarray(measured, dtype=np.float64) - np.tensordot(op.weights, thin64, axes=(1, 0))
    correction = np.tensordot(np.linalg.pinv(op.weights), residual, axes=(1, 0))
    return (thin64 + correction).astype(np.float32)


# ------------------------------------------------------------------------------------------ the children
def operator(depth: int):
    import numpy as np

    from ctdiff.data.slab import SlabOperator

    n = int(SLAB_MM / THIN_MM)
    centres = [(j * n + (n - 1) / 2) * THIN_MM for j in range(depth // n)]
    return SlabOperator.from_geometry(np.arange(depth) * THIN_MM, THIN_MM, centres, SLAB_MM)


def generate(data: Path, shape: tuple[int, int, int], rungs: int, seed: int = 0) -> dict:
    """Truth, predictions and series-1 measurements as .npy (float32) in ``data``."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    depth, height, width = shape
    coarse = torch.from_numpy(rng.normal(size=(max(2, depth // 6), max(2, height // 12), max(2, width // 12)))
                              .astype(np.float32))
    z = torch.nn.functional.interpolate(coarse[None, None], size=shape, mode="trilinear", align_corners=False)
    z = z[0, 0].numpy()
    z /= z.std()
    yy, xx = np.ogrid[:height, :width]
    body = ((yy - height / 2) / (0.42 * height)) ** 2 + ((xx - width / 2) / (0.46 * width)) ** 2 <= 1.0
    truth = np.where(body[None], np.float32(-100.0) + np.float32(450.0) * z, np.float32(-1000.0))
    del z
    truth += rng.normal(0.0, 20.0, shape).astype(np.float32)
    np.clip(truth, *HU_RANGE, out=truth)
    np.save(data / "truth.npy", truth)
    op = operator(depth)
    np.save(data / "measured.npy", op.forward(truth))
    for i in range(rungs):
        pred = truth + rng.normal(5.0 * i, 30.0 + 15.0 * i, shape).astype(np.float32)
        np.save(data / f"pred_{i}.npy", pred)
    return {"body_fraction": float((truth > -500.0).mean()), "slabs": op.n_slabs}


def worker(variant: str, data: Path, rungs: int) -> dict:
    """Load the volumes, run one variant on every prediction, report seconds and peak RSS growth."""
    import numpy as np
    import torch  # noqa: F401 (imported before the baseline RSS, as every variant needs it)

    from ctdiff.metrics.image import TruthScorer

    truth = np.load(data / "truth.npy")
    preds = [np.load(data / f"pred_{i}.npy") for i in range(rungs)]
    measured = np.load(data / "measured.npy") if variant.startswith("project") else None
    op = operator(truth.shape[0])
    rss_before, peak_before = _rss_mb(), _peak_mb()
    started = time.perf_counter()
    results: list = []
    if variant == "metrics_old":
        results = [old_reconstruction_metrics(p, truth, HU_RANGE) for p in preds]
    elif variant == "metrics_new":
        scorer = TruthScorer(truth, HU_RANGE)
        results = [scorer.score(p) for p in preds]
    elif variant in ("project_old", "project_new"):
        for i, p in enumerate(preds):
            out = old_project(op, p, measured) if variant == "project_old" else op.project(p, measured)
            if i == 0:
                np.save(data / f"{variant}.npy", out)  # compared by the parent
            results.append(float(np.abs(op.forward(out) - measured).max()))
            del out
    else:
        raise ValueError(f"unknown variant {variant!r}")
    seconds = time.perf_counter() - started
    peak = _peak_mb()
    return {"variant": variant, "seconds": seconds, "rss_before_mb": rss_before, "peak_before_mb": peak_before,
            "peak_mb": peak, "growth_mb": max(0.0, peak - rss_before), "results": results}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the parent
def _prepare(root: Path, shape: tuple[int, int, int], rungs: int) -> tuple[Path, dict]:
    data = root / "x".join(map(str, shape))
    data.mkdir()
    info = run_child("--generate", str(data), "--shape", *map(str, shape), "--rungs", str(rungs))
    return data, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--rungs", type=int, default=2, help="predictions scored against the one truth")
    parser.add_argument("--old-shape", nargs=3, type=int, metavar=("D", "H", "W"),
                        help="run the old paths at this shape instead (default: --shape, or half its depth "
                             "when the old image metrics could need more than 14 GB or the free memory)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.generate:
        print(json.dumps(generate(Path(args.generate), shape, args.rungs)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), args.rungs)))
        return 0

    import numpy as np
    import psutil
    import torch

    available = psutil.virtual_memory().available
    old_shape = tuple(args.old_shape) if args.old_shape else shape
    if not args.old_shape and math.prod(shape) * OLD_BYTES_PER_VOXEL > min(OLD_LIMIT_BYTES, 0.7 * available):
        old_shape = (max(11, shape[0] // 2), *shape[1:])
        print(f"# old paths at {old_shape}: at {shape} they could need more than "
              f"{min(OLD_LIMIT_BYTES, 0.7 * available) / 2**30:.1f} GB")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GB "
          f"({available / 2**30:.0f} GB available), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}, python {platform.python_version()}")
    root = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    started = time.perf_counter()
    try:
        data, info = _prepare(root, shape, args.rungs)
        old_data = data if old_shape == shape else _prepare(root, old_shape, args.rungs)[0]
        print(f"# truth {'x'.join(map(str, shape))}: body fraction {info['body_fraction']:.2f}, "
              f"{info['slabs']} slabs of {SLAB_MM:g} mm; {args.rungs} predictions", flush=True)
        runs = {}
        for variant in ("metrics_old", "metrics_new", "project_old", "project_new"):
            where = old_data if variant.endswith("_old") else data
            runs[variant] = run_child("--worker", variant, "--data", str(where), "--rungs", str(args.rungs))
            r = runs[variant]
            print(f"# {variant}: {r['seconds']:.1f} s, RSS before {r['rss_before_mb']:.0f} MB, peak "
                  f"{r['peak_mb']:.0f} MB (peak before {r['peak_before_mb']:.0f} MB)", flush=True)
        print()
        print(f"| computation ({args.rungs} predictions) | volume old | volume new | old s | new s | old/new time "
              "| old peak growth MB | new peak growth MB | old/new memory |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for name, old, new in (("image metrics (6 of METRIC_NAMES)", "metrics_old", "metrics_new"),
                               ("slab projection", "project_old", "project_new")):
            o, n = runs[old], runs[new]
            print(f"| {name} | {'x'.join(map(str, old_shape))} | {'x'.join(map(str, shape))} | {o['seconds']:.1f} "
                  f"| {n['seconds']:.1f} | {o['seconds'] / n['seconds']:.2f}x | {o['growth_mb']:.0f} "
                  f"| {n['growth_mb']:.0f} | {o['growth_mb'] / max(n['growth_mb'], 1.0):.1f}x |")
        print()
        if old_shape == shape:
            diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(runs["metrics_old"]["results"],
                                                              runs["metrics_new"]["results"]))
                     for k in runs["metrics_new"]["results"][0]}
            print("# image metrics, largest |old - new| over the predictions: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
            old_p = np.load(data / "project_old.npy", mmap_mode="r")
            new_p = np.load(data / "project_new.npy", mmap_mode="r")
            step = max(1, old_p.shape[0] // 8)
            diff = max(float(np.abs(old_p[i:i + step] - new_p[i:i + step]).max())
                       for i in range(0, old_p.shape[0], step))
            print(f"# slab projection, largest |old - new| over the first prediction: {diff:.2e} HU")
        else:
            print("# old and new ran on different volumes: results not compared (tests/test_metrics.py does)")
        print("# image metrics, new: " + json.dumps({k: round(v, 4) for k, v in
                                                      runs["metrics_new"]["results"][0].items()}))
        print(f"# slab projection, largest |A P' - m| (new): {max(runs['project_new']['results']):.2e} HU")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# total wall time {time.perf_counter() - started:.0f} s (including data generation and one "
          "interpreter per variant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
