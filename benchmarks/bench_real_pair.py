"""The slab physics on a real scanner's thick/thin pair: how wrong the assumed profiles are, and the fitted one.

The public DICOM-converter validation data ``neurolabusc/dcm_qa_ct`` (BSD-2-Clause) holds one Philips Ingenuity
acquisition reconstructed at 5 mm (``In/Philips/S21570/S2010``) and at 1 mm (``S2020``), 512 x 512 at 0.451 mm,
one frame of reference. Packed in the APE-data layout (``1/`` = S2010, ``2/`` = S2020) and preprocessed by the
pipeline's own stage, the pair gives, per slice profile (box, triangle, gaussian; and the profile fitted by the
slab stage's least squares on half of the slabs, scored on the other half):

- the forward error: the thin series pushed through the profile against the acquired thick slices (mean
  absolute HU inside the object, HU > -500), on the held-out slabs;
- the projected-truth cap: the true thin series projected onto the slabs with the profile, scored as evaluate
  scores a rung (psnr_body, mae_hu_body): the most any projected rung can reach;
- ``baseline_consistent``: series 1 interpolated onto the thin grid and projected (psnr_body), beside the
  plain interpolation (``baseline``).

    git clone https://github.com/neurolabusc/dcm_qa_ct    # (or the tool's fetch); then:
    python benchmarks/bench_real_pair.py /path/to/dcm_qa_ct

With ``--prediction``, a ``ctdiff predict`` output of S2010 (the thin NIfTI) is scored the same way against the
real 1 mm series S2020 (resampled onto its grid, linear), beside the baselines, and re-thickened with the
fitted profile against the acquired 5 mm slices (the forward error of the prediction, next to the real thin
series' own):

    ctdiff predict /path/to/dcm_qa_ct/In/Philips/S21570/S2010 --out /tmp/s2010 --samples 2 --steps 4
    python benchmarks/bench_real_pair.py /path/to/dcm_qa_ct --prediction /tmp/s2010/S2010.nii.gz

The folder's ``In/Philips/S21570/S2010`` and ``S2020`` are read; nothing is written outside a temporary folder.
``tests/test_slab_fit.py`` checks the same on the committed crop of this pair (tests/fixtures/dcm_qa_ct).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.grid import Grid, resample  # noqa: E402
from ctdiff.data.preprocess import preprocess  # noqa: E402
from ctdiff.data.processed import Case  # noqa: E402
from ctdiff.data.slab import PROFILES, SliceProfile, case_slabs, consistent_baseline  # noqa: E402
from ctdiff.metrics.image import TruthScorer  # noqa: E402
from ctdiff.params import load_params, with_overrides  # noqa: E402
from ctdiff.training.slab import SlabPair, fit_profile, forward_error  # noqa: E402


def pack(dcm_qa_ct: Path, raw: Path) -> Path:
    """S2010 as ``1/`` and S2020 as ``2/`` of ``raw/non-APE/philips_s21570.zip`` (the APE-data layout)."""
    series = dcm_qa_ct / "In" / "Philips" / "S21570"
    out = raw / "non-APE" / "philips_s21570.zip"
    out.parent.mkdir(parents=True)
    (raw / "APE").mkdir()
    with zipfile.ZipFile(out, "w") as zf:
        for folder, name in (("1", "S2010"), ("2", "S2020")):
            files = sorted(p for p in (series / name).iterdir() if p.name.startswith("I"))
            if not files:
                sys.exit(f"{series / name}: no DICOM files (expected the dcm_qa_ct checkout)")
            for path in files:
                zf.write(path, f"philips_s21570/{folder}/{path.name}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dcm_qa_ct", type=Path, help="a checkout of neurolabusc/dcm_qa_ct")
    parser.add_argument("--prediction", type=Path, help="ctdiff predict's thin NIfTI of S2010, to score")
    args = parser.parse_args()
    params = with_overrides(load_params(REPO / "params.yaml"), {
        "preprocess.workers": 1, "preprocess.min_cases": 1,
        "preprocess.split": {"train": 1.0, "val": 0.0, "test": 0.0}})
    with tempfile.TemporaryDirectory(prefix="bench_real_pair_") as tmp:
        root = Path(tmp)
        pack(args.dcm_qa_ct, root / "raw")
        report = preprocess(params, root / "raw", root / "processed", progress=False)
        (entry,) = report["cases"]
        if entry["status"] != "ok":
            sys.exit(f"preprocess rejected the pair: {entry['reason']}")
        print(f"preprocess: accepted, warnings {entry['warnings'] or 'none'}")
        case = Case.open(root / "processed" / entry["case_id"])
        pair = SlabPair.of_case(case)
        slabs = np.arange(len(pair.positions_mm))
        halves = {"even": slabs % 2 == 0, "odd": slabs % 2 == 1}
        tic = time.perf_counter()
        fitted = fit_profile([pair], params.slab, slab_masks=[halves["even"]], spacing_mm=[case.spacing_mm])
        fit_s = time.perf_counter() - tic
        profiles = {"fitted": fitted, **{name: SliceProfile.named(name) for name in PROFILES}}
        held_out = pair.inside(max(p.support for p in profiles.values())) & halves["odd"]
        truth, source, series1 = case.load("target"), case.load("source"), case.load("series1")
        scorer = TruthScorer(truth, params.hu_range)
        baseline = scorer.score(source)
        rows = []
        for name, profile in profiles.items():
            total, count = forward_error(pair, profile, held_out)
            operator, measured = case_slabs(case.meta, series1, profile)
            cap = scorer.score(operator.project(truth, measured=measured))
            projected = scorer.score(consistent_baseline(source, operator, measured))
            rows.append((name, total / count, cap, projected))
        if args.prediction:
            image = sitk.ReadImage(str(args.prediction))
            predicted = resample(sitk.GetArrayFromImage(image).astype(np.float32), Grid.of_image(image), case.grid)
            scored = scorer.score(predicted)
            truth_forward = forward_error(pair, fitted, held_out)
            pred_forward = forward_error(dataclasses.replace(pair, thin_hu=predicted), fitted, held_out)
    print(f"pair: thin {case.grid.shape} at {case.spacing_mm} mm, {len(slabs)} thick slices of "
          f"{pair.thickness_mm:g} mm; fitted on the {int(halves['even'].sum())} even slabs in {fit_s:.1f} s, "
          f"scored on {int(held_out.sum())} odd ones")
    print(f"fitted taps (every {fitted.step * pair.thickness_mm:g} mm from -{len(fitted.taps) // 2} to "
          f"+{len(fitted.taps) // 2}): {' '.join(f'{t:.3f}' for t in fitted.taps)}; FWHM "
          f"{fitted.fwhm() * pair.thickness_mm:.2f} mm\n")
    print("| profile | forward MAE HU (held-out slabs, inside the object) | projected truth psnr_body dB | "
          "projected truth mae_hu_body HU | baseline_consistent psnr_body dB |")
    print("|---|---:|---:|---:|---:|")
    for name, forward, cap, projected in rows:
        print(f"| {name} | {forward:.2f} | {cap['psnr_body']:.2f} | {cap['mae_hu_body']:.2f} | "
              f"{projected['psnr_body']:.2f} |")
    print(f"| (baseline: interpolation, no projection) | | | | {baseline['psnr_body']:.2f} |")
    if args.prediction:
        consistent = dict((r[0], r[3]) for r in rows)["fitted"]
        print(f"\n{args.prediction.name} against S2020 (the real 1 mm series): psnr_body {scored['psnr_body']:.2f} dB, "
              f"mae_hu_body {scored['mae_hu_body']:.2f} HU, ssim_body {scored['ssim_body']:.3f}; baseline_consistent "
              f"(fitted) {consistent['psnr_body']:.2f} dB / {consistent['mae_hu_body']:.2f} HU / "
              f"{consistent['ssim_body']:.3f}; baseline {baseline['psnr_body']:.2f} dB / {baseline['mae_hu_body']:.2f} "
              f"HU / {baseline['ssim_body']:.3f}")
        print(f"re-thickened with the fitted profile, against the acquired 5 mm slices (held-out slabs, inside the "
              f"object): the prediction {pred_forward[0] / pred_forward[1]:.2f} HU MAE, the real 1 mm series "
              f"{truth_forward[0] / truth_forward[1]:.2f} HU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
