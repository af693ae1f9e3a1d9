"""Models: the two VAE codecs behind one interface (:mod:`.vae`), the denoiser (:mod:`.denoiser`), the
noise process and sampling loop (:mod:`.diffusion`), the supervised reference network (:mod:`.reference`)
and checkpoint files (:mod:`.checkpoint`). Imports :mod:`ctdiff.data` only."""
