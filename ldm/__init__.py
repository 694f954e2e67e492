"""ldm: a latent diffusion framework."""
__version__ = "0.1.0"
