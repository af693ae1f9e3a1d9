"""ctdiff: paired CT series -> conditional latent diffusion, SD VAE vs MAISI VAE, as a DVC pipeline."""

__version__ = "0.1.0"
