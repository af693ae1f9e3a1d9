"""The calibrate stage: the model's per-voxel spread made an error bar, by split conformal prediction on val.

The spread of the model's draws (:func:`ctdiff.inference.sampling.sample_thin`) ranks its error but covers it
less often than a Gaussian reading promises (:mod:`ctdiff.metrics.uncertainty`). This stage samples the
``calibrate.split`` cases (val: never the test split) exactly as evaluate samples a test case (the model's own
sampling defaults, the seed ``train_seed``, the prediction projected onto series 1's slabs with the spread of
the projected draws), scores each body voxel's ``|prediction - truth| / spread``, and fits
:class:`ctdiff.metrics.uncertainty.Calibration`: per HU band of the prediction (``calibrate.bands_hu``) and slab
phase of the voxel's slice (``calibrate.slab_phase_bins``: the draws agree most at series 1's slab centres), the
scale whose interval ``prediction +- scale x spread`` covers 90 % and 95 % of the calibration voxels.

Written: ``models/calibration/calibration.json`` (the scales, and which model they were fitted for: evaluate
and ``ctdiff predict`` refuse a calibration of another model) and ``dvclive/calibrate/metrics.json`` (the raw
spread's 2-sd coverage and the scales, per band). evaluate then reports the calibrated coverage on test;
``ctdiff predict`` writes the calibrated map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from dvclive import Live
from tqdm import tqdm

from ctdiff.data.processed import split_cases
from ctdiff.data.slab import SlabCase
from ctdiff.device import pick_device
from ctdiff.inference.calibration import write_calibration
from ctdiff.inference.sampling import load_trained_model, predict_thin
from ctdiff.metrics.image import body_mask
from ctdiff.metrics.uncertainty import LEVELS, Calibration, nonconformity, phase_edges, voxel_phase
from ctdiff.params import Params


def calibrate(params: Params, processed_dir: Path, slab_dir: Path, vae_dir: Path, ckpt_dir: Path, out_dir: Path,
              live: Live | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the stage (module docstring); returns the summary."""
    cp = params.calibrate
    model = load_trained_model(vae_dir, ckpt_dir, pick_device(params.device))
    if model.sampling.samples < 2:  # nothing to calibrate: said in the file, so evaluate and predict know
        write_calibration(out_dir, None, model, skipped="one draw (train.sampling.samples): no spread")
        return {"cases": 0, "raw_coverage_2sd": float("nan")}
    scores, raw_coverage = [], []
    cases = split_cases(processed_dir, cp.split, cp.max_cases)
    for case in tqdm(cases, desc="calibrate", unit="case", disable=not progress):
        slabs = SlabCase.open(slab_dir, case.case_id)
        thin = predict_thin(model, case.load("source"), slabs.baseline(mmap=False), params.train_seed,
                            case.grid.direction, slabs.project)
        volume = slabs.project(thin.raw) if model.sampling.consistency else thin.raw
        truth = case.load("target")
        mask = body_mask(truth).numpy()
        ratio, mean = nonconformity(volume, thin.spread, truth, params.hu_range, mask)
        scores.append((ratio, mean, voxel_phase(slabs.operator.phase(case.grid.spacing_mm[2]), mask)))
        raw_coverage.append(float(np.mean(ratio <= 2.0)))
    calibration = Calibration.fit(scores, cp.bands_hu, LEVELS, phase_edges(cp.slab_phase_bins))
    write_calibration(out_dir, calibration, model, split=cp.split, cases=[c.case_id for c in cases])
    summary: dict[str, Any] = {"cases": len(cases), "raw_coverage_2sd": float(np.mean(raw_coverage))}
    for level, scales in calibration.scales.items():
        for group, scale in enumerate(scales):
            summary[f"scale_{round(level * 100)}/group_{group}"] = scale
    if live is not None:
        for key, value in summary.items():
            live.log_metric(key, value, plot=False)
        live.summary["bands_hu"] = list(calibration.edges_hu)
        live.summary["phase_edges"] = list(calibration.phase_edges)
        live.summary["voxels_per_group"] = list(calibration.voxels)
    return summary

