"""What a scratch VAE does epoch by epoch: the encoder's spread, the KL, and what the decoder puts out.

Issue 20's collapse (a scratch SD VAE decoding every volume of a lung family to one grey while its L1 loss
looked ordinary) is a trajectory, not an end state: this trains the scratch VAE exactly as vae_fit's first
attempt does (``scratch_codec`` + ``train_as_params``) and after every epoch round-trips one fixed val volume
whole, recording

- ``recon`` and ``kl``: the epoch's mean training terms (L1 in [0, 1], KL summed per item);
- ``sigma``: the encoder's mean posterior std on that volume; ``mu_spread``: the std of the posterior mean over
  latent positions (averaged over channels; near 0 = the encoder says the same thing everywhere);
- ``psnr_body``, ``mean_psnr_body``, ``block_psnr_body``: the round trip, the volume's best constant and block
  averaging at the VAE's compression (the trivial codes of :mod:`ctdiff.metrics.health`);
- ``out_contrast``: the std of the decoded HU in the body over the truth's (0 = one flat grey, 1 = as much
  structure as the truth); ``out_mean_hu`` beside ``truth_mean_hu``.

The diagnostics use no random numbers, so the training itself is the one vae_fit runs with the same params.

    python benchmarks/bench_vae_collapse.py --arm sd --family periphery \\
        --set data.phantom.n_cases=10 --set data.phantom.families.periphery.shape=[40,96,96] \\
        --set data.phantom.families.periphery.pixel_mm=0.8 --variant base --variant as-built:vae.logvar_init=null

Rows go to ``--out`` (CSV) as they come; a table of selected epochs is printed per run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vae_levers import family_data, parse_variant  # noqa: E402

from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.metrics.health import check_codec  # noqa: E402
from ctdiff.metrics.image import TruthScorer  # noqa: E402
from ctdiff.params import params_from_dict, read_params_yaml, set_dotted  # noqa: E402
from ctdiff.training.vae_fit import scratch_codec, train_as_params  # noqa: E402

FIELDS = ["variant", "train_seed", "epoch", "recon", "kl", "sigma", "mu_spread", "psnr_body", "mean_psnr_body",
          "block_psnr_body", "out_contrast", "out_mean_hu", "truth_mean_hu"]


def probe(codec, case) -> dict[str, float]:
    """Round-trip ``case``'s target whole; the encoder's and decoder's numbers (see the module docstring)."""
    truth = case.load("target")
    scorer = TruthScorer(truth, codec.hu_range)
    x = torch.from_numpy(truth.astype(np.float32))[None, None]
    posterior = codec.encode_posterior_hu(x, case.grid.direction)
    decoded = codec.decode_hu(posterior.mean, truth.shape, case.grid.direction)[0, 0].numpy()
    codec.module.train()  # encode/decode put the module in eval mode; training goes on after the probe
    mask = scorer.mask.numpy() if hasattr(scorer.mask, "numpy") else np.asarray(scorer.mask)
    clipped = np.clip(truth, *codec.hu_range)
    mu = posterior.mean[0].flatten(1)
    codes = check_codec(case.case_id, scorer.score(decoded)["psnr_body"], truth, scorer, codec.downsample)
    return {"sigma": float(posterior.std.mean()), "mu_spread": float(mu.std(dim=1).mean()),
            "psnr_body": codes.vae, "mean_psnr_body": codes.mean, "block_psnr_body": codes.lowpass,
            "out_contrast": float(decoded[mask].std() / max(clipped[mask].std(), 1e-6)),
            "out_mean_hu": float(decoded[mask].mean()), "truth_mean_hu": float(clipped[mask].mean())}


def train_probed(params, name: str, train, case, writer: csv.DictWriter, handle) -> list[dict]:
    """vae_fit's first attempt with :func:`probe` after every epoch (and before the first); the rows."""
    seed = params.train_seed
    codec = scratch_codec(params, seed, params.vae.logvar_init, "cpu")
    rows: list[dict] = []

    def log(epoch: int, losses: dict[str, float]) -> None:
        rows.append({"variant": name, "train_seed": seed, "epoch": epoch + 1, **losses, **probe(codec, case)})
        writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in rows[-1].items() if k in FIELDS})
        handle.flush()

    log(-1, {"recon": float("nan"), "kl": float("nan")})
    train_as_params(codec, train, params.vae, params.vae.scratch_epochs, params.vae.scratch_lr, seed, log)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("sd", "maisi"), required=True)
    parser.add_argument("--family", default="periphery")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for the data and the VAE of every run (YAML value)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_vae_collapse"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "vae_collapse.csv")
    parser.add_argument("--show", nargs="+", type=int, default=[1, 2, 4, 8, 16, 24, 36],
                        help="epochs printed in the table (every epoch goes to the CSV)")
    args = parser.parse_args()
    common = {"vae.use_maisi": args.arm == "maisi"}
    for item in args.set:
        common.update(parse_variant("x:" + item)[1])
    raw = set_dotted(read_params_yaml(REPO / "params.yaml"), common)
    tag = "-".join([args.family] + [f"{k.split('.')[-1]}={v}" for k, v in common.items() if k.startswith("data.")])
    processed = family_data(args.work / tag.replace(" ", "").replace("/", "_"), raw, args.family)
    train, val = split_cases(processed, "train"), split_cases(processed, "val")
    print(f"{args.family}: {len(train)} train, {len(val)} val cases; probe {val[0].case_id}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for seed in args.seeds:
            for name, overrides in [parse_variant(v) for v in (args.variant or ["base"])]:
                params = params_from_dict(set_dotted(raw, {**overrides, "train_seed": seed}))
                tic = time.perf_counter()
                rows = train_probed(params, name, train, val[0], writer, handle)
                print(f"\n{name}, seed {seed} ({time.perf_counter() - tic:.0f} s with the probes)\n")
                print("| epoch | recon L1 | KL | sigma | mu spread | psnr_body (constant, block) | out contrast | "
                      "out / truth mean HU |\n|---:|---:|---:|---:|---:|---|---:|---|")
                for r in rows:
                    if r["epoch"] in [0, *args.show] or r is rows[-1]:
                        print(f"| {r['epoch']} | {r['recon']:.4f} | {r['kl']:.3g} | {r['sigma']:.3g} | "
                              f"{r['mu_spread']:.3g} | {r['psnr_body']:.2f} ({r['mean_psnr_body']:.2f}, "
                              f"{r['block_psnr_body']:.2f}) | "
                              f"{r['out_contrast']:.2f} | {r['out_mean_hu']:.0f} / {r['truth_mean_hu']:.0f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
