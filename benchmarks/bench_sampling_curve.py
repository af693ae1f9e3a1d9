"""How few sampling steps and draws a trained model needs: quality, calibrated coverage and seconds per case.

For one trained workspace (``models/vae``, ``models/checkpoints``, ``data/processed``, ``data/slab``: a ``dvc repro``
or ``dvc exp`` workspace) and the cases of a split (val: never tune on test), each case is sampled once per step
count with the largest number of draws; the first ``n`` draws of that one seeded stream are what ``n`` draws give
(:func:`ctdiff.inference.sampling.draws`), so every (steps, draws) point comes from the same stream and the
points are paired. Each point's prediction is what evaluate's ``model`` rung scores (the draws' mean projected
onto series 1's slabs; ``train.sampling.decode: sample``), scored with the pipeline's metrics:

- ``psnr_body``, ``mae_hu_body``, ``embolus_conspicuity`` (cases with emboli);
- ``coverage_95``: the calibrated 95 % interval's coverage, leave one case out (the scales fitted, as the
  calibrate stage fits them, on the other cases of the split, scored on the left-out one; two draws or more);
- ``seconds``: the sampling time of one case at that point (the draws' own time, cumulative, plus the
  encoding of the condition; scoring not counted).

    python benchmarks/bench_sampling_curve.py --workspace /tmp/sweep --steps 2 4 8 16 32 --draws 1 2 4 8

It prints a table and appends its rows (with ``--label``, e.g. the arm and scheduler) to ``--csv``, the file the
sampling-curve plot in dvc.yaml reads (``dvc plots show benchmarks/sampling_curve.csv``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.data.slab import SlabCase  # noqa: E402
from ctdiff.inference.sampling import RunningMoments, draws, load_trained_model  # noqa: E402
from ctdiff.metrics.image import TruthScorer  # noqa: E402
from ctdiff.metrics.structures import CONSPICUITY, StructureTruth  # noqa: E402
from ctdiff.metrics.uncertainty import Calibration, nonconformity  # noqa: E402
from ctdiff.params import load_params  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--split", default="val")
    parser.add_argument("--cases", type=int, default=0, help="the first N cases of the split (0 = all)")
    parser.add_argument("--steps", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--label", default="", help="what this model is, for the csv (arm, scheduler)")
    parser.add_argument("--csv", type=Path, default=REPO / "benchmarks" / "sampling_curve.csv")
    args = parser.parse_args()
    ws = args.workspace
    params = load_params(ws / "params.yaml")
    model = load_trained_model(ws / "models" / "vae", ws / "models" / "checkpoints", torch.device("cpu"))
    if model.sampling.decode != "sample":
        sys.exit("this curve follows sampling.decode: sample")
    cases = split_cases(ws / "data" / "processed", args.split, args.cases)
    most = max(args.draws)
    label = args.label or f"{model.vae.name} {model.train_params.scheduler}"
    rows: dict[tuple[int, int], list[dict]] = {}
    scores: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for case in cases:
        truth = case.load("target")
        scorer = TruthScorer(truth, params.hu_range)
        mask = scorer.mask.cpu().numpy()
        structures = StructureTruth.build(case.load("labels"), case.meta["labels"]["classes"], truth, case.spacing_mm,
                                          case.category, params.evaluate.lumen_ring_mm, params.evaluate.defect_hu) \
            if case.has_labels else None
        slabs = SlabCase.open(ws / "data" / "slab", case.case_id)
        condition = model.condition(case.load("source", mmap=True), slabs.baseline())
        for steps in args.steps:
            sampled = model.with_sampling(steps=steps, samples=most)
            mean, projected = RunningMoments(truth.shape, spread=False), RunningMoments(truth.shape)
            stream = draws(sampled, condition, params.train_seed, case.grid.direction)
            seconds = 0.0  # sampling alone: the first draw includes encoding the condition; scoring is not counted
            for n in range(1, most + 1):
                tic = time.perf_counter()
                draw = next(stream)
                seconds += time.perf_counter() - tic
                mean.add(draw)
                projected.add(slabs.project(draw))
                if n not in args.draws:
                    continue
                prediction = slabs.project(mean.mean) if model.sampling.consistency else mean.mean
                row = {"seconds": seconds, **scorer.score(prediction)}
                if structures is not None and CONSPICUITY in structures.metrics(prediction):
                    row[CONSPICUITY] = structures.metrics(prediction)[CONSPICUITY]
                rows.setdefault((steps, n), []).append(row)
                if n >= 2:
                    scores.setdefault((steps, n), []).append(
                        nonconformity(prediction, projected.spread(), truth, params.hu_range, mask))
            print(f"{case.case_id}: {steps} steps done", flush=True)
    table = []
    for (steps, n), per_case in sorted(rows.items()):
        row = {"label": label, "steps": steps, "draws": n,
               "seconds": float(np.mean([r["seconds"] for r in per_case])),
               "psnr_body": float(np.mean([r["psnr_body"] for r in per_case])),
               "mae_hu_body": float(np.mean([r["mae_hu_body"] for r in per_case]))}
        with_emboli = [r[CONSPICUITY] for r in per_case if CONSPICUITY in r]
        row[CONSPICUITY] = float(np.mean(with_emboli)) if with_emboli else float("nan")
        row["coverage_95"] = loco_coverage(scores.get((steps, n), []), params.calibrate.bands_hu)
        table.append(row)
    print(f"\n{label}: {len(cases)} {args.split} case(s), {args.workspace}\n")
    print("| steps | draws | s per case | psnr_body dB | mae_hu_body HU | conspicuity | calibrated 95 % coverage |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['steps']} | {r['draws']} | {r['seconds']:.1f} | {r['psnr_body']:.2f} | {r['mae_hu_body']:.1f} | "
              f"{r[CONSPICUITY]:.3f} | {r['coverage_95']:.3f} |")
    new = not args.csv.exists()
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        if new:
            writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in table)
    return 0


def loco_coverage(per_case: list[tuple[np.ndarray, np.ndarray]], edges_hu) -> float:
    """Mean over cases of the calibrated 95 % coverage on each case (its body voxels' nonconformity and predicted
    HU), the scales fitted on the other cases (nan with fewer than two cases or draws)."""
    if len(per_case) < 2:
        return float("nan")
    coverage = []
    for i, (ratio, mean) in enumerate(per_case):
        calibration = Calibration.fit([c for j, c in enumerate(per_case) if j != i], edges_hu)
        scales = np.asarray(calibration.scales[0.95], np.float32)[calibration.band_of(mean)]
        coverage.append(float(np.mean(ratio <= scales)))
    return float(np.mean(coverage))


if __name__ == "__main__":
    sys.exit(main())
