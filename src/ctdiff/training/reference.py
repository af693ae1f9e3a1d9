"""The sr_reference stage's training loop: the supervised reference network (:mod:`ctdiff.models.reference`)
learns the thin series as a residual on the slab-consistent baseline.

One loop, top to bottom (:func:`train_reference`): load the train and val cases (the test split is never
read), build the network, optimizer and warm-up/cosine LR schedule, resume or start fresh
(:class:`~ctdiff.training.scaffold.TrainingRun`), then per epoch ``steps_per_epoch`` optimizer steps on
random patch pairs (L1 on [0, 1] intensities over ``hu_range``, as for the VAEs), validation on the
whole val volumes (the prediction projected onto the slabs, as evaluate scores it, against the truth; the
baseline's metrics alongside), dvclive logging, and checkpoints: ``last.pt`` every
``sr_reference.checkpoint_every`` steps and at every epoch end, ``best.pt`` when the val L1 of the
projected prediction improves. Resume, SIGTERM/SIGINT and divergence behave as in the train stage. A network
whose best projected val prediction is no better (in L1) than its own input stops the stage with one line
(:func:`check_beats_input`; ``sr_reference.accept_unhealthy`` accepts it): the ``reference`` rung would then be
the baseline under another name.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import SpatialCropd, SpatialPadd
from torch import nn
from tqdm import tqdm

from ctdiff.data.intensity import to_x01
from ctdiff.data.processed import Case, split_cases
from ctdiff.data.slab import SlabCase
from ctdiff.device import pick_device
from ctdiff.metrics.health import Unhealthy
from ctdiff.metrics.image import TruthScorer, body_mask, mean_abs01, mean_metrics
from ctdiff.models.reference import build_reference_net, net_contract, predict_reference
from ctdiff.params import Params, to_dict
from ctdiff.training.scaffold import (
    BEST,
    LAST,
    StopFlag,
    TrainingDiverged,
    TrainingRun,
    TrainInterrupted,
    TrainResult,
    set_rng_state,
    shaping,
    warmup_cosine,
)

# sr_reference params that change how a run executes, not the network it produces
NOT_SHAPING = ("device", "checkpoint_every", "window_batch")


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ReferenceCase:
    """One processed case as the reference sees it: input (baseline_consistent) and truth, both (D, H, W) HU."""

    case_id: str
    input_hu: np.ndarray  # float32, memory-mapped
    truth_hu: np.ndarray  # int16, memory-mapped
    slabs: SlabCase  # series 1's slab operator and measurements on the common grid
    body: torch.Tensor  # (D, H, W) bool: the truth's body mask (kept: it is most of a scorer's cost)

    def scorer(self, hu_range: tuple[float, float]) -> TruthScorer:
        return TruthScorer(self.truth_hu, hu_range, mask=self.body)

    @classmethod
    def load(cls, case: Case, slab_dir: Path) -> ReferenceCase:
        """The input (the slab stage's ``baseline_consistent``) and the truth memory-mapped: patches read only
        what they cut."""
        slabs = SlabCase.open(slab_dir, case.case_id)
        truth = case.load("target", mmap=True)
        return cls(case.case_id, slabs.baseline(mmap=True), truth, slabs, body_mask(truth))


class PatchPairs:
    """Random (input, target) patch pairs cut at one place from the training volumes, as (1, D, H, W) [0, 1]
    tensors; volumes smaller than a patch are edge-padded first (MONAI ``SpatialPadd`` over both keys).

    The volumes stay as they are (the input in HU, the truth memory-mapped int16) and only the cut patches
    are mapped to [0, 1], so a real-size case costs no whole-volume copy. MONAI's ``SpatialCropd`` cuts both
    keys alike; the case and the corner of each patch come from the loop's seeded numpy ``rng``, whose state
    every checkpoint holds, so a resumed run cuts the patches an uninterrupted one would.
    """

    KEYS = ("input", "target")

    def __init__(self, cases: list[ReferenceCase], patch: tuple[int, int, int], hu_range: tuple[float, float]) -> None:
        self.patch, self.hu_range = patch, hu_range
        pad = SpatialPadd(keys=self.KEYS, spatial_size=patch, mode="replicate")
        self.pairs = []
        for c in cases:
            pair = {"input": c.input_hu[None], "target": c.truth_hu[None]}
            if any(s < p for s, p in zip(c.truth_hu.shape, patch)):
                pair = pad({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in pair.items()})
            self.pairs.append(pair)

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) patches (B, 1, D, H, W) of random cases at random corners (drawn from ``rng``)."""
        inputs, targets = [], []
        for i in rng.integers(0, len(self.pairs), size):
            pair = self.pairs[int(i)]
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(pair["input"].shape[1:], self.patch)]
            cut = SpatialCropd(keys=self.KEYS, roi_start=corner, roi_end=[c + p for c, p in zip(corner, self.patch)])
            patch = cut(pair)  # views into the (memory-mapped) arrays: only the patch is read
            inputs.append(to_x01(patch["input"], self.hu_range))
            targets.append(to_x01(patch["target"], self.hu_range))
        return torch.stack(inputs), torch.stack(targets)


# --------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(net: nn.Module, params: Params, cases: list[ReferenceCase]) -> dict[str, float]:
    """Mean val metrics of the projected prediction (what evaluate scores) and ``l1`` (its L1 in [0, 1], the
    training loss over whole volumes); ``l1_raw`` of the unprojected prediction."""
    hu_range = params.hu_range
    was_training = net.training
    net.eval()
    per_case, l1, l1_raw = [], [], []
    for case in cases:
        scorer = case.scorer(hu_range)
        raw = predict_reference(net, params.sr_reference, hu_range, case.input_hu)
        projected = case.slabs.project(raw)
        l1_raw.append(mean_abs01(raw, scorer))
        del raw
        l1.append(mean_abs01(projected, scorer))
        per_case.append(scorer.score(projected))
    net.train(was_training)
    return {"l1": float(np.mean(l1)), "l1_raw": float(np.mean(l1_raw)), **mean_metrics(per_case)}


def baseline_metrics(params: Params, cases: list[ReferenceCase]) -> dict[str, float]:
    """The same means for the input itself (baseline_consistent): what the network must beat."""
    hu_range = params.hu_range
    scorers = [c.scorer(hu_range) for c in cases]
    return {"l1": float(np.mean([mean_abs01(c.input_hu, s) for c, s in zip(cases, scorers)])),
            **mean_metrics([s.score(c.input_hu) for c, s in zip(cases, scorers)])}


# ------------------------------------------------------------------------------------------- train
def shaping_params(params: Params, train_cases: list[Case], val_cases: list[Case], profile_digest: str
                   ) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: sr_reference params that shape the network and its
    trajectory (not ``NOT_SHAPING``), the seed, the input's definition (intensity range, slab profile), and the
    data."""
    sp = {k: v for k, v in to_dict(params.sr_reference).items() if k not in NOT_SHAPING}
    return shaping({"sr_reference": sp}, params.train_seed, train_cases, val_cases,
                   hu_range=list(params.hu_range), slab_profile=profile_digest)


def train_reference(params: Params, processed_dir: Path, slab_dir: Path, ckpt_dir: Path, live_dir: Path,
                    progress: bool = True) -> TrainResult:
    """Run (or resume) the sr_reference stage; see the module docstring. Returns what happened (``baseline``:
    the input's val metrics, empty when there was nothing left to do)."""
    sp = params.sr_reference
    device = pick_device(params.device)
    torch.manual_seed(params.train_seed)
    random.seed(params.train_seed)
    rng = np.random.default_rng([params.train_seed, 0x5E])  # patch cases and corners

    # ---- data: train split to learn from, val split to validate on; the test split is never read here
    train_split, val_split = split_cases(processed_dir, "train"), split_cases(processed_dir, "val")
    train_cases = [ReferenceCase.load(c, slab_dir) for c in train_split]
    val_cases = [ReferenceCase.load(c, slab_dir) for c in val_split]
    digests = {c.slabs.profile_digest for c in train_cases + val_cases}
    if len(digests) != 1:
        raise RuntimeError(f"{slab_dir} holds cases projected with different slab profiles: rerun the slab stage")
    profile_digest = digests.pop()
    patches = PatchPairs(train_cases, sp.patch, params.hu_range)

    # ---- network, optimizer, schedule
    net = build_reference_net(sp).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=sp.lr, weight_decay=sp.weight_decay)
    steps_per_epoch = math.ceil(len(train_cases) * sp.patches_per_volume / sp.batch_size)
    total_steps = sp.epochs * steps_per_epoch
    lr_scheduler = warmup_cosine(optimizer, sp.warmup_steps, total_steps, sp.lr_min_ratio)

    # ---- resume or start fresh
    run = TrainingRun("sr_reference", ckpt_dir, live_dir, shaping_params(params, train_split, val_split,
                                                                          profile_digest), steps_per_epoch)
    if run.checkpoint is not None:
        net.load_state_dict(run.checkpoint["net"])
        optimizer.load_state_dict(run.checkpoint["optimizer"])
        lr_scheduler.load_state_dict(run.checkpoint["lr_scheduler"])
        set_rng_state(run.checkpoint["rng"], rng)
    if run.complete(total_steps):
        check_beats_input(run, float(run.checkpoint["baseline_val"]), sp.accept_unhealthy)
        return run.result()

    baseline = baseline_metrics(params, val_cases)
    run.open_live({"network": "monai UNet", "input": f"baseline_consistent (slab profile {profile_digest})",
                   "parameters": sum(p.numel() for p in net.parameters())})

    def save(name: str, with_optimizer: bool = True) -> None:
        """Everything needed to continue (last.pt) or to predict (best.pt)."""
        run.save(name, {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict() if with_optimizer else None,
            "lr_scheduler": lr_scheduler.state_dict() if with_optimizer else None,
            "contract": net_contract(sp, params.hu_range, profile_digest),
            "baseline_val": baseline["l1"],
            "sr_reference_params": to_dict(sp),
        }, rng)

    # ---- the loop
    stop = StopFlag.install()
    bar = tqdm(total=sp.epochs, initial=run.epoch, desc="sr_reference", unit="epoch", disable=not progress)
    try:
        for epoch in range(run.epoch, sp.epochs):
            net.train()
            tic = time.perf_counter()
            while run.step < (epoch + 1) * steps_per_epoch:
                x01, target01 = (t.to(device) for t in patches.batch(sp.batch_size, rng))
                loss = F.l1_loss(x01 + net(x01), target01)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"step {run.step + 1} (epoch {epoch + 1}): loss is {loss.item()}; "
                                           f"stopped before writing anything for this step. Lower sr_reference.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_scheduler.step()
                run.step += 1
                run.epoch_stats.add(loss=loss.item())
                last_of_epoch = run.step == (epoch + 1) * steps_per_epoch
                if not last_of_epoch and (stop.signum is not None or run.step % sp.checkpoint_every == 0):
                    run.epoch_stats.seconds += time.perf_counter() - tic
                    tic = time.perf_counter()
                    save(LAST)  # (the epoch-end one follows validation)
                    if stop.signum is not None:
                        raise TrainInterrupted(stop.signum, run.step)
            run.epoch_stats.seconds += time.perf_counter() - tic

            # ---- end of epoch: validate, log, checkpoint
            val = validate(net, params, val_cases)
            metrics = {"train/loss": run.epoch_stats.mean("loss"), "lr": optimizer.param_groups[0]["lr"],
                       "perf/sec_per_step": run.epoch_stats.sec_per_step,
                       **{f"val/{k}": v for k, v in val.items()},
                       **{f"val_baseline/{k}": v for k, v in baseline.items()}}
            improved = run.record_val(val["l1"])
            run.log_epoch(epoch, metrics, {"best": {"epoch": epoch + 1, **{k: val[k] for k in
                                                                           ("l1", "psnr_body", "mae_hu_body")}}}
                          if improved else None)
            bar.update()
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", val_psnr_body=f"{val['psnr_body']:.2f}")
            if improved:
                save(BEST, with_optimizer=False)
            save(LAST)
            if stop.signum is not None and epoch + 1 < sp.epochs:
                raise TrainInterrupted(stop.signum, run.step)
    finally:
        bar.close()
        stop.restore()
    check_beats_input(run, baseline["l1"], sp.accept_unhealthy)
    return run.result(baseline=baseline)


def check_beats_input(run: TrainingRun, input_l1: float, accept: bool) -> None:
    """The network's best projected val prediction must be closer to the truth (L1) than its input is."""
    if run.best_val < input_l1:
        return
    message = (f"the reference network's best projected val prediction (L1 {run.best_val:.5f} in [0, 1]) is no better "
               f"than its own input, baseline_consistent ({input_l1:.5f}): it learned nothing; lower sr_reference.lr "
               f"or train longer, or set sr_reference.accept_unhealthy=true")
    if not accept:
        raise Unhealthy(message)
    print(f"sr_reference: warning: {message.split('; lower')[0]} (accepted)")
