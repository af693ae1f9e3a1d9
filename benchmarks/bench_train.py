"""Training benchmark: frozen-phase steps/s with cached latents vs. encoding every step, both VAEs, one run.

    python benchmarks/bench_train.py                 # scratch (CPU) VAE widths, default phantom-sized volumes
    python benchmarks/bench_train.py --real-widths   # released MAISI / SD widths (random weights: same cost)
    python benchmarks/bench_train.py --steps 10 --cases 4 --shape 48 64 64

For each VAE family it builds the codec through ``ctdiff.vae`` (``new_codec``; weights random, which
costs the same as trained ones), writes ``--cases`` synthetic volume pairs in the processed format, and
times, with the train stage's own code and default ``train`` params (UNet, patch, batch):

- **cached**: ``LatentCache.build`` once (reported separately), then frozen-phase steps that cut patches
  from the cached posteriors (what ``ctdiff.training.ldm`` does);
- **encode**: the same steps, but every patch pair is encoded by the frozen VAE first (no cache).

Each step = cut patches, sample latents, UNet forward + backward + AdamW step. Prints a table; the
"break-even" column is how many steps the cache needs to pay for its one-off encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctdiff.data.processed import split_cases
from ctdiff.models.denoiser import build_unet, latent_patch_shape
from ctdiff.models.diffusion import diffusion_loss, training_scheduler
from ctdiff.models.vae.maisi import maisi_config
from ctdiff.models.vae.sd import sd_scratch_config
from ctdiff.models.vae.weights import new_codec, scratch_config
from ctdiff.params import MaisiArchParams, SdArchParams, load_params, with_overrides
from ctdiff.training.latents import LatentCache, PatchSampler

REPO = Path(__file__).resolve().parents[1]
RELEASED = {"maisi": MaisiArchParams(num_channels=(64, 128, 256), num_res_blocks=(2, 2, 2), norm_num_groups=32),
            "sd": SdArchParams(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)}


def write_cases(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` train cases of smooth random HU fields (target) and their 5-slice running mean (source)."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(n):
        coarse = rng.normal(size=(shape[0] // 4 + 1, shape[1] // 8 + 1, shape[2] // 8 + 1))
        target = np.kron(coarse, np.ones((4, 8, 8)))[: shape[0], : shape[1], : shape[2]] * 400.0 - 300.0
        source = np.stack([target[max(k - 2, 0): k + 3].mean(axis=0) for k in range(shape[0])])
        folder = root / f"case_{i:03d}"
        folder.mkdir(parents=True)
        np.save(folder / "target.npy", target.astype(np.int16))
        np.save(folder / "source.npy", source.astype(np.int16))
        grid = {"shape": list(shape), "spacing": [5.0, 5.0, 1.0], "origin": [0.0] * 3,
                "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
        (folder / "meta.json").write_text(json.dumps({"case_id": folder.name, "category": "APE", "split": "train",
                                                      "grid": grid}))
        ids.append(folder.name)
    (root / "splits.json").write_text(json.dumps({"train": ids, "val": [], "test": []}))
    return root


def bench_codec(name: str, real_widths: bool, processed: Path, steps: int, warmup: int) -> dict[str, float]:
    params = with_overrides(load_params(REPO / "params.yaml"), {"vae.use_maisi": name == "maisi",
                                                                "vae.pretrained": False})
    tp = params.train
    if real_widths:
        lc = params.vae.latent_channels
        config = maisi_config(RELEASED["maisi"], lc) if name == "maisi" else sd_scratch_config(RELEASED["sd"], lc)
    else:
        config = scratch_config(params.vae)
    torch.manual_seed(0)
    vae = new_codec(params.vae, params.hu_range, config)
    vae.set_trainable("none")
    sampler = PatchSampler(latent_patch_shape(tp.patch, vae.downsample, tp.unet.latent_multiple, name), vae.downsample)
    cases = split_cases(processed, "train")
    volumes = [(c.load("source", mmap=True), c.load("target", mmap=True)) for c in cases]

    tic = time.perf_counter()
    cache = LatentCache.build(vae, cases, progress=False)
    cache_s = time.perf_counter() - tic
    scale = 1.0 / cache.target_std()

    def run(encode: bool) -> float:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        unet = build_unet(tp.unet, vae.latent_channels)
        opt = torch.optim.AdamW(unet.parameters(), lr=tp.lr)
        scheduler = training_scheduler(tp)
        order = rng.integers(0, len(cases), size=(warmup + steps, tp.batch_size))
        for i, indices in enumerate(order):
            if i == warmup:
                tic = time.perf_counter()
            corners = sampler.corners(volumes, indices, rng)
            if encode:
                source_hu, target_hu = sampler.image_batch(volumes, indices, corners)
                source, target = vae.encode_posterior_hu(source_hu), vae.encode_posterior_hu(target_hu)
            else:
                source, target = sampler.latent_batch(cache, indices, corners)
            loss = diffusion_loss(unet, scheduler, target.sample() * scale, source.sample() * scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps / (time.perf_counter() - tic)

    cached, encoded = run(encode=False), run(encode=True)
    break_even = cache_s / max(1 / encoded - 1 / cached, 1e-9)
    width = list(config.get("num_channels") or config["block_out_channels"])
    return {"codec": name, "width": width, "cache_s": cache_s, "cached": cached, "encode": encoded,
            "ratio": cached / encoded, "break_even": break_even}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-widths", action="store_true", help="released MAISI/SD widths instead of scratch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", type=int, default=8, help="training volume pairs (default phantom: 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 64, 64), metavar=("D", "H", "W"))
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.python_version()}")
    tp = load_params(REPO / "params.yaml").train
    print(f"train defaults: patch {list(tp.patch)}, batch {tp.batch_size}, UNet {list(tp.unet.channels)}; "
          f"{args.cases} volumes {list(args.shape)}; {args.steps} timed steps per mode; "
          f"{'released' if args.real_widths else 'scratch (CPU)'} VAE widths, random weights")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        processed = write_cases(Path(tmp), args.cases, tuple(args.shape))
        for name in ("sd", "maisi"):
            rows.append(bench_codec(name, args.real_widths, processed, args.steps, args.warmup))
    print()
    print("| VAE | width | cache build (s) | cached steps/s | encode-every-step steps/s | ratio | break-even steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['width']} | {r['cache_s']:.1f} | {r['cached']:.2f} | {r['encode']:.2f} | "
              f"{r['ratio']:.1f}x | {r['break_even']:.0f} |")


if __name__ == "__main__":
    main()
