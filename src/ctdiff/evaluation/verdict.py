"""The verdict over training seeds: what survives a second (and third) seed.

One training run per arm says nothing about how far another seed moves its numbers, and a bootstrap over
the test cases cannot say it either. Run the sweep (both arms, ``train_seed`` 0, 1, 2; the data and its
split stay fixed), then read it here:

    dvc exp run --queue -S 'train_seed=0,1,2' -S 'vae.use_maisi=false,true' && dvc queue start -j 1
    ctdiff verdict

For each arm and comparison (``model - baseline_consistent``, ``model - reference``) and for SD - MAISI,
per metric (:data:`METRICS`): the mean over seeds of the paired per-case difference, the spread between
seeds (the range of the per-seed means, and the values), and a seeded percentile bootstrap 95 % interval
over the test cases of the per-case differences averaged over seeds. A difference is called one only when
it is larger than the seed spread and its interval excludes zero; otherwise the verdict is "no
difference". SD - MAISI pairs the arms' runs with the same ``train_seed`` (same cases, same sampling seed).
The runs come from ``dvc exp show --json`` and each one's committed ``dvclive/evaluate/per_case.csv``
(``git show``), so nothing is re-run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctdiff.metrics.cases import paired_bootstrap

PER_CASE = "dvclive/evaluate/per_case.csv"
METRICS = ("psnr_body", "mae_hu_body", "embolus_conspicuity", "false_defect_fraction")
COMPARISONS = (("model", "baseline_consistent"), ("model", "reference"))
BETTER = {"psnr_body": "higher", "mae_hu_body": "lower", "embolus_conspicuity": "higher",
          "false_defect_fraction": "lower", "psnr": "higher", "ssim_body": "higher"}
IGNORED_PARAMS = ("train_seed", "vae.use_maisi")  # what a sweep varies; every other param must agree


@dataclass
class SeedRun:
    """One finished experiment: its arm, training seed and per-case rows (case id -> column -> value)."""

    name: str
    rev: str
    arm: str
    train_seed: int
    config: str  # the params that are neither the arm nor the seed, as one string: runs of one sweep share it
    rows: dict[str, dict[str, float]]

    def values(self, rung: str, metric: str) -> dict[str, float]:
        """case id -> the rung's metric, for the cases that have it."""
        column = f"{rung}_{metric}"
        return {c: v[column] for c, v in self.rows.items() if not math.isnan(v.get(column, math.nan))}


def read_per_case(text: str) -> dict[str, dict[str, float]]:
    """per_case.csv -> case id -> column -> float (empty cells: NaN)."""
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows[row["case_id"]] = {k: float(v) if v not in ("", None) else math.nan for k, v in row.items()
                                if k not in ("case_id", "category")}
    return rows


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_runs(repo: Path = Path("."), names: Sequence[str] | None = None) -> list[SeedRun]:
    """Every committed experiment of the repository (and the checked-out commit) with an evaluate result."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, check=True, capture_output=True,
                                      text=True).stdout)
    entries = []
    for entry in shown:
        if entry.get("rev") != "workspace":
            entries.append((entry.get("name") or entry["rev"][:7], entry["rev"], entry["data"]))
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                entries.append((rev.get("name") or exp.get("name") or rev["rev"][:7], rev["rev"], rev["data"]))
    runs = []
    for name, rev, data in entries:
        if names and name not in names:
            continue
        params = _flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
        shown_file = subprocess.run(["git", "show", f"{rev}:{PER_CASE}"], cwd=repo, capture_output=True, text=True)
        if shown_file.returncode != 0 or not params:
            continue
        config = json.dumps({k: v for k, v in sorted(params.items()) if k not in IGNORED_PARAMS}, sort_keys=True)
        runs.append(SeedRun(name, rev, "maisi" if params.get("vae.use_maisi") else "sd",
                            int(params.get("train_seed", 0)), config, read_per_case(shown_file.stdout)))
    return runs


def one_sweep(runs: list[SeedRun]) -> list[SeedRun]:
    """The runs of one sweep: those sharing a config (every param but the arm and the seed), one per (arm, seed)
    (the first listed, which ``dvc exp show`` gives newest first). Of several configs, the one with the most
    (arm, seed) runs wins, the newest on a tie: experiments on other params (a lever tried on val after the
    sweep) neither join it nor replace it."""
    groups: dict[str, dict[tuple[str, int], SeedRun]] = {}
    for run in runs:
        groups.setdefault(run.config, {}).setdefault((run.arm, run.train_seed), run)
    if not groups:
        return []
    kept = max(groups.values(), key=len)  # max keeps the first of equals: the newest config
    return sorted(kept.values(), key=lambda r: (r.arm, r.train_seed))


@dataclass
class Finding:
    """One row of the verdict."""

    arm: str
    comparison: str
    metric: str
    mean: float  # over seeds, of the per-case paired difference
    seed_values: list[float]  # the per-seed means
    ci95: tuple[float, float]  # bootstrap over cases of the seed-averaged per-case differences
    cases: int

    @property
    def seed_spread(self) -> float:
        return max(self.seed_values) - min(self.seed_values) if len(self.seed_values) > 1 else math.nan

    @property
    def verdict(self) -> str:
        """"no difference" unless the difference beats the seed spread and its interval excludes zero."""
        if len(self.seed_values) < 2 or math.isnan(self.mean):
            return "one seed: spread unknown"
        if self.cases < 2:
            return "one case: no interval"
        if abs(self.mean) <= self.seed_spread or self.ci95[0] <= 0 <= self.ci95[1]:
            return "no difference"
        side = self.comparison.split(" - ")[0]
        return f"{side} {'higher' if self.mean > 0 else 'lower'} ({BETTER.get(self.metric, '?')} is better)"


def compare(first: Sequence[SeedRun], second: Sequence[SeedRun], rungs: tuple[str, str], metric: str,
            arm: str, label: str, seed: int = 0) -> Finding | None:
    """``first``'s rung minus ``second``'s (the same runs for a comparison within an arm), paired by seed."""
    seeds = sorted({r.train_seed for r in first} & {r.train_seed for r in second})
    by_seed_a = {r.train_seed: r for r in first}
    by_seed_b = {r.train_seed: r for r in second}
    per_seed: list[dict[str, float]] = []
    for s in seeds:
        a, b = by_seed_a[s].values(rungs[0], metric), by_seed_b[s].values(rungs[1], metric)
        per_seed.append({c: a[c] - b[c] for c in a.keys() & b.keys()})
    cases = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    if not cases:
        return None
    averaged = [float(np.mean([d[c] for d in per_seed])) for c in cases]
    interval = paired_bootstrap(averaged, seed)
    return Finding(arm, label, metric, float(np.mean(averaged)), [float(np.mean([d[c] for c in cases]))
                                                                  for d in per_seed],
                   (interval["ci95_low"], interval["ci95_high"]), len(cases))


def verdict(runs: Sequence[SeedRun], metrics: Sequence[str] = METRICS) -> list[Finding]:
    """Every arm's comparisons and SD - MAISI for ``metrics``, over the runs' seeds."""
    findings = []
    arms = {arm: [r for r in runs if r.arm == arm] for arm in ("sd", "maisi")}
    for arm, arm_runs in arms.items():
        for rung, against in COMPARISONS:
            for metric in metrics:
                found = compare(arm_runs, arm_runs, (rung, against), metric, arm, f"{rung} - {against}")
                if found is not None:
                    findings.append(found)
    if arms["sd"] and arms["maisi"]:
        for metric in metrics:
            found = compare(arms["sd"], arms["maisi"], ("model", "model"), metric, "both", "SD - MAISI (model)")
            if found is not None:
                findings.append(found)
    return findings


def markdown(findings: Sequence[Finding], runs: Sequence[SeedRun]) -> str:
    seeds = {arm: sorted(r.train_seed for r in runs if r.arm == arm) for arm in ("sd", "maisi")}
    lines = [f"Runs: SD seeds {seeds['sd']}, MAISI seeds {seeds['maisi']} ({', '.join(r.name for r in runs)}).",
             "",
             "| arm | comparison | metric | mean over seeds | seed spread (range) | per seed | bootstrap 95 % | cases "
             "| verdict |",
             "|---|---|---|---:|---:|---|---|---:|---|"]
    for f in findings:
        per_seed = ", ".join(f"{v:+.3f}" for v in f.seed_values)
        lines.append(f"| {f.arm} | {f.comparison} | {f.metric} | {f.mean:+.3f} | {f.seed_spread:.3f} | {per_seed} | "
                     f"[{f.ci95[0]:+.3f}, {f.ci95[1]:+.3f}] | {f.cases} | {f.verdict} |")
    return "\n".join(lines)


def main(repo: Path = Path("."), names: Sequence[str] | None = None, as_json: bool = False) -> str:
    runs = one_sweep(load_runs(repo, names))
    if not runs:
        raise RuntimeError("no experiment with dvclive/evaluate/per_case.csv found: run the sweep first "
                           "(dvc exp run --queue -S 'train_seed=0,1,2' -S 'vae.use_maisi=false,true')")
    findings = verdict(runs)
    if as_json:
        return json.dumps([{**f.__dict__, "seed_spread": f.seed_spread, "verdict": f.verdict} for f in findings],
                          indent=2)
    return markdown(findings, runs)
