"""sigma-VAE: the KL tokenizer's training latent with fixed-distribution noise instead of the encoder's variance.

Sun et al. 2024, "Multimodal Latent Language Modeling with Next-Token Diffusion" (LatentLM, arXiv:2412.08635), its
sigma-VAE section; reference code microsoft/unilm LatentLM/tokenizer_models/modeling_sigma_vae.py
(`GaussianDistribution`).
A VAE whose encoder learns its own variance drives it towards 0 (variance collapse): the latent space becomes that of
a plain autoencoder, whose decoder is not robust to the errors of a generator. sigma-VAE keeps the noise: the encoder
predicts the mean mu only and the latent is

    z = mu + sigma * eps,   eps ~ N(0, I) per element,   sigma ~ N(0, C_sigma^2) one scalar per image,

so every image is trained at a random noise level, up to ~2-3 C_sigma. The reference draws
sigma = randn(B) * std / 0.8 (std = 0.75 by default, C_sigma = 0.9375) and broadcasts it over (C, h, w); we take
`tokenizer.sigma_vae.c_sigma` as that standard deviation. With sigma independent of the encoder, the KL term of the
ELBO, KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per element, keeps only 0.5 mu^2 as a
function of the weights: the KL regulariser becomes an L2 penalty on mu. We weigh it as LDM weighs its KL,
kl_weight * 0.5 * sum_{c,h,w} mu^2 averaged over the batch (the reference's kl_weight * mean(mu^2) is this with
kl_weight' = 2 kl_weight / (C h w)).

Departure: the network stays a diffusers AutoencoderKL (exportable as before); the log-variance half of its moments is
not used in training (it receives zero gradient) and means nothing in a sigma-VAE, so `ldm eval latents`'s posterior
variance / KL diagnostics do not describe it. Inference encodes mu, as the reference's `mode()`.

Draws: sigma and eps of image i come from its own generator (`draws[i]`: sigma first, then eps), so a batch split
over processes, or a resumed run, draws the same noise; without generators, from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.tokenizers.base import Encoded


def sigma_vae_noise(shape: torch.Size | tuple[int, ...], c_sigma: float, *, draws: Sequence[torch.Generator] | None,
                    device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise sigma * eps of `shape` (B, C, h, w), sigma (B,)) with sigma ~ N(0, c_sigma^2) per image and
    eps ~ N(0, I); image i draws sigma then eps from draws[i] (None: torch's global RNG)."""
    b = shape[0]
    if draws is None:
        sigma = torch.randn(b, device=device, dtype=dtype) * c_sigma  # (B,)
        eps = torch.randn(shape, device=device, dtype=dtype)  # (B, C, h, w)
    else:
        if len(draws) != b:
            raise ValueError(f"got {len(draws)} generators for a batch of {b}")
        pairs = [(torch.randn((), generator=g, device=g.device, dtype=dtype),
                  torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)) for g in draws]
        sigma = torch.stack([s for s, _ in pairs]).to(device) * c_sigma  # (B,)
        eps = torch.stack([e for _, e in pairs]).to(device)  # (B, C, h, w)
    return sigma.view(b, *([1] * (len(shape) - 1))) * eps, sigma


def sigma_vae_kl(mean: torch.Tensor) -> torch.Tensor:
    """The mean-dependent part of KL(N(mu, sigma^2 I) || N(0, I)) for sigma independent of the encoder:
    0.5 * sum_{c,h,w} mu^2 per image, averaged over the batch (0-dim, float32)."""
    return 0.5 * mean.float().square().flatten(1).sum(1).mean()


def sigma_vae_encoded(mean: torch.Tensor, *, kl_weight: float, c_sigma: float,
                      draws: Sequence[torch.Generator] | None) -> Encoded:
    """The training encoding of sigma-VAE from the encoder's mean (B, C, h, w): z = mu + sigma * eps and the weighted
    L2 term kl_weight * sigma_vae_kl(mu); logs the term and the batch's mean |sigma|."""
    noise, sigma = sigma_vae_noise(mean.shape, c_sigma, draws=draws, device=mean.device)
    kl = sigma_vae_kl(mean)
    return Encoded(mean + noise.to(mean.dtype), kl_weight * kl, {"loss_kl": kl, "sigma_abs": sigma.abs().mean()})
