"""Scratch VAEs against the linear block code of their latent size: val psnr_body against training steps.

Trains the arm's scratch VAE as vae_fit does (``ctdiff.training.vae_fit``: the same codec, crops, loss and
schedule) with the committed params and the given overrides, and scores the val split's round trip with the
pipeline's metrics after given epochs (training time alone in the table; scoring is not counted). Beside the
metrics, what a collapse shows first: the encoder's posterior std and KL per latent element, the spread of
the latent means over voxels, and the spread of the decoded volume against the truth's (HU, inside the body).

    python benchmarks/bench_vae_fit.py --arm sd --set vae.logvar_init=-6 --set vae.recon_loss=mse
    python benchmarks/bench_vae_fit.py --arm maisi --epochs 12 24 36        # the curve at those epochs

``--processed`` is a data/processed folder of the default phantoms (dvc repro preprocess); one variant per
call, so every row of a comparison runs alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.metrics.image import TruthScorer, mean_metrics  # noqa: E402
from ctdiff.models.vae.weights import new_codec, scratch_config  # noqa: E402
from ctdiff.params import params_from_dict  # noqa: E402
from ctdiff.training.vae_fit import init_logvar, train_as_params  # noqa: E402


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        dotted, value = item.split("=", 1)
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = yaml.safe_load(value)
    return raw


@torch.no_grad()
def score(codec, cases, hu_range) -> dict[str, float]:
    codec.module.eval()
    per_case, diagnostics = [], []
    for case in cases:
        truth = case.load("target")
        hu = torch.from_numpy(truth)[None, None]
        posterior = codec.encode_posterior_hu(hu, case.grid.direction)
        recon = codec.decode_hu(posterior.mean, truth.shape, case.grid.direction)[0, 0]
        scorer = TruthScorer(truth, hu_range)
        per_case.append(scorer.score(recon))
        body = scorer.mask
        diagnostics.append({
            "posterior_std": float(posterior.std.mean()),
            "kl_per_element": float(codec.kl(posterior)) / posterior.mean[0].numel(),
            "latent_spread": float(posterior.mean.std(dim=(2, 3, 4)).mean()),  # over voxels, per channel
            "recon_spread_hu": float(recon[body].std()), "truth_spread_hu": float(torch.from_numpy(
                np.clip(truth, *hu_range).astype(np.float32))[body].std())})
    codec.module.train()
    return {**mean_metrics(per_case), **{k: float(np.mean([d[k] for d in diagnostics])) for k in diagnostics[0]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--arm", choices=("sd", "maisi"), required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    parser.add_argument("--epochs", nargs="+", type=int, help="score after these epochs (default: the last)")
    args = parser.parse_args()
    raw = with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), [f"vae.use_maisi={args.arm == 'maisi'}",
                                                                              *args.set])
    params = params_from_dict(raw)
    vae = params.vae
    epochs = max(args.epochs or [vae.scratch_epochs])
    checkpoints = set(args.epochs or [epochs])
    train, val = split_cases(args.processed, "train"), split_cases(args.processed, "val")
    torch.set_num_threads(torch.get_num_threads())
    set_determinism(params.train_seed)
    codec = new_codec(vae, params.hu_range, scratch_config(vae))
    if vae.logvar_init is not None:
        init_logvar(codec, vae.logvar_init)
    curve, timer = [], {"train": 0.0, "tic": time.perf_counter()}
    steps_per_epoch = int(np.ceil(2 * len(train) * vae.patches_per_volume / vae.batch_size))

    def on_epoch(epoch: int, losses: dict[str, float]) -> None:
        if epoch + 1 in checkpoints:
            timer["train"] += time.perf_counter() - timer["tic"]
            metrics = score(codec, val, params.hu_range)
            curve.append({"epoch": epoch + 1, "steps": (epoch + 1) * steps_per_epoch,
                          "train_seconds": round(timer["train"], 1), **metrics})
            print(f"epoch {epoch + 1}: {timer['train']:.0f} s of training, val psnr_body {metrics['psnr_body']:.2f} "
                  f"dB, "
                  f"train L1 {losses['recon']:.4f}, posterior std {metrics['posterior_std']:.4f}, KL/element "
                  f"{metrics['kl_per_element']:.3f}, latent spread {metrics['latent_spread']:.4f}, decoded spread "
                  f"{metrics['recon_spread_hu']:.0f} HU (truth {metrics['truth_spread_hu']:.0f})", flush=True)
            timer["tic"] = time.perf_counter()

    train_as_params(codec, train, vae, epochs, vae.scratch_lr, params.train_seed, on_epoch)
    print(f"\n{args.arm} {' '.join(args.set) or '(committed params)'}")
    print("| epochs | steps | train s | val psnr_body | ssim_body | mae_hu_body | posterior std | latent spread | "
          "decoded spread HU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in curve:
        print(f"| {row['epoch']} | {row['steps']} | {row['train_seconds']:.0f} | {row['psnr_body']:.2f} | "
              f"{row['ssim_body']:.3f} | {row['mae_hu_body']:.1f} | {row['posterior_std']:.4f} | "
              f"{row['latent_spread']:.4f} | {row['recon_spread_hu']:.0f} / {row['truth_spread_hu']:.0f} |")
    print(json.dumps({"arm": args.arm, "set": args.set, "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
