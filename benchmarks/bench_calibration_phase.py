"""Calibrated coverage by slab phase: one scale per HU band against one per HU band x slab phase group.

The thick series pins each slab's weighted mean, so the model's draws agree most at slab centres and its
spread map shows bands at the slab period. This asks whether the error bands the same way: for a trained
workspace it samples every val and test case as the calibrate stage and evaluate do (the model's sampling
defaults, seed ``train_seed``, the projected prediction and the spread of the projected draws), prints the mean
error and spread per slab phase (val), fits both calibrations on val and reports their coverage on test, at slab
centres (phase < 1/6), between (1/6 .. 1/3) and midway (>= 1/3).

    python benchmarks/bench_calibration_phase.py --workspace . [--workspace other] [--phase-bins 3]
    python benchmarks/bench_calibration_phase.py --workspace . --loco-val   # val only, leave one case out
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


def collect(workspace: Path, split: str, params: dict, model) -> list[dict[str, np.ndarray]]:
    """Per case of ``split``, its body voxels: nonconformity, predicted mean, phase, |error|, spread (HU)."""
    cases = []
    low, high = params["hu_range"]
    for case in split_cases(workspace / "data" / "processed", split, 0):
        slabs = SlabCase.open(workspace / "data" / "slab", case.case_id)
        thin = predict_thin(model, case.load("source"), slabs.baseline(mmap=False), params["train_seed"],
                            case.grid.direction, slabs.project)
        volume = slabs.project(thin.raw) if model.sampling.consistency else thin.raw
        truth = case.load("target")
        mask = body_mask(truth).numpy()
        ratio, mean = nonconformity(volume, thin.spread, truth, params["hu_range"], mask)
        cases.append({"ratio": ratio, "mean": mean,
                      "phase": voxel_phase(slabs.operator.phase(case.grid.spacing_mm[2]), mask),
                      "error": np.abs(mean - np.clip(truth[mask], low, high)),
                      "spread": np.asarray(thin.spread, np.float32)[mask]})
    return cases


def pooled(cases: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in cases]) for k in cases[0]}


def covered(fit_on: list[dict[str, np.ndarray]], scored: dict[str, np.ndarray], bands, bins: int
            ) -> dict[float, np.ndarray]:
    """Per level, whether each ``scored`` voxel lies in its interval, scales fitted on ``fit_on`` (bins 1: per
    HU band only)."""
    fit = pooled(fit_on)
    calibration = Calibration.fit([(fit["ratio"], fit["mean"], fit["phase"])], bands, phase_edges=phase_edges(bins))
    group = calibration.group_of(scored["mean"], scored["phase"])
    return {level: scored["ratio"] <= np.asarray(calibration.scales[level], np.float32)[group] for level in (0.9, 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, action="append", required=True,
                        help="a trained workspace: params.yaml, data/processed, data/slab, models/vae, checkpoints")
    parser.add_argument("--phase-bins", type=int, default=3)
    parser.add_argument("--loco-val", action="store_true",
                        help="score on val itself, each case with scales fitted on the other val cases (leave one "
                             "case out), and sample no test case: to choose the grouping without the test split")
    args = parser.parse_args()
    scored_on = "val, leave one case out" if args.loco_val else "test"
    print(f"| workspace | phase group | val mean abs error HU | val mean spread HU | {scored_on}: coverage 90 / 95 %, "
          f"HU bands | HU bands x phase |")
    print("|---|---|---:|---:|---:|---:|")
    for workspace in args.workspace:
        # the raw file, not the typed params: a workspace of an older commit (before a key was added) reads too
        params = read_params_yaml(workspace / "params.yaml")
        model = load_trained_model(workspace / "models" / "vae", workspace / "models" / "checkpoints",
                                   pick_device(params["device"]))
        bands = params["calibrate"]["bands_hu"]
        val_cases = collect(workspace, "val", params, model)
        val = pooled(val_cases)
        if args.loco_val:
            scored = val
            hits = [{level: np.concatenate([covered(val_cases[:i] + val_cases[i + 1:], c, bands, bins)[level]
                                            for i, c in enumerate(val_cases)]) for level in (0.9, 0.95)}
                    for bins in (1, args.phase_bins)]
        else:
            scored = pooled(collect(workspace, "test", params, model))
            hits = [covered(val_cases, scored, bands, bins) for bins in (1, args.phase_bins)]
        groups = {"centre": lambda p: p < CENTRE_BELOW, "between": lambda p: (p >= CENTRE_BELOW) & (p < MIDWAY_FROM),
                  "midway": lambda p: p >= MIDWAY_FROM, "all": lambda p: np.ones(p.shape, bool)}
        for name, where in groups.items():
            v, t = where(val["phase"]), where(scored["phase"])
            cells = [f"{100 * np.mean(h[0.9][t]):.1f} / {100 * np.mean(h[0.95][t]):.1f}" for h in hits]
            print(f"| {workspace.name} | {name} | {val['error'][v].mean():.1f} | {val['spread'][v].mean():.1f} | "
                  f"{cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
