"""Inference: sampling from a trained model (:mod:`.sampling`), shared by evaluate and ``ctdiff predict``
(:mod:`.predict`), and the calibration of its spread (:mod:`.calibration`).
Imports :mod:`ctdiff.data`, :mod:`ctdiff.metrics` and :mod:`ctdiff.models`."""
