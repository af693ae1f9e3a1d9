"""A trained MAISI VAE's round trip at other sliding-window tiles: quality against block averaging, and time.

Nothing is retrained: the workspace's ``models/vae`` is copied with its manifest's ``runtime.tile`` changed
(what ``vae.maisi.tile`` sets), loaded through ``load_vae`` and scored as vae_fit's gate scores
(``check_health``: psnr_body beside the volume's mean and block averaging at the VAE's compression) on the
first ``--health-cases`` train cases and every val case.

    python benchmarks/bench_vae_tile.py --workspace . --tile 64 64 64 --tile 128 128 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.models.vae.weights import MANIFEST_JSON, load_vae  # noqa: E402
from ctdiff.training.vae_fit import check_health  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("."), help="holds models/vae and data/processed")
    parser.add_argument("--tile", nargs=3, type=int, action="append", required=True, metavar=("X", "Y", "Z"))
    parser.add_argument("--health-cases", type=int, default=2)
    args = parser.parse_args()
    processed = args.workspace / "data" / "processed"
    manifest = json.loads((args.workspace / "models" / "vae" / MANIFEST_JSON).read_text())
    if manifest["codec"] != "maisi":
        sys.exit(f"{args.workspace / 'models' / 'vae'} holds a {manifest['codec']} VAE: the tile is MAISI's")
    print("| tile | split | cases | psnr_body | block averaging | worst case over block | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for tile in args.tile:
            copy = Path(tmp) / "x".join(map(str, tile))
            shutil.copytree(args.workspace / "models" / "vae", copy)
            edited = {**manifest, "runtime": {**manifest["runtime"], "tile": tile}}
            (copy / MANIFEST_JSON).write_text(json.dumps(edited))
            codec = load_vae(copy)
            for split, cases in (("train", split_cases(processed, "train")[:args.health_cases]),
                                 ("val", split_cases(processed, "val"))):
                tic = time.perf_counter()
                checks = check_health(codec, cases)
                print(f"| {tile} | {split} | {len(checks)} | {np.mean([c.vae for c in checks]):.2f} | "
                      f"{np.mean([c.lowpass for c in checks]):.2f} | "
                      f"{min(c.gain_over_lowpass for c in checks):+.2f} | {time.perf_counter() - tic:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
