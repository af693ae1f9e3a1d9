"""vae_check: encode -> decode held-out target volumes and measure what the VAE loses.

Writes through a dvclive ``Live``: ``metrics.json`` (the six reconstruction metrics averaged over cases,
speed, memory, latent size, which weights were used, and the trivial codes of the same volumes:
``health``), ``plots/custom/per_case.json`` (every metric per case) and ``plots/images/<case_id>.png``
(mid-slices: input | reconstruction | |error|). A VAE that reconstructs some case no better than that volume's
mean code (by ``vae_check.min_gain_db``) nor than block averaging at its compression is unhealthy
(:mod:`ctdiff.metrics.health`): the summary says why in one line (``health.verdict``) and
:func:`raise_if_unhealthy`, called once the outputs are complete, fails the stage unless
``vae_check.accept_unhealthy``, so the metrics and images of the failure can be looked at.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm

from ctdiff.data.processed import split_cases
from ctdiff.evaluation.figures import orthogonal_panel
from ctdiff.metrics.health import Unhealthy, check_codec, codec_verdict, summarise_checks
from ctdiff.metrics.image import METRIC_NAMES, TruthScorer, mean_metrics
from ctdiff.models.vae.weights import load_vae
from ctdiff.params import Params


def check_vae(params: Params, processed_dir: Path, vae_dir: Path, live: Live,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Round-trip ``vae_check.max_cases`` cases of ``vae_check.split``; log to ``live``; return the summary."""
    codec = load_vae(vae_dir, device)
    manifest = codec.manifest
    cases = split_cases(processed_dir, params.vae_check.split, params.vae_check.max_cases)
    per_case, checks = [], []
    for case in tqdm(cases, desc="vae_check", unit="volume"):
        target = case.load("target")
        started = time.perf_counter()
        recon = codec.round_trip(target, case.grid.direction)
        latent_shape = codec.latent_shape(target.shape)
        seconds = time.perf_counter() - started
        scorer = TruthScorer(target, params.hu_range)  # one scorer (body mask, truth's channels) per case
        values = scorer.score(recon)
        checks.append(check_codec(case.case_id, values["psnr_body"], target, scorer, codec.downsample))
        per_case.append({"case_id": case.case_id, **values, "seconds": seconds,
                         "latent_shape": "x".join(map(str, latent_shape)),
                         "compression_ratio": codec.compression_ratio(target.shape)})
        title = (f"{case.case_id}: {manifest['codec']} ({manifest['weights']['origin']}), "
                 f"psnr_body {values['psnr_body']:.1f} dB, mae_hu_body {values['mae_hu_body']:.0f} HU")
        live.log_image(f"{case.case_id}.png", orthogonal_panel(target, recon, case.spacing_mm, params.hu_range, title))

    summary: dict[str, Any] = {
        **mean_metrics(per_case),
        "n_cases": len(per_case),
        "seconds_per_volume": float(np.mean([c["seconds"] for c in per_case])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "compression_ratio": float(np.mean([c["compression_ratio"] for c in per_case])),
    }
    if codec.device.type == "cuda":
        summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated(codec.device) / 2**20
    live.summary.update(summary)
    # Not numbers, so not logged as metrics; dvc metrics show/diff still display them.
    live.summary["codec"] = manifest["codec"]
    live.summary["weights"] = manifest["weights"]
    live.summary["health"] = summarise_checks(checks)
    live.log_plot("per_case", per_case, x="case_id", y=list(METRIC_NAMES), template="bar_horizontal")
    verdict = codec_verdict(checks, params.vae_check.min_gain_db, "vae_check.accept_unhealthy")
    live.summary["health"].update(healthy=verdict is None, verdict=verdict or "")
    return live.summary


def raise_if_unhealthy(summary: dict[str, Any], params: Params) -> None:
    """Raise :class:`Unhealthy` with the summary's one-line verdict unless the VAE passed or it is accepted."""
    verdict = summary["health"]["verdict"]
    if verdict and not params.vae_check.accept_unhealthy:
        raise Unhealthy(verdict)
    if verdict:
        print(f"vae_check: {verdict.split('; set')[0]}: accepted (vae_check.accept_unhealthy)")
