"""Data: image sources, robust decoding, the embedded digits, resumable sampling and the latent cache."""
