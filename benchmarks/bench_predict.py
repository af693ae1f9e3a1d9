"""``ctdiff predict`` on one scan, before and after: seconds and peak memory of the command a user runs, side by side.

Each configuration is one ``ctdiff predict`` in a fresh process on the same input with the same trained model
(a ``dvc repro`` workspace's ``models/``), one after the other in this run, so the ratios compare like with like:

- ``--window-batch`` values (latent windows per UNet call; 1 = one window at a time, what sampling did before
  windows were batched);
- the sampling settings (``--samples``, ``--steps``), the same for every configuration.

Peak memory is ``ru_maxrss`` of the predict process and, sampled every 0.2 s, its resident set; the voxels of
every configuration are compared with the first one's (window batches sum in another order: a voxel may round
to the next HU).

    python benchmarks/bench_predict.py /path/to/thick_series --workspace /tmp/run1 --samples 2 --steps 4 \
        --window-batch 1 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_size import WRAPPER  # noqa: E402  (runs a script, prints seconds and ru_maxrss)


def run_predict(workspace: Path, inputs: list[Path], out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    args = [str(REPO / "src" / "ctdiff" / "cli.py"), "predict", *map(str, inputs), "--out", str(out),
            "--models", str(workspace / "models"), "--params", str(workspace / "params.yaml"), "--quiet", *extra]
    log = out.with_suffix(".log")
    with open(log, "w") as stdout:
        proc = psutil.Popen([sys.executable, "-c", WRAPPER, *args], cwd=workspace, env=env, stdout=stdout,
                            stderr=stdout)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
    line = next((ln for ln in log.read_text().splitlines() if ln.startswith("BENCH ")), None)
    if line is None or json.loads(line[6:])["code"] != 0:
        sys.exit(f"predict {' '.join(extra)} failed:\n{log.read_text()[-2000:]}")
    result = json.loads(line[6:])
    return {"seconds": result["seconds"], "peak_gb": result["peak_kb"] / 2**20, "sampled_gb": peak / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="what ctdiff predict reads (zip, DICOM folder, NIfTI)")
    parser.add_argument("--workspace", type=Path, default=Path("."), help="holds params.yaml and models/")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window-batch", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more predict options, for all")
    args = parser.parse_args()
    sampling = ["--samples", str(args.samples), "--steps", str(args.steps), *args.extra]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        first: dict[str, np.ndarray] = {}
        for wb in args.window_batch:
            out = Path(tmp) / f"wb{wb}"
            result = run_predict(args.workspace.resolve(), [p.resolve() for p in args.inputs], out,
                                 [*sampling, "--window-batch", str(wb)])
            volumes = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.int32)
                       for p in sorted(out.glob("*.nii.gz")) if not p.name.endswith("_std.nii.gz")}
            first = first or volumes
            result["max_diff_hu"] = max(int(np.abs(v - first[k]).max()) for k, v in volumes.items())
            result["voxels_differ"] = float(np.mean([np.mean(v != first[k]) for k, v in volumes.items()]))
            result["shape"] = "; ".join("x".join(map(str, v.shape)) for v in volumes.values())
            rows.append((wb, result))
            print(f"window_batch {wb}: {result['seconds']:.1f} s, peak {result['peak_gb']:.2f} GB", flush=True)
    base = rows[0][1]["seconds"]
    print(f"\nctdiff predict {' '.join(sampling)} on {', '.join(p.name for p in args.inputs)} "
          f"({rows[0][1]['shape']} thin voxels), {os.cpu_count()} CPUs\n")
    print(f"| window_batch | seconds | x faster than {rows[0][0]} | peak RSS GB | voxels differing from the first "
          "| max diff HU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for wb, r in rows:
        print(f"| {wb} | {r['seconds']:.1f} | {base / r['seconds']:.2f} | {r['peak_gb']:.2f} | "
              f"{100 * r['voxels_differ']:.4f} % | {r['max_diff_hu']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
