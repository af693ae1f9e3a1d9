"""Structure metrics on hand-built volumes whose answers are known by construction."""

import numpy as np
import pytest

from ctdiff.data.phantom import TISSUE_CLASSES, Tissue
from ctdiff.metrics.cases import paired_gains, score, summarise
from ctdiff.metrics.image import TruthScorer
from ctdiff.metrics.structures import CONSPICUITY, FALSE_DEFECTS, StructureTruth, within_mm

LUMEN_HU, EMBOLUS_HU, LUNG_HU = 300.0, 50.0, -850.0
SPACING = (0.8, 0.8, 1.0)


def vessel_case(embolus: bool):
    """Lung with one straight artery along z (radius 3 px), optionally a 4-slice embolus in its middle."""
    shape = (24, 16, 16)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    labels = np.full(shape, Tissue.LUNG, np.uint8)
    lumen = (y - 8) ** 2 + (x - 8) ** 2 <= 9
    labels[lumen] = Tissue.ARTERY
    truth = np.where(lumen, LUMEN_HU, LUNG_HU).astype(np.float32)
    if embolus:
        clot = lumen & (z >= 10) & (z < 14) & ((y - 8) ** 2 + (x - 8) ** 2 <= 2)
        labels[clot] = Tissue.EMBOLUS
        truth[clot] = EMBOLUS_HU
    labels[0, 0, 0] = Tissue.BONE_CORTICAL  # one bone voxel: bone is a structure of this case too
    return labels, truth


def build(labels, truth, category, ring_mm=4.0, defect_hu=175.0):
    return StructureTruth.build(labels, TISSUE_CLASSES, truth, SPACING, category, ring_mm, defect_hu)


def test_the_truth_scores_one_and_zero():
    labels, truth = vessel_case(embolus=True)
    ape = build(labels, truth, "APE").metrics(truth)
    assert ape[CONSPICUITY] == pytest.approx(1.0)
    assert FALSE_DEFECTS not in ape  # a case with emboli is not asked for invented ones
    assert all(ape[f"mae_hu_{s}"] == 0.0 for s in ("artery", "embolus", "lung", "bone"))
    assert "mae_hu_soft_tissue" not in ape  # no such voxel: absent, not zero
    labels, truth = vessel_case(embolus=False)
    healthy = build(labels, truth, "non-APE").metrics(truth)
    assert healthy[FALSE_DEFECTS] == 0.0 and CONSPICUITY not in healthy and "mae_hu_embolus" not in healthy


def test_a_washed_out_embolus_loses_conspicuity_by_the_right_amount():
    labels, truth = vessel_case(embolus=True)
    case = build(labels, truth, "APE")
    clot = labels == Tissue.EMBOLUS
    washed = truth.copy()
    washed[clot] = EMBOLUS_HU + 0.6 * (LUMEN_HU - EMBOLUS_HU)  # 60 % of the way to the lumen
    got = case.metrics(washed)
    assert got[CONSPICUITY] == pytest.approx(0.4, abs=1e-6)
    assert got["mae_hu_embolus"] == pytest.approx(0.6 * (LUMEN_HU - EMBOLUS_HU))
    assert got["mae_hu_artery"] == 0.0  # the lumen is untouched
    # Filling the defect in completely makes it invisible; darkening the lumen around it by the same
    # amount as the clot keeps the contrast.
    filled = truth.copy()
    filled[clot] = LUMEN_HU
    assert case.metrics(filled)[CONSPICUITY] == pytest.approx(0.0, abs=1e-6)
    assert case.metrics(truth - 40.0)[CONSPICUITY] == pytest.approx(1.0)


def test_the_ring_is_lumen_within_the_distance_in_mm():
    labels, truth = vessel_case(embolus=True)
    case = build(labels, truth, "APE", ring_mm=2.0)
    ring_z = np.unique(np.nonzero(case.ring)[0])
    # The clot spans z 10..13 (1 mm slices): lumen within 2 mm lies in z 8..15, never in the clot.
    assert ring_z.min() == 8 and ring_z.max() == 15
    assert not (case.ring & (labels == Tissue.EMBOLUS)).any()
    assert not (case.ring & (labels == Tissue.LUNG)).any()
    # Physical distance on an anisotropic grid: 2 voxels along z at 1 mm, 2 voxels in-plane at 0.8 mm.
    point = np.zeros((5, 5, 5), bool)
    point[2, 2, 2] = True
    near = within_mm(point, (0.8, 0.8, 1.0), 1.7)
    assert near[2, 2, 4] and not near[4, 2, 2]  # 1.6 mm in-plane is in, 2.0 mm along z is out


def test_an_invented_defect_gives_a_positive_false_defect_fraction():
    labels, truth = vessel_case(embolus=False)
    case = build(labels, truth, "non-APE")
    lumen = labels == Tissue.ARTERY
    invented = truth.copy()
    dark = lumen & (np.arange(24)[:, None, None] < 6)  # a quarter of the artery's length turns dark
    invented[dark] = 100.0
    got = case.metrics(invented)
    assert got[FALSE_DEFECTS] == pytest.approx(dark.sum() / lumen.sum())
    assert got[FALSE_DEFECTS] == pytest.approx(0.25)
    # A brighter lumen invents nothing; the threshold is the param.
    assert case.metrics(truth + 50.0)[FALSE_DEFECTS] == 0.0
    assert build(labels, truth, "non-APE", defect_hu=90.0).metrics(invented)[FALSE_DEFECTS] == 0.0


def test_an_ape_case_whose_emboli_left_the_grid_has_neither_finding():
    labels, truth = vessel_case(embolus=False)
    got = build(labels, truth, "APE").metrics(truth)
    assert CONSPICUITY not in got and FALSE_DEFECTS not in got and got["mae_hu_artery"] == 0.0


def scores(rungs, truth, structures=None):
    scorer = TruthScorer(truth, (-1000.0, 1000.0))
    return {name: score(volume, scorer, structures) for name, volume in rungs.items()}


def test_rungs_are_scored_and_summarised_over_the_cases_that_have_each_metric():
    ape_labels, ape_truth = vessel_case(embolus=True)
    ok_labels, ok_truth = vessel_case(embolus=False)
    washed = ape_truth.copy()
    washed[ape_labels == Tissue.EMBOLUS] = LUMEN_HU
    per_case = [
        scores({"model": washed, "baseline": ape_truth}, ape_truth, build(ape_labels, ape_truth, "APE")),
        scores({"model": ok_truth, "baseline": ok_truth - 200.0}, ok_truth, build(ok_labels, ok_truth, "non-APE")),
        scores({"model": ok_truth, "baseline": ok_truth}, ok_truth),  # no labels
    ]
    assert CONSPICUITY not in per_case[2]["model"] and "psnr_body" in per_case[2]["model"]
    means = summarise(per_case)
    assert means["model"][CONSPICUITY] == pytest.approx(0.0, abs=1e-6)  # over the one APE case
    assert means["baseline"][FALSE_DEFECTS] == pytest.approx(1.0)  # 300 - 200 = 100 HU < 175 everywhere
    gains = paired_gains(per_case, "model", "baseline", seed=0)
    assert gains[CONSPICUITY]["cases"] == 1 and gains[CONSPICUITY]["mean"] == pytest.approx(-1.0)
    assert gains[FALSE_DEFECTS]["mean"] == pytest.approx(-1.0)
    unlabelled = [per_case[2]]
    assert CONSPICUITY not in summarise(unlabelled)["model"]
    assert set(paired_gains(unlabelled, "model", "baseline", seed=0)) == {"psnr_body", "mae_hu_body"}


def _float64_metrics(case, labels, truth, pred):
    """What StructureTruth.metrics computed before it kept float32: everything on whole float64 volumes."""
    t, p = truth.astype(np.float64), pred.astype(np.float64)
    out = {f"mae_hu_{s}": float(np.abs(p[m] - t[m]).mean()) for s, m in case.masks.items()}
    if case.ring is not None and case.truth_contrast is not None:
        clot = labels == Tissue.EMBOLUS
        truth_contrast = t[case.ring].mean() - t[clot].mean()
        out[CONSPICUITY] = float((p[case.ring].mean() - p[clot].mean()) / truth_contrast)
    if case.check_false_defects:
        lumen = labels == Tissue.ARTERY
        out[FALSE_DEFECTS] = float((p[lumen] < case.defect_hu).mean() - (t[lumen] < case.defect_hu).mean())
    return out


@pytest.mark.parametrize("embolus, category", [(True, "APE"), (False, "non-APE")])
def test_float32_truth_in_slabs_matches_the_float64_computation(monkeypatch, embolus, category):
    import tracemalloc

    from ctdiff.metrics import structures

    monkeypatch.setattr(structures, "SELECT_VOXELS", 300)  # one 16 x 16 slice per step: 24 steps
    labels, truth = vessel_case(embolus)
    rng = np.random.default_rng(0)
    truth = truth + rng.normal(0.0, 30.0, truth.shape).astype(np.float32)
    pred = truth + rng.normal(-20.0, 60.0, truth.shape).astype(np.float32)
    case = build(labels, truth, category)
    assert case.truth_hu.dtype == np.float32
    want = _float64_metrics(case, labels, truth, pred)
    tracemalloc.start()
    got = case.metrics(pred)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < pred.size * 8 / 2  # less than half of one whole-volume float64 copy (the old code made one)
    assert set(got) == set(want) and (CONSPICUITY in got) == embolus and (FALSE_DEFECTS in got) != embolus
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
