"""The linear code a VAE of the same latent size must beat: principal components of non-overlapping blocks.

For each VAE's latent grid (SD: 1 x 8 x 8 voxels per latent position, MAISI: 4 x 4 x 4) and its 4 latent
channels, the blocks of the train split's volumes (series 1 on the grid and series 2, as vae_fit trains on
both) in [0, 1] over ``hu_range`` are centred and their top principal components taken (an SVD, no
learning beyond it): a code of exactly as many values per volume as the VAE's latent. Each val target is
encoded (its blocks projected on the components) and decoded, and scored with the pipeline's own metrics
(``TruthScorer``: psnr_body and the rest) beside the scratch VAE's vae_check numbers.

    python benchmarks/bench_linear_code.py --processed data/processed     # after dvc repro preprocess
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.intensity import to_x01  # noqa: E402
from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.metrics.image import TruthScorer, mean_metrics  # noqa: E402
from ctdiff.params import load_params  # noqa: E402

GRIDS = {"sd": (1, 8, 8), "maisi": (4, 4, 4)}


def blocks_of(x01: np.ndarray, block: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, prod(block)) non-overlapping blocks of a (D, H, W) volume edge-padded to multiples of ``block``."""
    pad = [(0, -s % b) for s, b in zip(x01.shape, block)]
    padded = np.pad(x01, pad, mode="edge")
    d, h, w = (s // b for s, b in zip(padded.shape, block))
    bd, bh, bw = block
    grid = padded.reshape(d, bd, h, bh, w, bw).transpose(0, 2, 4, 1, 3, 5)
    return grid.reshape(d * h * w, bd * bh * bw), padded.shape


def volume_of(blocks: np.ndarray, padded_shape: tuple[int, ...], block: tuple[int, int, int],
              shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`blocks_of`, cropped to ``shape``."""
    bd, bh, bw = block
    d, h, w = (s // b for s, b in zip(padded_shape, block))
    grid = blocks.reshape(d, h, w, bd, bh, bw).transpose(0, 3, 1, 4, 2, 5).reshape(padded_shape)
    return grid[: shape[0], : shape[1], : shape[2]]


def fit(cases, block: tuple[int, int, int], components: int, hu_range) -> tuple[np.ndarray, np.ndarray]:
    """(mean block, top ``components`` principal directions) of the cases' source and target blocks."""
    data = np.concatenate([blocks_of(to_x01(c.load(which), hu_range).numpy(), block)[0]
                           for c in cases for which in ("source", "target")]).astype(np.float64)
    mean = data.mean(axis=0)
    # the covariance's eigenvectors (prod(block) x prod(block)): the SVD of the centred blocks, cheaply
    covariance = (data - mean).T @ (data - mean)
    _, vectors = np.linalg.eigh(covariance)
    return mean, vectors[:, ::-1][:, :components]


def round_trip(x01: np.ndarray, mean: np.ndarray, basis: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    blocks, padded = blocks_of(x01, block)
    codes = (blocks - mean) @ basis  # (N, components): the latent
    return volume_of(codes @ basis.T + mean, padded, block, x01.shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    params = load_params(args.params)
    low, high = params.hu_range
    train, held_out = split_cases(args.processed, "train"), split_cases(args.processed, args.split)
    components = params.vae.latent_channels
    results = {}
    for arm, block in GRIDS.items():
        tic = time.perf_counter()
        mean, basis = fit(train, block, components, params.hu_range)
        per_case = []
        for case in held_out:
            truth = case.load("target")
            recon01 = round_trip(to_x01(truth, params.hu_range).numpy().astype(np.float64), mean, basis, block)
            recon_hu = torch.from_numpy(recon01.astype(np.float32)) * (high - low) + low
            per_case.append(TruthScorer(truth, params.hu_range).score(recon_hu))
        results[arm] = {"block": list(block), "components": components, **mean_metrics(per_case),
                        "seconds": time.perf_counter() - tic}
    print(f"linear block code on {len(held_out)} {args.split} case(s), fitted on {len(train)} train case(s) "
          f"({args.processed}):\n")
    print("| grid | block (voxels) | values per voxel | psnr_body dB | ssim_body | mae_hu_body HU | psnr dB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        ratio = components / float(np.prod(r["block"]))
        print(f"| {arm} | {' x '.join(map(str, r['block']))} | {ratio:.4f} | {r['psnr_body']:.2f} | "
              f"{r['ssim_body']:.3f} | {r['mae_hu_body']:.1f} | {r['psnr']:.2f} |")
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
