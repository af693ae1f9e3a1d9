"""fetch_data: phantom (atomic rebuild), local (links, not copies) and hf: a Hugging Face cache in the
real layout built here and read with HF_HUB_OFFLINE=1; the online path (download, refusals, a dead
network) against a small fake Hub on 127.0.0.1. Nothing leaves the machine; "fails fast" is asserted as the
requests made, never as a duration."""

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from hf_fakes import COMMIT, FAKE_TOKEN, REPO, network_attempts  # fixtures hf_env, fake_hub, silent_hub: conftest.py
from paramkit import deep_merge, merged_params, raw_params

from ctdiff.data import fetch as fetch_module
from ctdiff.data.fetch import DataFetchError, fetch_data, find_zips, link_or_copy
from ctdiff.data.phantom import write_phantom_dataset

TINY_PHANTOM = {"n_cases": 3, "families": {"hilum": {"shape": [10, 32, 32], "pixel_mm": 10.0}}}


def _params(**data):
    return merged_params({"seed": 1, "data": data})


@pytest.fixture(scope="module")
def phantom_zips(tmp_path_factory) -> dict[str, bytes]:
    """``{"APE/case_001.zip": bytes, ...}``: three real phantom zips, as APE-data lays them out."""
    raw = tmp_path_factory.mktemp("phantom")
    p = _params(phantom=TINY_PHANTOM).data.phantom
    return {path.relative_to(raw).as_posix(): path.read_bytes() for path in write_phantom_dataset(raw, p, seed=1)}


# ------------------------------------------------------------------------------------------ phantom
def test_phantom_rebuilds_the_folder_whole(tmp_path):
    raw = tmp_path / "data" / "raw"
    (raw / "APE").mkdir(parents=True)
    (raw / "APE" / "stale_case.zip").write_bytes(b"left over from another run")
    summary = fetch_data(_params(source="phantom", phantom=TINY_PHANTOM), raw)
    assert summary.counts == {"APE": 2, "non-APE": 1} and summary.total == 3
    zips = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.zip"))
    assert all(re.fullmatch(r"(APE|non-APE)/case_\d{3}\.zip", z) for z in zips)
    assert sorted(int(z[-7:-4]) for z in zips) == [1, 2, 3]
    assert not (raw / "APE" / "stale_case.zip").exists()
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # no temporaries beside it
    assert "3 zips" in summary.line() and "2 APE" in summary.line()


def test_phantom_killed_midway_leaves_the_old_folder(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    fetch_data(_params(source="phantom", phantom=TINY_PHANTOM), raw)
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))

    def dies_after_one_case(raw_dir, p, seed, progress=False):
        write_phantom_dataset(raw_dir, dataclasses.replace(p, n_cases=1), seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch_module, "write_phantom_dataset", dies_after_one_case)
    with pytest.raises(KeyboardInterrupt):
        fetch_data(_params(source="phantom", phantom={**TINY_PHANTOM, "n_cases": 5}), raw)
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


# -------------------------------------------------------------------------------------------- local
def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_local_links_zips_without_copying(tmp_path):
    src = tmp_path / "ape-data"
    ape = _write(src / "APE" / "case_001.zip", b"zip 1")
    _write(src / "APE" / "case_002.zip", b"zip 2")
    non_ape = _write(src / "non_ape" / "case_003.zip", b"zip 3")  # spelling variants are accepted
    root_zip = _write(src / "case_004.zip", b"zip 4")
    _write(src / "APE" / ".case_005.zip.incomplete.zip", b"partial download")
    _write(src / "notes.txt", b"not a case")
    _write(src / "other" / "case_006.zip", b"not in a category folder")
    raw = tmp_path / "data" / "raw"

    summary = fetch_data(_params(source="local", local_dir=str(src)), raw)

    assert summary.counts == {"APE": 2, "non-APE": 1, "unknown": 1}
    assert summary.how == {"hardlink": 4}
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == [
        "APE/case_001.zip", "APE/case_002.zip", "case_004.zip", "non-APE/case_003.zip"]
    for source, linked in ((ape, raw / "APE" / "case_001.zip"), (non_ape, raw / "non-APE" / "case_003.zip"),
                           (root_zip, raw / "case_004.zip")):
        assert os.stat(source).st_ino == os.stat(linked).st_ino  # the same file, not a copy
    assert (src / "APE" / "case_001.zip").read_bytes() == b"zip 1"  # sources untouched


def test_link_falls_back_to_symlink_then_copy(tmp_path, monkeypatch):
    src = _write(tmp_path / "a.zip", b"payload")

    def no_hardlinks(*args, **kwargs):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_hardlinks)
    assert link_or_copy(src, tmp_path / "b.zip") == "symlink"
    assert (tmp_path / "b.zip").is_symlink() and (tmp_path / "b.zip").resolve() == src.resolve()

    monkeypatch.setattr(os, "symlink", no_hardlinks)
    assert link_or_copy(src, tmp_path / "c.zip") == "copy"
    assert not (tmp_path / "c.zip").is_symlink() and (tmp_path / "c.zip").read_bytes() == b"payload"


def test_local_missing_or_empty_folder_is_a_clear_error(tmp_path):
    raw = tmp_path / "raw"
    with pytest.raises(DataFetchError, match=r"data.local_dir=.*is not a folder.*data.source=phantom"):
        fetch_data(_params(source="local", local_dir=str(tmp_path / "nowhere")), raw)
    (tmp_path / "empty" / "APE").mkdir(parents=True)
    with pytest.raises(DataFetchError, match="holds no .zip files"):
        fetch_data(_params(source="local", local_dir=str(tmp_path / "empty")), raw)
    assert not raw.exists()
    inside = _write(raw / "APE" / "case_001.zip", b"the only copy")
    with pytest.raises(DataFetchError, match="lies inside the output folder"):
        fetch_data(_params(source="local", local_dir=str(raw)), raw)
    assert inside.read_bytes() == b"the only copy"


def test_duplicate_case_ids_across_categories_are_refused(tmp_path):
    _write(tmp_path / "src" / "APE" / "case_001.zip", b"a")
    _write(tmp_path / "src" / "non-APE" / "case_001.zip", b"b")
    with pytest.raises(DataFetchError, match="case_001.*twice"):
        find_zips(tmp_path / "src")


# ---------------------------------------------------------------------------------------- hf: cache
def _build_hf_cache(cache: Path, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main") -> Path:
    """The real huggingface_hub cache layout for dataset REPO at ``commit`` (``refs/<ref>`` points at it):
    blobs named by sha256, snapshot entries as relative symlinks to them."""
    storage = cache / f"datasets--{REPO.replace('/', '--')}"
    for rel, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        _write(blob, data)
        entry = storage / "snapshots" / commit / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return storage


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_hf_offline_links_zips_from_the_cache(hf_env, phantom_zips, tmp_path, revision, capsys):
    storage = _build_hf_cache(hf_env, {**phantom_zips, "README.md": b"# APE-data", ".gitattributes": b"*.zip lfs"})
    raw = tmp_path / "data" / "raw"
    summary = fetch_data(_params(source="hf", hf={"revision": revision}), raw)

    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == sorted(phantom_zips)
    assert summary.counts == {"APE": 2, "non-APE": 1} and summary.how == {"hardlink": 3}
    for rel, data in phantom_zips.items():
        linked = raw / rel
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        assert not linked.is_symlink() and os.stat(linked).st_ino == os.stat(blob).st_ino
        assert linked.read_bytes() == data
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_hf_allow_patterns_select_zips(hf_env, phantom_zips, tmp_path):
    _build_hf_cache(hf_env, phantom_zips)
    raw = tmp_path / "raw"
    summary = fetch_data(_params(source="hf", hf={"revision": COMMIT, "allow_patterns": ["APE/*.zip"]}), raw)
    assert summary.counts == {"APE": 2, "non-APE": 0}
    assert sorted(p.parent.name for p in raw.rglob("*.zip")) == ["APE", "APE"]


def test_hf_offline_without_cache_fails_fast_and_names_the_fix(hf_env, tmp_path, capsys):
    with network_attempts() as attempts, pytest.raises(DataFetchError) as info:
        fetch_data(_params(source="hf", hf={"revision": COMMIT}), tmp_path / "raw")
    assert attempts == []  # not one name lookup or connection: nothing to wait for
    message = str(info.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message and "data.source=phantom" in message and REPO in message
    assert FAKE_TOKEN not in message + repr(info.value.__cause__)
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err
    assert not (tmp_path / "raw").exists()


# ------------------------------------------------------------------------------ hf: a fake Hub online
def test_hf_online_downloads_into_the_cache_then_works_offline(fake_hub, hf_env, phantom_zips, tmp_path, capsys,
                                                               monkeypatch):
    hub = fake_hub(files={**phantom_zips, "README.md": b"# APE-data"})
    raw = tmp_path / "raw"
    summary = fetch_data(_params(source="hf"), raw)  # revision "main"
    assert summary.counts == {"APE": 2, "non-APE": 1} and summary.how == {"hardlink": 3}
    for rel, data in phantom_zips.items():
        assert (raw / rel).read_bytes() == data
    storage = hf_env / f"datasets--{REPO.replace('/', '--')}"
    assert (storage / "refs" / "main").read_text() == COMMIT  # so offline runs find "main" later
    assert not any("README" in path for path, _ in hub.requests)  # only the allowed zips were fetched
    assert {auth for _, auth in hub.requests} == {f"Bearer {FAKE_TOKEN}"}

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    n_requests = len(hub.requests)
    shutil.rmtree(raw)
    assert fetch_data(_params(source="hf"), raw).counts == summary.counts
    assert len(hub.requests) == n_requests
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


@pytest.mark.parametrize(("status", "code"), [(401, "RepoNotFound"), (403, "GatedRepo")])
def test_hf_refused_access_names_the_token_fix(fake_hub, tmp_path, capsys, status, code):
    hub = fake_hub(refuse=(status, code))
    with pytest.raises(DataFetchError) as info:
        fetch_data(_params(source="hf"), tmp_path / "raw")
    message = str(info.value)
    assert "HF_TOKEN" in message and "accepted the dataset's terms" in message and "data.source=phantom" in message
    assert hub.requests == [(f"/api/datasets/{REPO}/revision/main", f"Bearer {FAKE_TOKEN}")]  # one request, no retry
    assert FAKE_TOKEN not in message
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_hf_server_error_falls_back_to_the_cache(fake_hub, hf_env, phantom_zips, tmp_path):
    """A Hub that answers 500 is neither a refusal nor a dead network: the cache is used, and without one the
    error says what the Hub answered."""
    hub = fake_hub(refuse=(500, "InternalServerError"))
    params = _params(source="hf", hf={"revision": COMMIT})
    with pytest.raises(DataFetchError, match=r"answered HTTP 500 and the Hugging Face cache .*data.source=phantom"):
        fetch_data(params, tmp_path / "raw")
    _build_hf_cache(hf_env, phantom_zips)
    assert fetch_data(params, tmp_path / "raw").counts == {"APE": 2, "non-APE": 1}
    assert len(hub.requests) == 2  # one metadata request per run, no retries, no download


def test_hf_dead_network_times_out_quickly_then_uses_the_cache(fake_hub, silent_hub, monkeypatch, tmp_path):
    """A Hub that accepts connections and never answers: one short timeout, no retries, then the
    (empty) cache, then the clear error."""
    fake_hub.point_at(silent_hub.port)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 1)
    # only a timeout can end a wait on a server that never answers: this one is HF_HUB_ETAG_TIMEOUT's 1 s
    with pytest.raises(DataFetchError, match=r"cannot be reached \(\w*Timeout\w* within 1 s\).*data.source=phantom"):
        fetch_data(_params(source="hf"), tmp_path / "raw")
    assert silent_hub.requests() == [f"GET /api/datasets/{REPO}/revision/main"]  # one request: no retry, no download


# -------------------------------------------------------------------------------------------- stage
def _run_stage(cwd: Path, repo_root: Path, data: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw_params({"seed": 0}), {"data": data})))
    return subprocess.run([sys.executable, str(repo_root / "stages" / "fetch_data.py")], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_stage_script_phantom_and_offline_hf(tmp_path, repo_root):
    """The stage as DVC runs it, in a fresh interpreter (so huggingface_hub reads the environment at
    import, as in real use): phantom succeeds with a one-line summary; hf offline with an empty cache
    exits 1 with one error line, no traceback and no token."""
    ok = _run_stage(tmp_path, repo_root, {"phantom": TINY_PHANTOM}, {})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "fetch_data (phantom): 3 zips in data/raw: 2 APE, 1 non-APE [3 generated]"
    assert len(list((tmp_path / "data" / "raw").rglob("*.zip"))) == 3

    hf_home = tmp_path / "hf_home"
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    failed = _run_stage(tmp_path, repo_root, {"source": "hf"}, env)
    assert failed.returncode == 1
    assert failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch_data: error: ") and "data.source=phantom" in lines[0]
    assert FAKE_TOKEN not in failed.stderr
    assert len(list((tmp_path / "data" / "raw").rglob("*.zip"))) == 3  # the previous data/raw is kept
