"""The verdict over training seeds: a difference counts only beyond the seed spread and with an interval
that excludes zero."""

import numpy as np

from ctdiff.evaluation.verdict import SeedRun, one_sweep, read_per_case, verdict


def run(arm, seed, model, baseline, reference=None, cases=8, config="{}"):
    rows = {f"case_{i:03d}": {"model_psnr_body": model + 0.1 * i, "baseline_consistent_psnr_body": baseline + 0.1 * i,
                              "reference_psnr_body": (reference if reference is not None else baseline) + 0.1 * i}
            for i in range(cases)}
    return SeedRun(f"{arm}-{seed}", "rev", arm, seed, config, rows)


def find(findings, arm, comparison):
    return next(f for f in findings if f.arm == arm and f.comparison == comparison and f.metric == "psnr_body")


def test_a_gain_larger_than_the_seed_spread_is_called_and_a_smaller_one_is_not():
    # SD beats its baseline by 1.0 +- 0.05 dB over seeds; MAISI by 0.1 dB with a 0.4 dB swing between seeds
    runs = [run("sd", s, 24.0 + d, 23.0) for s, d in enumerate((0.0, 0.05, -0.05))]
    runs += [run("maisi", s, 23.1 + d, 23.0) for s, d in enumerate((0.2, -0.2, 0.0))]
    findings = verdict(runs, metrics=("psnr_body",))
    sd = find(findings, "sd", "model - baseline_consistent")
    assert sd.mean == np.float64(sd.mean) and abs(sd.mean - 1.0) < 1e-9 and abs(sd.seed_spread - 0.1) < 1e-9
    assert sd.verdict.startswith("model higher") and sd.ci95[0] > 0
    maisi = find(findings, "maisi", "model - baseline_consistent")
    assert abs(maisi.mean - 0.1) < 1e-9 and maisi.seed_spread > abs(maisi.mean) and maisi.verdict == "no difference"
    both = find(findings, "both", "SD - MAISI (model)")
    assert abs(both.mean - 0.9) < 1e-9 and len(both.seed_values) == 3


def test_one_seed_says_the_spread_is_unknown_and_per_case_csv_reads_empty_cells_as_missing():
    findings = verdict([run("sd", 0, 24.0, 23.0)], metrics=("psnr_body",))
    assert find(findings, "sd", "model - baseline_consistent").verdict == "one seed: spread unknown"
    rows = read_per_case("case_id,category,model_psnr_body,model_embolus_conspicuity\ncase_001,APE,23.5,\n")
    assert rows["case_001"]["model_psnr_body"] == 23.5 and np.isnan(rows["case_001"]["model_embolus_conspicuity"])


def test_the_sweep_is_the_config_with_most_runs_not_a_newer_lever_tried_beside_it():
    lever = '{"evaluate.split": "val"}'
    # dvc exp show lists newest first: two lever runs after the sweep, and a rerun of one sweep seed
    runs = [run("sd", 0, 20.0, 23.0, config=lever), run("maisi", 0, 20.0, 23.0, config=lever)]
    runs += [run("sd", 0, 24.5, 23.0)] + [run(arm, s, 24.0, 23.0) for arm in ("sd", "maisi") for s in range(3)]
    kept = one_sweep(runs)
    assert [(r.arm, r.train_seed) for r in kept] == [("maisi", 0), ("maisi", 1), ("maisi", 2),
                                                      ("sd", 0), ("sd", 1), ("sd", 2)]
    assert all(r.config == "{}" for r in kept)
    assert next(r for r in kept if r.arm == "sd" and r.train_seed == 0).rows["case_000"]["model_psnr_body"] == 24.5
    assert one_sweep([]) == []
