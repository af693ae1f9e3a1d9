"""vae_check: models/vae/ + held-out processed volumes -> dvclive/vae_check/ (metrics, per case, images)."""

import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that sleep instead of spinning while they wait (see stages/train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from ctdiff.data.processed import DataError
from ctdiff.device import pick_device
from ctdiff.evaluation.vae_check import check_vae, raise_if_unhealthy
from ctdiff.io import atomic_live
from ctdiff.metrics.health import Unhealthy
from ctdiff.models.vae.weights import WeightsError
from ctdiff.params import ParamsError, load_params


def main() -> int:
    try:
        params = load_params()
        device = pick_device(params.device)
        with atomic_live("dvclive/vae_check") as live:
            summary = check_vae(params, Path("data/processed"), Path("models/vae"), live, device)
        raise_if_unhealthy(summary, params)  # after the outputs are written: a failure can be looked at
    except (ParamsError, WeightsError, DataError, Unhealthy) as exc:
        print(f"vae_check: {exc}", file=sys.stderr)
        return 1
    print(f"vae_check: {summary['codec']} over {summary['n_cases']} case(s): psnr {summary['psnr']:.2f} dB, "
          f"psnr_body {summary['psnr_body']:.2f} dB, ssim {summary['ssim']:.3f}, "
          f"mae_hu_body {summary['mae_hu_body']:.1f} HU, {summary['seconds_per_volume']:.2f} s/volume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
