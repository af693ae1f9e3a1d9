"""Structure-level metrics from voxel-wise truth labels: what a reader of a CT pulmonary angiogram needs.

PSNR over the body says little about the findings. A thick-to-thin model can sharpen the image yet wash
out an embolus, or paint a filling defect into a healthy artery; these metrics look for exactly that,
using the phantoms' tissue labels on the common grid (``labels.npy``, :mod:`ctdiff.data.labels`):

- ``mae_hu_<structure>``: mean absolute HU error inside each structure present (:data:`STRUCTURES`:
  artery lumen, embolus, lung, soft tissue, bone), HU unclipped: a washed-out embolus is an HU error the
  [-1000, 1000] display range would not hide anyway, and bone is where clipping would.
- ``embolus_conspicuity`` (cases with emboli): the contrast of the emboli against the patent lumen
  around them, ``mean(lumen ring) - mean(embolus)``, in the prediction over the same in the truth. 1.0
  keeps the defect as it is, below 1 washes it out (0: invisible), above 1 exaggerates it. The ring is
  the artery-lumen voxels within ``evaluate.lumen_ring_mm`` of an embolus voxel (physical distance, so
  anisotropic grids are measured in mm).
- ``false_defect_fraction`` (cases without emboli, not in an APE folder): the fraction of artery-lumen
  voxels whose predicted HU falls below ``evaluate.defect_hu`` minus the same fraction in the truth.
  Positive: the model invents filling defects; negative: it fills in what the truth shows darker (partial
  volume at thin vessels' walls).

A case without labels, or without the classes a metric needs, simply has no such metric (absent, never
zero). The truth is series 2 as acquired (``target.npy``): its noise averages out of these means.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# Structure name -> the class names (meta.json "labels" "classes") it pools.
STRUCTURES: dict[str, tuple[str, ...]] = {
    "artery": ("artery",),
    "embolus": ("embolus",),
    "lung": ("lung",),
    "soft_tissue": ("soft_tissue",),
    "bone": ("bone_cortical", "bone_cancellous"),
}
ARTERY, EMBOLUS = "artery", "embolus"
APE_CATEGORY = "APE"
CONSPICUITY = "embolus_conspicuity"
FALSE_DEFECTS = "false_defect_fraction"
STRUCTURE_METRICS = (*(f"mae_hu_{name}" for name in STRUCTURES), CONSPICUITY, FALSE_DEFECTS)
MIN_CONTRAST_HU = 20.0  # a truth contrast below this (an embolus the truth barely shows) has no conspicuity
DISTANCE_RTOL = 1e-5  # float32 rounding of the distance map: ties count as within
SELECT_VOXELS = 1 << 22  # voxels per step of a masked mean (whole slices; 32 MiB as float64)


@dataclass(frozen=True)
class StructureTruth:
    """What one case's labels and truth fix, computed once and applied to every rung."""

    truth_hu: np.ndarray  # (D, H, W) float32 (the caller's array when it is float32 already)
    masks: dict[str, np.ndarray]  # structure -> (D, H, W) bool, only structures with voxels
    ring: np.ndarray | None  # patent lumen around the emboli (bool), None without emboli or ring
    defect_hu: float
    check_false_defects: bool  # a case without emboli that is not filed as APE
    truth_contrast: float | None  # mean(ring) - mean(embolus) in the truth
    truth_defect_fraction: float | None

    @classmethod
    def build(cls, labels: np.ndarray, classes: Mapping[int | str, str], truth_hu: np.ndarray,
              spacing_mm: Sequence[float], category: str, lumen_ring_mm: float, defect_hu: float) -> StructureTruth:
        """``labels`` (D, H, W) class ids, ``classes`` id -> name, ``spacing_mm`` (sx, sy, sz)."""
        if labels.shape != truth_hu.shape:
            raise ValueError(f"labels {labels.shape} and truth {truth_hu.shape} are not on one grid")
        ids_of = {}
        for class_id, name in classes.items():
            ids_of.setdefault(str(name), []).append(int(class_id))
        masks = {}
        for structure, names in STRUCTURES.items():
            ids = [i for name in names for i in ids_of.get(name, [])]
            mask = np.isin(labels, ids) if ids else np.zeros(labels.shape, bool)
            if mask.any():
                masks[structure] = mask
        truth = np.asarray(truth_hu, np.float32)  # means below in float64 over the selected voxels only
        ring, contrast = None, None
        if EMBOLUS in masks and ARTERY in masks:
            near = within_mm(masks[EMBOLUS], spacing_mm, lumen_ring_mm)
            ring = near & masks[ARTERY]
            if ring.any():
                contrast = _mean(truth, ring) - _mean(truth, masks[EMBOLUS])
                if contrast < MIN_CONTRAST_HU:
                    contrast = None
            else:
                ring = None
        check = EMBOLUS not in masks and ARTERY in masks and category != APE_CATEGORY
        fraction = _fraction_below(truth, masks[ARTERY], defect_hu) if check else None
        return cls(truth, masks, ring, float(defect_hu), check, contrast, fraction)

    def metrics(self, pred_hu: np.ndarray) -> dict[str, float]:
        """``mae_hu_<structure>``, ``embolus_conspicuity`` and ``false_defect_fraction`` where the case has
        them, for one (D, H, W) HU prediction on the labels' grid.

        Only the voxels of each mask are taken (as float64), never a converted copy of the whole volume.
        """
        pred = np.asarray(pred_hu)
        if pred.shape != self.truth_hu.shape:
            raise ValueError(f"prediction {pred.shape} and truth {self.truth_hu.shape} are not on one grid")
        out: dict[str, float] = {}
        for structure, mask in self.masks.items():
            total = sum(float(np.abs(p - t).sum()) for p, t in _selected(mask, pred, self.truth_hu))
            out[f"mae_hu_{structure}"] = total / int(np.count_nonzero(mask))
        if self.truth_contrast is not None and self.ring is not None:
            contrast = _mean(pred, self.ring) - _mean(pred, self.masks[EMBOLUS])
            out[CONSPICUITY] = float(contrast / self.truth_contrast)
        if self.check_false_defects and self.truth_defect_fraction is not None:
            out[FALSE_DEFECTS] = _fraction_below(pred, self.masks[ARTERY], self.defect_hu) - self.truth_defect_fraction
        return out


def _selected(mask: np.ndarray, *volumes: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """The voxels of each of ``volumes`` inside ``mask``, as float64, a slab of slices (axis 0) at a time:
    no temporary is larger than ``SELECT_VOXELS`` float64 values."""
    per_slab = max(1, SELECT_VOXELS // max(1, math.prod(mask.shape[1:])))
    for start in range(0, mask.shape[0], per_slab):
        inside = mask[start:start + per_slab]
        yield tuple(v[start:start + per_slab][inside].astype(np.float64, copy=False) for v in volumes)


def _mean(volume: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``volume`` over ``mask``, in float64 (only the selected voxels are converted)."""
    return sum(float(v.sum()) for (v,) in _selected(mask, volume)) / int(np.count_nonzero(mask))


def _fraction_below(volume: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Fraction of ``mask``'s voxels of ``volume`` below ``threshold``, compared in float64."""
    below = sum(int(np.count_nonzero(v < threshold)) for (v,) in _selected(mask, volume))
    return below / int(np.count_nonzero(mask))


def within_mm(mask: np.ndarray, spacing_mm: Sequence[float], distance_mm: float) -> np.ndarray:
    """Voxels within ``distance_mm`` (physical, centre to centre) of ``mask``, ``mask`` itself included.

    SimpleITK's Maurer distance map rather than a hand-written dilation: it measures in mm on
    anisotropic grids, which a voxel ball does not. It runs on the mask's bounding box grown by the distance
    (the same result: no voxel outside it is that close), not the whole volume: on a real-size case the
    emboli cover a few thousand voxels of 79 M, and the whole-volume map took seconds and 1 GB. A voxel exactly
    ``distance_mm`` away (common when the distance is a multiple of the spacing) counts as within, whichever
    way the map's float32 rounding leans (it leans differently on a different extent).
    """
    out = np.zeros(mask.shape, bool)
    if not mask.any():
        return out
    reach = [math.ceil(distance_mm / float(s)) for s in reversed(tuple(spacing_mm))]  # (z, y, x) voxels
    box = []
    for axis, (size, grow) in enumerate(zip(mask.shape, reach)):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - grow), min(size, int(hits[-1]) + grow + 1)))
    box = tuple(box)
    image = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    out[box] = sitk.GetArrayFromImage(distance) <= distance_mm * (1.0 + DISTANCE_RTOL)
    return out
