"""evaluate: test split -> dvclive/evaluate/ (the ladder: model, reference, baselines, VAE ceiling, with
structure metrics where the cases have labels), data/predictions/*.nii.gz."""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.evaluation.evaluate import evaluate
from ctdiff.evaluation.report import PAIRS
from ctdiff.evaluation.rungs import RUNG_NAMES
from ctdiff.metrics.structures import CONSPICUITY, FALSE_DEFECTS
from ctdiff.models.vae.weights import WeightsError
from ctdiff.params import ParamsError, load_params

FINDINGS = ((CONSPICUITY, "conspicuity"), (FALSE_DEFECTS, "false_defects"))  # printed where the rung has them


def main() -> int:
    try:
        params = load_params()
        metrics = evaluate(params, Path("data/processed"), Path("data/slab"), Path("models/vae"),
                           Path("models/checkpoints"), Path("dvclive/evaluate"), Path("data/predictions"),
                           reference_dir=Path("models/sr_reference"), calibration_dir=Path("models/calibration"))
    except (ParamsError, WeightsError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    for rung in RUNG_NAMES:
        if rung in metrics:
            m = metrics[rung]
            findings = "".join(f"  {label} {m[name]:.3f}" for name, label in FINDINGS if name in m)
            print(f"evaluate: {rung:<23} psnr_body {m['psnr_body']:6.2f} dB  ssim_body {m['ssim_body']:.3f}  "
                  f"mae_hu_body {m['mae_hu_body']:6.1f}{findings}")
    if metrics.get("health_note"):
        print(f"evaluate: warning: {metrics['health_note']}")
    for rung, against in PAIRS:
        for name, gain in metrics.get(f"{rung}_minus_{against}", {}).items():
            print(f"evaluate: {rung} - {against} {name}: {gain['mean']:+.3f} "
                  f"(95% bootstrap {gain['ci95_low']:+.3f} .. {gain['ci95_high']:+.3f}, {gain['cases']} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
