"""The VAE codecs: the interface (:mod:`.base`), MAISI (:mod:`.maisi`) and SD (:mod:`.sd`), where their weights
come from and how they load (:mod:`.weights`), and the adapter the diffusion model uses (:mod:`.adapter`)."""
