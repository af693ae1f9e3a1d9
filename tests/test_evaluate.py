"""evaluate: a real (tiny) trained model against the baselines, through the stage's own loading code."""

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from trainkit import tiny_params, workspace
from vae_helpers import single_torch_thread, write_slabs  # noqa: F401  (fixture)

from ctdiff.data.grid import Grid
from ctdiff.data.phantom import Tissue
from ctdiff.data.slab import SlabCase
from ctdiff.evaluation.evaluate import evaluate
from ctdiff.evaluation.report import GAIN_KEY, PAIRS
from ctdiff.evaluation.rungs import RUNG_NAMES
from ctdiff.inference.sampling import WindowedDenoiser, load_trained_model, sample_thin
from ctdiff.metrics.image import METRIC_NAMES, reconstruction_metrics
from ctdiff.metrics.structures import CONSPICUITY, FALSE_DEFECTS
from ctdiff.metrics.uncertainty import UNCERTAINTY_METRICS
from ctdiff.models.denoiser import build_unet
from ctdiff.models.reference import load_reference
from ctdiff.params import with_overrides
from ctdiff.training.ldm import train
from ctdiff.training.reference import train_reference


def with_sampling(params, **sampling):
    return with_overrides(params, {f"train.sampling.{k}": v for k, v in sampling.items()})


def with_evaluate(params, **evaluate):
    return with_overrides(params, {f"evaluate.{k}": v for k, v in evaluate.items()})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("evaluate")
    params = with_sampling(tiny_params(epochs=1, vae_freeze_epochs=1), steps=3)
    ws = workspace(tmp, params)
    train(params, **ws, progress=False)
    ws["reference_dir"] = tmp / "models" / "sr_reference"
    train_reference(params, ws["processed_dir"], ws["slab_dir"], ws["reference_dir"], tmp / "dvclive" / "sr_reference",
                    progress=False)
    return tmp, params, ws


def resampled(params, ws, copy_to, **sampling):
    """The trained model in a copy of its folder, sampled otherwise: the train stage rerun with other
    ``train.sampling`` (finds its training complete and only rewrites model.json, as under DVC)."""
    changed = with_sampling(params, **sampling)
    shutil.copytree(ws["ckpt_dir"], copy_to)
    train(changed, **{**ws_train(ws), "ckpt_dir": copy_to}, progress=False)
    return changed, {**ws, "ckpt_dir": copy_to}


def ws_train(ws):
    return {k: ws[k] for k in ("processed_dir", "slab_dir", "profile_dir", "vae_dir", "ckpt_dir", "live_dir")}


def run_evaluate(params, ws, live_dir, pred_dir, processed_dir=None, slab_dir=None):
    return evaluate(params, processed_dir or ws["processed_dir"], slab_dir or ws["slab_dir"], ws["vae_dir"],
                    ws["ckpt_dir"], live_dir, pred_dir, progress=False, reference_dir=ws.get("reference_dir"))


def test_stage_outputs(trained):
    tmp, params, ws = trained
    live_dir, pred_dir = tmp / "dvclive" / "evaluate", tmp / "data" / "predictions"
    metrics = run_evaluate(params, ws, live_dir, pred_dir)
    for arm in RUNG_NAMES:  # no labels in this workspace: no structure metric, anywhere
        # the model's draws (evaluate.samples, 8) give it a spread: how well it ranks and covers its error
        assert set(metrics[arm]) == set(METRIC_NAMES) | (set(UNCERTAINTY_METRICS) if arm == "model" else set())
        assert all(np.isfinite(v) for v in metrics[arm].values())
    assert -1 <= metrics["model"]["uncertainty_spearman"] <= 1
    assert 0 <= metrics["model"]["uncertainty_coverage_2sd"] <= 1
    assert metrics["sampling"]["seconds_per_volume"] > 0
    for name in ("psnr_body", "mae_hu_body"):
        gain = metrics[GAIN_KEY][name]
        assert gain["ci95_low"] <= gain["mean"] <= gain["ci95_high"] and gain["cases"] == 1
    for rung, against in PAIRS:
        assert set(metrics[f"{rung}_minus_{against}"]) == {"psnr_body", "mae_hu_body"}
    assert not (live_dir / "plots" / "custom").exists()
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary["vae"]["weights"]["origin"] == "scratch"
    assert summary["sampler"]["steps"] == 3 and summary["consistency"]["profile"] == "box"  # as the model carries
    test_ids = json.loads((ws["processed_dir"] / "splits.json").read_text())["test"]
    with open(live_dir / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == sorted(test_ids)
    assert float(rows[0]["model_psnr_body"]) == pytest.approx(metrics["model"]["psnr_body"], rel=1e-4)
    for case_id in test_ids:
        assert (live_dir / "plots" / "images" / f"{case_id}.png").stat().st_size > 1000
        # The prediction opens in any NIfTI viewer at the right place in patient space.
        image = sitk.ReadImage(str(pred_dir / f"{case_id}.nii.gz"))
        grid = Grid.from_meta(json.loads((ws["processed_dir"] / case_id / "meta.json").read_text())["grid"])
        assert Grid.of_image(image).shape == grid.shape
        np.testing.assert_allclose(image.GetSpacing(), grid.spacing_mm, atol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), grid.origin_mm, atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), grid.direction, atol=1e-6)
    # The baseline is series 1 as preprocess interpolated it: its metrics follow from the files alone.
    case_dir = ws["processed_dir"] / sorted(test_ids)[0]
    source, target = np.load(case_dir / "source.npy"), np.load(case_dir / "target.npy")
    clip = np.clip(source, -1000, 1000).astype(float) - np.clip(target, -1000, 1000)
    assert float(rows[0]["baseline_mae_hu"]) == pytest.approx(np.abs(clip).mean(), rel=1e-3)
    # What data/predictions holds is the projected model: it reproduces series 1 through the slab operator.
    slabs = SlabCase.open(ws["slab_dir"], sorted(test_ids)[0])
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{sorted(test_ids)[0]}.nii.gz"))).astype(np.float32)
    np.testing.assert_allclose(slabs.operator.forward(saved), slabs.measured, atol=0.6)
    consistent = slabs.project(source.astype(np.float32))
    clip = np.clip(consistent, -1000, 1000) - np.clip(target, -1000, 1000)
    assert float(rows[0]["baseline_consistent_mae_hu"]) == pytest.approx(np.abs(clip).mean(), rel=1e-3)


def test_raw_model_and_averaged_samples(trained, tmp_path):
    """consistency=false makes `model` the raw decode; samples=2 averages two draws of the same stream."""
    tmp, params, ws = trained
    raw, raw_ws = resampled(params, ws, tmp_path / "checkpoints", consistency=False, samples=2)
    raw = with_evaluate(raw, bspline_baseline=False)
    metrics = run_evaluate(raw, raw_ws, tmp_path / "raw_live", tmp_path / "raw_pred")
    assert {k: v for k, v in metrics["model"].items() if k not in UNCERTAINTY_METRICS} == metrics["model_raw"]
    assert "baseline_bspline" not in metrics
    assert metrics["sampler"]["samples"] == 2
    model = load_trained_model(ws["vae_dir"], ws["ckpt_dir"], torch.device("cpu"))
    assert model.sampling.samples == 8 and model.with_sampling(samples=2).sampling.samples == 2
    source = np.load(ws["processed_dir"] / sorted(json.loads(
        (ws["processed_dir"] / "splits.json").read_text())["test"])[0] / "source.npy")
    one = sample_thin(model.with_sampling(samples=1), source, seed=3).mean
    two = sample_thin(model.with_sampling(samples=2), source, seed=3).mean
    assert not np.allclose(one, two)


def test_sampling_is_seeded_and_works_past_the_training_patch(trained, single_torch_thread):  # noqa: F811
    tmp, params, ws = trained
    model = load_trained_model(ws["vae_dir"], ws["ckpt_dir"], torch.device("cpu"))
    # A volume larger than the training patch on every axis, with sizes no multiple of anything.
    source = np.random.default_rng(0).normal(-200, 300, (21, 45, 38)).astype(np.int16)
    first = sample_thin(model, source, seed=7).mean
    assert first.shape == source.shape and np.isfinite(first).all()
    np.testing.assert_array_equal(first, sample_thin(model, source, seed=7).mean)
    assert not np.array_equal(first, sample_thin(model, source, seed=8).mean)


def test_windowed_denoiser_is_the_unet_when_one_window_covers_the_volume():
    params = tiny_params()
    torch.manual_seed(0)
    unet = build_unet(params.train.unet, 2).eval()
    with torch.no_grad():  # MONAI zero-initialises the output convolution: give every weight a value
        for p in unet.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        whole = unet(x, timesteps=t)
        windowed = WindowedDenoiser(unet, (4, 8, 8), overlap=0.25)(x, timesteps=t)
        tiled = WindowedDenoiser(unet, (4, 4, 4), overlap=0.5)(x, timesteps=t)
    torch.testing.assert_close(windowed, whole)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)


def test_residual_model_and_decoded_change(tmp_path, single_torch_thread):  # noqa: F811
    """train.residual: the checkpoint carries the gain and evaluate reads samples back as latents;
    decode=change scores every decode as the change it makes to the baseline, the ceiling included."""
    params = with_evaluate(with_sampling(tiny_params(epochs=1, vae_freeze_epochs=1, residual=True), steps=3,
                                         decode="change"), bspline_baseline=False)
    ws = workspace(tmp_path, params)
    train(params, **ws, progress=False)
    model = load_trained_model(ws["vae_dir"], ws["ckpt_dir"], torch.device("cpu"))
    assert model.latent_target.residual and 0 < model.latent_target.gain != 1.0  # measured, stored, read back
    metrics = run_evaluate(params, ws, tmp_path / "live", tmp_path / "pred")
    assert metrics["sampler"]["residual"] and metrics["sampler"]["decode"] == "change"
    case_id = json.loads((ws["processed_dir"] / "splits.json").read_text())["test"][0]
    source, target = np.load(ws["processed_dir"] / case_id / "source.npy"), np.load(ws["processed_dir"] / case_id /
                                                                                     "target.npy")
    # the change is read against the condition the model was trained with (the default: source projected)
    if model.train_params.condition == "consistent":
        source = np.asarray(SlabCase.open(ws["slab_dir"], case_id).baseline())
    ceiling = source + model.vae.round_trip(target) - model.vae.round_trip(source)
    expected = reconstruction_metrics(ceiling, target, params.hu_range)
    assert metrics["vae_ceiling"]["psnr_body"] == pytest.approx(expected["psnr_body"], abs=1e-3)


def paint_vessel(case_dir, embolus: bool):
    """Give a processed case a label map (lung with one artery along z, an embolus in it when ``embolus``)
    and the matching truth, as preprocess writes phantom cases."""
    target = np.load(case_dir / "target.npy")
    d, h, w = target.shape
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    lumen = (y - h // 2) ** 2 + (x - w // 2) ** 2 <= 16
    labels = np.full(target.shape, Tissue.LUNG, np.uint8)
    labels[lumen] = Tissue.ARTERY
    target = np.where(lumen, 300, target)
    if embolus:
        clot = lumen & (z >= d // 2 - 2) & (z < d // 2 + 2) & ((y - h // 2) ** 2 + (x - w // 2) ** 2 <= 4)
        labels[clot] = Tissue.EMBOLUS
        target = np.where(clot, 50, target)
    np.save(case_dir / "target.npy", target.astype(np.int16))
    np.save(case_dir / "labels.npy", labels)
    # Series 1 and its interpolation from the painted truth, as trainkit's workspace makes them.
    series1 = target.reshape(d // 4, 4, h, w).mean(axis=1)
    source = np.stack([target[max(k - 2, 0):k + 3].mean(axis=0) for k in range(d)])
    np.save(case_dir / "series1.npy", np.rint(series1).astype(np.int16))
    np.save(case_dir / "source.npy", np.rint(source).astype(np.int16))
    meta = json.loads((case_dir / "meta.json").read_text())
    meta["category"] = "APE" if embolus else "non-APE"
    meta["labels"] = {"classes": {str(int(t)): t.name.lower() for t in Tissue}}
    (case_dir / "meta.json").write_text(json.dumps(meta))


def test_structure_metrics_for_every_rung_where_cases_have_labels(trained, tmp_path):
    """Two labelled test cases (one APE, one not) and one without labels: each gets what it has."""
    tmp, params, ws = trained
    processed = tmp_path / "data" / "processed"
    shutil.copytree(ws["processed_dir"], processed)
    splits = json.loads((processed / "splits.json").read_text())
    ape, healthy, unlabelled = splits["train"][:2] + splits["test"][:1]
    splits["test"] = sorted([ape, healthy, unlabelled])
    (processed / "splits.json").write_text(json.dumps(splits))
    paint_vessel(processed / ape, embolus=True)
    paint_vessel(processed / healthy, embolus=False)
    slab_dir, _ = write_slabs(processed)  # the slab stage rerun on the painted cases
    live_dir = tmp_path / "live"
    metrics = run_evaluate(params, ws, live_dir, tmp_path / "pred", processed, slab_dir)
    for rung in RUNG_NAMES:
        assert {CONSPICUITY, FALSE_DEFECTS, "mae_hu_artery", "mae_hu_lung", "mae_hu_embolus"} <= set(metrics[rung])
        assert "mae_hu_bone" not in metrics[rung]  # no case has bone: absent, not zero
    for rung, against in PAIRS:
        assert metrics[f"{rung}_minus_{against}"][CONSPICUITY]["cases"] == 1
    with open(live_dir / "per_case.csv") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert rows[unlabelled]["model_embolus_conspicuity"] == "" and rows[unlabelled]["model_mae_hu_artery"] == ""
    assert rows[healthy]["model_embolus_conspicuity"] == "" and rows[healthy]["model_false_defect_fraction"] != ""
    assert float(rows[ape]["model_embolus_conspicuity"]) == pytest.approx(metrics["model"][CONSPICUITY], rel=1e-4)
    # Series 1's 4-slice slabs and their interpolation blur the 4-slice clot into the lumen around it:
    # the baseline keeps part of its contrast, not all.
    assert 0 < float(rows[ape]["baseline_embolus_conspicuity"]) < 1
    plot = json.loads((live_dir / "plots" / "custom" / f"{CONSPICUITY}.json").read_text())
    plot = plot[CONSPICUITY] if isinstance(plot, dict) else plot
    assert {p["rung"] for p in plot} == set(RUNG_NAMES) and {p["case_id"] for p in plot} == {ape}


def test_reference_rung_is_the_stage_network_projected(trained):
    tmp, params, ws = trained
    case_id = json.loads((ws["processed_dir"] / "splits.json").read_text())["test"][0]
    target = np.load(ws["processed_dir"] / case_id / "target.npy")
    reference = load_reference(ws["reference_dir"], torch.device("cpu"))
    slabs = SlabCase.open(ws["slab_dir"], case_id)
    raw = reference.predict(slabs.baseline())
    expected = reconstruction_metrics(slabs.project(raw), target, params.hu_range)
    metrics = run_evaluate(params, ws, tmp / "ref_live", tmp / "ref_pred")
    assert metrics["reference"]["psnr_body"] == pytest.approx(expected["psnr_body"], abs=1e-3)


def test_a_model_conditioned_on_the_consistent_baseline_is_evaluated_on_val(tmp_path, single_torch_thread):  # noqa: F811
    """The lever of train.condition, measured as levers are: on the val split, never the test split."""
    params = with_evaluate(with_sampling(tiny_params(epochs=1, vae_freeze_epochs=1, condition="consistent"), steps=2,
                                         samples=2, decode="change"), split="val", bspline_baseline=False)
    ws = workspace(tmp_path, params)
    train(params, **ws, progress=False)
    metrics = run_evaluate(params, ws, tmp_path / "live", tmp_path / "pred")
    assert metrics["split"] == "val" and metrics["sampler"]["condition"] == "consistent"
    val_ids = json.loads((ws["processed_dir"] / "splits.json").read_text())["val"]
    with open(tmp_path / "live" / "per_case.csv") as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == sorted(val_ids)
    assert np.isfinite(metrics["model"]["psnr_body"]) and "uncertainty_spearman" in metrics["model"]
