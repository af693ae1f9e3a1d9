"""slab: processed train pairs -> models/slab/profile.json (series 1's slice sensitivity profile, fitted or named),
data/slab/<case_id>/ (every case's slab operator, measurements and baseline_consistent), dvclive/slab/ (the fit's
error on val against the named shapes, the cap each puts on the projected truth, the profile as a plot)."""

import sys
from pathlib import Path

from ctdiff.data.processed import DataError
from ctdiff.io import atomic_live
from ctdiff.params import ParamsError, load_params
from ctdiff.training.slab import SlabFitError, run_slab_stage


def main() -> int:
    try:
        params = load_params()
        with atomic_live("dvclive/slab") as live:
            summary = run_slab_stage(params, Path("data/processed"), Path("models/slab"), Path("data/slab"), live)
    except (ParamsError, DataError, SlabFitError, FileNotFoundError) as exc:
        print(f"slab: {exc}", file=sys.stderr)
        return 1
    errors = summary["forward_mae_hu"]
    print(f"slab: using the {summary['profile']} profile ({errors[summary['profile']]:.2f} HU forward error on "
          f"{summary['scored_on']}; fitted FWHM {summary['fitted']['fwhm_mm']:.2f} mm); slabs of every case in "
          f"data/slab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
