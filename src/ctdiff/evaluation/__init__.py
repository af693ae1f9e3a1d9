"""Evaluation: the VAE round trip (:mod:`.vae_check`), the ladder of rungs (:mod:`.rungs`), the evaluate
stage (:mod:`.evaluate`), what it writes (:mod:`.report`) and its figures (:mod:`.figures`), the calibrate stage
(:mod:`.calibrate`) and the verdict over a sweep (:mod:`.verdict`). Imports
everything but :mod:`ctdiff.training`."""
