"""evaluate: test split -> dvclive/evaluate/ (model vs baselines vs VAE ceiling), data/predictions/*.nii.gz."""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.evaluate import evaluate
from ctdiff.params import ParamsError, load_params
from ctdiff.vae.load import WeightsError


def main() -> int:
    try:
        params = load_params()
        metrics = evaluate(params, Path("data/processed"), Path("models/vae"), Path("models/checkpoints"),
                           Path("dvclive/evaluate"), Path("data/predictions"))
    except (ParamsError, WeightsError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    for arm in ("model", "baseline", "baseline_bspline", "vae_ceiling"):
        if arm in metrics:
            m = metrics[arm]
            print(f"evaluate: {arm:<17} psnr_body {m['psnr_body']:6.2f} dB  ssim_body {m['ssim_body']:.3f}  "
                  f"mae_hu_body {m['mae_hu_body']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
