"""evaluate: test split -> dvclive/evaluate/ (the ladder: model, baselines, VAE ceiling), data/predictions/*.nii.gz."""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.evaluate import GAIN_KEY, evaluate
from ctdiff.params import ParamsError, load_params
from ctdiff.rungs import RUNGS
from ctdiff.vae.load import WeightsError


def main() -> int:
    try:
        params = load_params()
        metrics = evaluate(params, Path("data/processed"), Path("models/vae"), Path("models/checkpoints"),
                           Path("dvclive/evaluate"), Path("data/predictions"))
    except (ParamsError, WeightsError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    for rung in RUNGS:
        if rung in metrics:
            m = metrics[rung]
            print(f"evaluate: {rung:<23} psnr_body {m['psnr_body']:6.2f} dB  ssim_body {m['ssim_body']:.3f}  "
                  f"mae_hu_body {m['mae_hu_body']:6.1f}")
    for name, gain in metrics[GAIN_KEY].items():
        print(f"evaluate: model - baseline_consistent {name}: {gain['mean']:+.3f} "
              f"(95% bootstrap {gain['ci95_low']:+.3f} .. {gain['ci95_high']:+.3f}, {gain['cases']} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
