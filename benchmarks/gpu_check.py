"""The GPU paths at real size, in one prepared run for a lent CUDA machine: seconds and peak GPU memory per step.

    python benchmarks/gpu_check.py                 # on a CUDA machine: 300 x 512 x 512, the released architectures
    python benchmarks/gpu_check.py --dry-run       # anywhere: the same steps at a tiny size on the CPU

Every step runs the project's own code on a real-size phantom (``presets/real-size.yaml``: fetch_data and
preprocess make it, the slab stage its slabs) with the VAEs of the released architectures and random weights
(their cost does not depend on the weights' values; no download), both arms:

1. ``vae_check``: one case encoded and decoded whole (MAISI: its own windows [320, 320, 160], overlap 0.4,
   ``num_splits`` 2, fp16 norms inside its autocast; SD per slice);
2. ``train``: one epoch with the VAE unfrozen (decoder fine-tuned), ``train.precision`` bf16 and then fp32;
3. ``evaluate``'s scoring: one prediction against its truth on the GPU (``TruthScorer(device=cuda)``) beside
   the same on the CPU;
4. ``ctdiff predict`` of one real-size thick series (2 draws x 4 steps), as a user runs it;
5. ``torchrun --nproc_per_node=1 stages/train.py``: the DDP path of the train stage, one epoch.

It writes ``benchmarks/out/gpu_check.md`` (and prints it): per step and arm, wall seconds and the peak GPU memory
(``torch.cuda.max_memory_allocated``; "-" on the CPU). ``--dry-run`` runs the identical plan on the CPU at
``--shape`` (default 32 x 64 x 64) with one epoch of everything, so the script is checked where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ctdiff.data.fetch import fetch_data  # noqa: E402
from ctdiff.data.preprocess import preprocess  # noqa: E402
from ctdiff.data.processed import split_cases  # noqa: E402
from ctdiff.io import atomic_dir  # noqa: E402
from ctdiff.metrics.image import TruthScorer  # noqa: E402
from ctdiff.models.vae.maisi import maisi_config  # noqa: E402
from ctdiff.models.vae.sd import sd_scratch_config  # noqa: E402
from ctdiff.models.vae.weights import load_vae, new_codec, save_weights, write_manifest  # noqa: E402
from ctdiff.params import (  # noqa: E402
    MaisiArchParams,
    Params,
    SdArchParams,
    leaves,
    load_params,
    params_from_dict,
    read_params_yaml,
    set_dotted,
    to_dict,
)
from ctdiff.training.ldm import train  # noqa: E402
from ctdiff.training.slab import run_slab_stage  # noqa: E402

RELEASED = {"maisi": MaisiArchParams(num_channels=(64, 128, 256), num_res_blocks=(2, 2, 2), norm_num_groups=32),
            "sd": SdArchParams(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)}
GPU = {"vae.maisi.tile": [320, 320, 160], "vae.maisi.overlap": 0.4, "vae.maisi.num_splits": 2}  # presets/real.yaml's


def workspace_params(root: Path, arm: str, dry_run: bool, shape: list[int]) -> Params:
    """The repository's params with the real-size preset (or a tiny one) and one epoch of everything."""
    preset = leaves(yaml.safe_load((REPO / "presets" / "real-size.yaml").read_text()))
    overrides = {**preset, "vae.use_maisi": arm == "maisi", "device": "cpu" if dry_run else "cuda",
                 "train.epochs": 1, "train.vae_freeze_epochs": 0, "train.accept_unhealthy": True,
                 "train.sampling.samples": 2, "train.sampling.steps": 4}
    if dry_run:
        overrides.update({"data.phantom.families.hilum.shape": shape, "data.phantom.families.hilum.pixel_mm": 4.0,
                          "vae.maisi.tile": [32, 32, 32], "vae.maisi.num_splits": 1})
    else:
        overrides.update(GPU)
    raw = set_dotted(read_params_yaml(REPO / "params.yaml"), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return params_from_dict(raw)


def write_released_vae(params: Params, out: Path) -> None:
    """The arm's released architecture, random weights, as vae_fit writes models/vae."""
    vae = params.vae
    config = maisi_config(RELEASED["maisi"], vae.latent_channels) if vae.use_maisi else \
        sd_scratch_config(RELEASED["sd"], vae.latent_channels)
    torch.manual_seed(0)
    codec = new_codec(vae, params.hu_range, config)
    with atomic_dir(out) as tmp:
        files = save_weights(codec, tmp)
        write_manifest(tmp, codec, ".", files, {"origin": "random, released architecture (gpu_check)"},
                       {"tile": list(vae.maisi.tile), "overlap": vae.maisi.overlap, "num_splits": vae.maisi.num_splits,
                        "dim_split": vae.maisi.dim_split} if vae.use_maisi else {"slice_batch": vae.sd.slice_batch})


def timed(fn: Callable[[], object], cuda: bool) -> tuple[float, float | None]:
    """(seconds, peak GPU MB or None) of one call."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - tic, (torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def run_arm(root: Path, arm: str, dry_run: bool, shape: list[int], rows: list[tuple]) -> None:
    cuda = not dry_run
    params = workspace_params(root, arm, dry_run, shape)
    processed = root / "data" / "processed"
    if not processed.is_dir():  # the data are the same for both arms
        fetch_data(params, root / "data" / "raw")
        preprocess(params, root / "data" / "raw", processed, progress=False)
        run_slab_stage(params, processed, root / "models" / "slab", root / "data" / "slab", None, progress=False)
    write_released_vae(params, root / "models" / "vae")
    case = split_cases(processed, "test")[0]
    truth = case.load("target")

    vae = load_vae(root / "models" / "vae", "cpu" if dry_run else "cuda")
    seconds, peak = timed(lambda vae=vae: vae.round_trip(truth, case.grid.direction), cuda)
    rows.append((arm, f"vae_check: one case encoded and decoded ({'x'.join(map(str, truth.shape))})", seconds, peak))
    del vae

    for precision in ("bf16", "fp32"):
        tuned = params_from_dict(set_dotted(to_dict(params), {"train.precision": precision}))
        ckpt = root / f"checkpoints-{arm}-{precision}"
        seconds, peak = timed(lambda tuned=tuned, ckpt=ckpt, precision=precision: train(
            tuned, processed, root / "data" / "slab", root / "models" / "slab", root / "models" / "vae", ckpt,
            root / "dvclive" / f"train-{precision}", progress=False), cuda)
        rows.append((arm, f"train: one epoch, VAE decoder fine-tuned, {precision}", seconds, peak))

    prediction = truth.astype(np.float32) + np.random.default_rng(0).normal(0, 30, truth.shape).astype(np.float32)
    for device in (("cuda", "cpu") if cuda else ("cpu",)):
        seconds, peak = timed(lambda device=device: TruthScorer(truth, params.hu_range, device=device).score(
            prediction), device == "cuda")
        rows.append((arm, f"evaluate's scoring: one prediction, truth prepared, on {device}", seconds, peak))

    # the model the fp32 epoch wrote is the workspace's: predict reads models/checkpoints
    os.replace(root / f"checkpoints-{arm}-fp32", root / "models" / "checkpoints")
    zip_path = next((root / "data" / "raw").rglob(f"{case.case_id}.zip"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ctdiff.cli", "predict", str(zip_path), "--out",
                           str(root / "predictions" / arm), "--quiet", "--device", "cpu" if dry_run else "cuda"],
                          cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"predict failed:\n{done.stderr}")
    rows.append((arm, "ctdiff predict: one thick series, 2 draws x 4 steps (whole command)",
                 time.perf_counter() - tic, None))

    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(REPO / "stages" / "train.py")], cwd=root, env={**env, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"torchrun train failed:\n{done.stdout}\n{done.stderr}")
    rows.append((arm, "torchrun --nproc_per_node=1 stages/train.py: one epoch (whole command)",
                 time.perf_counter() - tic, None))
    for path in (root / "models" / "checkpoints", root / "models" / "vae", root / "models" / "calibration"):
        subprocess.run(["rm", "-rf", str(path)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at a tiny size")
    parser.add_argument("--shape", nargs=3, type=int, default=[32, 64, 64], help="the dry run's phantom shape")
    parser.add_argument("--arms", nargs="+", default=["sd", "maisi"], choices=("sd", "maisi"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu_check.md")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on the CPU")
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for arm in args.arms:
            run_arm(Path(tmp), arm, args.dry_run, args.shape, rows)
    device = "CPU (dry run, tiny)" if args.dry_run else torch.cuda.get_device_name(0)
    lines = [f"gpu_check on {device}; {load_params(REPO / 'params.yaml').train.unet.channels} UNet; "
             f"{'shape ' + 'x'.join(map(str, args.shape)) if args.dry_run else 'presets/real-size.yaml'}", "",
             "| arm | step | seconds | peak GPU MB |", "|---|---|---:|---:|"]
    lines += [f"| {arm} | {what} | {seconds:.1f} | {'-' if peak is None else f'{peak:.0f}'} |"
              for arm, what, seconds, peak in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps([{"arm": a, "step": w, "seconds": s, "peak_gpu_mb": p} for a, w, s, p in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
