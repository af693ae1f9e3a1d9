"""calibrate: the trained model + processed val cases + data/slab -> models/calibration/calibration.json
(split-conformal scales of the model's spread), dvclive/calibrate/ (the raw spread's coverage and the scales)."""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.evaluation.calibrate import calibrate
from ctdiff.io import atomic_live
from ctdiff.models.vae.weights import WeightsError
from ctdiff.params import ParamsError, load_params


def main() -> int:
    try:
        params = load_params()
        with atomic_live("dvclive/calibrate") as live:
            summary = calibrate(params, Path("data/processed"), Path("data/slab"), Path("models/vae"),
                                Path("models/checkpoints"), Path("models/calibration"), live)
    except (ParamsError, WeightsError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 1
    scales = " ".join(f"{v:.2f}" for k, v in summary.items() if k.startswith("scale_95"))
    print(f"calibrate: {summary['cases']} case(s); the raw spread covered {summary['raw_coverage_2sd']:.0%} within 2 "
          f"spreads; 95 % scales per HU band x slab phase group (band-major): {scales}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
