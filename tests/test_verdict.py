"""The verdict over families and training seeds: a difference counts only beyond the seed spread and with an
interval that excludes zero; pooled over families it is called only where every family calls it.

The sweep is real: the documented ``dvc exp run --queue`` command in a temporary DVC repository whose one
stage writes, for the run's family, arm and seed, per-case values this test chose; the verdict reads the
finished experiments back through ``dvc.api``, and the test recomputes every expected number itself from
those values.
"""

import json
import shlex
import sys
from statistics import mean

import numpy as np
import pytest
import yaml
from dvc_repo import DvcRepo

from ctdiff.evaluation.verdict import (
    PER_CASE,
    SD_MAISI,
    SWEEP,
    SeedRun,
    family_of,
    levels,
    load_runs,
    main,
    one_sweep,
    pooled,
    read_per_case,
    verdict,
)

FAMILIES, ARMS, SEEDS = ("hilum", "periphery"), ("sd", "maisi"), (0, 1, 2)
CASES = 6
OFFSETS = (0.1, -0.1, 0.05, -0.05, 0.02, -0.02)  # per-case scatter of model - baseline, mean 0
STABLE, SWINGING = (0.0, 0.05, -0.05), (0.2, -0.2, 0.0)  # per-seed moves: spread 0.1 and 0.4
# model - baseline_consistent per family and arm: a 1 dB gain that is stable over seeds and a 0.1 dB one that
# swings by 0.4 dB; the arms swap between the families, so the families disagree on every arm and on SD - MAISI.
GAIN = {("hilum", "sd"): (1.0, STABLE), ("hilum", "maisi"): (0.1, SWINGING),
        ("periphery", "sd"): (0.1, SWINGING), ("periphery", "maisi"): (1.0, STABLE)}
REFERENCE_ABOVE_BASELINE = 3.0  # every model loses to the reference on both families
UNHEALTHY = "periphery/maisi/1"  # this run's VAE failed vae_check's gate and was accepted on purpose
GATE_LINE = ("the VAE reconstructs case_003 at 20.33 dB psnr_body, no better than ...; "
             "set vae_check.accept_unhealthy=true")


def per_case_values() -> dict[str, dict[str, list[float]]]:
    """``"family/arm/seed"`` -> rung -> psnr_body per case (case_000, ...)."""
    values = {}
    for (family, arm), (gain, moves) in GAIN.items():
        for seed, move in zip(SEEDS, moves):
            baseline = [23.0 + 0.3 * i for i in range(CASES)]
            values[f"{family}/{arm}/{seed}"] = {
                "baseline_consistent": baseline,
                "model": [b + gain + move + o for b, o in zip(baseline, OFFSETS)],
                "reference": [b + REFERENCE_ABOVE_BASELINE for b in baseline],
            }
    return values


VALUES = per_case_values()

# The stage: what evaluate writes, for the run's params, from the values above (a git-tracked dependency).
STAGE = """\
import csv, json, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))
key = f"{params['data']['phantom']['family']}/{'maisi' if params['vae']['use_maisi'] else 'sd'}/{params['train_seed']}"
rungs = json.load(open("values.json"))[key]
out = pathlib.Path("dvclive/evaluate")
out.mkdir(parents=True, exist_ok=True)
with open(out / "per_case.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["case_id", "category", *(f"{rung}_psnr_body" for rung in rungs)])
    for i in range(len(rungs["model"])):
        writer.writerow([f"case_{i:03d}", "APE" if i % 2 else "non-APE", *(repr(v[i]) for v in rungs.values())])
check = pathlib.Path("dvclive/vae_check")
check.mkdir(parents=True, exist_ok=True)
healthy = key != UNHEALTHY
(check / "metrics.json").write_text(json.dumps({"psnr_body": 21.0, "health": {"healthy": healthy,
                                                "verdict": "" if healthy else GATE_LINE}}))
"""
STAGE = f"UNHEALTHY, GATE_LINE = {UNHEALTHY!r}, {GATE_LINE!r}\n" + STAGE
PIPELINE = {"stages": {"evaluate": {
    "cmd": "python evaluate.py", "deps": ["evaluate.py", "values.json"],
    "params": ["seed", "train_seed", "data", "vae", "evaluate"],
    "outs": [{"dvclive/evaluate": {"cache": False}}, {"dvclive/vae_check": {"cache": False}}]}}}


def diff_means(family, arm_a, rung_a, arm_b, rung_b) -> list[float]:
    """Per seed: the mean over cases of ``arm_a``'s rung minus ``arm_b``'s, from the values written."""
    return [mean(a - b for a, b in zip(VALUES[f"{family}/{arm_a}/{seed}"][rung_a],
                                       VALUES[f"{family}/{arm_b}/{seed}"][rung_b])) for seed in SEEDS]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The documented sweep, queued and run to its end, plus a lever tried on the workspace afterwards."""
    repo = DvcRepo(tmp_path_factory.mktemp("verdict"))
    params = yaml.safe_load((repo.root / "params.yaml").read_text())
    params["data"]["phantom"].setdefault("family", "hilum")
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo.root / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    (repo.root / "evaluate.py").write_text(STAGE)
    (repo.root / "values.json").write_text(json.dumps(VALUES))
    repo.commit("a one-stage pipeline writing chosen per-case values")
    queue, start = SWEEP.split(" && ")
    assert start == "dvc queue start -j 1"
    repo.run(*shlex.split(queue))
    # `dvc queue start -j 1` returns at once; --run-all starts the same worker and returns when the queue is done.
    repo.dvc("exp", "run", "--run-all", "-j", "1")
    repo.dvc("exp", "run", "-n", "lever", "-S", "evaluate.max_cases=2")
    return repo


@pytest.mark.slow
def test_the_sweep_is_read_back_per_family_arm_and_seed_without_the_lever(sweep):
    runs = one_sweep(load_runs(sweep.root))
    assert [(r.family, r.arm, r.train_seed) for r in runs] == [(f, a, s) for f in FAMILIES for a in ("maisi", "sd")
                                                                for s in SEEDS]
    assert "lever" in {r.name for r in load_runs(sweep.root)} and "lever" not in {r.name for r in runs}
    for run in runs:  # each run's own per_case.csv, at its own revision
        written = VALUES[f"{run.family}/{run.arm}/{run.train_seed}"]["model"]
        assert [run.rows[f"case_{i:03d}"]["model_psnr_body"] for i in range(CASES)] == written


@pytest.mark.slow
def test_per_family_a_gain_beyond_the_seed_spread_is_called_and_a_smaller_one_is_not(sweep):
    findings = verdict(one_sweep(load_runs(sweep.root)))
    rows = {(f.family, f.arm, f.comparison): f for f in findings}
    assert {f.metric for f in findings} == {"psnr_body"}  # the only metric the stage writes

    stable = rows["hilum", "sd", "model - baseline_consistent"]
    per_seed = diff_means("hilum", "sd", "model", "sd", "baseline_consistent")
    assert stable.seed_values == pytest.approx(per_seed, abs=1e-9)
    assert stable.mean == pytest.approx(1.0, abs=1e-9) and stable.seed_spread == pytest.approx(0.1, abs=1e-9)
    assert stable.verdict == "model higher (higher is better)" and stable.ci95[0] > 0 and stable.cases == CASES

    # 0.1 dB: every case gains and the interval excludes zero, but another seed moves it by 0.4 dB
    swinging = rows["hilum", "maisi", "model - baseline_consistent"]
    assert swinging.mean == pytest.approx(0.1, abs=1e-9) and swinging.seed_spread == pytest.approx(0.4, abs=1e-9)
    assert swinging.ci95[0] > 0 and swinging.verdict == "no difference"

    assert rows["hilum", "both", SD_MAISI].seed_values == pytest.approx(
        diff_means("hilum", "sd", "model", "maisi", "model"), abs=1e-9)
    assert rows["hilum", "both", SD_MAISI].verdict == "SD higher (higher is better)"
    assert rows["periphery", "both", SD_MAISI].verdict == "SD lower (higher is better)"
    assert rows["periphery", "sd", "model - baseline_consistent"].verdict == "no difference"
    assert rows["periphery", "maisi", "model - baseline_consistent"].verdict == "model higher (higher is better)"


@pytest.mark.slow
def test_pooled_is_the_mean_of_family_means_with_the_wider_spread_and_says_where_families_disagree(sweep):
    table = {(p.arm, p.comparison): p for p in pooled(verdict(one_sweep(load_runs(sweep.root))))}
    comparisons = [("sd", "model - baseline_consistent", ("sd", "model", "sd", "baseline_consistent")),
                   ("maisi", "model - reference", ("maisi", "model", "maisi", "reference")),
                   ("both", SD_MAISI, ("sd", "model", "maisi", "model"))]
    for arm, comparison, sides in comparisons:
        per_seed = {family: diff_means(family, *sides) for family in FAMILIES}
        family_means = [mean(v) for v in per_seed.values()]
        spreads = [max(v) - min(v) for v in per_seed.values()] + [max(family_means) - min(family_means)]
        row = table[arm, comparison]
        assert row.mean == pytest.approx(mean(family_means), abs=1e-9), comparison
        assert row.spread == pytest.approx(max(spreads), abs=1e-9), comparison
    # the numbers these stand for: SD - MAISI is +0.9 on one family and -0.9 on the other
    assert table["both", SD_MAISI].mean == pytest.approx(0.0, abs=1e-9)
    assert table["both", SD_MAISI].spread == pytest.approx(1.8, abs=1e-9)

    assert table["sd", "model - baseline_consistent"].verdict == (
        "families disagree: hilum: model higher (higher is better); periphery: no difference")
    assert table["both", SD_MAISI].verdict == (
        "families disagree: hilum: SD higher (higher is better); periphery: SD lower (higher is better)")
    # the reference wins by 2.0 dB on one family and 2.9 dB on the other: the range of the family means (0.9)
    # is the spread, and the call holds because each family makes it
    reference = table["maisi", "model - reference"]
    assert reference.spread == pytest.approx(0.9, abs=1e-9)
    assert reference.verdict == "every family: model lower (higher is better)"


@pytest.mark.slow
def test_the_command_prints_the_answers_and_tables_and_json_carries_the_same_numbers(sweep):
    out = sweep.run(sys.executable, "-m", "ctdiff.cli", "verdict").stdout
    assert "- hilum: psnr_body: SD higher (higher is better)" in out
    assert "- periphery: psnr_body: SD lower (higher is better) (caveat: the VAE of MAISI seeds [1] failed" in out
    assert ("- pooled: psnr_body: families disagree: hilum: SD higher (higher is better); periphery: SD lower "
            "(higher is better)") in out
    assert "- families disagree on: sd model - baseline_consistent psnr_body, " in out
    assert "Family hilum: SD seeds [0, 1, 2], MAISI seeds [0, 1, 2]" in out
    assert "| sd | model - baseline_consistent | psnr_body | +1.000 | 0.100 |" in out
    assert "| both | SD - MAISI (model) | psnr_body | +0.000 | 1.800 | hilum +0.900, periphery -0.900 |" in out
    # the rungs' own numbers: hilum SD's model is the baseline + 1 dB + the seed's move, per case
    model_means = [mean(VALUES[f"hilum/sd/{seed}"]["model"]) for seed in SEEDS]
    assert (f"| sd | model | psnr_body | {mean(model_means):.3f} | {min(model_means):.3f} .. {max(model_means):.3f} "
            f"| {', '.join(f'{v:.3f}' for v in model_means)} |") in out

    shown = json.loads(main(sweep.root, json_out=True))  # plain numbers: the findings serialize as they are
    level = next(n for n in shown["levels"]
                 if (n["family"], n["arm"], n["rung"]) == ("periphery", "maisi", "reference"))
    assert level["seeds"] == [0, 1, 2] and level["mean"] == pytest.approx(
        mean(mean(VALUES[f"periphery/maisi/{seed}"]["reference"]) for seed in SEEDS), abs=1e-9)
    assert len(shown["runs"]) == 12 and shown["answers"]["hilum"] == "psnr_body: SD higher (higher is better)"
    # a VAE accepted past its health gate is named with its seed, and every answer on that family says so
    flagged = {(r["family"], r["arm"], r["train_seed"]): r["vae_verdict"] for r in shown["runs"] if r["vae_verdict"]}
    assert flagged == {("periphery", "maisi", 1): GATE_LINE}
    assert shown["answers"]["periphery"].startswith("psnr_body: SD lower (higher is better) (caveat: the VAE of "
                                                    "MAISI seeds [1] failed vae_check's health gate")
    assert "Health: maisi seed 1: the VAE reconstructs case_003 at 20.33 dB psnr_body" in out
    assert out.count("Health: ") == 1 and "caveat" not in shown["answers"]["hilum"]
    assert "caveat: the VAE of periphery MAISI seeds [1] failed" in shown["answers"]["pooled"]
    row = next(p for p in shown["pooled"] if p["arm"] == "sd" and p["comparison"] == "model - baseline_consistent")
    assert row["families"] == pytest.approx({"hilum": 1.0, "periphery": 0.1}, abs=1e-9)
    assert row["mean"] == pytest.approx(0.55, abs=1e-9) and row["spread"] == pytest.approx(0.9, abs=1e-9)

    # A commit after the sweep leaves its experiments on the commit before: --num reaches them.
    sweep.run("git", "commit", "-q", "--allow-empty", "-m", "notes after the sweep")
    missing = sweep.run(sys.executable, "-m", "ctdiff.cli", "verdict", check=False)
    assert missing.returncode == 1 and "--num" in missing.stderr and PER_CASE in missing.stderr
    assert sweep.run(sys.executable, "-m", "ctdiff.cli", "verdict", "--num", "2").stdout == out


# ------------------------------------------------------------------------------- without a repository
def run(family, arm, seed, model, baseline, config="{}"):
    rows = {f"case_{i:03d}": {"model_psnr_body": model + 0.1 * i, "baseline_consistent_psnr_body": baseline + 0.1 * i}
            for i in range(8)}
    return SeedRun(f"{family}-{arm}-{seed}", "rev", family, arm, seed, config, rows)


def test_one_seed_says_the_spread_is_unknown_and_per_case_csv_reads_empty_cells_as_missing():
    (finding,) = verdict([run("hilum", "sd", 0, 24.0, 23.0)], metrics=("psnr_body",))
    assert finding.verdict == "one seed: spread unknown"
    (row,) = pooled([finding])
    assert row.verdict == "hilum only: one seed: spread unknown" and np.isnan(row.spread)
    rows = read_per_case("case_id,category,model_psnr_body,model_embolus_conspicuity\ncase_001,APE,23.5,\n")
    assert rows["case_001"]["model_psnr_body"] == 23.5 and np.isnan(rows["case_001"]["model_embolus_conspicuity"])


def test_the_rungs_numbers_are_case_means_per_seed_and_skip_what_a_run_lacks():
    runs = [run("hilum", "sd", seed, 24.0 + seed, 23.0) for seed in (2, 0)]
    for i, case in enumerate(runs[0].rows.values()):  # coverage in one run only, one case without it
        case["model_uncertainty_coverage_95"] = np.nan if i == 0 else 0.9 + 0.01 * i
    found = {(n.rung, n.metric): n for n in levels(runs)}
    assert set(found) == {("model", "psnr_body"), ("baseline_consistent", "psnr_body"),
                          ("model", "uncertainty_coverage_95")}
    model = found["model", "psnr_body"]
    assert model.seeds == [0, 2] and model.seed_values == pytest.approx([24.35, 26.35])
    assert model.mean == pytest.approx(25.35) and model.seed_range == pytest.approx((24.35, 26.35))
    coverage = found["model", "uncertainty_coverage_95"]
    assert coverage.seeds == [2] and coverage.mean == pytest.approx(mean(0.9 + 0.01 * i for i in range(1, 8)))


def test_a_family_without_a_row_is_named_not_measured():
    runs = [run(f, "sd", s, 24.0 + 0.01 * s, 23.0) for f in FAMILIES for s in SEEDS]
    runs += [run("hilum", "maisi", s, 24.0, 23.0) for s in SEEDS]
    table = {(p.arm, p.comparison): p for p in pooled(verdict(runs, metrics=("psnr_body",)))}
    assert table["sd", "model - baseline_consistent"].verdict == "every family: model higher (higher is better)"
    assert table["both", SD_MAISI].verdict == "families disagree: hilum: no difference; periphery: not measured"


def test_the_family_is_the_phantom_family_or_the_data_source():
    assert family_of({"data.source": "phantom"}) == "hilum"  # params from before data.phantom.family
    assert family_of({"data.source": "phantom", "data.phantom.family": "periphery"}) == "periphery"
    assert family_of({"data.source": "hf", "data.phantom.family": "periphery"}) == "hf"
    assert family_of({"data.source": "local", "data.local_dir": "/data/ape-data/"}) == "local:ape-data"


def test_the_sweep_is_the_config_with_most_runs_not_a_newer_lever_tried_beside_it():
    lever = '{"evaluate.split": "val"}'
    # newest first: two lever runs after the sweep, and a rerun of one sweep seed
    runs = [run("hilum", "sd", 0, 20.0, 23.0, config=lever), run("hilum", "maisi", 0, 20.0, 23.0, config=lever)]
    runs += [run("hilum", "sd", 0, 24.5, 23.0)]
    runs += [run(f, arm, s, 24.0, 23.0) for f in FAMILIES for arm in ARMS for s in SEEDS]
    kept = one_sweep(runs)
    assert [(r.family, r.arm, r.train_seed) for r in kept] == [(f, a, s) for f in FAMILIES for a in ("maisi", "sd")
                                                                for s in SEEDS]
    assert all(r.config == "{}" for r in kept)
    rerun = next(r for r in kept if (r.family, r.arm, r.train_seed) == ("hilum", "sd", 0))
    assert rerun.rows["case_000"]["model_psnr_body"] == 24.5
    assert one_sweep([]) == []
