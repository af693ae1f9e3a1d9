"""vae_fit: processed train split + models/pretrained -> models/vae/ (manifest + weights), dvclive/vae_fit/.

vae.pretrained=true: the downloaded VAE, fine-tuned for vae.finetune_epochs (0 = as downloaded, not
copied); vae.pretrained=false: the same architecture family trained from scratch for vae.scratch_epochs.
The latent scale factor is the train stage's (computed from the latents it caches).
"""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from ctdiff.data.processed import DataError
from ctdiff.device import pick_device
from ctdiff.io import atomic_live
from ctdiff.metrics.health import Unhealthy
from ctdiff.models.vae.weights import WeightsError
from ctdiff.params import ParamsError, load_params
from ctdiff.training.vae_fit import fit_vae


def main() -> int:
    try:
        params = load_params()
        device = pick_device(params.device)
        with atomic_live("dvclive/vae_fit") as live:
            manifest = fit_vae(params, Path("data/processed"), Path("models/pretrained"), Path("models/vae"),
                               live, device)
    except (ParamsError, WeightsError, DataError, Unhealthy) as exc:
        print(f"vae_fit: {exc}", file=sys.stderr)
        return 1
    print(f"vae_fit: {manifest['codec']} VAE ({manifest['weights']['origin']}) -> models/vae "
          f"({manifest['train_seconds']:.0f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
