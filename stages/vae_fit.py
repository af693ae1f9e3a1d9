"""vae_fit: processed train split + models/pretrained -> models/vae/ (manifest + weights), dvclive/vae_fit/.

vae.pretrained=true: the downloaded VAE, fine-tuned for vae.finetune_epochs (0 = as downloaded, not
copied); vae.pretrained=false: the same architecture family trained from scratch for vae.scratch_epochs.
Either way the latent scale factor (1 / std of training latents) goes into the manifest.
"""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from ctdiff.device import pick_device
from ctdiff.metrics import atomic_live
from ctdiff.params import ParamsError, load_params
from ctdiff.vae.data import DataError
from ctdiff.vae.fit import fit_vae
from ctdiff.vae.load import WeightsError


def main() -> int:
    try:
        params = load_params()
        device = pick_device(params.train.device)
        with atomic_live("dvclive/vae_fit") as live:
            manifest = fit_vae(params, Path("data/processed"), Path("models/pretrained"), Path("models/vae"),
                               live, device)
    except (ParamsError, WeightsError, DataError) as exc:
        print(f"vae_fit: {exc}", file=sys.stderr)
        return 1
    print(f"vae_fit: {manifest['codec']} VAE ({manifest['weights']['source']}) -> models/vae, "
          f"scale factor {manifest['scale_factor']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
