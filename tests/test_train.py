"""The train stage on tiny real inputs: phases, resume after a kill, params hash, divergence, checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainkit import tiny_params, workspace
from vae_helpers import single_torch_thread, write_slabs  # noqa: F401  (fixture)

from ctdiff.models.checkpoint import read_model_card
from ctdiff.models.denoiser import build_unet
from ctdiff.models.diffusion import sample, sampling_scheduler
from ctdiff.models.vae.weights import load_vae, read_maisi_checkpoint
from ctdiff.params import to_dict, with_overrides
from ctdiff.training.latents import cut_patch
from ctdiff.training.ldm import TrainingDiverged, train
from ctdiff.training.scaffold import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def run(params, ws):
    return train(params, **ws, progress=False)


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """A child in its own process group (so a hung one is killed whole), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        # torchrun's workers run in sessions of their own and may outlive the killed group holding the
        # pipe open: read what is there for a few seconds instead of waiting for an EOF that never comes.
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            out = "(output unavailable: a worker process still holds the pipe)"
        pytest.fail(f"{proc.args} did not finish in {timeout} s:\n{out}")
    return proc.returncode, out


def sigterm_mid_epoch(stage: str, folder: Path, last: Path, total: int, steps_per_epoch: int) -> int:
    """Run ``stages/<stage>.py`` in ``folder`` (its params.yaml), SIGTERM it once ``last`` appears, check it
    stopped as a killed stage does (exit 128 + SIGTERM, last.pt mid-epoch); returns the saved step."""
    proc = start([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=folder)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    returncode, out = finish(proc)
    assert returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out
    saved = load_checkpoint(last)["step"]
    assert 0 < saved < total and saved % steps_per_epoch, f"killed at step {saved}, not mid-epoch"
    return saved


def vae_weights(vae_dir: Path, use_maisi: bool) -> dict[str, torch.Tensor]:
    if use_maisi:
        return read_maisi_checkpoint(vae_dir / "autoencoder.pt")
    return load_file(vae_dir / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("use_maisi", [False, True], ids=["sd", "maisi"])
def test_vae_is_frozen_then_only_its_decoder_moves(tmp_path, use_maisi):
    params = tiny_params(use_maisi=use_maisi, epochs=3, vae_freeze_epochs=2, vae_finetune="decoder", vae_lr=1e-3)
    ws = workspace(tmp_path, params)
    result = run(params, ws)
    assert [h["phase"] for h in result.history] == [0, 0, 1]
    drift = [h["vae/drift"] for h in result.history]
    assert drift[0] == drift[1] == 0.0 and drift[2] > 0  # weights identical through the frozen epochs
    assert [h["lr/vae"] for h in result.history][:2] == [0.0, 0.0]
    ckpt = load_checkpoint(ws["ckpt_dir"] / "last.pt")
    start = vae_weights(ws["vae_dir"], use_maisi)
    moved = {k for k, v in ckpt["vae"].items() if v.is_floating_point() and not torch.equal(v, start[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)


def test_full_finetune_moves_the_encoder_and_latent_std_stays_within_2x(tmp_path):
    params = tiny_params(epochs=4, vae_freeze_epochs=1, vae_finetune="full", vae_lr=2e-3, patches_per_volume=4)
    ws = workspace(tmp_path, params)
    result = run(params, ws)
    start_std = 1.0 / result.scale_factor
    stds = [h["latent/std"] for h in result.history]
    assert all(0.5 * start_std <= s <= 2.0 * start_std for s in stds), (start_std, stds)
    ckpt = load_checkpoint(ws["ckpt_dir"] / "last.pt")
    start = vae_weights(ws["vae_dir"], False)
    assert any(not torch.equal(v, start[k]) for k, v in ckpt["vae"].items() if k.startswith("encoder."))


def test_sigterm_mid_epoch_then_rerun_continues_to_the_same_end(tmp_path):
    params = tiny_params(epochs=3, vae_freeze_epochs=2, patches_per_volume=6, checkpoint_every=2)
    steps_per_epoch, total = 9, 27  # 3 train cases x 6 patches / batch 2, x 3 epochs
    ws = workspace(tmp_path / "killed", params)
    (tmp_path / "killed" / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    last = ws["ckpt_dir"] / "last.pt"
    saved = sigterm_mid_epoch("train", tmp_path / "killed", last, total, steps_per_epoch)

    resumed = run(params, ws)
    assert resumed.start_step == saved and resumed.steps == total
    assert "resuming from" in resumed.messages[0]
    reference_ws = workspace(tmp_path / "reference", params)
    reference = run(params, reference_ws)
    assert reference.start_step == 0 and reference.steps == total
    # the RNG streams were restored too: the resumed run ends on the same weights as the uninterrupted one
    a = load_checkpoint(last)["unet"]
    b = load_checkpoint(reference_ws["ckpt_dir"] / "last.pt")["unet"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # dvclive has one row per epoch, the interrupted epoch included once
    rows = (ws["live_dir"] / "plots" / "metrics" / "val" / "loss.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3


def test_changed_params_start_fresh_and_say_why(tmp_path):
    params = tiny_params(epochs=1, vae_freeze_epochs=1)
    ws = workspace(tmp_path, params)
    run(params, ws)
    same_model_other_run = with_overrides(tiny_params(epochs=1, vae_freeze_epochs=1, checkpoint_every=5),
                                          {"device": "cpu", "train.sampling.steps": 7})
    again = run(same_model_other_run, ws)
    assert again.start_step == again.steps > 0  # nothing to do: already complete
    assert read_model_card(ws["ckpt_dir"])["sampling"]["steps"] == 7  # but how it is sampled is written again
    changed = tiny_params(epochs=1, vae_freeze_epochs=1, lr=2e-3)
    fresh = run(changed, ws)
    assert fresh.start_step == 0 and fresh.steps == again.steps
    assert "different params (train.lr: 0.001 -> 0.002): starting fresh" in fresh.messages[0]


def test_non_finite_loss_stops_naming_the_step_and_writes_nothing(tmp_path):
    params = tiny_params(lr=1e30, checkpoint_every=100)  # the first step throws the weights to ~1e28
    ws = workspace(tmp_path, params)
    with pytest.raises(TrainingDiverged, match=r"step 2 \(epoch 1\): loss is (inf|nan)"):
        run(params, ws)
    assert not list(ws["ckpt_dir"].glob("*.pt"))
    assert not list(ws["live_dir"].rglob("*.*"))


def test_checkpoints_load_weights_only_and_sample(tmp_path):
    params = tiny_params(epochs=2, vae_freeze_epochs=1)
    ws = workspace(tmp_path, params)
    result = run(params, ws)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(ws["ckpt_dir"] / name, map_location="cpu", weights_only=True)
        assert ckpt["scale_factor"] == pytest.approx(result.scale_factor)
        assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    # the run ends fine-tuned: last.pt carries the VAE; best.pt carries it when its epoch came after the freeze
    assert torch.load(ws["ckpt_dir"] / "last.pt", map_location="cpu", weights_only=True)["vae"] is not None
    assert load_checkpoint(ws["ckpt_dir"] / "last.pt")["optimizer"] is not None
    metrics = json.loads((ws["live_dir"] / "metrics.json").read_text())
    assert metrics["codec"] == "sd" and metrics["weights"]["origin"] == "scratch" and metrics["step"] == 1
    # what evaluate does: rebuild from best.pt, encode the source, sample the target latent, decode
    best = load_checkpoint(ws["ckpt_dir"] / "best.pt")
    vae = load_vae(ws["vae_dir"], "cpu")
    if best["vae"] is not None:  # as load_trained_model does: a frozen-phase best.pt uses the VAE as fitted
        vae.module.load_state_dict(best["vae"])
    unet = build_unet(params.train.unet, vae.latent_channels)
    unet.load_state_dict(best["unet"])
    source_hu = torch.from_numpy(np.load(ws["processed_dir"] / "case_003" / "source.npy").astype(np.float32))
    latent = vae.encode_posterior_hu(source_hu[None, None]).mean * best["scale_factor"]
    latent = cut_patch(latent, (0, 0, 0), (8, 2, 2))
    generated = sample(unet.eval(), sampling_scheduler(params.train, steps=3), latent)
    hu = vae.decode_hu(generated / best["scale_factor"], (8, 16, 16))
    assert hu.shape == (1, 1, 8, 16, 16) and torch.isfinite(hu).all()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the fields after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def finish_torchrun(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """:func:`finish` for torchrun. Its workers run in sessions of their own, so on a timeout they get SIGABRT
    first: none outlives the test, and each prints every thread's stack (PYTHONFAULTHANDLER) into the failure."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGABRT)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{proc.args} did not finish in {timeout} s; the workers' stacks when stopped:\n{out}")
    return proc.returncode, out


def test_ddp_two_processes_on_cpu(tmp_path, monkeypatch):
    params = tiny_params(epochs=2, vae_freeze_epochs=1)  # both phases: DDP UNet + averaged VAE gradients
    ws = workspace(tmp_path, params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    # The job used to finish its last epoch and then hang in about half the runs: see DistEnv.close.
    returncode, out = finish_torchrun(start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", str(REPO / "stages" / "train.py")], cwd=tmp_path))
    assert returncode == 0, out
    ckpt = load_checkpoint(ws["ckpt_dir"] / "last.pt")
    assert ckpt["step"] == 2 * 2  # ceil(3 cases x 2 patches / (batch 2 x 2 ranks)) x 2 epochs
    assert out.count("train: 4 steps") == 1  # rank 0 alone reports


def test_ddp_job_that_fails_exits_with_an_error_instead_of_hanging(tmp_path, monkeypatch):
    """A diverging loss raises on every rank mid-training: the group must still close and the job end."""
    params = tiny_params(lr=1e30, checkpoint_every=100)  # as in the single-process test: step 2 is non-finite
    workspace(tmp_path, params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(params)))
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    returncode, out = finish_torchrun(start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", str(REPO / "stages" / "train.py")], cwd=tmp_path))
    assert returncode != 0, out
    assert "loss is" in out and "stopped before writing anything" in out


@pytest.mark.parametrize(("scheduler", "prediction"), [("rflow", "epsilon"), ("ddpm", "v")])
def test_other_noise_processes_train_end_to_end(tmp_path, scheduler, prediction):
    params = tiny_params(epochs=2, vae_freeze_epochs=1, scheduler=scheduler, prediction=prediction)
    result = run(params, workspace(tmp_path, params))
    assert result.steps == 6 and all(np.isfinite(h["val/loss"]) for h in result.history)


def test_the_condition_can_be_the_slab_consistent_baseline(tmp_path):
    """train.condition: consistent: the cached condition latents are the encoding of the slab stage's
    baseline_consistent (the projection of source.npy with the stage's operator), and sampling (evaluate, predict)
    conditions on the same volume."""
    from ctdiff.data.processed import split_cases
    from ctdiff.data.slab import case_slabs, consistent_baseline
    from ctdiff.inference.sampling import load_trained_model
    from ctdiff.training.latents import LatentCache
    from ctdiff.training.ldm import prepare_data

    params = tiny_params(epochs=1, vae_freeze_epochs=1, condition="consistent")
    ws = workspace(tmp_path, params)
    data = prepare_data(ws["processed_dir"], ws["slab_dir"], "consistent")
    case = split_cases(ws["processed_dir"], "train")[0]
    operator, measured = case_slabs(case.meta, case.load("series1"), "box")
    expected = consistent_baseline(case.load("source"), operator, measured)
    np.testing.assert_array_equal(data.volumes[0][0], expected)
    # memory-mapped, not held: a real-size split would not fit in RAM otherwise
    assert all(isinstance(v[0], np.memmap) for v in data.volumes) and isinstance(data.val_conditions[0], np.memmap)
    assert not np.array_equal(np.asarray(data.volumes[0][0]), case.load("source").astype(np.float32))
    vae = load_vae(ws["vae_dir"], "cpu")
    cache = LatentCache.build(vae, data.train[:1], volumes=data.volumes[:1], condition="consistent", progress=False)
    encoded = vae.encode_posterior_hu(torch.from_numpy(expected)[None, None], case.grid.direction).mean[0]
    torch.testing.assert_close(cache.cases[0].source.mean, encoded)
    run(params, ws)
    model = load_trained_model(ws["vae_dir"], ws["ckpt_dir"], torch.device("cpu"))
    assert model.train_params.condition == "consistent" and model.profile.name == "box"


def test_a_changed_slab_profile_retrains_a_consistent_model(tmp_path):
    """The model learnt from conditions projected with the slab profile: another profile (the slab stage rerun)
    must not find the finished checkpoint 'already complete', and the model must carry the new profile."""
    params = tiny_params(epochs=1, vae_freeze_epochs=1, condition="consistent")
    ws = workspace(tmp_path, params)
    first = run(params, ws)
    assert first.start_step == 0 and read_model_card(ws["ckpt_dir"])["slab_profile"]["name"] == "box"
    write_slabs(ws["processed_dir"], "triangle")
    again = run(params, ws)
    assert again.start_step == 0 and again.steps == first.steps
    assert "slab_profile" in again.messages[0] and "starting fresh" in again.messages[0]
    assert read_model_card(ws["ckpt_dir"])["slab_profile"]["name"] == "triangle"
