"""Training: the scaffold train and sr_reference share (:mod:`.scaffold`: resume, checkpoints, epoch
statistics, logging, signals), processes and precision (:mod:`.distributed`), the latent cache and patches
(:mod:`.latents`), and the loops: vae_fit (:mod:`.vae_fit`), the fitted slice profile (:mod:`.slab`),
train (:mod:`.ldm`), sr_reference (:mod:`.reference`). Imports :mod:`ctdiff.data`, :mod:`ctdiff.metrics`
and :mod:`ctdiff.models`."""
