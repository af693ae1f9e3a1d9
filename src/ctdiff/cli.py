"""``ctdiff <stage>``: run one pipeline stage script from the repository root (same as dvc.yaml's cmd).

The stage scripts in ``stages/`` are the single implementation; this entry point only finds and runs
them, so ``ctdiff preprocess`` and ``python stages/preprocess.py`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

STAGES = ("fetch_data", "preprocess", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctdiff", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    args = parser.parse_args(argv)
    script = Path("stages") / f"{args.stage}.py"
    if not script.is_file():
        parser.error(f"{script} not found: run ctdiff from the repository root (where dvc.yaml is)")
    sys.argv = [str(script)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
