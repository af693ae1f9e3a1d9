"""vae_fit and vae_check on tiny processed data: training lowers the loss, outputs follow their contracts."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from vae_helpers import (  # single_torch_thread is a fixture
    COMMIT,
    MAISI_REPO,
    SINGLE_THREAD_ENV,
    add_to_hf_cache,
    as_params,
    single_torch_thread,  # noqa: F401
    synthetic_ct,
    tiny_params,
    write_params,
    write_processed,
)

from ctdiff.data.processed import DataError, split_cases
from ctdiff.evaluation.vae_check import check_vae
from ctdiff.io import atomic_live
from ctdiff.metrics.image import METRIC_NAMES
from ctdiff.models.vae.maisi import maisi_config
from ctdiff.models.vae.weights import (
    MAISI_WEIGHTS,
    WeightsError,
    fetch_pretrained,
    load_vae,
    new_codec,
    scratch_config,
)
from ctdiff.training.vae_fit import fit_vae, train_codec

REPO_ROOT = Path(__file__).resolve().parents[1]
HU_RANGE = (-1000.0, 1000.0)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("use_maisi", [True, False], ids=["maisi", "sd"])
def test_scratch_training_lowers_the_reconstruction_loss(tmp_path, use_maisi):
    processed = write_processed(tmp_path / "data" / "processed")
    vae = as_params(tiny_params(use_maisi)).vae
    codec = new_codec(vae, HU_RANGE, scratch_config(vae))
    patch = vae.maisi.patch if use_maisi else vae.sd.patch
    history = train_codec(codec, split_cases(processed, "train"), patch, epochs=6, lr=vae.scratch_lr,
                          patches_per_volume=3, batch_size=2, kl_weight=vae.kl_weight, seed=0)
    assert len(history) == 6
    assert history[-1]["recon"] < 0.85 * history[0]["recon"]


def test_scratch_fit_is_reproducible(tmp_path):
    """Same params and data, same weights: rerunning the stage (dvc repro --force, a teammate's run) must not
    change the VAE. (torch seeds each process randomly; before seeding the init, two runs differed.)"""
    processed = write_processed(tmp_path / "data" / "processed")
    params = as_params(tiny_params(False, scratch_epochs=1))
    fetch_pretrained(params.vae, tmp_path / "pretrained")
    first = fit_vae(params, processed, tmp_path / "pretrained", tmp_path / "vae1")
    torch.randn(1000)  # whatever ran before in the process must not matter
    second = fit_vae(params, processed, tmp_path / "pretrained", tmp_path / "vae2")
    assert first["files"] == second["files"]  # name -> sha256 of the weights


@pytest.mark.parametrize("use_maisi", [True, False], ids=["maisi", "sd"])
def test_scratch_fit_then_check_write_their_contracts(tmp_path, use_maisi):
    processed = write_processed(tmp_path / "data" / "processed")
    params = as_params(tiny_params(use_maisi, scratch_epochs=1))
    fetch_pretrained(params.vae, tmp_path / "pretrained")

    with atomic_live(tmp_path / "live_fit") as live:
        manifest = fit_vae(params, processed, tmp_path / "pretrained", tmp_path / "vae", live)

    width = [8, 8, 16] if use_maisi else [8, 8, 16, 16]
    assert manifest["weights"] == {"origin": "scratch", "epochs": 1, "width": width}
    # No latent scale factor here: the train stage computes it from the latents it caches.
    assert manifest["weights_dir"] == "." and "scale_factor" not in manifest
    fit_metrics = json.loads((tmp_path / "live_fit" / "metrics.json").read_text())
    assert fit_metrics["weights"] == manifest["weights"] and fit_metrics["train_seconds"] == manifest["train_seconds"]
    assert (tmp_path / "live_fit" / "plots" / "metrics" / "train" / "recon.tsv").is_file()

    with atomic_live(tmp_path / "live_check") as live:
        check_vae(params, processed, tmp_path / "vae", live)

    check = tmp_path / "live_check"
    metrics = json.loads((check / "metrics.json").read_text())
    assert set(METRIC_NAMES) <= set(metrics) and metrics["n_cases"] == 2
    assert metrics["weights"] == manifest["weights"] and metrics["codec"] == ("maisi" if use_maisi else "sd")
    assert metrics["compression_ratio"] == 16.0  # MAISI 4*4*4 / 4 channels, SD 8*8 / 4 channels
    assert metrics["seconds_per_volume"] > 0 and metrics["peak_rss_mb"] > 0
    per_case = json.loads((check / "plots" / "custom" / "per_case.json").read_text())
    assert [c["case_id"] for c in per_case] == ["case_003", "case_004"]
    assert all(set(METRIC_NAMES) <= set(c) for c in per_case)
    assert sorted(p.name for p in (check / "plots" / "images").iterdir()) == ["case_003.png", "case_004.png"]


def test_pretrained_without_finetuning_points_at_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    processed = write_processed(tmp_path / "data" / "processed")
    raw = tiny_params(True, pretrained=True)
    vae = as_params(raw).vae
    buf = io.BytesIO()
    torch.save(new_codec(vae, HU_RANGE, maisi_config(vae.maisi.arch, vae.latent_channels)).module.state_dict(), buf)
    sha = add_to_hf_cache(tmp_path / "hf", MAISI_REPO, COMMIT, {"models/autoencoder.pt": buf.getvalue()})
    raw["vae"]["maisi"]["hub"]["sha256"] = sha["models/autoencoder.pt"]
    params = as_params(raw)
    models = tmp_path / "models"
    fetch_pretrained(params.vae, models / "pretrained", tmp_path / "hf")

    manifest = fit_vae(params, processed, models / "pretrained", models / "vae")

    assert manifest["weights_dir"] == "../pretrained"
    assert manifest["files"] == {MAISI_WEIGHTS: sha["models/autoencoder.pt"]}
    assert manifest["weights"] == {"origin": "pretrained", "repo": MAISI_REPO, "revision": COMMIT,
                                   "files": manifest["files"]}
    assert sorted(p.name for p in (models / "vae").iterdir()) == ["manifest.json"]  # nothing copied
    codec = load_vae(models / "vae")
    assert codec.latent_channels == params.vae.latent_channels

    scratch = as_params(tiny_params(True, pretrained=False))
    with pytest.raises(WeightsError, match="rerun fetch_weights"):
        fit_vae(scratch, processed, models / "pretrained", models / "vae")

    raw["vae"]["finetune_epochs"] = 1
    finetuned = fit_vae(as_params(raw), processed, models / "pretrained", models / "vae")
    assert finetuned["weights"] == {"origin": "finetuned", "epochs": 1, "base": manifest["weights"]}
    assert finetuned["weights_dir"] == "." and (models / "vae" / MAISI_WEIGHTS).is_file()
    assert finetuned["files"][MAISI_WEIGHTS] != sha["models/autoencoder.pt"]
    load_vae(models / "vae")


def test_stages_run_offline_from_the_repository_root(tmp_path):
    write_processed(tmp_path / "data" / "processed")
    write_params(tmp_path, tiny_params(False, scratch_epochs=1))
    env = {**os.environ, **SINGLE_THREAD_ENV, "HF_HUB_OFFLINE": "1"}
    for stage in ("fetch_weights", "vae_fit", "vae_check"):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{stage}:\n{done.stdout}\n{done.stderr}"
        assert done.stdout.startswith(f"{stage}: ")
    assert json.loads((tmp_path / "models" / "pretrained" / "origin.json").read_text())["origin"] == "scratch"
    assert (tmp_path / "models" / "vae" / "manifest.json").is_file()
    assert json.loads((tmp_path / "dvclive" / "vae_check" / "metrics.json").read_text())["codec"] == "sd"
    assert not list((tmp_path / "dvclive").glob(".*"))  # no temporary folders left


def test_missing_or_empty_splits_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="run the preprocess stage"):
        split_cases(tmp_path, "train")
    processed = write_processed(tmp_path / "data" / "processed")
    assert [c.case_id for c in split_cases(processed, "train", max_cases=2)] == ["case_000", "case_001"]
    with pytest.raises(DataError, match="no 'test' cases"):
        split_cases(processed, "test")


@pytest.mark.parametrize("use_maisi", [True, False], ids=["maisi", "sd"])
def test_the_scratch_levers_start_nearly_deterministic_and_crop_inside_the_body(tmp_path, use_maisi):
    """vae.logvar_init starts every posterior at sigma = exp(logvar / 2); vae.body_crops draws crops centred in
    the body; vae.recon_loss mse trains on the squared error."""
    from ctdiff.training.vae_fit import init_logvar

    vae = as_params(tiny_params(use_maisi)).vae
    codec = new_codec(vae, HU_RANGE, scratch_config(vae))
    init_logvar(codec, -8.0)
    hu = torch.from_numpy(synthetic_ct((8, 16, 16), 0))[None, None]
    _, std = codec.encode_posterior_hu(hu)
    torch.testing.assert_close(std, torch.full_like(std, float(np.exp(-4.0))), rtol=1e-4, atol=0)
    processed = write_processed(tmp_path / "processed")
    params = as_params(tiny_params(use_maisi, scratch_epochs=2, logvar_init=-6.0, body_crops=0.5, recon_loss="mse",
                                   warmup_steps=2))
    history = train_codec(codec, split_cases(processed, "train"), params.vae.maisi.patch if use_maisi else
                          params.vae.sd.patch, 2, 1e-3, 2, 2, 1e-6, 0, recon_loss="mse", warmup_steps=2,
                          body_crops=0.5)
    assert len(history) == 2 and all(np.isfinite(h["recon"]) for h in history)
