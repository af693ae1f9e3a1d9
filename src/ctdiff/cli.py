"""The ctdiff command line: one subcommand per pipeline stage, predict, preset and verdict.

  ctdiff STAGE                      run one stage of dvc.yaml (the script in stages/), without DVC's bookkeeping
  ctdiff predict INPUT... --out DIR apply the workspace's trained model to new thick series
  ctdiff preset NAME                print a committed preset as dvc exp run -S overrides
  ctdiff verdict                    the verdict over a sweep of experiments

Run it from the repository root (where dvc.yaml is). The stage scripts are the single implementation of
the stages: this entry point only finds and runs them, so 'ctdiff preprocess' and
'python stages/preprocess.py' cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

STAGES = ("fetch_data", "preprocess", "slab", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference",
          "calibrate", "evaluate")
PREDICT_HELP = """Apply the trained model to new thick series. Each INPUT is a case zip (APE-data layout: folder 1/ is
read, 2/ ignored), a folder of DICOM files, or a NIfTI volume. Writes DIR/<name>.nii.gz (the thin series, int16
HU), DIR/<name>/ (the same as a derived DICOM CT series) and DIR/<name>_std.nii.gz (the per-voxel uncertainty,
HU: calibrated on val when the model has the calibrate stage's scales, else the draws' raw spread). The model is the
workspace's (models/vae, models/checkpoints, models/calibration; --models for another copy) and
carries how it samples (steps, draws) and the slice profile it projects with; the options below override
them. params.yaml gives the reading limits (preprocess.*), the device and the default seed. A series with
uneven slice steps is refused unless --allow-irregular-slices."""
# One line: what --allow-irregular-slices does, mixed thicknesses included (predict.read_scan).
ALLOW_IRREGULAR_HELP = ("accept uneven slice steps (gaps, mixed spacings): slices are linearly interpolated onto one "
                        "spacing, the median step, and mixed slice thicknesses are taken as their median for every "
                        "slab (--thickness-mm overrides)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        commands.add_parser(stage, help=f"run the {stage} stage (stages/{stage}.py)")
    predict = commands.add_parser("predict", help="apply the trained model to new scans", description=PREDICT_HELP)
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    predict.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the outputs go")
    predict.add_argument("--models", type=Path, default=Path("models"), metavar="DIR",
                         help="folder holding vae/, checkpoints/ and calibration/ (default: models)")
    predict.add_argument("--params", type=Path, default=Path("params.yaml"), metavar="FILE",
                         help="params file (default: params.yaml)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default: params device)")
    predict.add_argument("--samples", type=int, help="decoded samples averaged (default: the model's)")
    predict.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    predict.add_argument("--seed", type=int, help="sampling seed (default: params train_seed, as evaluate)")
    predict.add_argument("--window-batch", type=int, help="latent windows per UNet call: speed and memory only, "
                         "the same voxels within float rounding (default: the model's; larger on a GPU)")
    predict.add_argument("--thickness-mm", type=float, help="slice thickness of the inputs (default: DICOM "
                         "SliceThickness, else the slice spacing; a NIfTI's z spacing)")
    predict.add_argument("--allow-irregular-slices", action="store_true", help=ALLOW_IRREGULAR_HELP)
    predict.add_argument("--anonymize", action="store_true", help="drop patient identifiers from the DICOM series")
    predict.add_argument("--quiet", action="store_true", help="no progress bars")
    preset = commands.add_parser("preset", help="print a committed preset as dvc exp run -S overrides",
                                 description="Print presets/NAME.yaml as -S overrides: "
                                             "dvc exp run $(ctdiff preset real)")
    preset.add_argument("name", metavar="NAME")
    verdict = commands.add_parser("verdict", help="the verdict over the family x seed x arm sweep's experiments",
                                  description="Read the sweep's experiments (dvc.api: exp_show, params_show, each "
                                              "run's per_case.csv) and print, per phantom family and pooled, each "
                                              "comparison's mean, seed spread and bootstrap interval "
                                              "(docs/verdict.md)")
    verdict.add_argument("--names", nargs="+", help="only these experiments (default: the sweep with most runs)")
    verdict.add_argument("--json", action="store_true", help="JSON instead of markdown tables")
    verdict.add_argument("-n", "--num", type=int, default=1, metavar="N",
                         help="experiments of the last N commits, as dvc exp show -n (default: 1, HEAD's)")
    args = parser.parse_args(argv)
    if args.command == "verdict":
        return print_verdict(args.names, args.json, args.num)
    if args.command == "predict":
        return run_predict(args)
    if args.command == "preset":
        return print_preset(args.name)
    return run_stage(parser, args.command)


def print_preset(name: str) -> int:
    from ctdiff.params import ParamsError
    from ctdiff.presets import preset_overrides

    try:
        print(" ".join(preset_overrides(name)))
    except (ParamsError, OSError) as exc:
        print(f"preset: {exc}", file=sys.stderr)
        return 1
    return 0


def print_verdict(names: list[str] | None, as_json: bool, num: int = 1) -> int:
    from dvc.exceptions import DvcException

    from ctdiff.evaluation.verdict import main as verdict_main

    try:
        print(verdict_main(Path("."), names, as_json, num))
    except (RuntimeError, DvcException) as exc:
        print(f"verdict: {exc}", file=sys.stderr)
        return 1
    return 0


def run_stage(parser: argparse.ArgumentParser, stage: str) -> int:
    script = Path("stages") / f"{stage}.py"
    if not script.is_file():
        parser.error(f"{script} not found: run ctdiff from the repository root (where dvc.yaml is)")
    sys.argv = [str(script)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``ctdiff predict``: one line per problem on stderr, exit 1 when the model or any input fails."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see stages/train.py)
    from ctdiff.device import pick_device
    from ctdiff.inference.calibration import load_calibration, model_identity
    from ctdiff.inference.predict import predict_inputs
    from ctdiff.inference.sampling import load_trained_model
    from ctdiff.models.vae.weights import WeightsError
    from ctdiff.params import ParamsError, load_params

    try:
        params = load_params(args.params)
        if args.thickness_mm is not None and args.thickness_mm <= 0:
            raise ParamsError("--thickness-mm must be > 0")
        device = pick_device(args.device or params.device, key="--device" if args.device else "device")
        model = load_trained_model(args.models / "vae", args.models / "checkpoints", device)
        calibration = load_calibration(args.models / "calibration", model)
        tuned = model.with_sampling(samples=args.samples, steps=args.steps, window_batch=args.window_batch)
        # the scales hold for the sampling settings they were fitted with (--steps/--samples equal to the model's
        # keep them; --window-batch never changes them)
        if model_identity(tuned) != model_identity(model):
            calibration = None
        model = tuned
    except (ParamsError, WeightsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 1
    seed = params.train_seed if args.seed is None else args.seed
    outcomes = predict_inputs(args.inputs, args.out, model, params, seed, args.thickness_mm, args.anonymize,
                              progress=not args.quiet, allow_irregular=args.allow_irregular_slices,
                              calibration=calibration)
    if calibration is None:
        print("predict: the uncertainty maps (_std.nii.gz) are the draws' raw spread, not calibrated (no calibration "
              f"in {args.models / 'calibration'} for these sampling settings)")
    for outcome in outcomes:
        if outcome.error:
            print(f"predict: {outcome.source}: {outcome.error}", file=sys.stderr)
        else:
            print(f"predict: {outcome.source} -> {', '.join(str(p) for p in outcome.written)}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
