"""ctdiff: paired CT series -> conditional latent diffusion, SD VAE vs MAISI VAE, as a DVC pipeline.

The library, in the order the data flows (each package imports only those listed before it, and the
core modules ``params``, ``io`` and ``device``; ``tests/test_layout.py`` holds it to that):

- :mod:`ctdiff.data`: case zips and DICOM in, DICOM out, grids, phantoms, labels, downloads, the
  processed format, and the slab physics of a thick series (fetch_data, preprocess).
- :mod:`ctdiff.metrics`: image-quality and structure metrics, paired per-case intervals, the health checks
  of a stage that learns, calibrated uncertainty.
- :mod:`ctdiff.models`: the VAE codecs, the denoiser, the noise process, the supervised reference
  network, checkpoints (what fetch_weights loads and every later stage builds on).
- :mod:`ctdiff.training`: the shared scaffold and the loops of vae_fit, slab, train and sr_reference.
- :mod:`ctdiff.inference`: sampling from a trained model (evaluate's and ``ctdiff predict``'s one path), its calibration
  and ``ctdiff predict``.
- :mod:`ctdiff.evaluation`: vae_check, the evaluate ladder, its report and figures, calibrate, the verdict
  over a sweep.
"""

__version__ = "0.1.0"
