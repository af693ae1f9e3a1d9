"""Scoring one case at real size against the memory-bandwidth bound of the same machine, in one process.

    python benchmarks/bench_metrics.py --shape 300 512 512             # real size, 3 predictions (~2 min, 2 cores)
    python benchmarks/bench_metrics.py --shape 40 128 128 --rungs 2    # a quick check of the benchmark itself
    python benchmarks/bench_metrics.py --device cuda                   # the same on the GPU
    python benchmarks/bench_metrics.py --json before.json              # keep the numbers (and the metrics)
    python benchmarks/bench_metrics.py --against before.json           # largest |difference| to a kept run

A synthetic CT-like case (air around an elliptical body, lungs, soft tissue, contrast-filled arteries along
the slices with one embolus, a spine; smooth texture and noise; labels for the structure metrics) and
``--rungs`` noisy predictions of it are written once as .npy by another process. One worker process then
loads them and measures, one after the other:

- ``single call``: ``reconstruction_metrics`` of the first prediction (the six image metrics, the truth's
  preparation included: what one call costs);
- ``truth preparation``: a ``TruthScorer`` for the truth (what a case pays once);
- ``rung i``: that scorer's ``score`` of each prediction (what each further rung of a case costs);
- ``structures``: ``StructureTruth.build`` once and ``metrics`` of each prediction;
- ``bound``: 12 plain float32 passes over the pair of volumes (``torch.sub(pred, truth, out=buffer)``,
  each reading both and writing one), timed before and after the rest; the faster of the two is the bound.

Each step's wall seconds and CPU seconds (all the process's threads) are divided by the bound's: on cores
shared with other jobs the wall ratio swings with their load from one step to the next, while the CPU ratio
measures the work. Peak memory is the process's resident high-water mark (``VmHWM``, reset before each step through
``/proc/self/clear_refs``) less its resident size just before the step: what the step costs on top of its
inputs (the volumes, loaded before, and the bound's buffer, allocated before). The table is printed and
written to ``benchmarks/out/metrics/<shape>.md``; ``--json`` keeps every number and metric.

The code measured is whatever ``ctdiff`` imports: ``PYTHONPATH=<an older checkout>/src python
benchmarks/bench_metrics.py ...`` measures that version with this same harness (the "before" numbers in
RESULTS.md; ``--device`` needs a version that takes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HU_RANGE = (-1000.0, 1000.0)
SPACING_MM = (0.7, 0.7, 1.0)  # (sx, sy, sz)
BOUND_PASSES = 12
OUT_DIR = Path(__file__).resolve().parent / "out" / "metrics"
CLASSES = {0: "air", 2: "soft_tissue", 3: "lung", 7: "artery", 8: "embolus", 9: "bone_cortical"}


# ------------------------------------------------------------------------------------------ the data
def generate(data: Path, shape: tuple[int, int, int], rungs: int, seed: int = 0) -> dict:
    """Truth, labels and predictions as .npy (float32 HU, uint8 labels) in ``data``."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    depth, height, width = shape
    z = np.arange(depth)[:, None, None]
    y = (np.arange(height)[None, :, None] - height / 2) / height
    x = (np.arange(width)[None, None, :] - width / 2) / width
    labels = np.zeros(shape, np.uint8)
    body = (y / 0.42) ** 2 + (x / 0.46) ** 2 <= 1.0
    labels[np.broadcast_to(body, shape)] = 2
    for side in (-1, 1):
        lung = ((y + 0.03) / 0.3) ** 2 + ((x - side * 0.2) / 0.16) ** 2 <= 1.0
        labels[np.broadcast_to(lung, shape)] = 3
    spine = ((y - 0.33) / 0.06) ** 2 + (x / 0.06) ** 2 <= 1.0
    labels[np.broadcast_to(spine, shape)] = 9
    # Arteries: tubes through the lungs that drift across the slices, one with an embolus.
    wobble = np.sin(z / max(depth, 1) * 2 * np.pi)
    for i, (cy, cx, r) in enumerate([(-0.05, -0.2, 0.018), (0.05, 0.2, 0.018), (-0.12, 0.16, 0.012),
                                     (0.1, -0.14, 0.012)]):
        tube = ((y - cy - 0.02 * wobble) ** 2 + (x - cx) ** 2) <= r**2
        labels[tube] = 7
        if i == 0:
            clot = tube & ((y - cy - 0.02 * wobble) ** 2 + (x - cx) ** 2 <= (0.5 * r) ** 2)
            clot &= (z >= depth // 3) & (z < depth // 3 + max(1, depth // 10))
            labels[clot] = 8
    hu = np.array([-1000, 0, 40, -850, 0, 0, 0, 300, 50, 700], np.float32)[labels]
    coarse = torch.from_numpy(rng.normal(size=(max(2, depth // 6), max(2, height // 12), max(2, width // 12)))
                              .astype(np.float32))
    texture = torch.nn.functional.interpolate(coarse[None, None], size=shape, mode="trilinear")[0, 0].numpy()
    truth = hu + np.where(labels == 0, 0.0, 30.0 * texture).astype(np.float32)
    del texture, hu
    truth += rng.normal(0.0, 15.0, shape).astype(np.float32)
    np.save(data / "truth.npy", truth)
    np.save(data / "labels.npy", labels)
    for i in range(rungs):
        np.save(data / f"pred_{i}.npy", truth + rng.normal(5.0 * i, 30.0 + 15.0 * i, shape).astype(np.float32))
    return {"body_fraction": float((truth > -500.0).mean())}


# ------------------------------------------------------------------------------------------ the worker
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(data: Path, rungs: int, device_name: str) -> dict:
    import numpy as np
    import torch

    from ctdiff.metrics.image import TruthScorer, reconstruction_metrics
    from ctdiff.metrics.structures import StructureTruth

    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    truth = np.load(data / "truth.npy")
    labels = np.load(data / "labels.npy")
    preds = [np.load(data / f"pred_{i}.npy") for i in range(rungs)]
    truth_t, pred_t = torch.from_numpy(truth).to(device), torch.from_numpy(preds[0]).to(device)
    buffer = torch.empty_like(truth_t)
    extra = {"device": device} if on_gpu else {}  # an older ctdiff without the argument scores on the CPU
    steps: list[dict] = []
    metrics: dict[str, dict] = {}

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def step(name: str, fn, *args):
        can_reset = _reset_peak()
        rss_kb = _status_kb("VmRSS")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        out = fn(*args)
        sync()
        seconds = time.perf_counter() - started
        row = {"step": name, "seconds": seconds, "cpu_seconds": time.process_time() - cpu_started,
               "peak_growth_mb": max(0, _status_kb("VmHWM") - rss_kb) / 1024 if can_reset else math.nan}
        if on_gpu:
            row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        steps.append(row)
        print(f"# {name}: {seconds:.2f} s ({row['cpu_seconds']:.2f} s CPU), peak growth {row['peak_growth_mb']:.0f} MB",
              file=sys.stderr, flush=True)
        return out

    def bound():
        for _ in range(BOUND_PASSES):
            torch.sub(pred_t, truth_t, out=buffer)

    torch.sub(pred_t, truth_t, out=buffer)  # the buffer paged in and the threads started before anything is timed
    inputs_mb = _status_kb("VmRSS") / 1024
    step("bound (before)", bound)
    metrics["single call"] = step("single call", lambda: reconstruction_metrics(preds[0], truth, HU_RANGE, **extra))
    scorer = step("truth preparation", lambda: TruthScorer(truth, HU_RANGE, **extra))

    def rung(scorer, pred):
        return scorer.score(torch.from_numpy(pred).to(device) if on_gpu else pred)  # on CUDA: moved there once

    for i, pred in enumerate(preds):
        metrics[f"rung {i}"] = step(f"rung {i}", rung, scorer, pred)
    del scorer
    structures = step("structure truth", lambda: StructureTruth.build(labels, CLASSES, truth, SPACING_MM, "APE",
                                                                    lumen_ring_mm=5.0, defect_hu=175.0))
    for i, pred in enumerate(preds):
        metrics[f"structures {i}"] = step(f"structures {i}", structures.metrics, pred)
    step("bound (after)", bound)
    return {"steps": steps, "metrics": metrics, "threads": torch.get_num_threads(), "inputs_rss_mb": inputs_mb,
            "peak_reset": _reset_peak(), "gpu": torch.cuda.get_device_name(device) if on_gpu else None}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: child failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the table
def table(result: dict, shape: tuple[int, int, int], rungs: int) -> list[str]:
    steps = {s["step"]: s for s in result["steps"]}
    bounds = [steps["bound (before)"], steps["bound (after)"]]
    bound, bound_cpu = min(b["seconds"] for b in bounds), min(b["cpu_seconds"] for b in bounds)
    structure_s = sum(steps[f"structures {i}"]["seconds"] for i in range(rungs))
    rows = [("single call: 6 image metrics, truth prepared inside", steps["single call"]),
            ("truth preparation (once per case)", steps["truth preparation"]),
            *((f"rung {i}: 6 image metrics, truth prepared", steps[f"rung {i}"]) for i in range(rungs)),
            ("structure truth (once per case)", steps["structure truth"]),
            *((f"structure metrics, rung {i}", steps[f"structures {i}"]) for i in range(rungs))]
    gpu = result["gpu"] is not None
    lines = [f"| step ({' x '.join(map(str, shape))}) | seconds | x bound | CPU seconds | x bound (CPU) "
             "| peak growth MB |" + (" GPU peak MB |" if gpu else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for name, s in rows:
        lines.append(f"| {name} | {s['seconds']:.2f} | {s['seconds'] / bound:.1f}x | {s['cpu_seconds']:.2f} "
                     f"| {s['cpu_seconds'] / bound_cpu:.1f}x | {s['peak_growth_mb']:.0f} |"
                     + (f" {s.get('gpu_peak_mb', math.nan):.0f} |" if gpu else ""))
    lines.append(f"| bound: {BOUND_PASSES} float32 passes over the two volumes (the faster of before/after: "
                 + ", ".join(f"{b['seconds']:.2f} s ({b['cpu_seconds']:.2f} CPU)" for b in bounds)
                 + f") | {bound:.2f} | 1.0x | {bound_cpu:.2f} | 1.0x | |" + (" |" if gpu else ""))
    further = [steps[f"rung {i}"] for i in range(1, rungs)]
    lines.append("")
    lines.append(f"single call {steps['single call']['seconds'] / bound:.1f}x the bound "
                 f"({steps['single call']['cpu_seconds'] / bound_cpu:.1f}x in CPU seconds; goal <= 5x); further rungs "
                 + ", ".join(f"{r['seconds'] / bound:.1f}x ({r['cpu_seconds'] / bound_cpu:.1f}x)" for r in further)
                 + f" (goal <= 3x each); structure metrics {structure_s / max(rungs, 1):.2f} s per rung; resident "
                 f"before the steps (the inputs, the bound's buffer): {result['inputs_rss_mb']:.0f} MB")
    return lines


def _machine() -> str:
    import numpy as np
    import psutil
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else platform.processor()
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GB, load average "
            f"{os.getloadavg()[0]:.1f}, torch {torch.__version__} ({torch.get_num_threads()} threads), numpy "
            f"{np.__version__}, python {platform.python_version()}")


def _largest_differences(metrics: dict, against: dict) -> dict[str, float]:
    worst: dict[str, float] = {}
    for key, values in metrics.items():
        for name, value in values.items():
            if key in against and name in against[key]:
                worst[name] = max(worst.get(name, 0.0), abs(value - against[key][name]))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--rungs", type=int, default=3, help="predictions scored against the one truth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the scorer's device)")
    parser.add_argument("--json", type=Path, help="write every number and metric here")
    parser.add_argument("--against", type=Path, help="a --json file of another run: print the largest differences")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.generate:
        print(json.dumps(generate(Path(args.generate), shape, args.rungs)))
        return 0
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.rungs, args.device)))
        return 0
    if args.rungs < 1:
        parser.error("--rungs must be >= 1")

    import ctdiff.metrics.image

    machine = _machine()
    print(f"# {machine}")
    print(f"# ctdiff.metrics.image from {Path(ctdiff.metrics.image.__file__).parent}")
    root = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    started = time.perf_counter()
    try:
        info = run_child("--generate", str(root), "--shape", *map(str, shape), "--rungs", str(args.rungs))
        print(f"# truth {' x '.join(map(str, shape))}: body fraction {info['body_fraction']:.2f}; "
              f"{args.rungs} predictions", flush=True)
        result = run_child("--worker", str(root), "--shape", *map(str, shape), "--rungs", str(args.rungs),
                           "--device", args.device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not result["peak_reset"]:
        print("# /proc/self/clear_refs is not writable here: peak growth not measured")
    lines = [f"`python benchmarks/bench_metrics.py --shape {' '.join(map(str, shape))} --rungs {args.rungs}"
             f"{'' if args.device == 'cpu' else ' --device ' + args.device}`", "",
             f"{machine}; worker {result['threads']} threads{', ' + result['gpu'] if result['gpu'] else ''}", "",
             *table(result, shape, args.rungs)]
    image = result["metrics"]["rung 0"]
    lines.append("image metrics of rung 0: " + ", ".join(f"{k} {v:.6g}" for k, v in image.items()))
    single = _largest_differences({"rung 0": result["metrics"]["single call"]}, result["metrics"])
    lines.append("single call vs rung 0 (same prediction), largest |difference|: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in single.items()))
    if args.against:
        worst = _largest_differences(result["metrics"], json.loads(args.against.read_text())["metrics"])
        lines.append(f"largest |difference| to {args.against.name}: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    print()
    print("\n".join(lines))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"{'x'.join(map(str, shape))}-{args.device}.md"
    out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "machine": machine, **result}, indent=1))
    print(f"# written to {out}; total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
