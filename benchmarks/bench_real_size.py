"""Every stage on real-size phantoms (presets/real-size.yaml: 300 x 512 x 512 thin series, 5 cases), both arms:
wall time and peak memory per stage, per case, against the 6 GB goal.

    python benchmarks/bench_real_size.py                  # both arms, every stage, in benchmarks/out/real-size
    python benchmarks/bench_real_size.py --arms sd --stages evaluate   # one stage again (the rest kept)

Each stage script runs alone in a fresh process (the same ``stages/<stage>.py`` DVC runs), in a workspace
whose params.yaml is the repository's with the preset applied; its peak resident memory is the maximum over
the process and its children (``ru_maxrss``), and the sum over its whole process tree, sampled every 0.2 s
(preprocess runs a worker per core at once). The data stages and sr_reference do not depend on the
VAE and run once; ``ctdiff predict`` on the test case's zip is measured too. Prints a markdown table and
writes benchmarks/out/real-size/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.params import leaves, read_params_yaml, set_dotted  # noqa: E402

SHARED = ("fetch_data", "preprocess", "slab", "sr_reference")  # the same for both arms
SHARED_OUTPUTS = {"fetch_data": ("data/raw",), "preprocess": ("data/processed",),
                  "slab": ("models/slab", "data/slab", "dvclive/slab"),
                  "sr_reference": ("models/sr_reference", "dvclive/sr_reference")}
ORDER = ("fetch_data", "preprocess", "slab", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference",
         "calibrate", "evaluate", "predict")
GOAL_GB = 6.0
# What each stage spends its time on, and what of it a GPU takes over (not measured here: no GPU).
WHERE = {
    "fetch_data": "phantom rendering and DICOM encoding (CPU, NumPy); stays on the CPU",
    "preprocess": "DICOM decoding and resampling (CPU, one worker per case); stays on the CPU",
    "slab": "the profile's least squares on the train pairs and each case's projection (CPU, NumPy)",
    "fetch_weights": "nothing to download for scratch VAEs",
    "vae_fit": "VAE forward and backward on patches: GPU",
    "vae_check": "VAE encode and decode of the whole volume: GPU; the metrics stay on the CPU",
    "train": "latent encoding of the train volumes and UNet steps: GPU",
    "sr_reference": "UNet steps and sliding-window validation: GPU; the slab projection stays on the CPU",
    "calibrate": "as evaluate's sampling of the val cases: GPU; the conformal scores: CPU",
    "evaluate": "sampling (UNet windows x steps x samples) and decoding: GPU; metrics and projection: CPU",
    "predict": "as evaluate's sampling and decoding: GPU; reading, projection and writing: CPU",
}
WRAPPER = """
import json, resource, runpy, sys, time
sys.argv = [sys.argv[1], *sys.argv[2:]]
tic = time.perf_counter()
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("BENCH " + json.dumps({"seconds": time.perf_counter() - tic, "peak_kb": peak, "code": code}))
"""


def workspace(root: Path, use_maisi: bool, shape: list[int] | None = None) -> Path:
    """A folder with the repository's params.yaml and the real-size preset (and the arm) applied; ``shape``
    replaces the phantoms' (a quick check of the benchmark itself)."""
    root.mkdir(parents=True, exist_ok=True)
    preset = leaves(yaml.safe_load((REPO / "presets" / "real-size.yaml").read_text()))
    extra = {"data.phantom.families.hilum.shape": shape} if shape else {}
    params = set_dotted(read_params_yaml(REPO / "params.yaml"), {**preset, "vae.use_maisi": use_maisi, **extra})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stage(root: Path, stage: str, log: Path) -> dict:
    """One stage script (or predict) in a fresh process; seconds, peak GB, exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if stage == "predict":
        test_case = json.loads((root / "data" / "processed" / "splits.json").read_text())["test"][0]
        zip_path = next((root / "data" / "raw").rglob(f"{test_case}.zip"))
        args = [str(REPO / "src" / "ctdiff" / "cli.py"), "predict", str(zip_path), "--out", str(root / "predicted")]
    else:
        args = [str(REPO / "stages" / f"{stage}.py")]
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        proc = psutil.Popen([sys.executable, "-c", WRAPPER, *args], cwd=root, env=env, stdout=out, stderr=err)
        tree_peak = 0
        while proc.poll() is None:  # the whole process tree's resident memory: preprocess runs workers at once
            try:
                tree = [proc, *proc.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)
    line = next((ln for ln in log.with_suffix(".out").read_text().splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        return {"seconds": float("nan"), "peak_gb": float("nan"), "tree_peak_gb": tree_peak / 2**30,
                "code": proc.returncode}
    result = json.loads(line[6:])
    return {"seconds": result["seconds"], "peak_gb": result["peak_kb"] / 2**20, "tree_peak_gb": tree_peak / 2**30,
            "code": result["code"]}


def cases_of(root: Path, stage: str) -> int:
    """How many cases the stage handles (its time is stated per case)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    if stage == "fetch_data":
        return params["data"]["phantom"]["n_cases"]
    splits = json.loads((root / "data" / "processed" / "splits.json").read_text())
    return {"preprocess": sum(len(v) for v in splits.values()), "slab": sum(len(v) for v in splits.values()),
            "fetch_weights": 1, "vae_fit": len(splits["train"]),
            "vae_check": min(params["vae_check"]["max_cases"] or 10**9, len(splits["val"])),
            "train": len(splits["train"]) + len(splits["val"]),
            "sr_reference": len(splits["train"]) + len(splits["val"]), "calibrate": len(splits["val"]),
            "evaluate": len(splits["test"]),
            "predict": 1}[stage]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "real-size")
    parser.add_argument("--arms", nargs="+", choices=("sd", "maisi"), default=["sd", "maisi"])
    parser.add_argument("--stages", nargs="+", choices=ORDER, default=list(ORDER))
    parser.add_argument("--shape", nargs=3, type=int, metavar=("D", "H", "W"),
                        help="phantom shape instead of the preset's (to check the benchmark quickly)")
    args = parser.parse_args()
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    first = args.arms[0]
    for arm in args.arms:
        root = workspace(args.workdir / arm, arm == "maisi", args.shape)
        for stage in [s for s in ORDER if s in args.stages]:
            if stage in SHARED and arm != first:
                # the VAE plays no part: take the first arm's outputs instead of running it again
                for out in SHARED_OUTPUTS[stage]:
                    shutil.rmtree(root / out, ignore_errors=True)
                    shutil.copytree(args.workdir / first / out, root / out)
                results[f"{arm}/{stage}"] = {**results[f"{first}/{stage}"], "shared": True}
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {arm}: {stage} ...", flush=True)
            result = run_stage(root, stage, args.workdir / f"{arm}-{stage}.log")
            result["cases"] = cases_of(root, stage)
            results[f"{arm}/{stage}"] = result
            print(f"    {result['seconds']:.0f} s, peak {result['peak_gb']:.2f} GB, exit {result['code']}", flush=True)
            results_path.write_text(json.dumps(results, indent=2))
            if result["code"] != 0:
                print(f"    failed: see {args.workdir / f'{arm}-{stage}.log'}")
                break
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\n| stage | arm | wall s | cases | s per case | peak RSS GB (largest process) | peak GB (all its "
          f"processes) | <= {GOAL_GB:g} GB | where the time goes |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for stage in ORDER:
        for arm in ("sd", "maisi"):
            r = results.get(f"{arm}/{stage}")
            if r is None:
                continue
            note = " (shared)" if r.get("shared") else ""
            peak = max(r["peak_gb"], r.get("tree_peak_gb", 0.0))
            ok = "yes" if peak <= GOAL_GB else "**no**"
            print(f"| {stage} | {arm}{note} | {r['seconds']:.0f} | {r['cases']} | {r['seconds'] / r['cases']:.0f} | "
                  f"{r['peak_gb']:.2f} | {r.get('tree_peak_gb', float('nan')):.2f} | {ok} | {WHERE[stage]} |")


if __name__ == "__main__":
    sys.exit(main())
