r"""The verdict over phantom families and training seeds: what survives another seed and another family.

One training run per arm says nothing about how far another seed moves its numbers, and one phantom family
says nothing about another anatomy; a bootstrap over the test cases can say neither. Run the sweep (two
families, both arms, ``train_seed`` 0, 1, 2; within a family the data and its split stay fixed), then read
it here:

    dvc exp run --queue -S 'data.phantom.family=hilum,periphery' -S 'train_seed=0,1,2' \
        -S 'vae.use_maisi=false,true' && dvc queue start -j 1
    ctdiff verdict

A run's family is ``data.phantom.family`` (``hilum`` where its params predate the key); a run on other data
is a family of its own, named by ``data.source`` (``hf``, or ``local:<folder name>`` of ``data.local_dir``).
The sweep varies :data:`VARIED`; every other param must agree between its runs (:func:`one_sweep`).

Per family, for each arm and comparison (``model - baseline_consistent``, ``model - reference``) and for
SD - MAISI, per metric (:data:`METRICS`): the mean over seeds of the paired per-case difference, the spread
between seeds (the range of the per-seed means, and the values), and a seeded percentile bootstrap 95 %
interval over the test cases of the per-case differences averaged over seeds. A difference is called one
only when it is larger than the seed spread and its interval excludes zero; otherwise the verdict is "no
difference". SD - MAISI pairs the arms' runs with the same ``train_seed`` (same cases, same sampling seed).

A run whose VAE failed vae_check's health gate and was accepted on purpose (``vae_check.accept_unhealthy``;
its ``dvclive/vae_check/metrics.json``) stays in the sweep but is named: its family's table says which seed,
and the family's and the pooled answer carry a caveat, since its model rung measures a VAE no better than
block averaging.

Beside the differences, each family's and arm's rungs by themselves (:func:`levels`, :data:`LEVELS`): the
mean over test cases per seed and over seeds, including the calibrated uncertainty's coverage on test.

Pooled over the families (:class:`Pooled`): the mean of the family means, a spread, and a verdict that says
where the families disagree. The spread is the largest of the families' seed spreads and the range of the
family means. It is the pooled number's seed spread: how far the answer moves when one changes something the
experimenter did not pick on purpose, the training seed (measured within each family) or the data (the
family). Like the seed spread it is a range, in the metric's units: with two or three families and seeds a
standard deviation is not worth estimating. The largest of the two, not their sum: each family mean already
carries its seed noise, so a sum would count it twice; the largest is the smallest bound that neither
source exceeds. The pooled row is called only when every family
calls it the same way (the claim "it holds on both families"), and then the mean and spread give its size
and how much of it depends on the family. It is not called by comparing the pooled mean with the pooled
spread: that would say "no difference" for a gain of 1 dB on one family and 3 dB on the other, which holds
on both. Where the signs differ the two rules agree, since the range of the family means then exceeds the
magnitude of their mean.

The experiments come from :func:`dvc.api.exp_show` (each commit's and experiment's name, revision and
state), their params from :func:`dvc.api.params_show` (typed and alone; exp_show's table mixes params with
metrics and dependency hashes, all as text), and each run's committed ``dvclive/evaluate/per_case.csv``
from :func:`dvc.api.read`, so nothing is re-run. See docs/verdict.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dvc.api
import numpy as np
from dvc.exceptions import PathMissingError

from ctdiff.metrics.cases import paired_bootstrap
from ctdiff.params import leaves

SWEEP = ("dvc exp run --queue -S 'data.phantom.family=hilum,periphery' -S 'train_seed=0,1,2' "
         "-S 'vae.use_maisi=false,true' && dvc queue start -j 1")
PER_CASE = "dvclive/evaluate/per_case.csv"
VAE_CHECK = "dvclive/vae_check/metrics.json"  # its health verdict: a run whose VAE failed and was accepted is named
METRICS = ("psnr_body", "mae_hu_body", "embolus_conspicuity", "false_defect_fraction")
COMPARISONS = (("model", "baseline_consistent"), ("model", "reference"))
SD_MAISI = "SD - MAISI (model)"
ARM_LABEL = {"sd": "SD", "maisi": "MAISI"}
BETTER = {"psnr_body": "higher", "mae_hu_body": "lower", "embolus_conspicuity": "higher",
          "false_defect_fraction": "lower", "psnr": "higher", "ssim_body": "higher"}
# The rungs' own numbers beside the differences (mean over test cases, then over seeds): the model among its
# baselines and its VAE's ceiling, and the calibrated uncertainty's coverage, width and rank correlation.
LEVELS = (("model", "psnr_body"), ("baseline_consistent", "psnr_body"), ("reference", "psnr_body"),
          ("vae_ceiling_consistent", "psnr_body"), ("model", "mae_hu_body"), ("baseline_consistent", "mae_hu_body"),
          ("model", "uncertainty_coverage_90"), ("model", "uncertainty_coverage_95"),
          ("model", "uncertainty_coverage_95_centre"), ("model", "uncertainty_coverage_95_midway"),
          ("model", "uncertainty_width_95_hu"), ("model", "uncertainty_spearman"))
VARIED = ("data.phantom.family", "train_seed", "vae.use_maisi")  # what a sweep varies; every other param agrees
DEFAULT_FAMILY = "hilum"  # the phantoms from before data.phantom.family existed


@dataclass
class SeedRun:
    """One finished experiment: its family, arm, training seed and per-case rows (case id -> column -> value)."""

    name: str
    rev: str
    family: str
    arm: str
    train_seed: int
    config: str  # every param but VARIED, as one string: the runs of one sweep share it
    rows: dict[str, dict[str, float]]
    vae_verdict: str = ""  # vae_check's health verdict when the VAE failed it and was accepted on purpose

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


def family_of(params: dict[str, object]) -> str:
    """The family of a run's data, from its flat params (``data.source``, ``data.phantom.family``, ...)."""
    source = params.get("data.source", "phantom")
    if source == "phantom":
        return str(params.get("data.phantom.family", DEFAULT_FAMILY))
    if source == "local":
        return f"local:{Path(str(params.get('data.local_dir', ''))).name}"
    return str(source)


def load_runs(repo: Path = Path("."), names: Sequence[str] | None = None, num: int = 1) -> list[SeedRun]:
    """Every finished experiment of the last ``num`` commits (and those commits) with an evaluate result,
    newest first."""
    shown = dvc.api.exp_show(repo=str(repo), num=num)
    # Experiments newest first, each commit after them (exp_show lists a commit before its experiments).
    shown = sorted((row for row in shown if row["rev"] != "workspace" and row["State"] in (None, "Success")),
                   key=lambda row: row["typ"] == "baseline")
    runs = []
    for row in shown:
        name = row["Experiment"] or row["rev"]
        if names and name not in names:
            continue
        try:
            per_case = dvc.api.read(PER_CASE, repo=str(repo), rev=row["rev"])
        except PathMissingError:
            continue
        params = leaves(dvc.api.params_show(repo=str(repo), rev=row["rev"]))
        config = json.dumps({k: v for k, v in params.items() if k not in VARIED}, sort_keys=True)
        runs.append(SeedRun(name, row["rev"], family_of(params), "maisi" if params.get("vae.use_maisi") else "sd",
                            int(params.get("train_seed", 0)), config, read_per_case(per_case),
                            _vae_verdict(repo, row["rev"])))
    return runs


def _vae_verdict(repo: Path, rev: str) -> str:
    """vae_check's one-line health verdict at ``rev`` ('' when the VAE passed, or the run predates the gate)."""
    try:
        health = json.loads(dvc.api.read(VAE_CHECK, repo=str(repo), rev=rev)).get("health", {})
    except (PathMissingError, FileNotFoundError, ValueError):
        return ""
    return "" if health.get("healthy", True) else str(health.get("verdict", "failed vae_check's health gate"))


def unhealthy(runs: Sequence[SeedRun]) -> dict[tuple[str, str], list[int]]:
    """(family, arm) -> the seeds whose VAE failed vae_check's gate and was accepted: their model rung measures
    a VAE no better than block averaging, which every answer built on them must say."""
    found: dict[tuple[str, str], list[int]] = {}
    for run in sorted(runs, key=lambda r: r.train_seed):
        if run.vae_verdict:
            found.setdefault((run.family, run.arm), []).append(run.train_seed)
    return found


def one_sweep(runs: list[SeedRun]) -> list[SeedRun]:
    """The runs of one sweep: those sharing a config (every param but :data:`VARIED`), one per (family, arm,
    seed) (the first listed: the newest). Of several configs, the one with the most runs wins, the newest on a
    tie: experiments on other params (a lever tried on val after the sweep) neither join it nor replace it."""
    groups: dict[str, dict[tuple[str, str, int], SeedRun]] = {}
    for run in runs:
        groups.setdefault(run.config, {}).setdefault((run.family, run.arm, run.train_seed), run)
    if not groups:
        return []
    kept = max(groups.values(), key=len)  # max keeps the first of equals: the newest config
    return sorted(kept.values(), key=lambda r: (r.family, r.arm, r.train_seed))


@dataclass
class Finding:
    """One row of a family's verdict."""

    family: str
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
    """``first``'s rung minus ``second``'s (the same runs for a comparison within an arm), paired by seed;
    the runs are one family's."""
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
    return Finding(first[0].family, arm, label, metric, float(np.mean(averaged)),
                   [float(np.mean([d[c] for c in cases])) for d in per_seed],
                   (interval["ci95_low"], interval["ci95_high"]), len(cases))


def verdict(runs: Sequence[SeedRun], metrics: Sequence[str] = METRICS) -> list[Finding]:
    """Every family's arm comparisons and SD - MAISI for ``metrics``, over its runs' seeds."""
    findings = []
    for family in sorted({r.family for r in runs}):
        arms = {arm: [r for r in runs if r.family == family and r.arm == arm] for arm in ("sd", "maisi")}
        for arm, arm_runs in arms.items():
            for rung, against in COMPARISONS:
                for metric in metrics:
                    found = compare(arm_runs, arm_runs, (rung, against), metric, arm, f"{rung} - {against}")
                    findings.append(found)
        if arms["sd"] and arms["maisi"]:
            for metric in metrics:
                findings.append(compare(arms["sd"], arms["maisi"], ("model", "model"), metric, "both", SD_MAISI))
    return [f for f in findings if f is not None]


@dataclass
class Level:
    """One rung's metric in one family and arm: the mean over test cases per seed, and over seeds."""

    family: str
    arm: str
    rung: str
    metric: str
    seeds: list[int]
    seed_values: list[float]  # per seed: the mean over the cases that have the metric

    @property
    def mean(self) -> float:
        return float(np.mean(self.seed_values))

    @property
    def seed_range(self) -> tuple[float, float]:
        return min(self.seed_values), max(self.seed_values)


def levels(runs: Sequence[SeedRun], wanted: Sequence[tuple[str, str]] = LEVELS) -> list[Level]:
    """Every family's and arm's :data:`LEVELS` that its runs have, seeds in order."""
    found = []
    for family in sorted({r.family for r in runs}):
        for arm in ("sd", "maisi"):
            arm_runs = sorted((r for r in runs if r.family == family and r.arm == arm), key=lambda r: r.train_seed)
            for rung, metric in wanted:
                per_seed = [(r.train_seed, float(np.mean(list(v.values())))) for r in arm_runs
                            if (v := r.values(rung, metric))]
                if per_seed:
                    found.append(Level(family, arm, rung, metric, [s for s, _ in per_seed], [v for _, v in per_seed]))
    return found


@dataclass
class Pooled:
    """One row of the verdict over families: a family's row for each family that has it (module docstring)."""

    arm: str
    comparison: str
    metric: str
    families: dict[str, Finding]  # family -> its row, for the families that have this row
    missing: tuple[str, ...] = ()  # the sweep's families without this row

    @property
    def mean(self) -> float:
        """The mean of the family means."""
        return float(np.mean([f.mean for f in self.families.values()]))

    @property
    def between_families(self) -> float:
        """The range of the family means."""
        means = [f.mean for f in self.families.values()]
        return max(means) - min(means)

    @property
    def spread(self) -> float:
        """The largest of the families' seed spreads and the range of the family means (NaN if one seed)."""
        return float(np.max([f.seed_spread for f in self.families.values()] + [self.between_families]))

    @property
    def verdict(self) -> str:
        """The families' verdict when they all give the same one, else where they disagree."""
        calls = {family: f.verdict for family, f in self.families.items()}
        calls.update(dict.fromkeys(self.missing, "not measured"))
        if len(calls) == 1:
            (family, call), = calls.items()
            return f"{family} only: {call}"
        if len(set(calls.values())) == 1:
            return f"every family: {next(iter(calls.values()))}"
        return "families disagree: " + "; ".join(f"{family}: {call}" for family, call in sorted(calls.items()))


def pooled(findings: Sequence[Finding]) -> list[Pooled]:
    """The families' rows side by side, one :class:`Pooled` per (arm, comparison, metric), in table order."""
    families = sorted({f.family for f in findings})
    rows: dict[tuple[str, str, str], dict[str, Finding]] = {}
    for f in findings:
        rows.setdefault((f.arm, f.comparison, f.metric), {})[f.family] = f
    return [Pooled(*key, found, tuple(x for x in families if x not in found)) for key, found in rows.items()]


def answers(findings: Sequence[Finding], pooled_rows: Sequence[Pooled], families: Sequence[str],
            unhealthy_runs: dict[tuple[str, str], list[int]] | None = None) -> dict[str, str]:
    """The one-line answer to SD against MAISI, per family and (with several families) pooled: each metric's
    verdict, and a caveat where an arm's VAE failed its health gate and was accepted (:func:`unhealthy`)."""
    lines = {}
    for family in families:
        lines[family] = "; ".join(f"{f.metric}: {f.verdict}" for f in findings
                                  if f.family == family and f.comparison == SD_MAISI) or "one arm: no SD - MAISI"
        caveats = [f"{ARM_LABEL[arm]} seeds {seeds}" for (fam, arm), seeds
                   in sorted((unhealthy_runs or {}).items()) if fam == family]
        if caveats:
            lines[family] += (f" (caveat: the VAE of {', '.join(caveats)} failed vae_check's health gate and was "
                              f"accepted on purpose: that arm's model measures a VAE no better than block averaging)")
    if len(lines) > 1:
        lines["pooled"] = "; ".join(f"{p.metric}: {p.verdict}" for p in pooled_rows
                                    if p.comparison == SD_MAISI) or "one arm: no SD - MAISI"
        if unhealthy_runs:
            named = ", ".join(f"{family} {ARM_LABEL[arm]} seeds {seeds}"
                              for (family, arm), seeds in sorted(unhealthy_runs.items()))
            lines["pooled"] += f" (caveat: the VAE of {named} failed vae_check's health gate and was accepted)"
    return lines


def _arm_seeds(runs: Sequence[SeedRun]) -> str:
    seeds = {arm: sorted(r.train_seed for r in runs if r.arm == arm) for arm in ("sd", "maisi")}
    return f"SD seeds {seeds['sd']}, MAISI seeds {seeds['maisi']} ({', '.join(r.name for r in runs)})"


def markdown(findings: Sequence[Finding], runs: Sequence[SeedRun]) -> str:
    pooled_rows = pooled(findings)
    numbers = levels(runs)
    families = sorted({r.family for r in runs})
    disagree = [f"{p.arm} {p.comparison} {p.metric}" for p in pooled_rows if p.verdict.startswith("families")]
    lines = [f"Families: {', '.join(families)}; runs: {len(runs)}.", "", "The answer, SD - MAISI:"]
    lines += [f"- {scope}: {line}" for scope, line in answers(findings, pooled_rows, families,
                                                                 unhealthy(runs)).items()]
    if len(families) > 1:
        lines.append(f"- families disagree on: {', '.join(disagree)}" if disagree else
                     "- the families agree on every row")
    header = ["| arm | comparison | metric | mean over seeds | seed spread (range) | per seed | bootstrap 95 % "
              "| cases | verdict |", "|---|---|---|---:|---:|---|---|---:|---|"]
    for family in families:
        lines += ["", f"Family {family}: {_arm_seeds([r for r in runs if r.family == family])}."]
        lines += [f"Health: {arm} seed {r.train_seed}: {r.vae_verdict.split('; set')[0]} (accepted)"
                  for arm in ("sd", "maisi") for r in runs if r.family == family and r.arm == arm and r.vae_verdict]
        lines += ["", *header]
        for f in findings:
            if f.family == family:
                per_seed = ", ".join(f"{v:+.3f}" for v in f.seed_values)
                lines.append(f"| {f.arm} | {f.comparison} | {f.metric} | {f.mean:+.3f} | {f.seed_spread:.3f} | "
                             f"{per_seed} | [{f.ci95[0]:+.3f}, {f.ci95[1]:+.3f}] | {f.cases} | {f.verdict} |")
        own = [n for n in numbers if n.family == family]
        if own:
            lines += ["", f"Family {family}, the rungs' own numbers: the mean over the test cases, then over seeds.",
                      "", "| arm | rung | metric | mean over seeds | seed range | per seed |",
                      "|---|---|---|---:|---|---|"]
            for n in own:
                low, high = n.seed_range
                per_seed = ", ".join(f"{v:.3f}" for v in n.seed_values)
                lines.append(f"| {n.arm} | {n.rung} | {n.metric} | {n.mean:.3f} | {low:.3f} .. {high:.3f} | "
                             f"{per_seed} |")
    if len(families) > 1:
        lines += ["", f"Pooled over {', '.join(families)}: the mean of the family means; spread = the largest of "
                  "the seed spreads and the range of the family means.", "",
                  "| arm | comparison | metric | mean of families | spread | per family | verdict |",
                  "|---|---|---|---:|---:|---|---|"]
        for p in pooled_rows:
            per_family = ", ".join(f"{family} {f.mean:+.3f}" for family, f in p.families.items())
            lines.append(f"| {p.arm} | {p.comparison} | {p.metric} | {p.mean:+.3f} | {p.spread:.3f} | {per_family} "
                         f"| {p.verdict} |")
    return "\n".join(lines)


def as_json(findings: Sequence[Finding], runs: Sequence[SeedRun]) -> str:
    pooled_rows = pooled(findings)
    families = sorted({r.family for r in runs})
    return json.dumps({
        "runs": [{k: getattr(r, k) for k in ("name", "rev", "family", "arm", "train_seed", "vae_verdict")}
                 for r in runs],
        "findings": [{**f.__dict__, "seed_spread": f.seed_spread, "verdict": f.verdict} for f in findings],
        "pooled": [{"arm": p.arm, "comparison": p.comparison, "metric": p.metric, "mean": p.mean, "spread": p.spread,
                    "between_families": p.between_families, "families": {k: f.mean for k, f in p.families.items()},
                    "missing": list(p.missing), "verdict": p.verdict} for p in pooled_rows],
        "answers": answers(findings, pooled_rows, families, unhealthy(runs)),
        "levels": [{**n.__dict__, "mean": n.mean} for n in levels(runs)],
    }, indent=2)


def main(repo: Path = Path("."), names: Sequence[str] | None = None, json_out: bool = False, num: int = 1) -> str:
    runs = one_sweep(load_runs(repo, names, num))
    if not runs:
        raise RuntimeError(f"no experiment with {PER_CASE} among the last {num} commit(s)' experiments: run the "
                           f"sweep first ({SWEEP}), or look further back with --num")
    findings = verdict(runs)
    return as_json(findings, runs) if json_out else markdown(findings, runs)
