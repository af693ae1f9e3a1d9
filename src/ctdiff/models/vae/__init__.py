"""The VAE codecs: the one interface every stage uses (:mod:`.base`), MAISI (:mod:`.maisi`) and SD (:mod:`.sd`),
and where their weights come from and how they load (:mod:`.weights`)."""
