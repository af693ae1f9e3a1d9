"""train: processed train/val splits + data/slab + models/vae -> models/checkpoints/ ({last,best}.pt and model.json,
how the model is sampled), dvclive/train/.

Resumes from models/checkpoints/last.pt when its params hash matches. Exit codes: 0 done; 1 error
(bad params, missing inputs, non-finite loss); 128 + signal (143 SIGTERM, 130 SIGINT) when stopped by
a signal after writing last.pt, so DVC does not record the stage as finished. Under torchrun
(``torchrun --nproc_per_node=N stages/train.py``) only rank 0 prints and writes.
"""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait. On shared cores
# (CI, a laptop, other jobs) spinning threads made CPU steps up to 20x slower; idle, it costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ctdiff.models.vae.weights import WeightsError
from ctdiff.params import ParamsError, load_params
from ctdiff.training.ldm import train
from ctdiff.training.scaffold import TrainingDiverged, TrainInterrupted


def main() -> int:
    try:
        params = load_params()
        result = train(params, Path("data/processed"), Path("data/slab"), Path("models/slab"), Path("models/vae"),
                       Path("models/checkpoints"), Path("dvclive/train"))
    except TrainInterrupted as exc:
        print(f"train: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ParamsError, WeightsError, TrainingDiverged, FileNotFoundError, RuntimeError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"train: {result.steps} steps; val loss {first['val/loss']:.4f} (epoch {first['epoch'] + 1}) -> "
              f"{last['val/loss']:.4f} (epoch {last['epoch'] + 1}); checkpoints in models/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
