"""Calibrated coverage by slab phase: one scale per HU band against one per HU band x slab phase group.

The thick series pins each slab's weighted mean, so the model's draws agree most at slab centres and its
spread map shows bands at the slab period. This asks whether the error bands the same way: for a trained
workspace it samples every val and test case as the calibrate stage and evaluate do (the model's sampling
defaults, seed ``train_seed``, the projected prediction and the spread of the projected draws), prints the mean
error and spread per slab phase (val), fits both calibrations on val and reports their coverage on test, at slab
centres (phase < 1/6), between (1/6 .. 1/3) and midway (>= 1/3).

    python benchmarks/bench_calibration_phase.py --workspace . [--workspace other] [--phase-bins 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.data.slab import SlabCase  # noqa: E402
from ctdiff.device import pick_device  # noqa: E402
from ctdiff.inference.sampling import load_trained_model, predict_thin  # noqa: E402
from ctdiff.metrics.image import body_mask  # noqa: E402
from ctdiff.metrics.uncertainty import (  # noqa: E402
    CENTRE_BELOW,
    MIDWAY_FROM,
    Calibration,
    nonconformity,
    phase_edges,
    voxel_phase,
)
from ctdiff.params import read_params_yaml  # noqa: E402


def collect(workspace: Path, split: str, params: dict, model) -> dict[str, np.ndarray]:
    """Body voxels of every case of ``split``: nonconformity, predicted mean, phase, |error|, spread (HU)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("ratio", "mean", "phase", "error", "spread")}
    for case in split_cases(workspace / "data" / "processed", split, 0):
        slabs = SlabCase.open(workspace / "data" / "slab", case.case_id)
        thin = predict_thin(model, case.load("source"), slabs.baseline(mmap=False), params["train_seed"],
                            case.grid.direction, slabs.project)
        volume = slabs.project(thin.raw) if model.sampling.consistency else thin.raw
        truth = case.load("target")
        mask = body_mask(truth).numpy()
        ratio, mean = nonconformity(volume, thin.spread, truth, params["hu_range"], mask)
        phase = voxel_phase(slabs.operator.phase(case.grid.spacing_mm[2]), mask)
        low, high = params["hu_range"]
        out["ratio"].append(ratio)
        out["mean"].append(mean)
        out["phase"].append(phase)
        out["error"].append(np.abs(mean - np.clip(truth[mask], low, high)))
        out["spread"].append(np.asarray(thin.spread, np.float32)[mask])
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, action="append", required=True,
                        help="a trained workspace: params.yaml, data/processed, data/slab, models/vae, checkpoints")
    parser.add_argument("--phase-bins", type=int, default=3)
    args = parser.parse_args()
    print("| workspace | phase group | val mean abs error HU | val mean spread HU | test coverage 90 / 95 %, "
          "HU bands | test coverage 90 / 95 %, HU bands x phase |")
    print("|---|---|---:|---:|---:|---:|")
    for workspace in args.workspace:
        # the raw file, not the typed params: a workspace of an older commit (before a key was added) reads too
        params = read_params_yaml(workspace / "params.yaml")
        model = load_trained_model(workspace / "models" / "vae", workspace / "models" / "checkpoints",
                                   pick_device(params["device"]))
        val, test = collect(workspace, "val", params, model), collect(workspace, "test", params, model)
        bands = params["calibrate"]["bands_hu"]
        fits = [Calibration.fit([(val["ratio"], val["mean"])], bands),
                Calibration.fit([(val["ratio"], val["mean"], val["phase"])], bands,
                                phase_edges=phase_edges(args.phase_bins))]
        groups = {"centre": lambda p: p < CENTRE_BELOW, "between": lambda p: (p >= CENTRE_BELOW) & (p < MIDWAY_FROM),
                  "midway": lambda p: p >= MIDWAY_FROM, "all": lambda p: np.ones(p.shape, bool)}
        for name, where in groups.items():
            v, t = where(val["phase"]), where(test["phase"])
            cells = []
            for calibration in fits:
                covered = []
                for level in (0.9, 0.95):
                    scale = np.asarray(calibration.scales[level], np.float32)[
                        calibration.group_of(test["mean"], test["phase"])]
                    covered.append(100 * float(np.mean((test["ratio"] <= scale)[t])))
                cells.append(f"{covered[0]:.1f} / {covered[1]:.1f}")
            print(f"| {workspace.name} | {name} | {val['error'][v].mean():.1f} | {val['spread'][v].mean():.1f} | "
                  f"{cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
