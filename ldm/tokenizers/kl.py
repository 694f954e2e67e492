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
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from ldm.tokenizers.base import Encoded, Posterior, TokenizerKind, load_diffusers_strict
from ldm.tokenizers.sigma_vae import sigma_vae_encoded

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
    """AutoencoderKL.from_pretrained(folder) from local files only. A missing folder, a folder of another class, one
    without weights or with weights that do not fill the network raises one line naming the file (diffusers itself
    would initialise missing tensors at random with a warning)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        hint = " (a 'vae' sub-folder exists: point at it)" if (folder / "vae" / "config.json").is_file() else ""
        raise FileNotFoundError(f"no diffusers AutoencoderKL at {str(folder)!r}: expected {str(folder / 'config.json')!r}"
                                f" and diffusion_pytorch_model.safetensors{hint}. Download one (e.g. "
                                f"stabilityai/sd-vae-ft-ema) with `huggingface-cli download` into that folder.")
    cls_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if cls_name not in (None, "AutoencoderKL"):
        raise ValueError(f"{str(folder)!r} holds a {cls_name}, not an AutoencoderKL")
    return load_diffusers_strict(AutoencoderKL, folder, example_repo="stabilityai/sd-vae-ft-ema")


def autoencoder_downsample(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_posterior(vae: AutoencoderKL, x: torch.Tensor) -> Posterior:
    """q(z|x) of an AutoencoderKL: encoder -> quant_conv -> (mean, logvar clamped to [-30, 20])."""
    moments = vae.encoder(x)  # (B, 2C, h, w)
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    return moments_posterior(moments)


def moments_posterior(moments: torch.Tensor) -> Posterior:
    """LDM's DiagonalGaussianDistribution of encoder moments (B, 2C, h, w): (mean, logvar clamped to [-30, 20])."""
    mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
    return Posterior(mean, logvar.clamp(-30.0, 20.0))


def gaussian_encoded(post: Posterior, *, kl_weight: float, draws) -> Encoded:
    """The training encoding of a gaussian kind: z ~ q(z|x) (per-sample `draws`) and its own term
    kl_weight * KL(q(z|x) || N(0, I)), summed over latent elements and averaged over the batch."""
    from ldm.tokenizers.losses import kl_diagonal_gaussian

    z = post.sample(draws)  # (B, C, h, w)
    kl = kl_diagonal_gaussian(post.mean.float(), post.logvar.float()).mean()  # fp32 sums under autocast
    return Encoded(z, kl_weight * kl, {"loss_kl": kl})


def decode_latent(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) images (post_quant_conv -> decoder)."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)


# diffusers config keys that define the AutoencoderKL network (the rest are inference metadata)
KL_ARCH_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
                "use_post_quant_conv", "mid_block_add_attention")


class KLKind(TokenizerKind):
    """`tokenizer.kind: kl`: a diffusers AutoencoderKL with LDM's diagonal Gaussian posterior; trained with
    kl_weight * KL(q(z|x) || N(0, I)) (summed over latent elements, averaged over the batch); exports as a diffusers
    folder."""

    name, family, module_type = "kl", "gaussian", AutoencoderKL

    def build(self, cfg, image_size: int) -> nn.Module:
        return build_autoencoder_kl(latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
                                    layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                                    mid_block_attention=cfg.mid_block_attention, attn_levels=cfg.attn_levels,
                                    use_quant_conv=cfg.use_quant_conv, sample_size=image_size)

    def arch(self, model: nn.Module) -> dict[str, Any]:
        return {k: list(model.config[k]) if isinstance(model.config[k], tuple) else model.config[k]
                for k in KL_ARCH_KEYS if k in model.config}

    def from_arch(self, config: dict[str, Any]) -> nn.Module:
        return AutoencoderKL(**config)

    def downsample(self, model: nn.Module) -> int:
        return autoencoder_downsample(model)

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.latent_channels

    def encode_train(self, model, x, *, cfg, draws) -> Encoded:
        post = encode_posterior(model, x)
        if cfg.sigma_vae.enabled:  # LatentLM's sigma-VAE: the mean plus fixed-distribution noise (sigma_vae.py)
            return sigma_vae_encoded(post.mean, kl_weight=cfg.kl_weight, c_sigma=cfg.sigma_vae.c_sigma, draws=draws)
        return gaussian_encoded(post, kl_weight=cfg.kl_weight, draws=draws)

    def encode(self, model, x, *, sample=False, generator=None) -> torch.Tensor:
        post = encode_posterior(model, x)
        return post.sample(generator) if sample else post.mean

    def decode(self, model, z) -> torch.Tensor:
        return decode_latent(model, z)

    def posterior(self, model, x) -> Posterior:
        return encode_posterior(model, x)

    def is_folder(self, folder: Path) -> bool:
        config = folder / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("_class_name") in (None, "AutoencoderKL")

    def save_folder(self, model, out_dir: Path, *, stats, scaling_factor: float | None) -> None:
        """save_pretrained, with the statistics registered in the config as scaling_factor / latents_mean /
        latents_std, else `scaling_factor` (the caller passes 1.0 when none is known, never diffusers' default
        0.18215, SD-VAE's factor)."""
        if stats is not None:
            model.register_to_config(scaling_factor=stats.scaling_factor, latents_mean=list(stats.mean),
                                     latents_std=list(stats.std))
        elif scaling_factor is not None:
            model.register_to_config(scaling_factor=scaling_factor)
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load_folder(self, folder: Path):
        from ldm.tokenizers.stats import LatentStats

        vae = load_autoencoder_kl(folder)
        cfg = vae.config
        stats = None
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            stats = LatentStats(mean=list(cfg.latents_mean), std=list(cfg.latents_std),
                                scaling_factor=float(cfg.scaling_factor), num_images=0)
        return vae, stats, float(cfg.scaling_factor)
