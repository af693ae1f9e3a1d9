"""The sr_reference stage: a plain supervised super-resolution network in image space, the yardstick the
conditional latent-diffusion model is judged against (evaluate's ``reference`` rung).

What it sees and predicts:

- **input**: the slab-consistent baseline of a case (:func:`reference_input`): series 1 linearly
  interpolated onto the common grid (``source.npy``), projected onto series 1's slabs with
  ``evaluate.slab_profile``; exactly the volume evaluate hands it, so the network is scored on the input
  it learnt from;
- **output**: a residual added to that input (:func:`predict_reference`), so it only has to learn what the
  slabs cannot see (detail along the slice axis), and an untrained network is not far from the baseline.

Both are clipped to ``vae.hu_range`` and mapped to [0, 1] (the range every metric uses) and the loss is L1
there, as for the VAEs; the predicted residual is added in HU to the unclipped input, so voxels beyond the
range keep their values. The network is MONAI's ``UNet`` (3D, one channel in and out), trained on random
patches (``sr_reference.patch``, the train stage's size) of the train split and run on whole volumes
through MONAI's Gaussian-blended ``SlidingWindowInferer`` with that patch as the window (it pads volumes
smaller than the window). The VAE plays no part: the rung is the same for the SD and the MAISI arm.

One loop, top to bottom (:func:`train_reference`): load the train and val cases (the test split is never
read), build the network, optimizer and warm-up/cosine LR schedule, resume or start fresh, then per epoch
``steps_per_epoch`` optimizer steps on random patch pairs, validation on the whole val volumes (the
prediction projected onto the slabs, as evaluate scores it, against the truth; the baseline's metrics
alongside), dvclive logging, and checkpoints: ``last.pt`` every ``sr_reference.checkpoint_every`` steps
and at every epoch end, ``best.pt`` when the val L1 of the projected prediction improves.

Resume as in the train stage (:mod:`ctdiff.checkpoint`): a ``last.pt`` whose params hash matches continues
where it stopped (network, optimizer, LR schedule, RNG streams, the partial epoch's statistics); otherwise
training starts fresh and says why. SIGTERM/SIGINT finish the current step, write ``last.pt`` and raise
:class:`~ctdiff.checkpoint.TrainInterrupted` (the stage exits 128 + the signal number); a non-finite loss
raises :class:`~ctdiff.checkpoint.TrainingDiverged` before anything of that step is written.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dvclive import Live
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import SpatialPad
from torch import nn
from tqdm import tqdm

from ctdiff.checkpoint import (
    StopFlag,
    TrainingDiverged,
    TrainInterrupted,
    diff_keys,
    load_checkpoint,
    params_hash,
    resumable,
    rng_state,
    save_checkpoint,
    set_rng_state,
    warmup_cosine,
)
from ctdiff.device import pick_device
from ctdiff.metrics import mean_metrics, reconstruction_metrics, to_x01
from ctdiff.params import Params, SrReferenceParams, to_dict
from ctdiff.slab import SlabOperator, case_consistency
from ctdiff.vae.data import Case, data_fingerprint, split_cases

LAST, BEST = "last.pt", "best.pt"
# sr_reference params that change how a run executes, not the network it produces
NOT_SHAPING = ("device", "checkpoint_every", "window_batch")


@dataclass
class ReferenceResult:
    steps: int  # optimizer steps done in total (including those of a resumed run)
    start_step: int  # where this invocation began (0 = fresh)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch logged by this invocation
    baseline: dict[str, float] = field(default_factory=dict)  # val metrics of the input (baseline_consistent)
    messages: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- input, network
def reference_input(meta: dict, source_hu: np.ndarray, series1_hu: np.ndarray, profile: str) -> np.ndarray:
    """The network's input: (D, H, W) float32 HU, ``source_hu`` (series 1 on the common grid, (D, H, W)) projected
    onto the slabs of ``series1_hu`` (series 1 as acquired, ``series1.npy``) with ``profile``: evaluate's
    ``baseline_consistent``."""
    return _consistent(meta, source_hu, series1_hu, profile)[0]


def _consistent(meta: dict, source_hu: np.ndarray, series1_hu: np.ndarray, profile: str
                ) -> tuple[np.ndarray, SlabOperator, np.ndarray]:
    """(:func:`reference_input`, the case's slab operator, its measurements): validation projects with them too."""
    operator, measured = case_consistency(meta, series1_hu, profile)
    return operator.project(np.asarray(source_hu, dtype=np.float32), measured=measured), operator, measured


def build_reference_net(sp: SrReferenceParams) -> nn.Module:
    """MONAI 3D ``UNet``, (B, 1, D, H, W) [0, 1] intensities -> (B, 1, D, H, W) residual in the same units.

    ``num_res_units=0``: the top layer is then a plain transposed convolution (linear output). With residual
    units MONAI puts a norm and an activation on the top layer's single output channel, which normalises
    each patch's residual away, and it cost more time than it gained on the phantoms (val, paired). The top
    layer starts at zero, so an untrained network returns its input (the baseline) instead of noise.
    """
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=sp.channels, strides=sp.strides,
               num_res_units=0)
    top = net.model[-1].conv  # the last layer applied: Sequential(down, skip(...), up)[-1], conv only
    nn.init.zeros_(top.weight)
    nn.init.zeros_(top.bias)
    return net


def net_contract(params: Params) -> dict[str, Any]:
    """What a checkpoint must share with the params that load it: the architecture and the input it was trained on."""
    sp = params.sr_reference
    return {"channels": list(sp.channels), "strides": list(sp.strides), "hu_range": list(params.vae.hu_range),
            "slab_profile": params.evaluate.slab_profile}


@torch.no_grad()
def predict_reference(net: nn.Module, params: Params, baseline_consistent_hu: np.ndarray) -> np.ndarray:
    """(D, H, W) HU input (:func:`reference_input`, any shape) -> (D, H, W) float32 HU: input + predicted residual.

    Not projected onto the slabs (the caller does that). The volume stays on the CPU; windows of
    ``sr_reference.patch`` run on the network's device, ``window_batch`` at a time, blended with a Gaussian.
    """
    hu = np.asarray(baseline_consistent_hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {hu.shape}")
    sp, (low, high) = params.sr_reference, params.vae.hu_range
    inferer = SlidingWindowInferer(roi_size=sp.patch, sw_batch_size=sp.window_batch, overlap=sp.overlap,
                                   mode="gaussian", padding_mode="replicate",
                                   sw_device=next(net.parameters()).device, device=torch.device("cpu"))
    residual01 = inferer(to_x01(hu, (low, high))[None, None], net)
    return hu + residual01[0, 0].float().numpy() * (high - low)


def load_reference(params: Params, ckpt_dir: Path, device: torch.device) -> nn.Module:
    """The trained network in eval mode on ``device``: ``best.pt``, else ``last.pt`` (weights only)."""
    path = next((ckpt_dir / name for name in (BEST, LAST) if (ckpt_dir / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {ckpt_dir / BEST} or {ckpt_dir / LAST}: run the sr_reference stage first "
                                f"(dvc repro sr_reference)")
    ckpt = load_checkpoint(path)
    changed = diff_keys(ckpt.get("contract", {}), net_contract(params))
    if changed:
        raise RuntimeError(f"{path} was trained with other params ({', '.join(changed)}): rerun the sr_reference "
                           f"stage (dvc repro sr_reference)")
    net = build_reference_net(params.sr_reference)
    net.load_state_dict(ckpt["net"])
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ReferenceCase:
    """One processed case as the reference sees it: input (baseline_consistent) and truth, both (D, H, W) HU."""

    case_id: str
    input_hu: np.ndarray  # float32
    target_hu: np.ndarray  # int16
    operator: SlabOperator
    measured: np.ndarray  # (S, H, W) float32: series 1's slabs on the common grid

    @classmethod
    def load(cls, case: Case, profile: str) -> ReferenceCase:
        series1_path = case.folder / "series1.npy"
        if not series1_path.is_file():
            raise FileNotFoundError(f"{case.case_id}: {series1_path} not found (series 1 as acquired, which the "
                                    f"slab projection needs): rerun the preprocess stage")
        meta = json.loads((case.folder / "meta.json").read_text())
        input_hu, operator, measured = _consistent(meta, case.load("source"), np.load(series1_path), profile)
        return cls(case.case_id, input_hu, case.load("target"), operator, measured)


class PatchPairs:
    """Training volumes as (1, D, H, W) [0, 1] tensors (input, target), edge-padded to at least one patch
    (MONAI ``SpatialPad``), and random patch pairs cut at one place from both."""

    def __init__(self, cases: list[ReferenceCase], patch: tuple[int, int, int], hu_range: tuple[float, float]) -> None:
        pad = SpatialPad(spatial_size=patch, mode="replicate")
        self.patch = patch
        self.pairs = [(pad(to_x01(c.input_hu, hu_range)[None]), pad(to_x01(c.target_hu, hu_range)[None]))
                      for c in cases]

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) patches (B, 1, D, H, W) of random cases at random corners (drawn from ``rng``)."""
        inputs, targets = [], []
        for i in rng.integers(0, len(self.pairs), size):
            x, y = self.pairs[int(i)]
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(x.shape[1:], self.patch)]
            window = (slice(None), *(slice(c, c + p) for c, p in zip(corner, self.patch)))
            inputs.append(x[window])
            targets.append(y[window])
        return torch.stack(inputs), torch.stack(targets)


# --------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(net: nn.Module, params: Params, cases: list[ReferenceCase]) -> dict[str, float]:
    """Mean val metrics of the projected prediction (what evaluate scores) and ``l1`` (its L1 in [0, 1], the
    training loss over whole volumes); ``l1_raw`` of the unprojected prediction."""
    hu_range = params.vae.hu_range
    was_training = net.training
    net.eval()
    per_case, l1, l1_raw = [], [], []
    for case in cases:
        raw = predict_reference(net, params, case.input_hu)
        projected = case.operator.project(raw, measured=case.measured)
        target01 = to_x01(case.target_hu, hu_range)
        l1.append(float((to_x01(projected, hu_range) - target01).abs().mean()))
        l1_raw.append(float((to_x01(raw, hu_range) - target01).abs().mean()))
        per_case.append(reconstruction_metrics(projected, case.target_hu, hu_range))
    net.train(was_training)
    return {"l1": float(np.mean(l1)), "l1_raw": float(np.mean(l1_raw)), **mean_metrics(per_case)}


def baseline_metrics(params: Params, cases: list[ReferenceCase]) -> dict[str, float]:
    """The same means for the input itself (baseline_consistent): what the network must beat."""
    hu_range = params.vae.hu_range
    l1 = [float((to_x01(c.input_hu, hu_range) - to_x01(c.target_hu, hu_range)).abs().mean()) for c in cases]
    return {"l1": float(np.mean(l1)),
            **mean_metrics([reconstruction_metrics(c.input_hu, c.target_hu, hu_range) for c in cases])}


# ------------------------------------------------------------------------------------------- train
@dataclass
class EpochStats:
    """Running sums of one epoch (kept in last.pt so a resumed epoch reports the whole epoch)."""

    steps: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0

    @property
    def loss_mean(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def shaping_params(params: Params, train_cases: list[Case], val_cases: list[Case]) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: sr_reference params that shape the network and its
    trajectory (not ``NOT_SHAPING``), the seed, the input's definition, and the data."""
    return {
        "seed": params.seed,
        "sr_reference": {k: v for k, v in to_dict(params.sr_reference).items() if k not in NOT_SHAPING},
        "hu_range": list(params.vae.hu_range),
        "slab_profile": params.evaluate.slab_profile,
        "data": {"train": {c.case_id: data_fingerprint(c) for c in train_cases},
                 "val": {c.case_id: data_fingerprint(c) for c in val_cases}},
    }


def train_reference(params: Params, processed_dir: Path, ckpt_dir: Path, live_dir: Path,
                    progress: bool = True) -> ReferenceResult:
    """Run (or resume) the sr_reference stage; see the module docstring. Returns what happened."""
    sp = params.sr_reference
    device = pick_device(sp.device, key="sr_reference.device")
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    rng = np.random.default_rng([params.seed, 0x5E])  # patch cases and corners

    # ---- data: train split to learn from, val split to validate on; the test split is never read here
    train_split, val_split = split_cases(processed_dir, "train"), split_cases(processed_dir, "val")
    profile = params.evaluate.slab_profile
    train_cases = [ReferenceCase.load(c, profile) for c in train_split]
    val_cases = [ReferenceCase.load(c, profile) for c in val_split]
    patches = PatchPairs(train_cases, sp.patch, params.vae.hu_range)

    # ---- network, optimizer, schedule
    net = build_reference_net(sp).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=sp.lr, weight_decay=sp.weight_decay)
    steps_per_epoch = math.ceil(len(train_cases) * sp.patches_per_volume / sp.batch_size)
    total_steps = sp.epochs * steps_per_epoch
    lr_scheduler = warmup_cosine(optimizer, sp.warmup_steps, total_steps, sp.lr_min_ratio)

    # ---- resume or start fresh
    shaping = shaping_params(params, train_split, val_split)
    ckpt, why = resumable(ckpt_dir / LAST, shaping)
    print(f"sr_reference: {why}")
    step, best_val, epoch_stats = 0, math.inf, EpochStats()
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        step, best_val = ckpt["step"], ckpt["best_val_l1"]
        epoch_stats = EpochStats(**ckpt["epoch_stats"])
        set_rng_state(ckpt["rng"], rng)
    else:
        for name in (LAST, BEST):
            (ckpt_dir / name).unlink(missing_ok=True)
        shutil.rmtree(live_dir, ignore_errors=True)
    result = ReferenceResult(steps=step, start_step=step, messages=[why])
    if step >= total_steps:
        print(f"sr_reference: already complete ({step} steps); delete {ckpt_dir} to train again")
        return result

    result.baseline = baseline_metrics(params, val_cases)
    live = Live(str(live_dir), resume=ckpt is not None, dvcyaml=False, save_dvc_exp=False)
    live.summary.update({"network": "monai UNet", "input": f"baseline_consistent ({profile} profile)",
                         "parameters": sum(p.numel() for p in net.parameters())})

    def checkpoint(path: Path, with_optimizer: bool = True) -> None:
        """Everything needed to continue (last.pt) or to predict (best.pt)."""
        save_checkpoint(path, {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict() if with_optimizer else None,
            "lr_scheduler": lr_scheduler.state_dict() if with_optimizer else None,
            "step": step,
            "epoch": step // steps_per_epoch,
            "epoch_stats": epoch_stats.__dict__,
            "best_val_l1": best_val,
            "rng": rng_state(rng),
            "params_hash": params_hash(shaping),
            "params_shaping": json.dumps(shaping, sort_keys=True),
            "contract": net_contract(params),
            "sr_reference_params": to_dict(sp),
        })

    # ---- the loop
    start_epoch = step // steps_per_epoch
    stop = StopFlag.install()
    bar = tqdm(total=sp.epochs, initial=start_epoch, desc="sr_reference", unit="epoch", disable=not progress)
    try:
        for epoch in range(start_epoch, sp.epochs):
            net.train()
            tic = time.perf_counter()
            while step < (epoch + 1) * steps_per_epoch:
                x01, target01 = (t.to(device) for t in patches.batch(sp.batch_size, rng))
                loss = F.l1_loss(x01 + net(x01), target01)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"step {step + 1} (epoch {epoch + 1}): loss is {loss.item()}; stopped "
                                           f"before writing anything for this step. Lower sr_reference.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_scheduler.step()
                step += 1
                epoch_stats.steps += 1
                epoch_stats.loss_sum += loss.item()
                last_of_epoch = step == (epoch + 1) * steps_per_epoch
                if not last_of_epoch and (stop.signum is not None or step % sp.checkpoint_every == 0):
                    epoch_stats.seconds += time.perf_counter() - tic
                    tic = time.perf_counter()
                    checkpoint(ckpt_dir / LAST)  # (the epoch-end one follows validation)
                    if stop.signum is not None:
                        raise TrainInterrupted(stop.signum, step)
            epoch_stats.seconds += time.perf_counter() - tic

            # ---- end of epoch: validate, log, checkpoint
            val = validate(net, params, val_cases)
            metrics = {"train/loss": epoch_stats.loss_mean, "lr": optimizer.param_groups[0]["lr"],
                       "perf/sec_per_step": epoch_stats.seconds / max(epoch_stats.steps, 1),
                       **{f"val/{k}": v for k, v in val.items()},
                       **{f"val_baseline/{k}": v for k, v in result.baseline.items()}}
            live.step = epoch
            for name, value in metrics.items():
                live.log_metric(name, value)
            improved = val["l1"] < best_val
            if improved:
                best_val = val["l1"]
                live.summary["best"] = {"epoch": epoch + 1, **{k: val[k] for k in ("l1", "psnr_body", "mae_hu_body")}}
            live.summary.update({"epoch": epoch + 1, "steps": step})
            live.next_step()
            result.history.append({"epoch": epoch, "step": step, **metrics})
            bar.update()
            bar.set_postfix(loss=f"{epoch_stats.loss_mean:.4f}", val_psnr_body=f"{val['psnr_body']:.2f}")
            epoch_stats = EpochStats()
            if improved:
                checkpoint(ckpt_dir / BEST, with_optimizer=False)
            checkpoint(ckpt_dir / LAST)
            if stop.signum is not None and epoch + 1 < sp.epochs:
                raise TrainInterrupted(stop.signum, step)
    finally:
        bar.close()
        stop.restore()
    result.steps = step
    return result
