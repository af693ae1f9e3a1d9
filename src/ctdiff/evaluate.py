"""The evaluate stage: the trained model against the honest baselines, on the test split.

For every test case (``data/processed``, never seen by vae_fit's training or the train stage) one latent
is sampled from series 1 (DDIM for a DDPM-trained model, Euler steps for rectified flow; fixed seed;
``evaluate.samples`` of them averaged) and decoded; volumes larger than the training patch are sampled
window by window (MONAI ``SlidingWindowInferer`` around the UNet at every step, Gaussian blending), so
any size works. Every rung of the ladder (:mod:`ctdiff.rungs`: model, model_raw, the baselines raw and
projected onto series 1's slabs, the VAE ceiling raw and projected) is built from that one decode and
scored (:mod:`ctdiff.scoring`) against series 2 with ``psnr``, ``ssim``, ``mae_hu`` and ``*_body``, and,
where the case has a label map (the phantoms), with the structure metrics of :mod:`ctdiff.structures`
(MAE per structure, embolus conspicuity, false filling defects). The ``reference`` rung is the
``sr_reference`` stage's supervised network. The paired per-case gains of ``model`` over
``baseline_consistent`` and over ``reference`` (and of ``reference`` over ``baseline_consistent``) get
seeded bootstrap intervals (:data:`PAIRS`).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn
from tqdm import tqdm

from ctdiff.checkpoint import load_checkpoint
from ctdiff.denoiser import build_unet, crop_latent, pad_latent
from ctdiff.device import pick_device
from ctdiff.diffusion import LatentTarget, sample, sampling_scheduler
from ctdiff.grid import Grid, image_from_array, resample, to_int16_hu
from ctdiff.images import densest_plane, ladder_panel
from ctdiff.io import atomic_dir, atomic_write_text
from ctdiff.latents import VaeAdapter, latent_patch_shape
from ctdiff.metrics import METRIC_NAMES, atomic_live
from ctdiff.params import Params
from ctdiff.reference import load_reference, predict_reference
from ctdiff.rungs import build_ladder, decoded_change
from ctdiff.scoring import paired_gains, score_rungs, summarise
from ctdiff.slab import case_consistency
from ctdiff.structures import CONSPICUITY, FALSE_DEFECTS, STRUCTURE_METRICS, StructureTruth

CHECKPOINTS = ("best.pt", "last.pt")  # best by val loss; last when no validation improved on the first
GAIN_KEY = "model_minus_baseline_consistent"  # paired per-case gain of the model over the honest baseline
# The paired comparisons evaluate reports, as (rung, against): metrics.json key "<rung>_minus_<against>".
PAIRS = (("model", "baseline_consistent"), ("model", "reference"), ("reference", "baseline_consistent"))
TITLED = ("model", "model_raw", "reference", "baseline_consistent", "vae_ceiling_consistent")  # PNG panel titles
PLOTTED = (CONSPICUITY, FALSE_DEFECTS)  # per case and rung, as DVC plots (plots/custom/<metric>.json)


@dataclass
class TrainedModel:
    unet: nn.Module
    vae: VaeAdapter
    scale_factor: float
    latent_target: LatentTarget
    latent_patch: tuple[int, int, int]
    checkpoint: dict[str, Any]  # name, step, epoch


class WindowedDenoiser(nn.Module):
    """The UNet applied over overlapping latent windows of the training patch size, blended.

    Same call signature as ``DiffusionModelUNet``, so MONAI's sampling loop uses it unchanged; the noise
    is drawn once for the whole volume, so neighbouring windows denoise the same sample.
    """

    def __init__(self, unet: nn.Module, roi: tuple[int, int, int], overlap: float, window_batch: int = 1) -> None:
        super().__init__()
        self.unet = unet
        self.inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=window_batch, overlap=overlap,
                                            mode="gaussian")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.inferer(x, self.unet, timesteps=timesteps, context=context)


def load_trained_model(params: Params, vae_dir: Path, ckpt_dir: Path, device: torch.device) -> TrainedModel:
    """The UNet, the VAE (with its fine-tuned weights when training changed them) and the scale factor."""
    path = next((ckpt_dir / name for name in CHECKPOINTS if (ckpt_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (expected one of {CHECKPOINTS}): run the train stage")
    ckpt = load_checkpoint(path)
    vae = VaeAdapter.load(vae_dir, params.vae, device)
    if ckpt.get("codec") not in (None, vae.name):
        raise ValueError(f"{path} was trained with the {ckpt['codec']} VAE but {vae_dir} holds {vae.name}: "
                         "rerun the train stage (dvc repro)")
    if ckpt.get("vae") is not None:
        vae.module.load_state_dict(ckpt["vae"])
    vae.set_trainable("none")
    unet = build_unet(params.train.unet, vae.latent_channels)
    unet.load_state_dict(ckpt["unet"])
    unet.to(device).eval()
    latent_patch = latent_patch_shape(params.train.patch, vae.downsample, params.train.unet.latent_multiple, vae.name)
    latent_target = LatentTarget(bool(ckpt.get("train_params", {}).get("residual", False)),
                                 float(ckpt.get("residual_gain") or 1.0))
    return TrainedModel(unet, vae, float(ckpt["scale_factor"]), latent_target, tuple(latent_patch),
                        {"file": path.name, "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"])})


@torch.no_grad()
def predict(model: TrainedModel, params: Params, source_hu: np.ndarray, seed: int) -> np.ndarray:
    """Sample series 2 given series 1 on its grid: (D, H, W) HU in, (D, H, W) float32 HU out.

    With ``evaluate.samples`` > 1 the decoded samples (one seeded stream, successive draws) are averaged
    in HU: an estimate of the posterior mean, which is what PSNR and MAE reward.
    """
    device = next(model.unet.parameters()).device
    hu = torch.from_numpy(source_hu.astype(np.float32))[None, None].to(device)
    # The posterior mean conditions sampling: the deterministic code of series 1.
    condition = model.vae.encode_posterior_hu(hu).mean * model.scale_factor
    latent_shape = tuple(condition.shape[2:])
    condition = pad_latent(condition, params.train.unet)
    roi = tuple(min(r, s) for r, s in zip(model.latent_patch, condition.shape[2:]))
    denoiser: nn.Module = model.unet
    if roi != tuple(condition.shape[2:]):
        denoiser = WindowedDenoiser(model.unet, roi, params.evaluate.overlap, params.evaluate.window_batch)
    generator = torch.Generator(device=device).manual_seed(seed)
    scheduler = sampling_scheduler(params.train, params.evaluate.steps)
    total = np.zeros(source_hu.shape, np.float64)
    for _ in range(params.evaluate.samples):
        latent = model.latent_target.latent(sample(denoiser, scheduler, condition, generator=generator), condition)
        latent = crop_latent(latent, latent_shape) / model.scale_factor
        total += model.vae.decode_hu(latent, source_hu.shape)[0, 0].float().cpu().numpy()
    return (total / params.evaluate.samples).astype(np.float32)


@torch.no_grad()
def vae_round_trip(vae: VaeAdapter, hu: np.ndarray) -> np.ndarray:
    """Encode (posterior mean) and decode series 2: (D, H, W) HU -> (D, H, W) float32 HU."""
    device = next(vae.module.parameters()).device
    x = torch.from_numpy(hu.astype(np.float32))[None, None].to(device)
    return vae.decode_hu(vae.encode_posterior_hu(x).mean, hu.shape)[0, 0].float().cpu().numpy()


def case_structures(case_dir: Path, meta: dict, target_hu: np.ndarray, params: Params) -> StructureTruth | None:
    """The case's structure truth from ``labels.npy``, or None when the case has no labels (real data)."""
    path = case_dir / "labels.npy"
    if not path.is_file() or "labels" not in meta:
        return None
    return StructureTruth.build(np.load(path), meta["labels"]["classes"], target_hu,
                                Grid.from_meta(meta["grid"]).spacing_mm, meta["category"],
                                params.evaluate.lumen_ring_mm, params.evaluate.defect_hu)


def evaluate(params: Params, processed_dir: Path, vae_dir: Path, ckpt_dir: Path, live_dir: Path,
             pred_dir: Path, progress: bool = True, reference_dir: Path | None = None) -> dict[str, Any]:
    """Run the stage; returns the summary written to ``live_dir/metrics.json``.

    ``reference_dir`` holds the sr_reference stage's checkpoints (the ``reference`` rung); None leaves
    that rung out.
    """
    ep = params.evaluate
    splits = json.loads((processed_dir / "splits.json").read_text())
    case_ids = sorted(splits["test"])[: ep.max_cases or None]
    if not case_ids:
        raise RuntimeError(f"{processed_dir}/splits.json has no test case: nothing to evaluate")
    device = pick_device(params.train.device)
    model = load_trained_model(params, vae_dir, ckpt_dir, device)
    reference = load_reference(params, reference_dir, device) if reference_dir is not None else None
    rows: list[dict[str, Any]] = []
    per_case: list[dict[str, dict[str, float]]] = []
    seconds: list[float] = []
    with atomic_live(live_dir) as live, atomic_dir(pred_dir) as preds:
        for case_id in tqdm(case_ids, desc="evaluate", unit="case", disable=not progress):
            case_dir = processed_dir / case_id
            meta = json.loads((case_dir / "meta.json").read_text())
            grid = Grid.from_meta(meta["grid"])
            source, target = np.load(case_dir / "source.npy"), np.load(case_dir / "target.npy")
            series1 = np.load(case_dir / "series1.npy")
            grid1 = Grid.from_meta(meta["series1"]["grid"])
            operator, measured = case_consistency(meta, series1, ep.slab_profile)

            tic = time.perf_counter()
            model_raw = predict(model, params, source, params.seed)
            seconds.append(time.perf_counter() - tic)
            vae_ceiling = vae_round_trip(model.vae, target)
            baseline = source.astype(np.float32)
            if ep.decode == "change":
                anchor = vae_round_trip(model.vae, source)
                model_raw, vae_ceiling = decoded_change(model_raw, baseline, anchor), decoded_change(vae_ceiling,
                                                                                                    baseline, anchor)
            bspline = resample(series1, grid1, grid, "bspline") if ep.bspline_baseline else None
            project = partial(operator.project, measured=measured)
            ladder = build_ladder(model_raw, vae_ceiling, baseline, bspline, project, ep.consistency,
                                  None if reference is None else partial(predict_reference, reference, params))
            structures = case_structures(case_dir, meta, target, params)
            scores = score_rungs(ladder, target, params.vae.hu_range, structures)
            per_case.append(scores)
            row: dict[str, Any] = {"case_id": case_id, "category": meta["category"], "seconds": seconds[-1],
                                   "slabs": operator.n_slabs}
            row.update({f"{rung}_{name}": value for rung, metrics in scores.items() for name, value in metrics.items()})
            rows.append(row)

            series1_shown = resample(series1, grid1, grid, "nearest")  # thick slabs as acquired
            columns = [("model", ladder["model"]), ("model_raw", model_raw),
                       *([("reference", ladder["reference"])] if "reference" in ladder else []),
                       ("series 1", series1_shown), ("baseline_consistent", ladder["baseline_consistent"])]
            psnrs = ", ".join(f"{rung} {scores[rung]['psnr_body']:.2f}" for rung in TITLED if rung in scores)
            fig = ladder_panel(columns, target, grid.spacing_mm, ep.window_hu,
                               f"{case_id} ({meta['category']}): psnr_body dB {psnrs}{findings_line(scores)}",
                               through=embolus_plane(structures))
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80)
            png = Path(live.plots_dir) / "images" / f"{case_id}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(buf.getvalue())
            if ep.nifti:
                sitk.WriteImage(image_from_array(to_int16_hu(ladder["model"]), grid),
                                str(preds / f"{case_id}.nii.gz"), useCompression=True)

        for rung, metrics in summarise(per_case).items():
            for name in (*METRIC_NAMES, *STRUCTURE_METRICS):
                if name in metrics:  # a structure metric only where some case has labels for it
                    live.log_metric(f"{rung}/{name}", metrics[name], plot=False)
        for rung, against in PAIRS:
            if rung not in per_case[0] or against not in per_case[0]:
                continue
            for name, interval in paired_gains(per_case, rung, against, params.seed).items():
                for key, value in interval.items():
                    live.log_metric(f"{rung}_minus_{against}/{name}/{key}", value, plot=False)
        for name in PLOTTED:
            points = [{"case_rung": f"{row['case_id']} {rung}", "case_id": row["case_id"], "rung": rung,
                       name: scores[rung][name]}
                      for row, scores in zip(rows, per_case) for rung in scores if name in scores[rung]]
            if points:
                live.log_plot(name, points, x=name, y="case_rung", template="bar_horizontal",
                              title=f"{name} per case and rung")
        live.log_metric("sampling/seconds_per_volume", float(np.mean(seconds)), plot=False)
        live.log_metric("cases", len(case_ids), plot=False)
        live.summary.update({"vae": {"codec": model.vae.name, "weights": model.vae.weights},
                             "checkpoint": model.checkpoint,
                             "sampler": {"scheduler": params.train.scheduler, "steps": ep.steps,
                                         "samples": ep.samples, "decode": ep.decode,
                                         "residual": model.latent_target.residual},
                             "consistency": {"model_projected": ep.consistency, "profile": ep.slab_profile}})
        write_per_case_csv(Path(live.dir) / "per_case.csv", rows)
    return json.loads((live_dir / "metrics.json").read_text())


def embolus_plane(structures: StructureTruth | None) -> tuple[int, int] | None:
    """Where the panel's planes cut when the case has emboli: through most of them (else the mid-planes)."""
    if structures is None or "embolus" not in structures.masks:
        return None
    return densest_plane(structures.masks["embolus"])


def findings_line(scores: dict[str, dict[str, float]]) -> str:
    """The panel title's second line: the findings metrics of model, reference and baseline_consistent."""
    parts = [f"{name} " + ", ".join(f"{rung} {scores[rung][name]:.2f}" for rung in
                                     ("model", "reference", "baseline_consistent") if name in scores.get(rung, {}))
             for name in PLOTTED if name in scores["model"]]
    return "\n" + "; ".join(parts) if parts else ""


def write_per_case_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per case: id, category, sampling seconds, then ``<arm>_<metric>`` columns (a DVC plot)."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))  # cases without labels lack some columns
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
