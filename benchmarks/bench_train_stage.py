"""The whole train stage with the committed ``params.yaml`` and a released-size VAE, timed by phase.

    python benchmarks/bench_train_stage.py           # SD (the committed default), released architecture
    python benchmarks/bench_train_stage.py --maisi   # MAISI, released architecture (slow on a CPU)

The committed default trains against the pretrained SD VAE, which needs a download. Its cost does not
depend on the weights' values, so this builds the released architecture with random weights
(``new_codec``, same parameter count: printed), writes it to ``models/vae`` as vae_fit would, and runs
``ctdiff.training.ldm.train`` on the default phantom data (fetch_data + preprocess, as ``dvc repro`` makes
it). Everything else, epochs, UNet, patch, batch, unfrozen epochs, validation, is the committed params.
The loss values mean nothing here (random VAE); the seconds are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from bench_train import RELEASED  # the released architectures (run as a script: benchmarks/ is on the path)

from ctdiff.data.fetch import fetch_data
from ctdiff.data.preprocess import preprocess
from ctdiff.io import atomic_dir
from ctdiff.models.vae.maisi import maisi_config
from ctdiff.models.vae.sd import sd_scratch_config
from ctdiff.models.vae.weights import new_codec, runtime_settings, save_weights, write_manifest
from ctdiff.params import load_params
from ctdiff.training.ldm import train
from ctdiff.training.slab import run_slab_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maisi", action="store_true", help="MAISI instead of SD")
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    params = dataclasses.replace(params, vae=dataclasses.replace(params.vae, use_maisi=args.maisi))
    vae = params.vae
    config = maisi_config(RELEASED["maisi"], vae.latent_channels) if args.maisi else \
        sd_scratch_config(RELEASED["sd"], vae.latent_channels)

    with tempfile.TemporaryDirectory(prefix="bench_train_stage_") as tmp:
        root = Path(tmp)
        tic = time.perf_counter()
        fetch_data(params, root / "raw")
        preprocess(params, root / "raw", root / "processed", progress=False)
        run_slab_stage(params, root / "processed", root / "models_slab", root / "slab", None, progress=False)
        data_s = time.perf_counter() - tic
        torch.manual_seed(0)
        codec = new_codec(vae, params.hu_range, config)
        n_params = sum(p.numel() for p in codec.module.parameters())
        with atomic_dir(root / "vae") as out:
            files = save_weights(codec, out)
            write_manifest(out, codec, ".", files, {"origin": "random, released architecture (benchmark)"},
                           runtime_settings(vae))
        del codec

        tic = time.perf_counter()
        result = train(params, root / "processed", root / "slab", root / "models_slab", root / "vae",
                       root / "checkpoints", root / "live", progress=False)
        total = time.perf_counter() - tic

    tp = params.train
    per_epoch = [(h["phase"], h["perf/sec_per_step"] * (h["step"] - (result.history[i - 1]["step"] if i else 0)))
                 for i, h in enumerate(result.history)]
    frozen = sum(s for phase, s in per_epoch if phase == 0.0)
    unfrozen = sum(s for phase, s in per_epoch if phase == 1.0)
    n_frozen = sum(1 for phase, _ in per_epoch if phase == 0.0)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    print(f"VAE: {'maisi' if args.maisi else 'sd'} released architecture, {n_params:,} parameters (random weights)")
    print(f"params: {args.params}; epochs {tp.epochs} ({n_frozen} frozen), {result.steps} steps, "
          f"vae_recon_slices {tp.vae_recon_slices}; phantom data made in {data_s:.0f} s (not counted)\n")
    print("| part | seconds | share |")
    print("|---|---:|---:|")
    rest = total - frozen - unfrozen
    for name, seconds in [("frozen-VAE steps (cached latents)", frozen), ("unfrozen-VAE steps", unfrozen),
                          ("the rest: encoding the cache, validation, checkpoints", rest),
                          ("**train stage total**", total)]:
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"\nval loss {result.history[0]['val/loss']:.4f} (epoch 1) -> {result.history[-1]['val/loss']:.4f} "
          f"(epoch {len(result.history)})")


if __name__ == "__main__":
    main()
