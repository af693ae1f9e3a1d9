"""Artifacts between machines (slow): one tiny run of all eight stages in a git clone "A", pushed with
``dvc push`` and ``dvc exp push`` to a DVC remote on a real SSH server on 127.0.0.1 and to a shared folder,
then pulled into second clones that must find ``dvc repro`` a no-op, the same metrics, the experiment, and a
model that predicts a new scan voxel for voxel as A's does. A remote that is unreachable, unwritable or
holds a corrupted object ends in DVC's error and leaves the workspace as it was; no credential reaches a
tracked file. ``docs/remote.md`` is the workflow these tests follow.

The git server is a bare repository on disk (in real life GitHub or similar); the DVC remote is the
part under test. The SSH server is Debian's ``sshd`` (``tests/sshd.py``); the clones run with a
``HOME`` of their own, so the user's ``~/.ssh`` and DVC config stay out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from dvc_repo import DvcRepo
from paramkit import TINY_PIPELINE
from sshd import SshServer, find_sshd, free_port

from ctdiff.cli import main as cli_main

slow = pytest.mark.slow  # everything but the check of this repository's own .dvc/config
STAGES = ("fetch_data", "preprocess", "slab", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference",
          "calibrate", "evaluate")
# What another machine pulls: every stage's outputs but fetch_data's (data/raw is `push: false`).
PULL_ALL = ("preprocess", "slab", "fetch_weights", "vae_fit", "train", "sr_reference", "calibrate", "evaluate")
# What a laptop pulls to look at a run and predict with its model (metrics and PNGs come with git).
PULL_LAPTOP = ("fetch_weights", "vae_fit", "train", "calibrate", "evaluate")
TINY = {**TINY_PIPELINE, "data.phantom.n_cases": 5, "vae.scratch_epochs": 1, "sr_reference.epochs": 1,
        "train.sampling.samples": 1}
EXPERIMENT = "one-case"  # evaluate.max_cases=1: reruns evaluate alone, so it is cheap to run and to push


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def snapshot(repo: DvcRepo) -> dict[str, str]:
    """The whole workspace as a user would compare it: git's view, and every file (DVC's cache included,
    its scratch folder ``.dvc/tmp`` not) with its md5."""
    files = {"git HEAD": repo.run("git", "rev-parse", "HEAD").stdout,
             "git status": repo.run("git", "status", "--porcelain").stdout}
    for path in sorted(repo.root.rglob("*")):
        rel = path.relative_to(repo.root).as_posix()
        if path.is_file() and not rel.startswith((".git/", ".dvc/tmp/")) and "__pycache__" not in rel:
            files[rel] = hashlib.md5(path.read_bytes()).hexdigest()
    return files


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lock_md5(lock_text: str, stage: str, path: str) -> str:
    outs = yaml.safe_load(lock_text)["stages"][stage]["outs"]
    return next(out["md5"] for out in outs if out["path"] == path)


@contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def predict(repo: DvcRepo, scan: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """``ctdiff predict scan --out out`` in ``repo`` with its workspace model and params: the thin series
    and its affine. The command line runs in this process (one torch import for the module, not one per
    clone); the clones' ``src`` is a copy of the code imported here."""
    with working_directory(repo.root):
        assert cli_main(["predict", str(scan), "--out", str(out), "--quiet"]) == 0
    image = nib.load(out / f"{scan.stem}.nii.gz")
    return np.asarray(image.dataobj), image.affine


def pulled_outputs(repo: DvcRepo) -> dict[str, str]:
    """Every file of the outputs another machine pulls (the cached ones of PULL_ALL's stages)."""
    files = {}
    for folder in ("data/processed", "data/slab", "data/predictions", "models"):
        files.update({f"{folder}/{k}": v for k, v in tree(repo.root / folder).items()})
    return files


@dataclass
class Run:
    """Clone A after its run and pushes: what the other clones are compared with."""

    repo: DvcRepo
    origin: Path          # the bare git repository both clones push to and clone from
    sshd: SshServer
    env: dict[str, str]   # the clones' own HOME (no user ~/.ssh or DVC config)
    folder: Path          # the shared-folder remote
    scan: Path            # a "new scan" (a test case's zip, outside every clone)
    prediction: tuple[np.ndarray, np.ndarray]
    outputs: dict[str, str]
    metrics: dict         # dvc metrics show --json
    evaluate_metrics: dict
    experiment_lock: str
    experiment_metrics: dict


@pytest.fixture(scope="module")
def sshd():
    if find_sshd() is None and not os.environ.get("CI"):
        pytest.skip("sshd (Debian's openssh-server) is not installed")
    server = SshServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def run(sshd, tmp_path_factory) -> Run:
    base = tmp_path_factory.mktemp("remote")
    home = base / "home"
    home.mkdir()
    # A fresh HOME keeps the user's own ~/.ssh and DVC config out; matplotlib keeps its font cache.
    env = {"HOME": str(home), "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(Path.home() / ".cache/matplotlib"))}
    origin = base / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    folder = base / "shared-folder"

    (base / "a").mkdir()
    a = DvcRepo(base / "a", TINY, env=env)
    a.run("git", "remote", "add", "origin", str(origin))
    # The team's remotes, as docs/remote.md adds them: URLs and verify in .dvc/config (tracked), the key
    # in .dvc/config.local (ignored by git).
    a.dvc("remote", "add", "-d", "storage", sshd.url(sshd.storage("storage")))
    a.dvc("remote", "modify", "storage", "verify", "true")
    a.dvc("remote", "modify", "--local", "storage", "keyfile", str(sshd.client_key))
    a.dvc("remote", "add", "shared", str(folder))
    a.dvc("remote", "modify", "shared", "verify", "true")
    a.commit("tiny offline params, the team's remotes")
    a.dvc("repro")
    a.commit("results")
    a.dvc("push")
    a.dvc("push", "-r", "shared")
    a.run("git", "push", "-q", "origin", "main")

    a.dvc("exp", "run", "-n", EXPERIMENT, "-S", "evaluate.max_cases=1")
    experiment_lock = (a.root / "dvc.lock").read_text()
    experiment_metrics = json.loads((a.root / "dvclive" / "evaluate" / "metrics.json").read_text())
    a.dvc("exp", "push", "origin", EXPERIMENT)                  # git refs + cache to the default remote
    a.dvc("exp", "push", "-r", "shared", "origin", EXPERIMENT)  # the cache to the shared folder too
    a.run("git", "checkout", "--", ".")                         # back to main's results
    a.dvc("checkout", "--force")
    assert a.run("git", "status", "--porcelain").stdout == ""

    splits = json.loads((a.root / "data" / "processed" / "splits.json").read_text())
    case_id = splits["test"][0]
    scans = base / "scans"
    scans.mkdir()
    scan = shutil.copy(next((a.root / "data" / "raw").rglob(f"{case_id}.zip")), scans)
    return Run(
        repo=a, origin=origin, sshd=sshd, env=env, folder=folder, scan=Path(scan),
        prediction=predict(a, Path(scan), base / "a-predictions"),
        outputs=pulled_outputs(a),
        metrics=json.loads(a.dvc("metrics", "show", "--json").stdout),
        evaluate_metrics=json.loads((a.root / "dvclive" / "evaluate" / "metrics.json").read_text()),
        experiment_lock=experiment_lock,
        experiment_metrics=experiment_metrics,
    )


def clone(run: Run, root: Path, remote: str) -> DvcRepo:
    """A second machine: git clone, then this machine's own credentials or default remote (local config)."""
    repo = DvcRepo.clone(run.origin, root, env=run.env)
    if remote == "storage":
        repo.dvc("remote", "modify", "--local", "storage", "keyfile", str(run.sshd.client_key))
    else:
        repo.dvc("remote", "default", "--local", remote)
    return repo


@pytest.fixture(scope="module", params=["storage", "shared"], ids=["ssh", "shared-folder"])
def pulled(request, run, tmp_path_factory) -> DvcRepo:
    """Clone B: a git clone of A's pushed history that pulled everything A pushed, from one remote."""
    b = clone(run, tmp_path_factory.mktemp(f"b-{request.param}") / "b", request.param)
    b.dvc("pull", *PULL_ALL)
    return b


@slow
def test_pull_brings_every_pushed_output_and_repro_is_a_noop(run, pulled):
    assert pulled_outputs(pulled) == run.outputs
    assert not (pulled.root / "data" / "raw").exists()  # push: false, regenerated from the seed when needed
    out = pulled.dvc("repro", "--allow-missing").stdout
    assert ran(out) == set(), out
    for stage in STAGES:
        assert f"'{stage}' didn't change, skipping" in out, out
    # The only difference from A: the raw zips, which were not pushed.
    status = json.loads(pulled.dvc("status", "--json").stdout)
    assert status == {"fetch_data": [{"changed outs": {"data/raw": "not in cache"}}],
                      "preprocess": [{"changed deps": {"data/raw": "deleted"}}]}, status


@slow
def test_pulled_metrics_are_the_same(run, pulled):
    assert json.loads(pulled.dvc("metrics", "show", "--json").stdout) == run.metrics


@slow
def test_the_pulled_model_predicts_voxel_for_voxel_as_the_first_clone(run, pulled, tmp_path):
    thin, affine = predict(pulled, run.scan, tmp_path / "predictions")
    np.testing.assert_array_equal(thin, run.prediction[0])
    np.testing.assert_array_equal(affine, run.prediction[1])


@slow
def test_a_pushed_experiment_is_pulled_compared_and_applied(run, pulled, tmp_path):
    pulled.dvc("exp", "pull", "origin")  # every experiment of this commit
    assert EXPERIMENT in pulled.dvc("exp", "show", "--csv").stdout
    diff = json.loads(pulled.dvc("metrics", "diff", "main", EXPERIMENT, "--all", "--json").stdout)
    model = diff["dvclive/evaluate/metrics.json"]["model.psnr_body"]
    assert model["old"] == run.evaluate_metrics["model"]["psnr_body"]
    assert model["new"] == run.experiment_metrics["model"]["psnr_body"]
    pulled.dvc("plots", "diff", "main", EXPERIMENT, "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    # apply checks out the experiment's outputs from the cache exp pull filled, and names data/raw (never
    # pushed) as the one output it could not check out.
    applied = pulled.dvc("exp", "apply", EXPERIMENT, check=False)
    assert applied.returncode != 0, applied.stdout
    assert "Checkout failed for following targets:\ndata/raw\n" in applied.stderr, applied.stderr
    predictions = "data/predictions"
    assert lock_md5(run.experiment_lock, "evaluate", predictions) != lock_md5(
        (run.repo.root / "dvc.lock").read_text(), "evaluate", predictions)
    assert lock_md5((pulled.root / "dvc.lock").read_text(), "evaluate", predictions) == lock_md5(
        run.experiment_lock, "evaluate", predictions)
    status = json.loads(pulled.dvc("status", "--json").stdout)
    assert set(status) == {"fetch_data", "preprocess"}, status  # predictions and the rest match the lock


@slow
def test_a_laptop_pulls_the_model_and_predictions_only_and_predicts_the_same(run, tmp_path):
    laptop = clone(run, tmp_path / "laptop", "storage")
    laptop.dvc("pull", *PULL_LAPTOP)
    assert not (laptop.root / "data" / "processed").exists()
    assert tree(laptop.root / "data" / "predictions") == tree(run.repo.root / "data" / "predictions")
    # The metrics and the figures come with git (cache: false).
    assert json.loads(laptop.dvc("metrics", "show", "--json").stdout) == run.metrics
    assert list((laptop.root / "dvclive" / "evaluate" / "plots" / "images").glob("*.png"))
    thin, affine = predict(laptop, run.scan, tmp_path / "predictions")
    np.testing.assert_array_equal(thin, run.prediction[0])
    np.testing.assert_array_equal(affine, run.prediction[1])


@slow
def test_a_second_machine_runs_an_experiment_without_the_raw_zips_and_shares_it_back(run, tmp_path):
    gpu2 = clone(run, tmp_path / "gpu2", "storage")
    gpu2.dvc("pull", *PULL_ALL)
    out = gpu2.dvc("exp", "run", "--allow-missing", "-n", "on-gpu2", "-S", "evaluate.bspline_baseline=false").stdout
    assert ran(out) == {"evaluate"}, out  # fetch_data and preprocess skipped: the tensors are there
    gpu2.dvc("exp", "push", "origin", "on-gpu2")
    a = run.repo
    a.dvc("exp", "pull", "origin", "on-gpu2")
    diff = json.loads(a.dvc("metrics", "diff", "main", "on-gpu2", "--all", "--json").stdout)
    model = diff["dvclive/evaluate/metrics.json"]["model.psnr_body"]
    assert model["old"] == run.evaluate_metrics["model"]["psnr_body"]
    assert model["new"] == json.loads((gpu2.root / "dvclive" / "evaluate" / "metrics.json").read_text())["model"][
        "psnr_body"]
    # Why data/raw need not be pushed: a bare repro rebuilds it from the seed, with the hash A recorded,
    # and nothing downstream reruns.
    out = gpu2.dvc("repro").stdout
    assert ran(out) == {"fetch_data"}, out
    assert json.loads(gpu2.dvc("status", "--json").stdout) == {}


@slow
def test_an_unreachable_remote_fails_clearly_and_leaves_the_workspace_as_it_was(run, tmp_path):
    port = free_port()  # nothing listens there: the server is down
    url = f"ssh://{run.sshd.user}@127.0.0.1:{port}/srv/ctdiff"
    refused = f"Connect call failed ('127.0.0.1', {port})"
    a = run.repo
    a.dvc("remote", "add", "--local", "down", url)
    try:
        before = snapshot(a)
        push = a.dvc("push", "-r", "down", check=False)
        assert push.returncode != 0 and refused in push.stderr, push.stderr
        assert snapshot(a) == before
    finally:
        a.dvc("remote", "remove", "--local", "down")

    c = clone(run, tmp_path / "c", "storage")
    c.dvc("remote", "add", "--local", "down", url)
    before = snapshot(c)
    pull = c.dvc("pull", "-r", "down", *PULL_ALL, check=False)
    assert pull.returncode != 0 and refused in pull.stderr, pull.stderr
    assert snapshot(c) == before


@slow
@pytest.mark.parametrize("layout, message", [
    # sshfs reports the refused mkdir of files/md5/<xx> as a missing file (treeverse/dvc#7861);
    # docs/remote.md says what it means.
    ("empty", "No such file or directory"),
    ("holding an earlier push", "Permission denied"),
])
def test_an_unwritable_remote_fails_clearly_and_leaves_both_sides_as_they_were(run, layout, message):
    a = run.repo
    name = f"readonly-{layout.split()[0]}"
    folder = run.sshd.storage(name)
    a.dvc("remote", "add", "--local", name, run.sshd.url(folder))
    a.dvc("remote", "modify", "--local", name, "keyfile", str(run.sshd.client_key))
    try:
        if layout != "empty":
            a.dvc("push", "-r", name, "preprocess")  # the team pushed the data once; the rest is new
        run.sshd.read_only(folder)
        before, stored = snapshot(a), tree(folder)
        push = a.dvc("push", "-r", name, check=False)
        assert push.returncode != 0 and message in push.stderr, push.stderr
        assert snapshot(a) == before
        assert tree(folder) == stored
    finally:
        a.dvc("remote", "remove", "--local", name)


@slow
def test_the_ssh_remote_accepts_any_host_key_so_pulls_rely_on_verify(run, tmp_path):
    """dvc-ssh connects through sshfs with asyncssh's host-key check off (known_hosts=None): a known_hosts
    that names another key for this server changes nothing. docs/remote.md says what that means; if this
    starts failing, DVC checks host keys and the page should say so."""
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    kind, key = impostor.with_suffix(".pub").read_text().split()[:2]
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{run.sshd.port} {kind} {key}\n")
    env = {**run.repo.env, "HOME": str(tmp_path / "home")}
    status = subprocess.run(["dvc", "status", "--cloud", "--json"], cwd=run.repo.root, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stderr


def damage(remote: Path, cache: Path, lock_text: str, stage: str, out: str, relpath: str) -> str:
    """Flip one byte of ``out/relpath``'s object in a folder remote (same size, new content); its md5."""
    dir_md5 = lock_md5(lock_text, stage, out)
    listing = json.loads((cache / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(entry["md5"] for entry in listing if entry["relpath"] == relpath)
    obj = remote / "files" / "md5" / md5[:2] / md5[2:]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(data)
    return md5


@slow
def test_a_corrupted_object_is_refused_on_pull_and_never_reaches_the_workspace(run, tmp_path):
    damaged = tmp_path / "damaged-folder"
    shutil.copytree(run.folder, damaged)
    lock = (run.repo.root / "dvc.lock").read_text()
    md5 = damage(damaged, run.repo.root / ".dvc" / "cache", lock, "train", "models/checkpoints", "best.pt")

    # The team's remote has verify = true (tracked): the damaged object is hashed on arrival and dropped.
    d = clone(run, tmp_path / "d", "shared")
    d.dvc("remote", "modify", "--local", "shared", "url", str(damaged))
    before = snapshot(d)
    pull = d.dvc("pull", *PULL_ALL, check=False)
    assert pull.returncode != 0, pull.stdout
    assert "Checkout failed for following targets:\nmodels/checkpoints\n" in pull.stderr, pull.stderr
    assert not (d.root / "models" / "checkpoints").exists()
    assert not (d.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    # What did change: the intact outputs, pulled and verified, each as A has it.
    pulled = pulled_outputs(d)
    assert pulled and all(run.outputs[path] == digest for path, digest in pulled.items())
    assert set(run.outputs) - set(pulled) == {p for p in run.outputs if p.startswith("models/checkpoints/")}
    after = snapshot(d)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k for k in changed if k not in pulled and not k.startswith(".dvc/cache/")} == set()

    # Why verify is on: with DVC's default (verify = false) the damaged bytes arrive silently.
    e = clone(run, tmp_path / "e", "shared")
    e.dvc("remote", "modify", "--local", "shared", "url", str(damaged))
    e.dvc("remote", "modify", "--local", "shared", "verify", "false")
    e.dvc("pull", *PULL_ALL)
    assert tree(e.root / "models" / "checkpoints")["best.pt"] != run.outputs["models/checkpoints/best.pt"]
    assert set(json.loads(e.dvc("status", "--json").stdout)) == {"fetch_data", "preprocess"}  # nothing says so


CREDENTIAL_KEYS = {"password", "passphrase", "keyfile", "access_key_id", "secret_access_key", "session_token",
                   "credentialpath", "account_key", "sas_token", "connection_string", "client_secret",
                   "gdrive_client_secret", "token", "key_file"}


def test_this_repositorys_dvc_config_holds_no_credentials():
    config = (Path(__file__).resolve().parents[1] / ".dvc" / "config").read_text()
    keys = {line.split("=")[0].strip() for line in config.splitlines() if "=" in line}
    assert not keys & CREDENTIAL_KEYS, keys & CREDENTIAL_KEYS
    assert "/config.local" in (Path(__file__).resolve().parents[1] / ".dvc" / ".gitignore").read_text()


@slow
def test_credentials_stay_in_config_local_and_never_reach_git(run, tmp_path):
    c = DvcRepo.clone(run.origin, tmp_path / "c", env=run.env)
    password = "hunter2-ctdiff-" + hashlib.md5(str(tmp_path).encode()).hexdigest()
    keyfile = str(tmp_path / "keys" / "id_ed25519_ctdiff")
    c.dvc("remote", "add", "vault", "ssh://ci@127.0.0.1/srv/ctdiff")
    c.dvc("remote", "modify", "--local", "vault", "password", password)
    c.dvc("remote", "modify", "--local", "vault", "keyfile", keyfile)
    c.commit("the vault remote")  # git add -A, as a hurried user would
    c.run("git", "push", "-q", "origin", "HEAD:vault")
    assert ".dvc/config.local" not in c.run("git", "ls-files").stdout.split()
    assert password in (c.root / ".dvc" / "config.local").read_text()
    assert "vault" in (c.root / ".dvc" / "config").read_text()
    # Nothing in the clone's commit, nor anywhere on the git server: every branch and every experiment,
    # A's included (A ran `dvc exp run` and `dvc exp push` with its key path in .dvc/config.local).
    refs = c.run("git", "-C", str(run.origin), "for-each-ref", "--format=%(refname)").stdout.split()
    assert "refs/heads/vault" in refs and any(ref.startswith("refs/exps/") for ref in refs), refs
    for secret in (password, keyfile, str(run.sshd.client_key)):
        found = c.run("git", "-C", str(run.origin), "grep", "-F", "-l", secret, *refs, check=False)
        assert found.returncode == 1 and not found.stdout, found.stdout
