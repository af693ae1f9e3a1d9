"""The users' workflow, end to end, offline: all eight stages under real DVC, the SD arm and the MAISI arm
as experiments, branches, ``dvc metrics diff`` and the experiment queue (slow).

Sizes are tiny (10 phantom patients of 30 x 32 x 32, VAEs and UNet a few channels wide, two epochs), so
the numbers mean nothing; the plumbing is what is under test.
"""

import json
import sys
from pathlib import Path

import pytest
from dvc_repo import DvcRepo
from paramkit import TINY_PIPELINE as TINY

from ctdiff.evaluation.report import GAIN_KEY
from ctdiff.evaluation.rungs import RUNG_NAMES

pytestmark = pytest.mark.slow

STAGES = ("fetch_data", "preprocess", "slab", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference",
          "calibrate", "evaluate")
CONTRACT = {"psnr", "ssim", "mae_hu", "psnr_body", "ssim_body", "mae_hu_body"}
FINDINGS = ("embolus_conspicuity", "false_defect_fraction", "mae_hu_artery")


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def workspace_files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file outside .git and .dvc (outputs, dvc.lock, params, code): path -> (inode, size, mtime_ns), what
    changes when a file is written or replaced."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in (".git", ".dvc")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = DvcRepo(tmp_path_factory.mktemp("experiments"), TINY)
    repo.commit("tiny offline params")
    return repo


@pytest.fixture(scope="module")
def sd_arm(repo):
    out = repo.dvc("repro").stdout
    repo.commit("SD arm results")
    return out


def test_repro_runs_all_eight_stages_and_writes_the_contract_metrics(repo, sd_arm):
    assert ran(sd_arm) == set(STAGES)
    for stage in ("vae_check", "evaluate"):
        metrics = json.loads((repo.root / "dvclive" / stage / "metrics.json").read_text())
        arms = RUNG_NAMES if stage == "evaluate" else (None,)
        for arm in arms:
            assert CONTRACT <= set(metrics[arm] if arm else metrics)
    evaluate = json.loads((repo.root / "dvclive" / "evaluate" / "metrics.json").read_text())
    assert evaluate["vae"]["weights"]["origin"] == "scratch"
    assert {"mean", "ci95_low", "ci95_high", "cases"} <= set(evaluate[GAIN_KEY]["psnr_body"])
    for rung in RUNG_NAMES:  # the phantoms carry labels: the structure metrics are there for every rung
        assert set(FINDINGS) <= set(evaluate[rung]), rung
    assert list((repo.root / "data" / "predictions").glob("*.nii.gz"))


def test_noop_repro_does_no_work(repo, sd_arm):
    before = workspace_files(repo.root)
    out = repo.dvc("repro").stdout
    assert ran(out) == set(), out
    assert "Data and pipelines are up to date." in out, out
    assert workspace_files(repo.root) == before  # no output, lock or cache link written, replaced or checked out


def test_maisi_experiment_reruns_only_what_the_vae_changes(repo, sd_arm):
    out = repo.dvc("exp", "run", "-n", "maisi-arm", "-S", "vae.use_maisi=true").stdout
    # The reference does not depend on the VAE: both arms are judged against the same network. The calibration
    # scales hold for one model: a new VAE means new scales.
    assert ran(out) == {"fetch_weights", "vae_fit", "vae_check", "train", "calibrate", "evaluate"}, out
    assert "maisi-arm" in repo.dvc("exp", "show", "--csv").stdout
    repo.dvc("exp", "branch", "maisi-arm", "maisi")
    diff = json.loads(repo.dvc("metrics", "diff", "main", "maisi", "--all", "--json").stdout)
    vae_check = diff["dvclive/vae_check/metrics.json"]
    evaluate = diff["dvclive/evaluate/metrics.json"]
    assert {"psnr", "psnr_body", "mae_hu"} <= set(vae_check)
    assert {f"{rung}.psnr_body" for rung in RUNG_NAMES} <= set(evaluate)
    assert {f"{GAIN_KEY}.psnr_body.mean", f"{GAIN_KEY}.mae_hu_body.ci95_low"} <= set(evaluate)
    # The structure metrics and the reference, side by side for the two arms.
    assert {f"{rung}.{name}" for rung in RUNG_NAMES for name in FINDINGS} <= set(evaluate)
    assert {"model_minus_reference.psnr_body.mean", "model_minus_reference.embolus_conspicuity.mean",
            f"{GAIN_KEY}.false_defect_fraction.ci95_high"} <= set(evaluate)
    assert repo.dvc("plots", "diff", "main", "maisi", "-o", str(repo.root / "plots_out")).returncode == 0


def test_queued_experiments_run_from_git_tracked_files(repo, sd_arm):
    repo.dvc("exp", "run", "--queue", "-n", "one-case", "-S", "evaluate.max_cases=1")
    # `dvc queue start -j 1` returns at once; --run-all starts the same queue worker and returns when the queue
    # has run, so the test waits on the queue itself rather than on a clock.
    worked = repo.dvc("exp", "run", "--run-all", "-j", "1", check=False)
    status = repo.dvc("queue", "status").stdout
    line = next((row for row in status.splitlines() if "one-case" in row), "")
    assert line.split()[-1:] == ["Success"], status + worked.stdout + worked.stderr
    shown = repo.dvc("exp", "show", "--csv").stdout
    assert "one-case" in shown


def test_a_training_seed_reruns_what_learns_and_returning_to_seed_0_restores_the_vae(repo, sd_arm):
    """train_seed is separate from the data seed: a sweep over it keeps the phantoms and the split. Stages whose
    outputs are all cached (their dvclive metrics and plots declared as such) are saved to DVC's run-cache: a
    sweep that comes back to a VAE it trained checks it out instead of training it again. train and sr_reference
    keep their checkpoints across runs to resume (persist), which DVC never run-caches."""
    # A workspace `dvc exp run` (the MAISI arm's, when the module runs in order) leaves its params and
    # outputs in the workspace: start from main's commit, as a user sweeping from main would.
    repo.run("git", "checkout", "--", ".")
    repo.dvc("checkout", "--force")
    splits_before = (repo.root / "data" / "processed" / "splits.json").read_text()
    out = repo.dvc("exp", "run", "-n", "seed-1", "-S", "train_seed=1").stdout
    assert ran(out) == {"vae_fit", "vae_check", "train", "sr_reference", "calibrate", "evaluate"}, out
    assert (repo.root / "data" / "processed" / "splits.json").read_text() == splits_before
    # The verdict reads the sweep back: the committed SD run (seed 0), this one (seed 1), the MAISI arm (seed 0).
    result = repo.run(sys.executable, "-m", "ctdiff.cli", "verdict")
    assert "SD seeds [0, 1], MAISI seeds [0]" in result.stdout, result.stdout
    assert "| sd | model - baseline_consistent | psnr_body |" in result.stdout

    # Back to seed 0 from the seed-1 workspace: the committed run's VAE comes from the run-cache.
    out = repo.dvc("exp", "run", "-n", "seed-0-again", "-S", "train_seed=0").stdout
    assert "Stage 'vae_fit' is cached - skipping run" in out, out
    assert {"slab", "vae_fit", "vae_check"}.isdisjoint(ran(out)), out
    assert "train" in ran(out), out
