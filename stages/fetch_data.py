"""fetch_data stage: fill data/raw/ with case zips from data.source (phantom, hf or local).

Run from the repository root: ``python stages/fetch_data.py`` (dvc.yaml does).
"""

import sys
from pathlib import Path

from ctdiff.fetch import DataFetchError, fetch_data
from ctdiff.params import load_params

RAW_DIR = Path("data/raw")


def main() -> int:
    params = load_params()
    try:
        summary = fetch_data(params, RAW_DIR, progress=True)
    except DataFetchError as exc:
        # One line, no traceback: the message names the fix (and never holds the token).
        print(f"fetch_data: error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
