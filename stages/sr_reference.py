"""sr_reference: processed train/val splits + data/slab -> models/sr_reference/{last,best}.pt, dvclive/sr_reference/.

A supervised image-space network (MONAI UNet, residual on the slab-consistent baseline) that evaluate
scores as the ``reference`` rung. Resumes from models/sr_reference/last.pt when its params hash matches.
Exit codes: 0 done; 1 error (bad params, missing inputs, non-finite loss); 128 + signal (143 SIGTERM,
130 SIGINT) when stopped by a signal after writing last.pt, so DVC does not record the stage as finished.
"""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.params import ParamsError, load_params
from ctdiff.training.reference import train_reference
from ctdiff.training.scaffold import TrainingDiverged, TrainInterrupted


def main() -> int:
    try:
        params = load_params()
        result = train_reference(params, Path("data/processed"), Path("data/slab"), Path("models/sr_reference"),
                                 Path("dvclive/sr_reference"))
    except TrainInterrupted as exc:
        print(f"sr_reference: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ParamsError, TrainingDiverged, FileNotFoundError, RuntimeError) as exc:
        print(f"sr_reference: {exc}", file=sys.stderr)
        return 1
    if result.history:
        last, base = result.history[-1], result.baseline
        print(f"sr_reference: {result.steps} steps; val psnr_body {last['val/psnr_body']:.2f} dB, mae_hu_body "
              f"{last['val/mae_hu_body']:.1f} HU (epoch {last['epoch'] + 1}; baseline_consistent "
              f"{base['psnr_body']:.2f} dB, {base['mae_hu_body']:.1f} HU); checkpoints in models/sr_reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
