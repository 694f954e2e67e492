"""FSQ tokenizer: finite scalar quantization between diffusers' Encoder and Decoder.

Mentzer, Minnen, Agustsson, Tschannen 2024, "Finite Scalar Quantization: VQ-VAE Made Simple" (arXiv:2309.15505,
ICLR 2024); reference code: the paper's App. A.1, google-research/google-research fsq/fsq.ipynb.

* Sec. 3: a d-dimensional latent z is bounded per channel by f and rounded, z_hat = round(f(z)), with f(z) =
  floor(L/2) tanh(z), so channel i takes one of L_i values; the codebook is implicit, the product of the per-channel
  value sets, |C| = prod_i L_i (levels [8, 5, 5, 5] -> 1000 codes). Rounding passes gradients straight through:
  round_ste(x) = x + sg(round(x) - x) (Bengio et al. 2013's STE).
* App. A.1 `bound`, which covers even L too: with half_l = (L - 1)(1 - eps) / 2, offset = 0.5 for even L (0 for odd)
  and shift = tan(offset / half_l),  f(z) = tanh(z + shift) * half_l - offset,  eps = 1e-3. For odd L this is
  floor(L/2) tanh(z) shrunk by (1 - eps) so that +-floor(L/2) is reached only in the limit; for even L the range
  (-L/2, L/2 - 1) holds the L integers -L/2 .. L/2 - 1 and f(0) = 0 up to O(x^5) (the reference uses tan where
  atanh would centre it exactly; we keep tan, as the reference, so codes and indices match it).
* `quantize`: z_hat / floor(L/2), codes normalised to [-1, 1] (even L: [-1, 1 - 2/L]); `codes_to_indexes` /
  `indexes_to_codes`: the mixed-radix number sum_i (z_hat_i + floor(L_i/2)) * prod_{j<i} L_j (channel 0 varies
  fastest) and its inverse.
* The paper's recommended levels per target codebook size (its Sec. 4 table): 2^8 [8, 6, 5], 2^10 [8, 5, 5, 5],
  2^12 [7, 5, 5, 5, 5], 2^14 [8, 8, 8, 6, 5], 2^16 [8, 8, 8, 5, 5, 5] (`tokenizer.fsq.levels`).

FSQ has no codebook loss, commitment loss, codebook reseeding or entropy penalty (Sec. 3: none is needed); the
autoencoder trains with the reconstruction (+ perceptual, + GAN) losses of the quantised family alone. Architecture
as ldm's VQ tokenizer: diffusers Encoder -> 1x1 conv to len(levels) channels -> FSQ -> 1x1 conv -> diffusers Decoder
(the paper's MaskGIT / UViM experiments swap VQ for FSQ in the same way, projecting to d = len(levels) channels).
The generator sees the normalised codes, len(levels) channels. Quantisation runs in float32 whatever the autocast
precision, so indices do not depend on bf16 rounding.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from ldm.tokenizers.base import Encoded, TokenizerKind
from ldm.tokenizers.vq import (
    code_histogram,
    diffusers_decoder,
    diffusers_encoder,
    perplexity,
)

FSQ_EPS = 1e-3  # the reference's eps in `bound`


def check_levels(levels) -> list[int]:
    """The levels as a list of ints, or a ValueError naming what is allowed (integers >= 2, at least one)."""
    levels = list(levels)
    if not levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in levels):
        raise ValueError(f"FSQ levels {levels!r}: expected a non-empty list of integers >= 2 (e.g. the paper's "
                         f"[8, 5, 5, 5] = 1000 codes)")
    return levels


# ----------------------------------------------------------------------------------------------------------- maths
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward: x + sg(round(x) - x) (FSQ Sec. 3 / App. A.1 `round_ste`)."""
    return x + (torch.round(x) - x).detach()


def fsq_bound(z: torch.Tensor, levels: torch.Tensor, eps: float = FSQ_EPS) -> torch.Tensor:
    """App. A.1 `bound` per channel (last dim): tanh(z + shift) * half_l - offset, half_l = (L - 1)(1 - eps) / 2,
    offset = 0.5 for even L, shift = tan(offset / half_l)."""
    levels = levels.to(z.dtype)
    half_l = (levels - 1) * (1 - eps) / 2
    offset = torch.where(levels.remainder(2) == 0, 0.5, 0.0).to(z.dtype)
    shift = torch.tan(offset / half_l)
    return torch.tanh(z + shift) * half_l - offset


def fsq_quantize(z: torch.Tensor, levels: torch.Tensor, eps: float = FSQ_EPS) -> torch.Tensor:
    """Normalised codes round_ste(bound(z)) / floor(L/2) (App. A.1 `quantize`); z (..., d), levels (d,)."""
    return round_ste(fsq_bound(z, levels, eps)) / torch.div(levels, 2, rounding_mode="floor").to(z.dtype)


def mixed_radix_basis(levels: torch.Tensor) -> torch.Tensor:
    """(1, L_0, L_0 L_1, ...): the place value of each channel's digit (App. A.1 `_basis`)."""
    return torch.cat([levels.new_ones(1), torch.cumprod(levels[:-1], 0)])


def codes_to_indices(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Normalised codes (..., d) -> int64 indices (...): sum_i (code_i * floor(L_i/2) + floor(L_i/2)) * basis_i."""
    half = torch.div(levels, 2, rounding_mode="floor")
    digits = torch.round(codes.float() * half + half).long()  # (..., d) in [0, L_i - 1]
    return (digits * mixed_radix_basis(levels)).sum(-1)


def indices_to_codes(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """int indices (...) -> normalised float32 codes (..., d), the inverse of `codes_to_indices`."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"code indices must be integers, got {indices.dtype}")
    digits = torch.div(indices.long().unsqueeze(-1), mixed_radix_basis(levels), rounding_mode="floor") % levels
    half = torch.div(levels, 2, rounding_mode="floor")
    return (digits - half).float() / half.float()


def implicit_codebook(levels: torch.Tensor) -> torch.Tensor:
    """All prod(L) codes, (K, d), row k = indices_to_codes(k)."""
    return indices_to_codes(torch.arange(int(torch.prod(levels)), device=levels.device), levels)


# ----------------------------------------------------------------------------------------------------------- modules
class FSQOutput(NamedTuple):
    codes: torch.Tensor     # (B, d, h, w) normalised codes in [-1, 1], straight-through gradient to the encoder
    indices: torch.Tensor   # (B, h, w) int64 code indices in [0, prod(levels))


class FiniteScalarQuantizer(nn.Module):
    """FSQ of (B, d, h, w) latents over the channel axis; no parameters (levels are non-persistent buffers)."""

    def __init__(self, levels: list[int], eps: float = FSQ_EPS):
        super().__init__()
        self.levels_list, self.eps = check_levels(levels), eps
        self.register_buffer("levels", torch.tensor(self.levels_list, dtype=torch.long), persistent=False)
        self.codebook_size = math.prod(self.levels_list)

    def forward(self, z: torch.Tensor) -> FSQOutput:
        if z.dim() != 4 or z.shape[1] != len(self.levels_list):
            raise ValueError(f"FSQ expects latents (B, {len(self.levels_list)}, h, w), got {tuple(z.shape)}")
        h = z.float().permute(0, 2, 3, 1)  # (B, h, w, d), float32 whatever the autocast precision
        codes = fsq_quantize(h, self.levels, self.eps)  # (B, h, w, d)
        indices = codes_to_indices(codes.detach(), self.levels)  # (B, h, w)
        return FSQOutput(codes.permute(0, 3, 1, 2).contiguous().to(z.dtype), indices)  # (B, d, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices (B, h, w) -> (B, d, h, w) float32."""
        return indices_to_codes(indices, self.levels).permute(0, 3, 1, 2).contiguous()  # (B, d, h, w)


class FSQAutoencoder(nn.Module):
    """diffusers Encoder -> 1x1 conv to len(levels) -> FSQ -> 1x1 conv -> diffusers Decoder."""

    def __init__(self, *, block_out_channels: list[int], levels: list[int], layers_per_block: int = 2,
                 norm_num_groups: int = 32, mid_block_attention: bool = True, attn_levels: list[int] = (),
                 z_channels: int = 256, eps: float = FSQ_EPS, in_channels: int = 3):
        super().__init__()
        levels = check_levels(levels)
        self.config = {"block_out_channels": list(block_out_channels), "levels": levels,
                       "layers_per_block": layers_per_block, "norm_num_groups": norm_num_groups,
                       "mid_block_attention": mid_block_attention, "attn_levels": list(attn_levels),
                       "z_channels": z_channels, "eps": eps, "in_channels": in_channels}
        conv = {"block_out_channels": block_out_channels, "layers_per_block": layers_per_block,
                "norm_num_groups": norm_num_groups, "mid_block_attention": mid_block_attention,
                "attn_levels": attn_levels}
        self.encoder = diffusers_encoder(in_channels=in_channels, z_channels=z_channels, **conv)
        self.quant_conv = nn.Conv2d(z_channels, len(levels), 1)
        self.quantizer = FiniteScalarQuantizer(levels, eps)
        self.post_quant_conv = nn.Conv2d(len(levels), z_channels, 1)
        self.decoder = diffusers_decoder(z_channels=z_channels, out_channels=in_channels, **conv)
        self.downsample = 2 ** (len(block_out_channels) - 1)
        self.latent_channels = len(levels)

    def encode(self, x: torch.Tensor) -> FSQOutput:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, d, h, w) and indices (B, h, w)."""
        return self.quantizer(self.quant_conv(self.encoder(x)))  # (B, d, h, w)

    def decode(self, z_or_indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, d, h, w) or indices (B, h, w) -> images (B, 3, H, W)."""
        if z_or_indices.dim() == 3:
            z_or_indices = self.quantizer.lookup(z_or_indices).to(self.post_quant_conv.weight.dtype)
        elif z_or_indices.dim() != 4:
            raise ValueError(f"decode expects codes (B, C, h, w) or indices (B, h, w), got {tuple(z_or_indices.shape)}")
        return self.decoder(self.post_quant_conv(z_or_indices))  # (B, 3, H, W)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, FSQOutput]:
        q = self.encode(x)
        return self.decode(q.codes), q


class FSQKind(TokenizerKind):
    """`tokenizer.kind: fsq`: the FSQAutoencoder above; no loss term of its own (FSQ Sec. 3). Exports to ldm's own
    folder (tokenizer_config.json + tokenizer.safetensors). EQ-VAE applies (Kouzelis et al. 2025 regularise
    discrete VQ-GAN tokenizers too); VA-VAE's VF loss is defined for continuous KL latents (Yao et al. 2025), so it
    is refused."""

    name, family, module_type = "fsq", "quantised", FSQAutoencoder
    regularisers = ("eq",)

    def build(self, cfg, image_size: int) -> nn.Module:
        return FSQAutoencoder(block_out_channels=cfg.block_out_channels, levels=cfg.fsq.levels,
                              layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                              mid_block_attention=cfg.mid_block_attention, attn_levels=cfg.attn_levels,
                              z_channels=cfg.latent_channels)

    def configured_latent_channels(self, cfg) -> tuple[str, Any, int]:
        return "tokenizer.fsq.levels", list(cfg.fsq.levels), len(cfg.fsq.levels)

    def encode_train(self, model, x, *, cfg, draws) -> Encoded:
        q = model.encode(x)
        counts = code_histogram(q.indices, model.quantizer.codebook_size)  # this batch's codes (logged only)
        return Encoded(q.codes, q.codes.new_zeros((), dtype=torch.float32),
                       {"fsq_usage": (counts > 0).float().mean(), "fsq_perplexity": perplexity(counts)})

    def encode(self, model, x, *, sample=False, generator=None) -> torch.Tensor:
        return model.encode(x).codes

    def indices(self, model, x) -> torch.Tensor:
        return model.encode(x).indices

    def codebook_size(self, model) -> int:
        return model.quantizer.codebook_size
