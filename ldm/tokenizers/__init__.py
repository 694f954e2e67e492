"""Stage 1: tokenizers (image <-> latent). KL (diffusers AutoencoderKL) and VQ autoencoders, their losses, EQ-VAE and
VA-VAE regularisers, latent statistics, loading as a frozen `Tokenizer` and export (see docs/tokenizers.md)."""

from ldm.tokenizers.export import Tokenizer, build_tokenizer, export_tokenizer, load_tokenizer
from ldm.tokenizers.stats import LatentStats, compute_latent_stats, load_latent_stats, save_latent_stats

__all__ = ["Tokenizer", "build_tokenizer", "export_tokenizer", "load_tokenizer", "LatentStats",
           "compute_latent_stats", "load_latent_stats", "save_latent_stats"]
