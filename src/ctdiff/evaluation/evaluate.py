"""The evaluate stage: the trained model against the honest baselines, on the test split.

For every test case (never seen by vae_fit's training or the train stage) the model samples series 2 from
series 1 (:mod:`ctdiff.inference.sampling`, the path ``ctdiff predict`` takes too, with the sampling defaults
the model carries), the VAE round-trips the truth, the slab stage's operator and ``baseline_consistent`` (read
from ``data/slab``, the projection of every rung) come in, and every rung of the ladder
(:mod:`ctdiff.evaluation.rungs`) is built from those, scored against
series 2 (``psnr``, ``ssim``, ``mae_hu`` and ``*_body``; where the case has a label map, the structure
metrics of :mod:`ctdiff.metrics.structures`), cut into the PNG panel's planes, and released.
:mod:`ctdiff.evaluation.report` writes what the stage shows: metrics.json with the paired per-case gains
and their bootstrap intervals, per_case.csv, the findings plots and the panels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ctdiff.data.grid import image_from_array, resample, to_int16_hu
from ctdiff.data.processed import Case, split_cases
from ctdiff.data.slab import SlabCase
from ctdiff.device import pick_device
from ctdiff.evaluation.figures import cut_planes, densest_plane
from ctdiff.evaluation.report import CaseResult, case_panel, log_results
from ctdiff.evaluation.rungs import PREDICTION, Ladder, LadderInputs
from ctdiff.inference.calibration import load_calibration
from ctdiff.inference.sampling import TrainedModel, decoded_change, load_trained_model, predict_thin
from ctdiff.io import atomic_dir, atomic_live
from ctdiff.metrics.cases import score
from ctdiff.metrics.image import TruthScorer
from ctdiff.metrics.structures import StructureTruth
from ctdiff.metrics.uncertainty import Calibration, calibrated_metrics, uncertainty_metrics
from ctdiff.models.reference import Reference, load_reference
from ctdiff.params import Params


def evaluate(params: Params, processed_dir: Path, slab_dir: Path, vae_dir: Path, ckpt_dir: Path, live_dir: Path,
             pred_dir: Path, progress: bool = True, reference_dir: Path | None = None,
             calibration_dir: Path | None = None) -> dict[str, Any]:
    """Run the stage; returns the summary written to ``live_dir/metrics.json``.

    ``reference_dir`` holds the sr_reference stage's checkpoints (the ``reference`` rung); None leaves
    that rung out. ``calibration_dir``: the calibrate stage's scales of the model's spread (the calibrated
    coverage on test); None, or no calibration there, leaves those metrics out.
    """
    cases = split_cases(processed_dir, params.evaluate.split, params.evaluate.max_cases)
    device = pick_device(params.device)
    model = load_trained_model(vae_dir, ckpt_dir, device)
    reference = load_reference(reference_dir, device) if reference_dir is not None else None
    calibration = load_calibration(calibration_dir, model) if calibration_dir is not None else None
    results = []
    with atomic_live(live_dir) as live, atomic_dir(pred_dir) as preds:
        for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
            slabs = SlabCase.open(slab_dir, case.case_id)
            check_profiles(slabs, model, reference)
            inputs, seconds = ladder_inputs(model, reference, params, case, slabs)
            result = score_case(case, Ladder(inputs), params, seconds, slabs.operator.n_slabs,
                                preds if params.evaluate.nifti else None, calibration,
                                slabs.operator.phase(case.grid.spacing_mm[2]))
            live.log_image(f"{case.case_id}.png", case_panel(result, params.evaluate.window_hu))
            results.append(result)
        log_results(live, results, model, params)
    return json.loads((live_dir / "metrics.json").read_text())


def check_profiles(slabs: SlabCase, model: TrainedModel, reference: Reference | None) -> None:
    """The model and the reference must have learnt from the slab profile evaluate projects with."""
    if model.profile.digest != slabs.profile_digest:
        raise RuntimeError(f"the trained model was trained with the {model.profile.name} slab profile "
                           f"({model.profile.digest}) but data/slab holds {slabs.profile_digest}: rerun train "
                           f"(dvc repro)")
    if reference is not None and reference.profile_digest != slabs.profile_digest:
        raise RuntimeError(f"the reference network learnt from slab profile {reference.profile_digest} but data/slab "
                           f"holds {slabs.profile_digest}: rerun sr_reference (dvc repro)")


def ladder_inputs(model: TrainedModel, reference: Reference | None, params: Params, case: Case, slabs: SlabCase
                  ) -> tuple[LadderInputs, float]:
    """(what the case's rungs are built from, seconds the sampling took)."""
    ep = params.evaluate
    source, target, series1 = case.load("source"), case.load("target"), case.load("series1")
    baseline_consistent = slabs.baseline(mmap=False)
    direction = case.grid.direction
    tic = time.perf_counter()
    thin = predict_thin(model, source, baseline_consistent, params.train_seed, direction, slabs.project)
    seconds = time.perf_counter() - tic
    vae_ceiling = model.vae.round_trip(target, direction)
    if thin.anchor is not None:  # sampling.decode: change reads the ceiling as a change too
        vae_ceiling = decoded_change(vae_ceiling, thin.condition, thin.anchor)
    bspline = resample(series1, case.series1_grid, case.grid, "bspline") if ep.bspline_baseline else None
    inputs = LadderInputs(thin.raw, thin.spread, vae_ceiling, source.astype(np.float32), baseline_consistent, bspline,
                          slabs.project, model.sampling.consistency, None if reference is None else reference.predict)
    return inputs, seconds


def score_case(case: Case, ladder: Ladder, params: Params, seconds: float, slabs: int,
               preds: Path | None, calibration: Calibration | None = None, phase: np.ndarray | None = None
               ) -> CaseResult:
    """Score every rung against the truth, keep the panel's planes, write the prediction's NIfTI to ``preds``;
    with ``calibration``, also the calibrated intervals' coverage of the prediction (with ``phase``, each slice's
    slab phase: per phase group, and at slab centres and midway)."""
    truth = case.load("target")
    # The truth's body mask and SSIM maps, once per case, on the stage's device (each rung moves there once).
    scorer = TruthScorer(truth, params.hu_range, device=pick_device(params.device))
    structures = case_structures(case, truth, params)
    through = embolus_plane(structures) or (truth.shape[0] // 2, truth.shape[1] // 2)
    result = CaseResult(case.case_id, case.category, case.spacing_mm, seconds, slabs, through,
                        truth=cut_planes(truth, through),
                        series1=cut_planes(resample(case.load("series1"), case.series1_grid, case.grid, "nearest"),
                                           through))  # thick slabs as acquired
    for rung, volume in ladder:
        result.scores[rung.name] = score(volume, scorer, structures)
        if rung.column is not None:
            result.planes[rung.column] = cut_planes(volume, through)
        if rung.name == PREDICTION:
            result.error = cut_planes(np.abs(volume - truth.astype(np.float32)), through)
            spread = ladder.inputs.model_spread
            if spread is not None:  # several draws: how well their spread ranks and covers the error
                mask = scorer.mask.cpu().numpy()
                result.scores[rung.name].update(uncertainty_metrics(volume, spread, truth, params.hu_range, mask))
                if calibration is not None:
                    result.scores[rung.name].update(calibrated_metrics(volume, spread, truth, params.hu_range,
                                                                       calibration, mask, phase))
                result.spread = cut_planes(spread, through)
            if preds is not None:
                sitk.WriteImage(image_from_array(to_int16_hu(volume), case.grid), str(preds / f"{case.case_id}.nii.gz"),
                                useCompression=True)
    return result


def case_structures(case: Case, truth_hu: np.ndarray, params: Params) -> StructureTruth | None:
    """The case's structure truth from ``labels.npy``, or None when the case has no labels (real data)."""
    if not case.has_labels:
        return None
    return StructureTruth.build(case.load("labels"), case.meta["labels"]["classes"], truth_hu, case.spacing_mm,
                                case.category, params.evaluate.lumen_ring_mm, params.evaluate.defect_hu)


def embolus_plane(structures: StructureTruth | None) -> tuple[int, int] | None:
    """Where the panel's planes cut when the case has emboli: through most of them (else the mid-planes)."""
    if structures is None or "embolus" not in structures.masks:
        return None
    return densest_plane(structures.masks["embolus"])
