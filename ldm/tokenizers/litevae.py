"""LiteVAE tokenizer: a wavelet encoder and the usual decoder (Sadat et al., "LiteVAE: Lightweight and Efficient
Variational Autoencoders for Latent Diffusion Models", NeurIPS 2024, arXiv:2405.14477).

Encoder (the paper's Fig. 1), for L = len(tokenizer.block_out_channels) - 1 wavelet levels (3 -> f8):

    x_l = DWT_l(x) / 2^l,             l = 1..L  orthonormal Haar (ldm.tokenizers.wavelets): the 4 sub-bands of level
                                                 l, (B, 12, H/2^l, W/2^l) for RGB; /2^l makes LL the local mean, as
                                                 the paper's pseudocode scales level l
    f_l = F_l(x_l)                              feature extraction: one lightweight UNet per level
    z   = F_agg(cat_l pool_{2^(L-l)}(f_l))      feature aggregation: a UNet on the features resized to the latent grid
                                                 (average pooling by 2^(L-l)), concatenated on the channel axis

F_l and F_agg are ADM-style UNets (Dhariwal & Nichol 2021, arXiv:2105.05233, guided_diffusion/unet.py) *without spatial
resampling* and without attention or time embedding: a 3x3 input conv to C * mult[0]; for each multiplier m,
`blocks` ResBlocks (GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, 1x1 shortcut when the width
changes, second conv zero-initialised as ADM's) to width C * m, each output kept as a skip; two ResBlocks in the
middle; the mirror path of `blocks` ResBlocks per multiplier, each on cat(h, skip); GroupNorm -> SiLU -> conv3x3 out.
With F_l: 12 -> 12 channels and F_agg: 12 L -> 2 n_z (posterior mean and log-variance), the paper's encoder sizes
(ENCODER_PRESETS: LiteVAE-S/B/M/L, width / multipliers / 2 blocks) have 1.04M, 6.76M, 32.76M and 41.43M parameters
at n_z = 12, against 1.03M, 6.75M, 32.75M and 41.42M in the paper (tests/test_litevae.py pins them).

Posterior and decoder are the KL tokenizer's: q(z|x) = N(mean, exp(logvar)), logvar clamped to [-30, 20] (LDM),
trained with kl_weight * KL(q || N(0, I)) (ldm.tokenizers.kl.gaussian_encoded); decoder = diffusers' `Decoder`
(SD-VAE's, as in the paper), sized by tokenizer.block_out_channels / layers_per_block / norm_num_groups /
mid_block_attention / attn_levels, optionally behind 1x1 quant / post-quant convs (tokenizer.use_quant_conv; the
paper has none).

Self-modulated convolution (the paper's SMC; tokenizer.litevae.smc): every GroupNorm -> SiLU -> conv of the decoder
(the two in each ResNet block and the output head) becomes SiLU -> SMC, where SMC is StyleGAN2's modulated convolution
(Karras et al. 2020, arXiv:1912.04958, Eqs. 1 and 3) with a learned, input-independent style s (one scale per input
channel, initialised to 1) instead of one computed from a latent:

    w'_ijk = s_i * w_ijk,     w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps),     eps = 1e-8

so each output channel's weights have unit norm (the demodulation normalises the feature scale that GroupNorm
normalised, without GroupNorm's per-group statistics). The attention block of the decoder's middle keeps its
GroupNorm (it feeds linear projections, not a convolution).

Departures and choices where the paper is silent or unavailable here: the resizing of f_1 .. f_{L-1} to the latent grid
is average pooling; GroupNorm in F_l / F_agg uses tokenizer.litevae.norm_num_groups groups (8 by default; the
paper's S widths, 16, rule out ADM's 32); the paper's UNet discriminator (Schonfeld et al. 2020) is not implemented (the
PatchGAN of ldm.tokenizers.discriminator trains LiteVAE as every kind), nor are its pretraining at a lower resolution
as an automatic stage (two runs with tokenizer.pretrained do it) or its additional high-frequency losses.
EQ-VAE and VA-VAE apply (the paper is silent on them; both act on the latent and the decoder, which LiteVAE shares
with KL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ldm.tokenizers.base import Encoded, Posterior, TokenizerKind
from ldm.tokenizers.kl import block_types, gaussian_encoded, moments_posterior
from ldm.tokenizers.wavelets import haar_wavedec2

SUBBAND_CHANNELS = 4  # LL, HL, LH, HH per image channel


# ----------------------------------------------------------------------------------------------------------- layers
class SelfModulatedConv2d(nn.Conv2d):
    """A convolution with StyleGAN2's modulation and demodulation (Eqs. 1, 3) by a learned per-input-channel style
    `scale` (the paper's SMC). A Conv2d subclass, so `.weight` / `.bias` keep their names and roles."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple, stride=1, padding=0,
                 eps: float = 1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.scale = nn.Parameter(torch.ones(in_channels))  # s_i
        self.eps = eps

    def modulated_weight(self) -> torch.Tensor:
        w = self.weight * self.scale.view(1, -1, 1, 1)  # Eq. (1): w'_ijk = s_i w_ijk, (O, I, k, k)
        return w * torch.rsqrt(w.square().sum(dim=(1, 2, 3), keepdim=True) + self.eps)  # Eq. (3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.modulated_weight(), self.bias)


def self_modulate(decoder: Decoder) -> Decoder:
    """Replace every GroupNorm -> SiLU -> conv of a diffusers Decoder (ResNet blocks' norm1/conv1 and norm2/conv2, the
    output head's conv_norm_out/conv_out) by SiLU -> SelfModulatedConv2d; in place, returns the decoder."""
    def smc(conv: nn.Conv2d) -> SelfModulatedConv2d:
        return SelfModulatedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding)

    for block in [m for m in decoder.modules() if isinstance(m, ResnetBlock2D)]:
        block.norm1, block.conv1 = nn.Identity(), smc(block.conv1)
        block.norm2, block.conv2 = nn.Identity(), smc(block.conv2)
    decoder.conv_norm_out, decoder.conv_out = nn.Identity(), smc(decoder.conv_out)
    return decoder


class ResBlock(nn.Module):
    """ADM's ResBlock without time embedding: GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3 (zero-initialised), plus
    the input (a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # ADM zero_module: the block starts as its shortcut
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FeatureUNet(nn.Module):
    """The paper's feature-extraction / aggregation network: an ADM-style UNet with skip connections whose levels
    change the width (channels * mult) but never the resolution (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, *, channels: int, mult: Sequence[int], blocks: int,
                 groups: int):
        super().__init__()
        widths = [channels * m for m in mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [], widths[0]
        for w in widths:
            for _ in range(blocks):
                self.down.append(ResBlock(c, w, groups))
                c = w
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, groups), ResBlock(c, c, groups)])
        self.up = nn.ModuleList()
        for w in reversed(widths):
            for _ in range(blocks):
                self.up.append(ResBlock(c + skips.pop(), w, groups))
                c = w
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, D, H, W)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1))  # (B, D', H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


def unet_widths(channels: int, mult: Sequence[int], blocks: int) -> list[int]:
    """Every width a GroupNorm of FeatureUNet(channels, mult, blocks) normalises (block inputs incl. skip
    concatenations, block outputs)."""
    widths = [channels * m for m in mult]
    skips, out, c = [], [], widths[0]
    for w in widths:
        for _ in range(blocks):
            out += [c, w]
            c = w
            skips.append(c)
    for w in reversed(widths):
        for _ in range(blocks):
            out += [c + skips.pop(), w]
            c = w
    return out


# ----------------------------------------------------------------------------------------------------------- encoder
class LiteVAEEncoder(nn.Module):
    """Images (B, 3, H, W) -> posterior moments (B, out_channels, H/2^levels, W/2^levels): Haar levels -> F_l per level
    -> average pooling to the latent grid -> F_agg."""

    def __init__(self, *, levels: int, out_channels: int, extractor_channels: int, extractor_mult: Sequence[int],
                 extractor_blocks: int, feature_channels: int, aggregator_channels: int,
                 aggregator_mult: Sequence[int], aggregator_blocks: int, norm_num_groups: int, in_channels: int = 3):
        super().__init__()
        self.levels = levels
        self.extractors = nn.ModuleList([
            FeatureUNet(SUBBAND_CHANNELS * in_channels, feature_channels, channels=extractor_channels,
                        mult=extractor_mult, blocks=extractor_blocks, groups=norm_num_groups)
            for _ in range(levels)])
        self.aggregator = FeatureUNet(levels * feature_channels, out_channels, channels=aggregator_channels,
                                      mult=aggregator_mult, blocks=aggregator_blocks, groups=norm_num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for level, (coeffs, extract) in enumerate(zip(haar_wavedec2(x, self.levels), self.extractors), start=1):
            f = extract(coeffs / 2 ** level)  # (B, F, H/2^l, W/2^l)
            pool = 2 ** (self.levels - level)
            feats.append(F.avg_pool2d(f, pool) if pool > 1 else f)  # (B, F, h, w)
        return self.aggregator(torch.cat(feats, dim=1))  # (B, out, h, w)


# the paper's encoder sizes (LiteVAE-S / B / M / L): feature-extraction and aggregation UNets
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    name: {"extractor_channels": ec, "extractor_mult": em, "extractor_blocks": 2,
           "aggregator_channels": ac, "aggregator_mult": am, "aggregator_blocks": 2}
    for name, ec, em, ac, am in (("LiteVAE-S", 16, [1, 2, 2], 16, [1, 2, 2]),
                                 ("LiteVAE-B", 32, [1, 2, 3], 32, [1, 2, 3]),
                                 ("LiteVAE-M", 64, [1, 2, 4], 32, [1, 2, 3]),
                                 ("LiteVAE-L", 64, [1, 2, 4], 64, [1, 2, 4]))}


# ----------------------------------------------------------------------------------------------------------- model
class LiteVAE(nn.Module):
    """LiteVAEEncoder -> (quant_conv) -> diagonal Gaussian posterior; latent -> (post_quant_conv) -> diffusers Decoder
    (self-modulated when `smc`). The downsampling factor is 2^levels with levels = len(block_out_channels) - 1, the
    decoder's upsampling."""

    def __init__(self, *, latent_channels: int = 4, extractor_channels: int = 16,
                 extractor_mult: Sequence[int] = (1, 2, 2), extractor_blocks: int = 2, feature_channels: int = 12,
                 aggregator_channels: int = 16, aggregator_mult: Sequence[int] = (1, 2, 2), aggregator_blocks: int = 2,
                 encoder_norm_groups: int = 8, block_out_channels: Sequence[int] = (128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32, mid_block_attention: bool = True,
                 attn_levels: Sequence[int] = (), use_quant_conv: bool = False, smc: bool = False,
                 in_channels: int = 3):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "extractor_channels": extractor_channels,
                           "extractor_mult": list(extractor_mult), "extractor_blocks": extractor_blocks,
                           "feature_channels": feature_channels, "aggregator_channels": aggregator_channels,
                           "aggregator_mult": list(aggregator_mult), "aggregator_blocks": aggregator_blocks,
                           "encoder_norm_groups": encoder_norm_groups, "block_out_channels": list(block_out_channels),
                           "layers_per_block": layers_per_block, "norm_num_groups": norm_num_groups,
                           "mid_block_attention": mid_block_attention, "attn_levels": list(attn_levels),
                           "use_quant_conv": use_quant_conv, "smc": smc, "in_channels": in_channels}
        self.levels = len(block_out_channels) - 1
        if self.levels < 1:
            raise ValueError(f"tokenizer.block_out_channels={list(block_out_channels)!r}: litevae needs at least 2 "
                             f"entries (wavelet levels = len - 1, downsampling 2**levels)")
        for key, mult in (("extractor_mult", extractor_mult), ("aggregator_mult", aggregator_mult)):
            if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
                raise ValueError(f"tokenizer.litevae.{key}={list(mult)!r}; expected a non-empty list of integers >= 1")
        widths = (unet_widths(extractor_channels, extractor_mult, extractor_blocks)
                  + unet_widths(aggregator_channels, aggregator_mult, aggregator_blocks))
        if any(w % encoder_norm_groups for w in widths):
            raise ValueError(f"tokenizer.litevae.norm_num_groups={encoder_norm_groups} does not divide the encoder "
                             f"UNets' widths {sorted(set(widths))} (from the extractor_* / aggregator_* keys)")
        self.downsample = 2 ** self.levels
        self.latent_channels = latent_channels
        self.encoder = LiteVAEEncoder(levels=self.levels, out_channels=2 * latent_channels,
                                      extractor_channels=extractor_channels, extractor_mult=extractor_mult,
                                      extractor_blocks=extractor_blocks, feature_channels=feature_channels,
                                      aggregator_channels=aggregator_channels, aggregator_mult=aggregator_mult,
                                      aggregator_blocks=aggregator_blocks, norm_num_groups=encoder_norm_groups,
                                      in_channels=in_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_quant_conv else None
        _, up = block_types(len(block_out_channels), attn_levels)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=in_channels, up_block_types=up,
                               block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, mid_block_add_attention=mid_block_attention)
        if smc:
            self_modulate(self.decoder)

    def posterior(self, x: torch.Tensor) -> Posterior:
        """q(z|x) of images (B, 3, H, W) in [-1, 1]."""
        moments = self.encoder(x)  # (B, 2C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments_posterior(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.posterior(x).mean)


class LiteVAEKind(TokenizerKind):
    """`tokenizer.kind: litevae`: the LiteVAE above; gaussian like KL (same posterior, KL term and decoder); exports to
    ldm's own folder (tokenizer_config.json + tokenizer.safetensors)."""

    name, family, module_type = "litevae", "gaussian", LiteVAE

    def build(self, cfg, image_size: int) -> nn.Module:
        lv = cfg.litevae
        return LiteVAE(latent_channels=cfg.latent_channels, extractor_channels=lv.extractor_channels,
                       extractor_mult=lv.extractor_mult, extractor_blocks=lv.extractor_blocks,
                       feature_channels=lv.feature_channels, aggregator_channels=lv.aggregator_channels,
                       aggregator_mult=lv.aggregator_mult, aggregator_blocks=lv.aggregator_blocks,
                       encoder_norm_groups=lv.norm_num_groups, block_out_channels=cfg.block_out_channels,
                       layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                       mid_block_attention=cfg.mid_block_attention, attn_levels=cfg.attn_levels,
                       use_quant_conv=cfg.use_quant_conv, smc=lv.smc)

    def encode_train(self, model, x, *, cfg, draws) -> Encoded:
        return gaussian_encoded(model.posterior(x), kl_weight=cfg.kl_weight, draws=draws)

    def encode(self, model, x, *, sample=False, generator=None) -> torch.Tensor:
        post = model.posterior(x)
        return post.sample(generator) if sample else post.mean

    def decode(self, model, z) -> torch.Tensor:
        return model.decode(z)

    def posterior(self, model, x) -> Posterior:
        return model.posterior(x)

    def encoder_last_layer(self, model) -> torch.Tensor:
        return model.encoder.aggregator.conv_out.weight
