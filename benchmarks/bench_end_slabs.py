"""The end slabs: what keeping or dropping the slabs that reach past the thin grid does to the projected rungs.

For one trained workspace (a ``dvc repro`` or ``dvc exp`` run: ``models/``, ``data/processed``, ``data/slab``) and
the cases of a split (val: never tune on test), each case is sampled once (``--draws`` draws of ``--steps``
steps, the model's condition as trained); the draws' mean and series 1 interpolated are then projected onto the
slabs with operators that keep a slab when at least ``min coverage`` of its profile lies inside the grid
(the rest dropped), and scored: the ``model`` and ``baseline_consistent`` rungs, paired.

    python benchmarks/bench_end_slabs.py --workspace /tmp/run --coverage 0.95 0.85 0.7 0.5

docs/slab.md ("The end slabs") holds what it printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.grid import Grid  # noqa: E402
from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.data.slab import SlabCase, SlabOperator, consistent_baseline, read_profile  # noqa: E402
from ctdiff.inference.sampling import RunningMoments, draws, load_trained_model  # noqa: E402
from ctdiff.metrics.image import TruthScorer  # noqa: E402
from ctdiff.params import load_params  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--coverage", nargs="+", type=float, default=[0.95, 0.85, 0.7, 0.5])
    args = parser.parse_args()
    ws = args.workspace
    params = load_params(ws / "params.yaml")
    model = load_trained_model(ws / "models" / "vae", ws / "models" / "checkpoints", torch.device("cpu"))
    model = model.with_sampling(steps=args.steps, samples=args.draws)
    profile = read_profile(ws / "models" / "slab")
    rows: dict[float, list[tuple[float, ...]]] = {}
    for case in split_cases(ws / "data" / "processed", args.split):
        truth = case.load("target")
        scorer = TruthScorer(truth, params.hu_range)
        slabs = SlabCase.open(ws / "data" / "slab", case.case_id)
        condition = model.condition(case.load("source", mmap=True), slabs.baseline())
        mean = RunningMoments(truth.shape, spread=False)
        for draw in draws(model, condition, params.train_seed, case.grid.direction):
            mean.add(draw)
        grid, grid1 = Grid.from_meta(case.meta["grid"]), Grid.from_meta(case.meta["series1"]["grid"])
        series1, source = case.load("series1"), case.load("source")
        for coverage in args.coverage:
            op = SlabOperator.for_case(grid, grid1, case.meta["series1"].get("slice_thickness"), profile, coverage)
            measured = op.measurements(series1, grid1, grid)
            m = scorer.score(op.project(mean.mean, measured))
            b = scorer.score(consistent_baseline(source, op, measured))
            rows.setdefault(coverage, []).append((m["psnr_body"], m["mae_hu_body"], b["psnr_body"],
                                                  b["mae_hu_body"], op.n_slabs))
        print(f"{case.case_id} done", flush=True)
    print(f"\n{ws}: {len(rows[args.coverage[0]])} {args.split} cases, {args.draws} draws of {args.steps} steps\n")
    print("| min coverage | slabs kept | model psnr_body / mae_hu_body | baseline_consistent | model - baseline |")
    print("|---|---:|---|---|---:|")
    for coverage, r in rows.items():
        a = np.array(r)
        print(f"| {coverage:g} | {a[:, 4].mean():.1f} | {a[:, 0].mean():.2f} dB / {a[:, 1].mean():.1f} HU | "
              f"{a[:, 2].mean():.2f} dB / {a[:, 3].mean():.1f} HU | {np.mean(a[:, 0] - a[:, 2]):+.2f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
