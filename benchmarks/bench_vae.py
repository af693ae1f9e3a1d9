"""VAE codec benchmark: seconds per volume (encode + decode) and peak RSS, SD vs MAISI, tiled and untiled.

    python benchmarks/bench_vae.py                 # the default table (about 5 minutes on 2 CPU cores)
    python benchmarks/bench_vae.py --sizes 64x128x128 --tile 64

Both codecs run at their released sizes with random weights (speed and memory do not depend on the
values): MAISI with the released ``AutoencoderKlMaisi`` config from params.yaml (``vae.maisi.arch``),
SD with the published config of ``stabilityai/sd-vae-ft-mse`` (below). Each configuration runs in its
own process, so the peak RSS it reports (``getrusage(RUSAGE_SELF)`` in that process) belongs to that
configuration alone; ``rss_model`` is the RSS after imports and model construction, before any volume,
so ``peak - rss_model`` is what the volume costs. The default volumes are small because full CT volumes
(about 350 x 512 x 512) take hours per codec on a CPU; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# diffusers' AutoencoderKL config of stabilityai/sd-vae-ft-mse (config.json at the pinned revision).
SD_VAE_FT_MSE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}
DEFAULT_SIZES = ("16x64x64", "48x128x128")
DEFAULT_TILE = 32
HU_RANGE = (-1000.0, 1000.0)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(config: dict) -> dict:
    """Build one codec, round-trip one synthetic volume, return timings and memory (runs in a child)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from ctdiff.models.vae.maisi import MaisiCodec, maisi_config
    from ctdiff.models.vae.sd import SdCodec
    from ctdiff.params import load_params

    torch.manual_seed(0)
    shape = tuple(config["shape"])
    vae = load_params(config["params"]).vae
    if config["codec"] == "maisi":
        tile = config["tile"] or [-(-max(shape) // 16) * 16] * 3  # untiled: one window covers the volume
        codec = MaisiCodec(maisi_config(vae.maisi.arch, vae.latent_channels), HU_RANGE, tile, vae.maisi.overlap,
                           vae.maisi.num_splits, vae.maisi.dim_split, config["device"])
    else:
        codec = SdCodec(AutoencoderKL(**SD_VAE_FT_MSE), HU_RANGE, vae.sd.slice_batch, config["device"])
    rss_model = _rss_mb()
    rng = np.random.default_rng(0)
    hu = torch.from_numpy(rng.normal(0.0, 300.0, shape).astype(np.float32))[None, None]
    started = time.perf_counter()
    latent = codec.encode_hu(hu)
    encoded = time.perf_counter()
    recon = codec.decode_hu(latent, shape)
    done = time.perf_counter()
    assert recon.shape[2:] == shape
    return {"encode_s": encoded - started, "decode_s": done - encoded, "total_s": done - started,
            "latent": "x".join(map(str, latent.shape[1:])), "rss_model_mb": rss_model, "peak_rss_mb": _rss_mb()}


def run_one(config: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="volumes DxHxW")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="MAISI tile edge for the tiled rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {args.device}, {os.cpu_count()} cores ({cpu}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    print("| codec | volume DxHxW | tiling | latent CxDxHxW | encode s | decode s | s/volume | RSS model MB "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for size in args.sizes:
        shape = [int(s) for s in size.lower().split("x")]
        rows = [("sd", None, "per slice"), ("maisi", None, "untiled"),
                ("maisi", [args.tile] * 3, f"tiles {args.tile}^3")]
        for codec, tile, tiling in rows:
            config = {"codec": codec, "shape": shape, "tile": tile, "device": args.device, "params": args.params}
            r = run_one(config)
            print(f"| {codec} | {size} | {tiling} | {r['latent']} | {r['encode_s']:.1f} | {r['decode_s']:.1f} | "
                  f"{r['total_s']:.1f} | {r['rss_model_mb']:.0f} | {r['peak_rss_mb']:.0f} |", flush=True)
    print(f"# total wall time {time.perf_counter() - started:.0f} s (including one interpreter start per row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
