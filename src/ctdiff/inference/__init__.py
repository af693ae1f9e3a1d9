"""Inference: sampling from a trained model (:mod:`.sampling`), shared by evaluate and ``ctdiff predict``.
Imports :mod:`ctdiff.data`, :mod:`ctdiff.metrics` and :mod:`ctdiff.models`."""
