"""fetch_weights against a Hugging Face cache built here in the real layout, with the hub offline; the shared
reachability check against a closed port, a local server that answers 404 and one that never answers.
Nothing leaves the machine; "fails fast" is asserted as the requests made, never as a duration."""

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from hf_fakes import network_attempts
from huggingface_hub import constants
from vae_helpers import (  # single_torch_thread is a fixture
    COMMIT,
    MAISI_REPO,
    SD_REPO,
    SINGLE_THREAD_ENV,
    add_to_hf_cache,
    as_params,
    single_torch_thread,  # noqa: F401
    tiny_params,
    write_params,
)

from ctdiff.data.hub import HubError, hub_unreachable_reason, offline_reason
from ctdiff.models.vae.maisi import maisi_config
from ctdiff.models.vae.sd import sd_scratch_config
from ctdiff.models.vae.weights import (
    MAISI_WEIGHTS,
    ORIGIN_JSON,
    SD_CONFIG,
    SD_WEIGHTS,
    WeightsError,
    fetch_pretrained,
    new_codec,
    pretrained_codec,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MAISI_FILE = "models/autoencoder.pt"
AGENT_REGISTRY = "GET /api/agent-harnesses"  # huggingface_hub >= 2.4 asks once a day, with telemetry on

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import; its constant is what the code consults.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _maisi_state_dict() -> dict[str, torch.Tensor]:
    vae = as_params(tiny_params(use_maisi=True, pretrained=True)).vae
    return new_codec(vae, (-1000.0, 1000.0), maisi_config(vae.maisi.arch, vae.latent_channels)).module.state_dict()


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sd_files(tmp_path: Path) -> dict[str, bytes]:
    vae = as_params(tiny_params(use_maisi=False, pretrained=True)).vae
    folder = tmp_path / "sd_export"
    AutoencoderKL(**sd_scratch_config(vae.sd.scratch, vae.latent_channels)).save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in (SD_CONFIG, SD_WEIGHTS)}


def _maisi_params(sha256: str) -> dict:
    return tiny_params(use_maisi=True, pretrained=True, **{"maisi.hub.sha256": sha256})


def test_maisi_found_offline_verified_and_loaded(tmp_path, offline):
    cache = tmp_path / "hf"
    hashes = add_to_hf_cache(cache, MAISI_REPO, COMMIT, {MAISI_FILE: _torch_bytes(_maisi_state_dict())})
    vae = as_params(_maisi_params(hashes[MAISI_FILE])).vae
    out = tmp_path / "models" / "pretrained"

    record, notes = fetch_pretrained(vae, out, cache)

    assert record == {"origin": "hub", "codec": "maisi", "repo": MAISI_REPO, "revision": COMMIT,
                      "files": {MAISI_WEIGHTS: hashes[MAISI_FILE]}}
    assert notes == []
    assert json.loads((out / ORIGIN_JSON).read_text()) == record
    assert hashlib.sha256((out / MAISI_WEIGHTS).read_bytes()).hexdigest() == hashes[MAISI_FILE]
    codec = pretrained_codec(vae, (-1000.0, 1000.0), out)
    assert codec.latent_shape((16, 16, 16)) == (4, 4, 4, 4)


def test_sd_found_offline_and_unpinned_config_hash_is_reported(tmp_path, offline):
    cache = tmp_path / "hf"
    hashes = add_to_hf_cache(cache, SD_REPO, COMMIT, _sd_files(tmp_path))
    vae = as_params(tiny_params(use_maisi=False, pretrained=True, **{"sd.hub.sha256": hashes[SD_WEIGHTS],
                                                                      "sd.hub.config_sha256": ""})).vae
    out = tmp_path / "pretrained"

    record, notes = fetch_pretrained(vae, out, cache)

    assert record["files"] == {SD_CONFIG: hashes[SD_CONFIG], SD_WEIGHTS: hashes[SD_WEIGHTS]}
    assert len(notes) == 1
    assert hashes[SD_CONFIG] in notes[0] and f"-S vae.sd.hub.config_sha256={hashes[SD_CONFIG]}" in notes[0]
    assert pretrained_codec(vae, (-1000.0, 1000.0), out).downsample == (1, 8, 8)


def test_tampered_file_is_refused_and_nothing_written(tmp_path, offline):
    cache = tmp_path / "hf"
    hashes = add_to_hf_cache(cache, MAISI_REPO, COMMIT, {MAISI_FILE: _torch_bytes(_maisi_state_dict())})
    pinned = hashlib.sha256(b"the file that was pinned").hexdigest()
    out = tmp_path / "pretrained"

    with pytest.raises(HubError) as exc:
        fetch_pretrained(as_params(_maisi_params(pinned)).vae, out, cache)

    message = str(exc.value)
    assert hashes[MAISI_FILE] in message and pinned in message
    assert f"-S vae.maisi.hub.sha256={hashes[MAISI_FILE]}" in message
    assert not out.exists()
    assert list(tmp_path.glob(".pretrained*")) == []  # no temporary folder left behind


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_arbitrary_object_is_refused_without_running_it(tmp_path, offline):
    marker = tmp_path / "payload-ran"
    data = _torch_bytes({"encoder.conv_in.conv.weight": torch.zeros(1), "evil": _Payload(marker)})
    hashes = add_to_hf_cache(tmp_path / "hf", MAISI_REPO, COMMIT, {MAISI_FILE: data})
    out = tmp_path / "pretrained"

    with pytest.raises(WeightsError, match="weights_only=True"):
        fetch_pretrained(as_params(_maisi_params(hashes[MAISI_FILE])).vae, out, tmp_path / "hf")

    assert not marker.exists()
    assert not out.exists()


def test_checkpoint_with_wrong_keys_is_refused_listing_them(tmp_path, offline):
    state = _maisi_state_dict()
    state["encoder.extra_head.weight"] = state.pop("decoder.blocks.0.conv.conv.weight")
    hashes = add_to_hf_cache(tmp_path / "hf", MAISI_REPO, COMMIT, {MAISI_FILE: _torch_bytes({"state_dict": state})})
    out = tmp_path / "pretrained"

    with pytest.raises(WeightsError) as exc:
        fetch_pretrained(as_params(_maisi_params(hashes[MAISI_FILE])).vae, out, tmp_path / "hf")

    message = str(exc.value)
    assert "1 missing key(s): decoder.blocks.0.conv.conv.weight" in message
    assert "1 unexpected key(s): encoder.extra_head.weight" in message
    assert not out.exists()


def test_offline_with_empty_cache_fails_fast_naming_the_switch(tmp_path, offline):
    vae = as_params(tiny_params(use_maisi=False, pretrained=True)).vae
    with network_attempts() as attempts, pytest.raises(HubError) as exc:
        fetch_pretrained(vae, tmp_path / "pretrained", tmp_path / "empty-cache")
    assert attempts == []  # not one name lookup or connection: nothing to wait for
    message = str(exc.value)
    assert "dvc exp run -S vae.pretrained=false" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert f"{SD_REPO}@{COMMIT[:12]} config.json" in message and "diffusion_pytorch_model.safetensors" in message
    assert not (tmp_path / "pretrained").exists()


def test_scratch_records_scratch_without_touching_the_hub(tmp_path, offline):
    record, notes = fetch_pretrained(as_params(tiny_params(use_maisi=True)).vae, tmp_path / "p", tmp_path / "none")
    assert record == {"origin": "scratch", "codec": "maisi"} and notes == []
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [ORIGIN_JSON]


def _run_stage(cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **SINGLE_THREAD_ENV, **env_extra}
    return subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "fetch_weights.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_offline_uses_cache_and_never_prints_the_token(tmp_path):
    cache = tmp_path / "hf"
    hashes = add_to_hf_cache(cache, MAISI_REPO, COMMIT, {MAISI_FILE: _torch_bytes(_maisi_state_dict())})
    write_params(tmp_path, _maisi_params(hashes[MAISI_FILE]))
    secret = "hf_thisIsNotARealTokenButMustNotLeak"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_TOKEN": secret}

    ok = _run_stage(tmp_path, env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "models" / "pretrained" / MAISI_WEIGHTS).is_file()

    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    failed = _run_stage(tmp_path, env)
    assert failed.returncode == 1
    assert "dvc exp run -S vae.pretrained=false" in failed.stderr
    assert failed.stderr.count("fetch_weights: ") == 1 and "Traceback" not in failed.stderr  # one message
    assert secret not in ok.stdout + ok.stderr + failed.stdout + failed.stderr


def test_stage_with_a_hub_that_never_answers_stops_after_one_request_at_its_timeout(tmp_path, silent_hub):
    """A dead network (connections accepted, never answered): the stage asks once, waits vae.hub_timeout_s and
    stops with the fix; huggingface_hub alone would retry for 20 s and more."""
    write_params(tmp_path, tiny_params(use_maisi=True, pretrained=True, **{"hub_timeout_s": 1.0}))
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{silent_hub.port}",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "empty")}
    failed = _run_stage(tmp_path, env)
    assert failed.returncode == 1
    # only a timeout can end a wait on a server that never answers: this one is the params' 1 s
    assert re.search(r"cannot be reached \(\w*Timeout\w* within 1 s\)", failed.stderr), failed.stderr
    assert "vae.pretrained=false" in failed.stderr
    # the one metadata request: no retry, no download (huggingface_hub's own agent registry lookup aside)
    maisi = as_params(tiny_params(use_maisi=True, pretrained=True)).vae.maisi.hub
    assert [r for r in silent_hub.requests() if r != AGENT_REGISTRY] == [
        f"GET /api/models/{maisi.repo}/revision/{maisi.revision}"]
    assert not (tmp_path / "models" / "pretrained").exists()


def test_offline_variable_set_after_import_counts(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert offline_reason() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert offline_reason() == "HF_HUB_OFFLINE=1 is set"
    assert hub_unreachable_reason(SD_REPO, "model", COMMIT, timeout_s=0.1) == "HF_HUB_OFFLINE=1 is set"


def test_closed_port_is_unreachable_within_the_timeout(fake_hub):
    with socket.socket() as probe:  # a port that was free a moment ago: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake_hub.point_at(port)
    with network_attempts() as attempts:
        reason = hub_unreachable_reason(SD_REPO, "model", COMMIT, timeout_s=2.0)
    assert reason is not None and reason.startswith("the Hugging Face Hub cannot be reached (") and "2 s)" in reason
    assert "Timeout" not in reason  # refused at once, not waited out
    assert [a for event, a in attempts if event == "socket.connect"] == [("127.0.0.1", port)]  # one try, no retry


def test_hub_that_answers_with_an_error_is_not_called_unreachable(tmp_path, fake_hub, monkeypatch):
    """An HTTP error is an OSError too: it must reach the user as the Hub's answer, with the fix and the
    switch, not as a network problem and not as a traceback."""
    secret = "hf_thisIsNotARealTokenButMustNotLeak"
    monkeypatch.setenv("HF_TOKEN", secret)
    fake_hub(refuse=(404, "RevisionNotFound"))  # every request: no such revision
    with pytest.raises(HubError) as exc:
        fetch_pretrained(as_params(_maisi_params("")).vae, tmp_path / "pretrained", tmp_path / "empty-cache")
    message = str(exc.value)
    assert "RevisionNotFoundError, HTTP 404" in message and "vae.maisi.hub.repo and .revision" in message
    assert "cannot be reached" not in message and "dvc exp run -S vae.pretrained=false" in message
    assert secret not in message
    assert not (tmp_path / "pretrained").exists()
