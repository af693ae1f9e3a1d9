"""Metrics: image quality in HU and [0, 1] (:mod:`.image`), structures from voxel labels (:mod:`.structures`),
per case (:mod:`.cases`): every metric of one prediction, means and paired bootstrap intervals over
cases; whether a stage learned anything (:mod:`.health`) and calibrated uncertainty
(:mod:`.uncertainty`). Imports :mod:`ctdiff.data` only."""
