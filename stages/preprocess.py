"""preprocess: data/raw/**.zip -> data/processed/ (int16 HU tensors, meta.json, splits.json, report.json)."""

import sys
from pathlib import Path

from ctdiff.data.preprocess import PreprocessError, preprocess
from ctdiff.params import ParamsError, load_params


def main() -> int:
    try:
        params = load_params()
        report = preprocess(params, Path("data/raw"), Path("data/processed"))
    except (ParamsError, PreprocessError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 1
    print(f"preprocess: {report['n_ok']} case(s) ok, {report['n_rejected']} rejected "
          f"(details in data/processed/report.json)")
    for case in report["cases"]:
        if case["status"] != "ok":
            print(f"  {case['case_id']}: {case['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
