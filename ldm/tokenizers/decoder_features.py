"""The frozen decoder run for objectives through it: intermediate feature maps (LPL) and a decode with gradients.

Keyed on the decoder's module structure, not on a tokenizer kind: any autoencoder whose latents reach the image
through an optional 1x1 `post_quant_conv` and a diffusers-style `decoder` with named blocks

    decoder.conv_in -> decoder.mid_block -> decoder.up_blocks[0 .. N-1] -> conv_norm_out -> conv_act -> conv_out

qualifies (diffusers' AutoencoderKL, ldm's VQAutoencoder, any later kind built on diffusers' Decoder). Feature block
b is the output of `mid_block` for b = 0 and of `up_blocks[b - 1]` for b = 1 .. N, so block 0 is at the latent
resolution and each upsampling up block doubles it (SD-VAE: blocks 0 .. 4 at 32, 64, 128, 256, 256 px for 256 px
images). These are the features Berrada et al. 2025 (arXiv:2411.04873) read: the mid block and the up blocks, as in
the authors' reference code (diffusers examples/research_projects/lpl, `get_features`). One departure from that code:
the latent goes through `post_quant_conv` first, as every decode does (the reference feeds `decoder.conv_in`
directly, so its features are not those of the decoder that makes the images when post_quant_conv is present).

`decoder_features` runs only up to the last requested block. Both functions run under whatever grad mode the caller
has: the decoder's parameters are frozen (requires_grad False, held outside the task's state), so gradients reach the
latent, i.e. the generator, only. `checkpoint=True` recomputes each block in the backward pass instead of storing its
activations (torch.utils.checkpoint, non-reentrant): the same gradients for less memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

DECODER_PARTS = ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")


def _decoder(autoencoder: nn.Module, key: str) -> nn.Module:
    """The autoencoder's diffusers-style decoder, or a one-line ValueError naming the config key `key`."""
    dec = getattr(autoencoder, "decoder", None)
    if dec is None or not all(hasattr(dec, part) for part in DECODER_PARTS) or \
            not isinstance(dec.up_blocks, (nn.ModuleList, list, tuple)):
        raise ValueError(f"{key}: the tokenizer's decoder ({type(dec if dec is not None else autoencoder).__name__}) "
                         f"has no named feature blocks (expected a diffusers-style decoder with "
                         f"{', '.join(DECODER_PARTS)}); use a tokenizer built on one (kl, vq) or turn the option off")
    return dec


def num_feature_blocks(autoencoder: nn.Module, key: str = "diffusion.lpl.blocks") -> int:
    """Feature blocks of the decoder: the mid block plus one per up block."""
    return 1 + len(_decoder(autoencoder, key).up_blocks)


def check_blocks(autoencoder: nn.Module, blocks: Sequence[int], key: str = "diffusion.lpl.blocks") -> list[int]:
    """The requested feature blocks, sorted and unique, or a one-line ValueError naming `key` and the allowed range."""
    n = num_feature_blocks(autoencoder, key)
    bad = [b for b in blocks if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < n]
    if bad or not blocks:
        raise ValueError(f"{key}={list(blocks)!r}: {bad or 'empty'}; the tokenizer's decoder has feature blocks "
                         f"0 .. {n - 1} (0 = mid block, b = up block b-1); choose indices in that range")
    return sorted(set(blocks))


def _run(module: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    # diffusers' mid/up blocks take (hidden, temb); temb is None for an image autoencoder
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(module, x, None, use_reentrant=False)
    return module(x, None)


def _decoder_input(autoencoder: nn.Module, dec: nn.Module, z: torch.Tensor) -> torch.Tensor:
    z = z.to(next(dec.parameters()).dtype)
    post = getattr(autoencoder, "post_quant_conv", None)
    return dec.conv_in(post(z) if post is not None else z)


def decoder_features(autoencoder: nn.Module, z: torch.Tensor, blocks: Sequence[int], *, checkpoint: bool = False,
                     key: str = "diffusion.lpl.blocks") -> list[torch.Tensor]:
    """Feature maps (B, C_b, H_b, W_b) of `blocks` (sorted) for latents z (B, C, h, w) in the tokenizer's latent
    space (not the generator's normalised one); the decoder stops after the last requested block."""
    dec = _decoder(autoencoder, key)
    blocks = check_blocks(autoencoder, blocks, key)
    h = _decoder_input(autoencoder, dec, z)  # (B, C_0, h, w)
    h = _run(dec.mid_block, h, checkpoint)  # block 0, (B, C_0, h, w)
    out = [h] if blocks[0] == 0 else []
    for b in range(1, blocks[-1] + 1):
        h = _run(dec.up_blocks[b - 1], h, checkpoint)  # (B, C_b, H_b, W_b)
        if b in blocks:
            out.append(h)
    return out


def decode(autoencoder: nn.Module, z: torch.Tensor, *, checkpoint: bool = False,
           key: str = "diffusion.pixel_loss") -> torch.Tensor:
    """Images (B, 3, H, W) for latents z in the tokenizer's latent space, with gradients to z when grad mode is on:
    the same modules in the same order as the tokenizer's own decode (post_quant_conv, then diffusers'
    Decoder.forward without its latent_embeds)."""
    dec = _decoder(autoencoder, key)
    h = _run(dec.mid_block, _decoder_input(autoencoder, dec, z), checkpoint)
    for up in dec.up_blocks:
        h = _run(up, h, checkpoint)
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
