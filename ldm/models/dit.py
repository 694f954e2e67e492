"""DiT: Diffusion Transformer with adaLN-Zero conditioning, plus the LightningDiT switches.

Paper: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748), reference
facebookresearch/DiT models.py. LightningDiT switches from Yao et al. 2025, "Reconstruction vs. Generation"
(arXiv:2501.01423), reference hustvl/LightningDiT models/lightningdit.py: SwiGLU feed-forward, RMSNorm (in the blocks,
the final layer and the QK-norm), 2-D RoPE on queries and keys (added on top of the absolute sin-cos embedding),
QK-norm.

Pipeline, read top to bottom in `DiT.forward`:
  latents (B, C, H, W) -> patchify (conv P x P, stride P) -> + fixed 2-D sin-cos pos emb -> N adaLN-Zero blocks
  conditioned on c = emb(t) + emb(y) -> final adaLN + linear -> unpatchify -> (B, C_out, H, W).

Interface shared with the UNet adapter (ldm/models/unet.py): `forward(x, t, y, *, return_hidden=False)`, t (B,) in
[0, 1] in OUR convention (t = 0 data, t = 1 noise; ldm/diffusion/paths.py). The timestep embedder receives
`t_shift + t_scale * t`:
  - t_scale = 1000, t_shift = 0 (default): flow / diffusion models trained here; scaling spreads the sinusoidal
    features over their full range, as DiT's integer steps do.
  - t_scale = 1000, t_shift = -1: DiT/ADM's discrete step index i = 1000 t - 1, i.e. the DDPM knots t_i = (i + 1) / T
    of ldm/diffusion/paths.py (`DiscretePath.model_time`); used for imported DiT weights.
  - t_scale = 1, t_shift = 0: SiT / LightningDiT feed their t in [0, 1] unscaled.
  - t_scale = -1, t_shift = 1: feeds 1 - t, the time flip used when importing SiT / LightningDiT weights, whose
    data sits at t = 1 (see ldm/models/checkpoints.py).

Departures from the reference, all numerically neutral: fused QKV as one Linear (the reference does the same via
timm), `F.scaled_dot_product_attention` (or xformers / plain ops: `attn_backend`, layers.ATTENTION_BACKENDS; the
kernels agree to float rounding), SiLU(c) computed once instead of inside every
adaLN branch, the position embedding kept as a buffer rather than a frozen Parameter, the null label row always
present (id = num_classes), and learned-sigma outputs kept whole (B, 2C, H, W) as DiT does; the SiT/LightningDiT
habit of discarding the second half inside forward is handled at import time instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.models.layers import (
    ATTENTION_BACKENDS,
    GeluMlp,
    GeneratorOutput,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    check_attention_backend,
    check_generator_inputs,
    check_label_settings,
    condition_labels,
    modulate,
    rope_2d_angles,
    sincos_pos_embed_2d,
    swiglu_hidden,
)
from ldm.models.text_cond import CaptionEmbedder, CrossAttention, TextCondition


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """Pre-modulation norm: affine-free LayerNorm (DiT) or RMSNorm with a learnable gain (LightningDiT)."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV, optional QK-norm and 2-D RoPE (LightningDiT `Attention`); the kernel
    is layers.ATTENTION_BACKENDS[backend]."""

    def __init__(self, dim: int, num_heads: int, *, use_qknorm: bool, use_rmsnorm: bool, backend: str) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm: RMSNorm with the RMSNorm switch, else LayerNorm with affine and torch's default eps, as LightningDiT.
        qk_norm = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.q_norm = qk_norm(self.head_dim) if use_qknorm else nn.Identity()
        self.k_norm = qk_norm(self.head_dim) if use_qknorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        q, k, v = qkv.unbind(0)  # (B, H, L, Dh) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(ATTENTION_BACKENDS[self.backend](q, k, v))  # (B, L, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (DiT Fig. 3): gates, shifts and scales regressed from c, gates zero-init."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, *, use_swiglu: bool, use_rmsnorm: bool, use_qknorm: bool,
        attn_backend: str, cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(dim, use_rmsnorm)
        self.attn = Attention(dim, num_heads, use_qknorm=use_qknorm, use_rmsnorm=use_rmsnorm, backend=attn_backend)
        # text models: PixArt-alpha's cross-attention to the caption tokens, after self-attention (text_cond.py)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attention else None
        self.norm2 = _norm(dim, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        else:
            self.mlp = GeluMlp(dim, int(dim * mlp_ratio))
        self.ada_ln = nn.Linear(dim, 6 * dim)  # applied to SiLU(c)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None):
        mod = self.ada_ln(c_act).unsqueeze(1)  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # (B, 1, D) each
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope))  # (B, L, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, *context)  # (B, L, D); context = (caption tokens (B, S, D), mask (B, S))
        x = torch.addcmul(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to P*P*C_out values per token (DiT `FinalLayer`)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, use_rmsnorm: bool) -> None:
        super().__init__()
        self.norm = _norm(dim, use_rmsnorm)
        self.ada_ln = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(c_act).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, P*P*C_out)


class DiT(nn.Module):
    """Class-conditional (or unconditional, num_classes=0) diffusion transformer on square latents.

    Label ids are 0..num_classes-1; id num_classes is the null label used for classifier-free guidance. During
    training (`self.training`) labels are replaced by the null id with probability `class_dropout_prob`, drawn from
    `generator` or torch's global RNG; `force_drop` (B,) bool forces it in any mode. y=None means all null labels.

    Text-conditioned (caption_dim set, num_classes=0; ldm/models/text_cond.py, PixArt-alpha): y is a TextCondition
    (caption tokens (B, caption_tokens, caption_dim), mask, pooled (B, pooled_dim)); every block cross-attends to the
    projected caption tokens and the pooled embedding joins the adaLN condition; captions drop to the learned null
    caption as labels drop (class_dropout_prob, force_drop, generator); y=None means all null captions.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        t_scale: float = 1000.0,
        t_shift: float = 0.0,
        use_swiglu: bool = False,
        use_rmsnorm: bool = False,
        use_rope: bool = False,
        use_qknorm: bool = False,
        repa_depth: int | None = None,
        attn_backend: str = "sdpa",
        grad_checkpointing: bool = False,
        use_compile: bool = False,
        caption_dim: int | None = None,
        caption_tokens: int = 0,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        check_label_settings(num_classes, class_dropout_prob)
        if caption_dim is not None and (num_classes or caption_tokens < 1):
            raise ValueError(f"a text-conditioned DiT (caption_dim={caption_dim}) takes num_classes=0 (got "
                             f"{num_classes}) and caption_tokens >= 1 (got {caption_tokens})")
        if repa_depth is not None and not 1 <= repa_depth <= depth:
            raise ValueError(f"repa_depth={repa_depth}; expected a block index in [1, depth={depth}]")
        check_attention_backend(attn_backend)
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.class_dropout_prob = num_classes, class_dropout_prob
        self.t_scale, self.t_shift = t_scale, t_shift
        self.repa_depth = repa_depth
        self.grad_checkpointing = grad_checkpointing
        grid = input_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid)[None])  # (1, L, D), fixed
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.caption_embedder = (None if caption_dim is None else
                                 CaptionEmbedder(caption_dim, caption_tokens, hidden_size, pooled_dim=pooled_dim))
        if use_rope:
            angles = rope_2d_angles(hidden_size // num_heads, grid)  # (L, Dh/2)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_swiglu=use_swiglu, use_rmsnorm=use_rmsnorm,
                     use_qknorm=use_qknorm, attn_backend=attn_backend, cross_attention=caption_dim is not None)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.initialize_weights()
        if use_compile:
            self.compile_blocks()

    def compile_blocks(self, compile_fn: Callable[[nn.Module], None] = nn.Module.compile) -> list[str]:
        """torch.compile each block in place (nn.Module.compile by default): parameter names, hence checkpoints, are
        unchanged, and the blocks, all of one shape, share one compiled graph. Returns their names ("blocks.<i>")."""
        for block in self.blocks:
            compile_fn(block)
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def initialize_weights(self) -> None:
        """DiT's initialisation (models.py `initialize_weights`)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight.data  # like nn.Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.caption_embedder is not None:  # PixArt-alpha: caption MLP N(0, 0.02^2), cross-attention output zero
            self.caption_embedder.initialize_weights()
            for block in self.blocks:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # adaLN-Zero: every block's modulation starts at zero, so gates are 0 and each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln.weight)
            nn.init.zeros_(block.ada_ln.bias)
        # Zero output layer: the network outputs 0 at initialisation.
        nn.init.zeros_(self.final_layer.ada_ln.weight)
        nn.init.zeros_(self.final_layer.ada_ln.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, P*P*C) with per-token layout (p, q, c) -> (B, C, H, W)."""
        B, P, g = x.shape[0], self.patch_size, self.input_size // self.patch_size
        x = x.view(B, g, g, P, P, self.out_channels)  # (B, h, w, P, P, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_channels, g * P, g * P)  # (B, C, H, W)

    def embed_condition(
        self, t: torch.Tensor, y: torch.Tensor | None, force_drop: torch.Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """c = emb(t_shift + t_scale t) + emb(y after label dropout); t (B,), y (B,) or None -> (B, D)."""
        c = self.t_embedder(self.t_shift + self.t_scale * t)  # (B, D)
        y = condition_labels(y, batch=t.shape[0], num_classes=self.num_classes, force_drop=force_drop,
                             dropout_prob=self.class_dropout_prob if self.training else 0.0, generator=generator,
                             device=t.device, net="DiT")  # (B,) or None
        return c if y is None else c + self.y_embedder(y)  # (B, D)

    def embed_caption(
        self, t: torch.Tensor, y: TextCondition | None, force_drop: torch.Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Text models: (c = emb(t) + pooled projection (B, D), (caption tokens (B, S, D), mask (B, S))) after
        caption dropout (text_cond.CaptionEmbedder)."""
        if y is not None and not isinstance(y, TextCondition):
            raise ValueError("this DiT is text-conditioned: y must be a TextCondition (caption embeddings) or None")
        c = self.t_embedder(self.t_shift + self.t_scale * t)  # (B, D)
        pooled, tokens, mask = self.caption_embedder(
            y, batch=t.shape[0], drop_prob=self.class_dropout_prob if self.training else 0.0, force_drop=force_drop,
            generator=generator, device=t.device)
        return (c if pooled is None else c + pooled), (tokens, mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
        force_drop: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor | GeneratorOutput:
        """x (B, C, H, W) latents, t (B,) or scalar in [0, 1] (0 data, 1 noise), y (B,) long or None."""
        t = check_generator_inputs(x, t, self.in_channels, self.input_size)  # (B,)
        if return_hidden and self.repa_depth is None:
            raise ValueError("return_hidden=True needs a DiT built with repa_depth=k (the block whose output is used)")

        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, D)
        context = None
        if self.caption_embedder is None:
            c_act = F.silu(self.embed_condition(t, y, force_drop, generator))  # (B, D)
        else:
            c, context = self.embed_caption(t, y, force_drop, generator)  # (B, D), ((B, S, D), (B, S))
            c_act = F.silu(c)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        hidden = None
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c_act, rope, context, use_reentrant=False)  # (B, L, D)
            else:
                h = block(h, c_act, rope, context)  # (B, L, D)
            if i + 1 == self.repa_depth:
                hidden = h
        out = self.unpatchify(self.final_layer(h, c_act))  # (B, C_out, H, W)
        return GeneratorOutput(out, hidden) if return_hidden else out


# ----------------------------------------------------------------------------------------------------------------
# Presets: (depth, hidden_size, num_heads) from DiT Table 1; LightningDiT adds SwiGLU + RMSNorm + RoPE
# (configs/lightningdit_xl_vavae_f16d32.yaml: use_qknorm false). "Ti" and "Pico" are small CPU sizes of ours.
# ----------------------------------------------------------------------------------------------------------------

_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
          "Ti": (6, 192, 3), "Pico": (2, 64, 2)}
_LIGHTNING = dict(use_swiglu=True, use_rmsnorm=True, use_rope=True)

DIT_PRESETS = {
    f"DiT-{size}/{p}": partial(DiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
    for size, (d, w, h) in _SIZES.items() for p in (1, 2, 4, 8)
}
DIT_PRESETS.update({
    f"LightningDiT-{size}/{p}": partial(DiT, depth=d, hidden_size=w, num_heads=h, patch_size=p, **_LIGHTNING)
    for size, (d, w, h) in _SIZES.items() for p in (1, 2)
})


def build_dit(name: str, **overrides) -> DiT:
    """Build a preset by name (e.g. "DiT-XL/2", "LightningDiT-B/1"); keyword overrides go to `DiT.__init__`."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; expected one of {sorted(DIT_PRESETS)}")
    return DIT_PRESETS[name](**overrides)
