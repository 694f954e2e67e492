"""Text conditioning of the generators: the caption condition, the DiT's caption embedder with classifier-free-
guidance dropout to a learned null caption and its cross-attention layer, the text UNet (diffusers'
UNet2DConditionModel with the same caption conventions), and the prompt table that lets guidance treat captions as
classes.

Paper: Chen et al. 2023, "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis" (arXiv:2310.00426) §2.3 and Fig. 4, reference PixArt-alpha/PixArt-alpha diffusion/model/nets/PixArt.py and
PixArt_blocks.py (facts only; the code is ours):
  - a caption projection MLP (Linear(D_text, D) - GELU(tanh) - Linear(D, D), `CaptionEmbedder.y_proj`) maps the text
    encoder's per-token embeddings to the transformer width once, before the blocks;
  - each block gets a multi-head cross-attention layer AFTER its self-attention and before its MLP: queries from the
    image tokens as they are (no norm, no modulation, no gate), keys and values from the projected caption tokens,
    padding masked out, output projection zero-initialised so a new block starts as the identity
    (`MultiHeadCrossAttention`, `initialize_weights`); the caption MLP's weights are initialised N(0, 0.02^2);
  - captions are dropped for CFG with the model's dropout probability (PixArt: 0.1, `class_dropout_prob`), replaced
    by a null caption of the same length in the text encoder's space, i.e. before the projection (`token_drop`).
Departures, each a choice of ours:
  - the null caption is LEARNED (an nn.Parameter trained with the network), initialised as PixArt's fixed buffer
    `y_embedding` (N(0, 1 / D_text) per entry); PixArt registers it as a buffer, so it stays random. Dropped
    captions keep no padding mask (every null position is attended to); PixArt keeps the caption's own mask;
  - the pooled text embedding (CLIP's pooled output; for T5 the masked token mean, ldm/encoders/text.py) is added to
    the adaLN condition through a Linear - SiLU - Linear projection (SD3's `CombinedTimestepTextProjEmbeddings`,
    Esser et al. 2024 arXiv:2403.03206 §4, Fig. 2a); PixArt-alpha uses no pooled embedding. The projection's last
    layer starts at zero so the condition starts as the time embedding alone. Off with use_pooled=False;
  - adaLN stays DiT's per-block adaLN-Zero (ldm/models/dit.py) rather than PixArt's adaLN-single (one shared
    modulation MLP plus a learned per-block table): the class-conditional blocks are reused unchanged;
  - PixArt packs the valid caption tokens of the batch into one sequence with xformers' block-diagonal mask; we
    attend to the padded (B, L) tokens with a key-padding mask (torch SDPA), which computes the same attention.
The null drop uses the label dropout of ldm/models/layers.py (`drop_labels`) on a dummy label per sample, so a
caption drop draws exactly as a label drop does: per sample from its own generator in training, forced at sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.layers import check_generator_inputs, drop_labels


class TextCondition(NamedTuple):
    """The condition of a text-conditioned generator: what ldm.encoders.text.TextEncoder returns for a batch."""

    tokens: torch.Tensor               # (B, L, D_text) per-token embeddings
    mask: torch.Tensor                 # (B, L) bool, True = a real token
    pooled: torch.Tensor | None = None  # (B, Dp) pooled embedding


def caption_drop_mask(batch: int, prob: float, force_drop: torch.Tensor | None,
                      generator: torch.Generator | Sequence[torch.Generator] | None,
                      device: torch.device) -> torch.Tensor:
    """(B,) bool: which captions are replaced by the null caption, drawn as `drop_labels` draws a label drop."""
    dummy = torch.zeros(batch, dtype=torch.long, device=device)
    return drop_labels(dummy, 1, prob, force_drop, generator).bool()


def caption_or_null(cond: TextCondition | None, null_tokens: torch.Tensor, null_pooled: torch.Tensor | None, *,
                    batch: int, drop_prob: float, force_drop: torch.Tensor | None, generator,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens (B, S, D_text), mask (B, S), pooled (B, Dp) or None) after the CFG drop: dropped rows (and every row
    when cond is None) hold the null caption `null_tokens` (S, D_text) / `null_pooled` (Dp,), attended to in full;
    pooled is None when the network takes none (null_pooled None)."""
    S, D = null_tokens.shape
    if cond is None:
        tokens = null_tokens.expand(batch, -1, -1)  # (B, S, D_text)
        mask = torch.ones(batch, S, dtype=torch.bool, device=device)
        return tokens, mask, None if null_pooled is None else null_pooled.expand(batch, -1)
    if cond.tokens.shape[1:] != (S, D):
        raise ValueError(f"caption tokens have shape {tuple(cond.tokens.shape)}; this generator takes (B, {S}, {D}) "
                         f"(text.max_tokens x the encoder's width)")
    drop = caption_drop_mask(batch, drop_prob, force_drop, generator, device)  # (B,)
    tokens = torch.where(drop[:, None, None], null_tokens.to(cond.tokens.dtype), cond.tokens)  # (B, S, D_text)
    mask = cond.mask.bool() | drop[:, None]  # (B, S): the null caption is attended to in full
    if null_pooled is None:
        return tokens, mask, None
    if cond.pooled is None:
        raise ValueError("this generator adds the pooled caption embedding to its condition; the TextCondition has "
                         "none")
    return tokens, mask, torch.where(drop[:, None], null_pooled.to(cond.pooled.dtype), cond.pooled)


class CrossAttention(nn.Module):
    """Multi-head cross-attention of image tokens (queries) to caption tokens (keys, values), PixArt's
    `MultiHeadCrossAttention`: q Linear(D, D), fused kv Linear(D, 2D), out Linear(D, D); padding keys masked."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) image tokens, context (B, S, D) caption tokens, mask (B, S) bool -> (B, L, D)."""
        B, L, D = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k, v = self.kv(context).view(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class CaptionEmbedder(nn.Module):
    """Caption projection, pooled projection and the learned null caption (module docstring)."""

    def __init__(self, caption_dim: int, caption_tokens: int, hidden_size: int, *,
                 pooled_dim: int | None = None) -> None:
        super().__init__()
        self.caption_dim, self.caption_tokens = caption_dim, caption_tokens
        self.fc1 = nn.Linear(caption_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.null_tokens = nn.Parameter(torch.randn(caption_tokens, caption_dim) / caption_dim ** 0.5)
        if pooled_dim:
            self.pooled_fc1 = nn.Linear(pooled_dim, hidden_size)
            self.pooled_fc2 = nn.Linear(hidden_size, hidden_size)
            self.null_pooled = nn.Parameter(torch.randn(pooled_dim) / pooled_dim ** 0.5)
        else:
            self.pooled_fc1 = self.pooled_fc2 = self.null_pooled = None

    def initialize_weights(self) -> None:
        """PixArt: caption MLP weights N(0, 0.02^2) (biases 0 from the DiT init); the pooled projection's output
        layer zero, so the adaLN condition starts as the time embedding."""
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)
        if self.pooled_fc2 is not None:
            nn.init.zeros_(self.pooled_fc2.weight)
            nn.init.zeros_(self.pooled_fc2.bias)

    def forward(self, cond: TextCondition | None, *, batch: int, drop_prob: float,
                force_drop: torch.Tensor | None, generator, device: torch.device):
        """(pooled embedding (B, D) or None, caption tokens (B, S, D), mask (B, S)); cond None = all null."""
        tokens, mask, pooled = caption_or_null(cond, self.null_tokens, self.null_pooled, batch=batch,
                                               drop_prob=drop_prob, force_drop=force_drop, generator=generator,
                                               device=device)
        dtype = self.fc1.weight.dtype
        context = self.fc2(F.gelu(self.fc1(tokens.to(dtype)), approximate="tanh"))  # (B, S, D)
        pooled_emb = None
        if pooled is not None:
            pooled_emb = self.pooled_fc2(F.silu(self.pooled_fc1(pooled.to(dtype))))  # (B, D)
        return pooled_emb, context, mask


class TextUNetGenerator(nn.Module):
    """Text-conditioned UNet: diffusers' `UNet2DConditionModel` (the Stable Diffusion UNet; Rombach et al. 2022,
    arXiv:2112.10752 §3.3: cross-attention of the UNet's transformer blocks to the caption tokens, which enter
    unprojected as `encoder_hidden_states` with their padding mask) with the DiT's caption conventions: the learned
    null caption and caption dropout of `caption_or_null`, and the pooled embedding through diffusers' "projection"
    class embedding (a Linear - SiLU - Linear added to the time embedding, as SDXL adds its pooled text embedding).
    Levels with attention use CrossAttnDown/UpBlock2D, the others plain ResNet blocks; the mid block cross-attends.
    Interface of ldm/models (`forward(x, t, y, *, force_drop, generator)`, t in [0, 1] with t = 1 noise; the time
    projection receives t_scale * t) with y a TextCondition or None (all null)."""

    def __init__(self, *, input_size: int, in_channels: int, caption_dim: int, caption_tokens: int,
                 pooled_dim: int | None = None, class_dropout_prob: float = 0.1, learn_sigma: bool = False,
                 block_out_channels: Sequence[int] = (64, 128), layers_per_block: int = 2,
                 attention_head_dim: int = 32, norm_num_groups: int = 32, t_scale: float = 1000.0) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        levels = len(block_out_channels)
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size={input_size} is not divisible by 2**(levels-1)={2 ** (levels - 1)}")
        attention = [i > 0 for i in range(levels)]  # as UNetGenerator: attention below the top level
        self.input_size, self.in_channels, self.learn_sigma = input_size, in_channels, learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.class_dropout_prob, self.t_scale = 0, class_dropout_prob, t_scale
        self.null_tokens = nn.Parameter(torch.randn(caption_tokens, caption_dim) / caption_dim ** 0.5)
        self.null_pooled = nn.Parameter(torch.randn(pooled_dim) / pooled_dim ** 0.5) if pooled_dim else None
        self.unet = UNet2DConditionModel(
            sample_size=input_size, in_channels=in_channels, out_channels=self.out_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            cross_attention_dim=caption_dim, attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            class_embed_type="projection" if pooled_dim else None, projection_class_embeddings_input_dim=pooled_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: TextCondition | None = None, *,
                return_hidden: bool = False, force_drop: torch.Tensor | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents, t (B,) or scalar in [0, 1], y a TextCondition or None -> (B, C_out, H, W)."""
        if return_hidden:
            raise ValueError("return_hidden (REPA) is not available for the text UNet")
        if y is not None and not isinstance(y, TextCondition):
            raise ValueError("this UNet is text-conditioned: y must be a TextCondition (caption embeddings) or None")
        t = check_generator_inputs(x, t, self.in_channels, self.input_size)  # (B,)
        tokens, mask, pooled = caption_or_null(
            y, self.null_tokens, self.null_pooled, batch=x.shape[0],
            drop_prob=self.class_dropout_prob if self.training else 0.0, force_drop=force_drop, generator=generator,
            device=x.device)  # (B, S, D_text), (B, S), (B, Dp) | None
        return self.unet(x, self.t_scale * t, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                         class_labels=pooled, return_dict=False)[0]  # (B, C_out, H, W)


class PromptTable(nn.Module):
    """A text-conditioned generator seen as a class-conditional one over a fixed list of prompts: net(x, t, ids)
    with ids (B,) in [0, P] runs the network on prompt ids[i] (id P = the null caption). Sampling and classifier-free
    guidance (ldm/diffusion/guidance.py) then treat the P prompts as P classes, unchanged."""

    def __init__(self, model: nn.Module, prompts: TextCondition) -> None:
        super().__init__()
        self.model, self.prompts = model, prompts
        self.num_prompts = prompts.tokens.shape[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None, **kwargs) -> torch.Tensor:
        if ids is None:
            return self.model(x, t, None, **kwargs)
        null = ids == self.num_prompts  # (B,)
        rows = ids.clamp(max=self.num_prompts - 1).to(self.prompts.tokens.device)
        pooled = None if self.prompts.pooled is None else self.prompts.pooled[rows]
        cond = TextCondition(self.prompts.tokens[rows], self.prompts.mask[rows], pooled)  # (B, L, D_text), ...
        return self.model(x, t, cond, force_drop=null, **kwargs)
