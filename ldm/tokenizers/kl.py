"""KL tokenizer: a `diffusers.AutoencoderKL` (Kingma & Welling 2014; LDM, Rombach et al. 2022, arXiv:2112.10752 §3).

The autoencoder *is* a diffusers AutoencoderKL, so SD-VAE (f8c4), FLUX-style f8c16 and VA-VAE f16c32 (ch 128,
ch_mult [1, 1, 2, 2, 4], 2 res blocks, attention at 16 px) are all expressible, load from a local folder with
`from_pretrained`, and export with `save_pretrained`. This module builds one from typed kwargs, loads one from a
folder (never from the hub) and exposes the diagonal Gaussian posterior of LDM
(ldm/modules/distributions/distributions.py: logvar clamped to [-30, 20]).

Attention levels follow LDM's `attn_resolutions`: an encoder level listed in `attn_levels` (0 = full resolution)
uses AttnDownEncoderBlock2D (resnet -> self-attention per layer, one head of the block's width), and the decoder mirrors
it with AttnUpDecoderBlock2D.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from torch import nn

log = logging.getLogger(__name__)


def block_types(n_levels: int, attn_levels=()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers down/up block type names; the decoder's list runs from the deepest level up."""
    attn = set(attn_levels)
    bad = sorted(a for a in attn if not 0 <= a < n_levels)
    if bad:
        raise ValueError(f"attn_levels {bad} out of range for {n_levels} levels (expected 0..{n_levels - 1})")
    down = tuple("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n_levels))
    up = tuple("AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(range(n_levels)))
    return down, up


def build_autoencoder_kl(*, latent_channels: int = 4, block_out_channels: list[int] = (128, 256, 512, 512),
                         layers_per_block: int = 2, norm_num_groups: int = 32, mid_block_attention: bool = True,
                         attn_levels: list[int] = (), use_quant_conv: bool = True, sample_size: int = 256,
                         in_channels: int = 3) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL. Defaults are SD-VAE's (kl-f8: ch 128, ch_mult [1, 2, 4, 4], 2 blocks)."""
    down, up = block_types(len(block_out_channels), attn_levels)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, down_block_types=down, up_block_types=up,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=sample_size,
                         mid_block_add_attention=mid_block_attention, use_quant_conv=use_quant_conv,
                         use_post_quant_conv=use_quant_conv)


def load_autoencoder_kl(folder: str | Path) -> AutoencoderKL:
    """AutoencoderKL.from_pretrained(folder) from local files only; clear errors for a missing or wrong folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        hint = " (a 'vae' sub-folder exists: point at it)" if (folder / "vae" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no diffusers AutoencoderKL at {str(folder)!r}: expected {str(folder / 'config.json')!r}"
                                f" and diffusion_pytorch_model.safetensors{hint}. Download one (e.g. "
                                f"stabilityai/sd-vae-ft-ema) with `huggingface-cli download` into that folder.")
    cls_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if cls_name not in (None, "AutoencoderKL"):
        raise ValueError(f"{str(folder)!r} holds a {cls_name}, not an AutoencoderKL")
    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)


def autoencoder_downsample(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class Posterior(NamedTuple):
    """Diagonal Gaussian q(z|x): mean and log-variance, each (B, C, h, w)."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps (reparameterisation, Kingma & Welling 2014 Eq. 10). eps comes from
        `generator`: one, one per sample (a list of B: sample i's eps from generator i, whatever batch it is in), or
        None (torch's global RNG)."""
        if generator is None or isinstance(generator, torch.Generator):
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        else:
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {self.mean.shape[0]}")
            eps = torch.stack([torch.randn(self.mean.shape[1:], generator=g, device=g.device, dtype=self.mean.dtype)
                               for g in generator]).to(self.mean.device)  # (B, C, h, w)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


def encode_posterior(vae: AutoencoderKL, x: torch.Tensor) -> Posterior:
    """q(z|x) of an AutoencoderKL: encoder -> quant_conv -> (mean, logvar clamped to [-30, 20])."""
    moments = vae.encoder(x)  # (B, 2C, h, w)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
    return Posterior(mean, logvar.clamp(-30.0, 20.0))


def decode_latent(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) images (post_quant_conv -> decoder)."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)


def decoder_last_layer(module: nn.Module) -> torch.Tensor:
    """W of the adaptive GAN weight (Esser et al. 2021 Eq. 7): the decoder's output conv weight."""
    return module.decoder.conv_out.weight


def encoder_last_layer(module: nn.Module) -> torch.Tensor:
    """W of VA-VAE's adaptive VF weight: the encoder's output conv weight (LightningDiT autoencoder.py L385)."""
    return module.encoder.conv_out.weight
