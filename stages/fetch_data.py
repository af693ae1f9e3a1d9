"""fetch_data stage: fill data/raw/ with case zips from data.source (phantom, hf or local).

Run from the repository root: ``python stages/fetch_data.py`` (dvc.yaml does).
"""

import sys
from pathlib import Path

from ctdiff.data.fetch import DataFetchError, fetch_data
from ctdiff.params import ParamsError, load_params

RAW_DIR = Path("data/raw")


def main() -> int:
    try:
        params = load_params()
        summary = fetch_data(params, RAW_DIR, progress=True)
    except (ParamsError, DataFetchError) as exc:
        # One line, no traceback: the message names the fix (and never holds the token).
        print(f"fetch_data: error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
