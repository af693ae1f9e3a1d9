"""What the evaluate stage writes: ``metrics.json``, ``per_case.csv``, the findings plots and the PNG panels.

``metrics.json`` holds ``<rung>/<metric>`` (means over the test cases; a structure metric over the cases
that have it), ``<rung>_minus_<against>/<metric>/{mean,ci95_low,ci95_high,cases}`` for :data:`PAIRS`
(paired per-case differences, same case and seed, with a seeded bootstrap interval), the sampling time,
which VAE weights, checkpoint, sampler and consistency settings produced them, and ``health``: whether the
VAE's projected ceiling reaches the projected baseline at all (:func:`vae_health`; when it does not, the model
rung measures a broken VAE, not latent diffusion, and the stage says so).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dvclive import Live
from matplotlib.figure import Figure

from ctdiff.evaluation.figures import Planes, ladder_panel
from ctdiff.evaluation.rungs import PREDICTION, RUNGS
from ctdiff.inference.sampling import TrainedModel
from ctdiff.io import atomic_write_text
from ctdiff.metrics.cases import paired_gains, summarise
from ctdiff.metrics.image import METRIC_NAMES
from ctdiff.metrics.structures import CONSPICUITY, FALSE_DEFECTS, STRUCTURE_METRICS
from ctdiff.metrics.uncertainty import CALIBRATED_METRICS, UNCERTAINTY_METRICS
from ctdiff.params import Params

GAIN_KEY = "model_minus_baseline_consistent"  # paired per-case gain of the model over the honest baseline
# The paired comparisons evaluate reports, as (rung, against): metrics.json key "<rung>_minus_<against>".
PAIRS = (("model", "baseline_consistent"), ("model", "reference"), ("reference", "baseline_consistent"))
PLOTTED = (CONSPICUITY, FALSE_DEFECTS)  # per case and rung, as DVC plots (plots/custom/<metric>.json)
SERIES1 = "series 1"  # the panels' first column: series 1 as acquired (thick slabs), on the common grid


@dataclass
class CaseResult:
    """One test case after scoring: its metrics per rung and the planes its panel shows (no volumes)."""

    case_id: str
    category: str
    spacing_mm: tuple[float, float, float]
    seconds: float  # sampling time
    slabs: int  # series 1's slabs the projection uses
    through: tuple[int, int]  # the panel's axial slice and coronal row
    truth: Planes
    series1: Planes
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # rung -> metric -> value
    planes: dict[str, Planes] = field(default_factory=dict)  # panel column -> planes
    error: Planes | None = None  # |prediction - truth| HU
    spread: Planes | None = None  # the per-voxel spread of the prediction's draws, HU (several draws only)

    def row(self) -> dict[str, Any]:
        """The case's per_case.csv row."""
        row: dict[str, Any] = {"case_id": self.case_id, "category": self.category, "seconds": self.seconds,
                               "slabs": self.slabs}
        row.update({f"{rung}_{name}": value for rung, metrics in self.scores.items()
                    for name, value in metrics.items()})
        return row


def case_panel(result: CaseResult, window_hu: tuple[float, float]) -> Figure:
    """Series 1 as acquired, every rung with a panel column, the truth and |prediction - truth|, axial and
    coronal, with the headline rungs' psnr_body and the findings in the title."""
    scores = result.scores
    columns = [(SERIES1, result.series1)] + [(r.column, result.planes[r.column]) for r in RUNGS
                                              if r.column is not None and r.column in result.planes]
    psnrs = ", ".join(f"{r.name} {scores[r.name]['psnr_body']:.2f}" for r in RUNGS if r.headline and r.name in scores)
    title = f"{result.case_id} ({result.category}): psnr_body dB {psnrs}{findings_line(scores)}"
    maps = [(f"|{PREDICTION} - truth| HU", result.error)]
    if result.spread is not None:
        maps.append((f"{PREDICTION} spread (sample std) HU", result.spread))
    return ladder_panel(columns, result.truth, maps, result.spacing_mm, window_hu, title, result.through)


def findings_line(scores: dict[str, dict[str, float]]) -> str:
    """The panel title's second line: the findings metrics of the rungs marked ``findings``."""
    parts = [f"{name} " + ", ".join(f"{r.name} {scores[r.name][name]:.2f}" for r in RUNGS
                                     if r.findings and name in scores.get(r.name, {}))
             for name in PLOTTED if name in scores[PREDICTION]]
    return "\n" + "; ".join(parts) if parts else ""


def log_results(live: Live, results: list[CaseResult], model: TrainedModel, params: Params) -> None:
    """metrics.json (means, paired gains, what produced them), the findings plots and per_case.csv."""
    ep, sampling = params.evaluate, model.sampling
    per_case = [r.scores for r in results]
    for rung, metrics in summarise(per_case).items():
        for name in (*METRIC_NAMES, *STRUCTURE_METRICS, *UNCERTAINTY_METRICS, *CALIBRATED_METRICS):
            if name in metrics:  # a structure metric only where some case has labels for it
                live.log_metric(f"{rung}/{name}", metrics[name], plot=False)
    for rung, against in PAIRS:
        if rung not in per_case[0] or against not in per_case[0]:
            continue
        for name, interval in paired_gains(per_case, rung, against, params.seed).items():
            for key, value in interval.items():
                live.log_metric(f"{rung}_minus_{against}/{name}/{key}", value, plot=False)
    for name in PLOTTED:
        points = [{"case_rung": f"{r.case_id} {rung}", "case_id": r.case_id, "rung": rung, name: r.scores[rung][name]}
                  for r in results for rung in r.scores if name in r.scores[rung]]
        if points:
            live.log_plot(name, points, x=name, y="case_rung", template="bar_horizontal",
                          title=f"{name} per case and rung")
    health = vae_health(summarise(per_case))
    live.log_metric("health/vae_ceiling_below_baseline", float(bool(health)), plot=False)
    live.summary["health_note"] = health
    live.log_metric("sampling/seconds_per_volume", float(np.mean([r.seconds for r in results])), plot=False)
    live.log_metric("cases", len(results), plot=False)
    live.summary.update({"vae": {"codec": model.vae.name, "weights": model.vae.weights},
                         "checkpoint": model.checkpoint,
                         "split": ep.split,
                         "sampler": {"scheduler": model.train_params.scheduler, "steps": sampling.steps,
                                     "samples": sampling.samples, "decode": sampling.decode,
                                     "residual": model.latent_target.residual,
                                     "condition": model.train_params.condition},
                         "consistency": {"model_projected": sampling.consistency, "profile": model.profile.name}})
    write_per_case_csv(Path(live.dir) / "per_case.csv", [r.row() for r in results])


def vae_health(means: dict[str, dict[str, float]]) -> str:
    """'' when the VAE's projected ceiling reaches the projected baseline (psnr_body); else the one-line note."""
    ceiling, baseline = means.get("vae_ceiling_consistent"), means.get("baseline_consistent")
    if ceiling is None or baseline is None or ceiling["psnr_body"] >= baseline["psnr_body"]:
        return ""
    return (f"the model rung measures a broken VAE, not latent diffusion: even the truth through the VAE, projected "
            f"(vae_ceiling_consistent {ceiling['psnr_body']:.2f} dB psnr_body), is below the projected baseline "
            f"({baseline['psnr_body']:.2f} dB); see vae_check")


def write_per_case_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per case: id, category, sampling seconds, then ``<rung>_<metric>`` columns (a DVC plot)."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))  # cases without labels lack some columns
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
