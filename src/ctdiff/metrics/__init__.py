"""Metrics: image quality in HU and [0, 1] (:mod:`.image`), structures from voxel labels (:mod:`.structures`),
and per case (:mod:`.cases`): every metric of one prediction, means and paired bootstrap intervals over
cases. Imports :mod:`ctdiff.data` only."""
