"""The latents stage: VAE moments of every stored HQ crop (pipeline.latents.stage)."""
