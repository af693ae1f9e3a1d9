"""The sr_reference stage on tiny real inputs: it learns, predicts any shape, loads back, and resumes after a kill."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from paramkit import repo_params
from test_train import sigterm_mid_epoch
from trainkit import smooth_field
from vae_helpers import single_torch_thread, write_processed, write_slabs  # noqa: F401  (fixture)

from ctdiff.data.intensity import to_x01
from ctdiff.data.slab import SlabCase, SliceProfile
from ctdiff.models.checkpoint import load_checkpoint
from ctdiff.models.reference import build_reference_net, load_reference, predict_reference
from ctdiff.params import Params, to_dict
from ctdiff.training.reference import train_reference

pytestmark = pytest.mark.usefixtures("single_torch_thread")
SHAPE = (16, 32, 32)  # (D, H, W) voxels; series 1 = slabs of 4 of them


def tiny_params(**sr_reference: Any) -> Params:
    """A two-level UNet of width 4-8 on [8, 16, 16] patches: a CPU run of a second or two."""
    defaults: dict[str, Any] = {
        "epochs": 2, "batch_size": 2, "patches_per_volume": 2, "patch": [8, 16, 16], "lr": 3e-3,
        "warmup_steps": 2, "channels": [4, 8], "strides": [2], "window_batch": 4, "checkpoint_every": 2,
    }
    defaults.update(sr_reference)
    return repo_params({"seed": 0, "train_seed": 0, "device": "cpu", "sr_reference.accept_unhealthy": True,
                        **{f"sr_reference.{k}": v for k, v in defaults.items()}})


def workspace(root: Path) -> dict[str, Path]:
    """processed data (3 train, 1 val, 1 test case) and its slabs under ``root``; the paths :func:`train_reference`
    takes."""
    processed = write_processed(root / "data" / "processed", n_train=3, n_val=1, n_test=1, shape=SHAPE,
                                target_hu=smooth_field, source_slices=5, series1_slices=4)
    slab_dir, _ = write_slabs(processed)
    return {"processed_dir": processed, "slab_dir": slab_dir, "ckpt_dir": root / "models" / "sr_reference",
            "live_dir": root / "dvclive" / "sr_reference"}


def run(params: Params, ws: dict[str, Path]):
    return train_reference(params, **ws, progress=False)


def case_input(ws: dict[str, Path], case_id: str) -> np.ndarray:
    return np.asarray(SlabCase.open(ws["slab_dir"], case_id).baseline())


def test_training_lowers_the_loss_and_beats_its_input_on_val(tmp_path):
    # the health gate on (tests/test_health.py has it fire): a network that beats its input passes it
    params = tiny_params(epochs=8, patches_per_volume=16, batch_size=4, channels=[8, 16], checkpoint_every=100,
                         accept_unhealthy=False)
    ws = workspace(tmp_path)
    result = run(params, ws)
    assert result.start_step == 0 and result.steps == 8 * 12  # 3 cases x 16 patches / 4, x 8 epochs
    first, last = result.history[0], result.history[-1]
    assert last["train/loss"] < 0.95 * first["train/loss"]
    # the projected prediction is closer to the truth than the projected baseline it started from
    # (the input is the smooth-corrected projection since 2026-12-04: 8 epochs reach 0.971 x its L1, +0.25 dB)
    assert last["val/l1"] < 0.98 * result.baseline["l1"]
    assert last["val/psnr_body"] > result.baseline["psnr_body"] + 0.15
    assert last["val_baseline/psnr_body"] == result.baseline["psnr_body"]
    best = load_checkpoint(ws["ckpt_dir"] / "best.pt")
    assert best["best_val"] == min(h["val/l1"] for h in result.history) and best["optimizer"] is None
    metrics = json.loads((ws["live_dir"] / "metrics.json").read_text())
    assert metrics["val"]["psnr_body"] == pytest.approx(last["val/psnr_body"])
    assert metrics["val_baseline"]["psnr_body"] == pytest.approx(result.baseline["psnr_body"])
    assert metrics["epoch"] == 8 and metrics["steps"] == 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Params, dict[str, Path]]:
    """One tiny finished run shared by the read-only tests below."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    params = tiny_params()
    ws = workspace(tmp_path_factory.mktemp("trained"))
    run(params, ws)
    torch.set_num_threads(previous)
    return params, ws


@pytest.mark.parametrize("shape", [(11, 13, 9), (19, 37, 21), (8, 16, 16)])
def test_predict_reference_takes_any_shape(trained, shape):
    params, ws = trained
    reference = load_reference(ws["ckpt_dir"], torch.device("cpu"))
    volume_hu = smooth_field(shape, seed=7)
    out = reference.predict(volume_hu)
    assert out.shape == shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out, volume_hu)  # a trained network changes its input
    if shape == tuple(params.sr_reference.patch):  # one window: exactly input + the network's residual in HU
        low, high = params.hu_range
        with torch.no_grad():
            residual01 = reference.net(to_x01(volume_hu, (low, high))[None, None])[0, 0].numpy()
        np.testing.assert_allclose(out, volume_hu + residual01 * (high - low), rtol=1e-5, atol=1e-3)


def test_an_untrained_network_returns_its_input():
    """The top layer starts at zero: before training the reference is the baseline, not noise."""
    params = tiny_params()
    volume_hu = smooth_field((11, 20, 18), seed=3)
    np.testing.assert_array_equal(predict_reference(build_reference_net(params.sr_reference).eval(),
                                                    params.sr_reference, params.hu_range, volume_hu), volume_hu)


def test_load_reference_round_trip(trained, tmp_path):
    params, ws = trained
    reference = load_reference(ws["ckpt_dir"], torch.device("cpu"))
    assert not reference.net.training
    best = load_checkpoint(ws["ckpt_dir"] / "best.pt")["net"]
    for key, value in reference.net.state_dict().items():
        torch.testing.assert_close(value, best[key])
    # the checkpoint carries how it runs and what its input was, not the params of the day
    assert reference.params == params.sr_reference and reference.hu_range == params.hu_range
    assert reference.profile_digest == SliceProfile.named("box").digest
    volume_hu = case_input(ws, "case_003")  # the val case
    np.testing.assert_array_equal(reference.predict(volume_hu),
                                  load_reference(ws["ckpt_dir"], torch.device("cpu")).predict(volume_hu))
    with pytest.raises(FileNotFoundError, match="run the sr_reference stage"):
        load_reference(tmp_path / "nothing", torch.device("cpu"))


def test_reference_input_is_the_slab_consistent_baseline(trained):
    """The input agrees with what series 1 measured: its slab means are series 1's slices."""
    params, ws = trained
    folder = ws["processed_dir"] / "case_000"
    baseline = case_input(ws, "case_000")
    series1 = np.load(folder / "series1.npy").astype(np.float32)
    assert baseline.dtype == np.float32 and baseline.shape == SHAPE
    # series 1 here is the mean of each slab of 4 thin slices (rounded to whole HU)
    np.testing.assert_allclose(baseline.reshape(4, 4, *SHAPE[1:]).mean(axis=1), series1, atol=1e-3)


def test_missing_slabs_name_the_case_and_the_fix(tmp_path):
    ws = workspace(tmp_path)
    (ws["slab_dir"] / "case_001" / "slabs.npz").unlink()
    with pytest.raises(FileNotFoundError, match="case_001.*slabs.npz not found: run the slab stage"):
        run(tiny_params(), ws)


def test_sigterm_mid_epoch_then_rerun_continues_to_the_same_end(tmp_path):
    params = tiny_params(epochs=2, patches_per_volume=40)
    steps_per_epoch, total = 60, 120  # 3 train cases x 40 patches / batch 2, x 2 epochs
    ws = workspace(tmp_path / "killed")
    (tmp_path / "killed" / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    last = ws["ckpt_dir"] / "last.pt"
    saved = sigterm_mid_epoch("sr_reference", tmp_path / "killed", last, total, steps_per_epoch)

    resumed = run(params, ws)
    assert resumed.start_step == saved and resumed.steps == total
    assert "resuming from" in resumed.messages[0]
    reference_ws = workspace(tmp_path / "uninterrupted")
    reference = run(params, reference_ws)
    assert reference.start_step == 0 and reference.steps == total
    # the RNG streams were restored too: the resumed run ends on the same weights as the uninterrupted one
    a, b = load_checkpoint(last)["net"], load_checkpoint(reference_ws["ckpt_dir"] / "last.pt")["net"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # dvclive has one row per epoch, the interrupted epoch included once
    rows = (ws["live_dir"] / "plots" / "metrics" / "val" / "l1.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2

    # finished with the same params: nothing retrains; with other params: a fresh start that says why
    again = run(params, ws)
    assert again.start_step == again.steps == total and not again.history
    assert load_checkpoint(last)["step"] == total
    fresh = run(tiny_params(epochs=2, patches_per_volume=40, lr=1e-3), ws)
    assert fresh.start_step == 0 and "sr_reference.lr: 0.003 -> 0.001" in fresh.messages[0]
