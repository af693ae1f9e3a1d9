"""Scratch-VAE levers over phantom families and training seeds, paired on val, judged as vae_fit's gate judges.

Each variant (a set of params overrides) is trained as vae_fit trains its first attempt (``scratch_codec`` +
``train_as_params``: same crops, loss, schedule and seed) for every family x train_seed, then every val case is
round-tripped whole and scored beside its two trivial codes (``ctdiff.metrics.health``: the volume's mean,
and block averaging at the VAE's own compression). A row per (family, seed, variant): val psnr_body, the
worst val case's gain over block averaging, and whether vae_fit's gate (on its train health cases) passes.

    python benchmarks/bench_vae_levers.py --arm maisi --variant base \\
        --variant as-built:vae.logvar_init=null --variant wide:vae.maisi.scratch.num_channels=[16,32,64]
    python benchmarks/bench_vae_levers.py --arm maisi --dry-run        # tiny phantoms, 1 epoch: the plan works

The data of each family are generated once under ``--work`` (fetch_data + preprocess, committed params with
``data.phantom.family``). Rows are appended to ``--out`` (CSV) as they finish, so a killed run keeps the rows
it finished and a later run adds to them (delete the file to start over); the Markdown summary (per variant:
mean over families x seeds of the paired difference to the first variant, and its range) is printed at the
end; ``--summarise a.csv b.csv`` prints it for runs split over processes (one family or seed each, side by
side on one GPU). ``--fp32`` turns CUDA autocast off (the CPU's numerics).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.fetch import fetch_data  # noqa: E402
from ctdiff.data.preprocess import preprocess  # noqa: E402
from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.metrics.health import codec_verdict  # noqa: E402
from ctdiff.params import params_from_dict, read_params_yaml, set_dotted  # noqa: E402
from ctdiff.training.vae_fit import check_health, scratch_codec, train_as_params  # noqa: E402

FIELDS = ["family", "train_seed", "variant", "overrides", "train_s", "val_psnr_body", "val_block_psnr_body",
          "val_mean_psnr_body", "worst_gain_over_block", "gate"]
DRY = {"data.phantom.n_cases": 6, "data.phantom.families.hilum.shape": [32, 32, 32],
       "data.phantom.families.periphery.shape": [32, 64, 64], "data.phantom.z_subsamples": 1,
       "vae.scratch_epochs": 1, "vae.health_cases": 1, "preprocess.split": {"train": 0.5, "val": 0.25, "test": 0.25}}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (values YAML) -> (name, overrides)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, _split_top(rest)):
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets ("a=[1,2],b=3" -> two items)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def family_data(work: Path, raw_params: dict, family: str) -> Path:
    """data/processed of ``family`` under ``work`` (made once)."""
    processed = work / family / "processed"
    if not (processed / "splits.json").is_file():
        params = params_from_dict(set_dotted(raw_params, {"data.phantom.family": family}))
        tic = time.perf_counter()
        fetch_data(params, work / family / "raw")
        preprocess(params, work / family / "raw", processed, progress=False)
        print(f"{family}: data made in {time.perf_counter() - tic:.0f} s", flush=True)
    return processed


def run_one(raw_params: dict, processed: Path, seed: int, device: str, fp32: bool) -> dict:
    params = params_from_dict(set_dotted(raw_params, {"train_seed": seed}))
    vae = params.vae
    codec = scratch_codec(params, seed, vae.logvar_init, device)
    if fp32:
        codec.amp = False
        if hasattr(codec, "norm_float16"):
            codec.norm_float16 = False
    train, val = split_cases(processed, "train"), split_cases(processed, "val")
    tic = time.perf_counter()
    train_as_params(codec, train, vae, vae.scratch_epochs, vae.scratch_lr, seed)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    gate = codec_verdict(check_health(codec, train[:vae.health_cases]), vae.min_gain_db, "-")
    checks = check_health(codec, val)
    return {"train_s": round(seconds, 1), "val_psnr_body": np.mean([c.vae for c in checks]),
            "val_block_psnr_body": np.mean([c.lowpass for c in checks]),
            "val_mean_psnr_body": np.mean([c.mean for c in checks]),
            "worst_gain_over_block": min(c.gain_over_lowpass for c in checks), "gate": "fail" if gate else "pass"}


def summary(rows: list[dict], variants: list[str]) -> str:
    """Per variant: val psnr_body minus the first variant's, paired per family and seed."""
    base = {(r["family"], r["train_seed"]): float(r["val_psnr_body"]) for r in rows if r["variant"] == variants[0]}
    lines = ["| variant | runs | val psnr_body | - " + variants[0] + " (mean; min .. max over family x seed) | "
             "worst val gain over block (min) | gate passes |", "|---|---:|---:|---|---:|---:|"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        diffs = [float(r["val_psnr_body"]) - base[(r["family"], r["train_seed"])] for r in mine
                 if (r["family"], r["train_seed"]) in base]
        paired = (f"{statistics.mean(diffs):+.2f} ({min(diffs):+.2f} .. {max(diffs):+.2f}; n={len(diffs)})"
                  if diffs else "-")
        lines.append(f"| {name} | {len(mine)} | {statistics.mean(float(r['val_psnr_body']) for r in mine):.2f} | "
                     f"{paired} | {min(float(r['worst_gain_over_block']) for r in mine):+.2f} | "
                     f"{sum(r['gate'] == 'pass' for r in mine)}/{len(mine)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("sd", "maisi"), required=True)
    parser.add_argument("--families", nargs="+", default=["hilum", "periphery"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                        help="a variant; the first is the one the others are paired against (default: base)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_vae_levers"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "vae_levers.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp32", action="store_true", help="no autocast on CUDA (the CPU's numerics)")
    parser.add_argument("--dry-run", action="store_true", help="tiny phantoms and one epoch: check the plan")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="CSV",
                        help="print the summary of these CSVs (runs split over processes) and exit")
    parser.add_argument("--prepare", action="store_true", help="make the families' data and exit")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    if args.summarise:
        rows = [row for path in args.summarise for row in csv.DictReader(path.open())]
        names = list(dict.fromkeys([name for name, _ in variants] if args.variant else [r["variant"] for r in rows]))
        print(summary(rows, names))
        return 0
    fresh = not args.out.is_file() or args.out.stat().st_size == 0
    if not fresh and args.out.read_text().splitlines()[0] != ",".join(FIELDS):
        sys.exit(f"{args.out}: its header is not this benchmark's columns; name a new --out")
    common = {"vae.use_maisi": args.arm == "maisi", **(DRY if args.dry_run else {})}
    raw = set_dotted(read_params_yaml(REPO / "params.yaml"), common)
    work = args.work / ("dry" if args.dry_run else "full")
    data = {family: family_data(work, raw, family) for family in args.families}
    if args.prepare:
        return 0
    if args.fp32 and args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with args.out.open("a", newline="") as handle:  # append: an earlier run's rows in --out are kept
        writer = csv.DictWriter(handle, FIELDS)
        if fresh:
            writer.writeheader()
        for seed in args.seeds:
            for family in args.families:
                for name, overrides in variants:
                    result = run_one(set_dotted(raw, overrides), data[family], seed, args.device, args.fp32)
                    row = {"family": family, "train_seed": seed, "variant": name,
                           "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()), **result}
                    writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
                    handle.flush()
                    rows.append(row)
                    print(f"{family} seed {seed} {name}: val psnr_body {row['val_psnr_body']:.2f} (block "
                          f"{row['val_block_psnr_body']:.2f}), worst gain over block "
                          f"{row['worst_gain_over_block']:+.2f}, gate {row['gate']}, {row['train_s']:.0f} s",
                          flush=True)
    print(f"\n{args.arm} on {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}"
          f"{' (fp32)' if args.fp32 else ''}; {', '.join(args.families)} x seeds {args.seeds}\n")
    print(summary(rows, [name for name, _ in variants]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
