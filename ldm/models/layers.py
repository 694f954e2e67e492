"""Building blocks shared by the generator networks (DiT, LightningDiT, the UNet adapter).

Pure functions first (adaLN modulation, sinusoidal embeddings, 2-D RoPE, the attention kernels, label dropout and the
label convention), then the small modules built on them (timestep / label embedders, RMSNorm, the GELU and SwiGLU
feed-forward nets).

Sources (facts and formulas only; the code is ours):
- adaLN(-Zero), timestep and label embedders, 2-D sin-cos position embedding: Peebles & Xie 2023, "Scalable Diffusion
  Models with Transformers" (arXiv:2212.09748) §3.2, reference facebookresearch/DiT models.py (`modulate`,
  `TimestepEmbedder`, `LabelEmbedder`, `get_2d_sincos_pos_embed*`, itself from MAE util/pos_embed.py).
- RMSNorm: Zhang & Sennrich 2019 (arXiv:1910.07467), as hustvl/LightningDiT models/rmsnorm.py (Llama style: computed
  in float32, learnable gain, eps 1e-6).
- SwiGLU: Shazeer 2020 (arXiv:2002.05202) Eq. (6), fused `w12` projection as LightningDiT models/swiglu_ffn.py.
- Attention: softmax(Q K^T / sqrt(d)) V, Vaswani et al. 2017 (arXiv:1706.03762) Eq. (1); `ATTENTION_BACKENDS` are
  three kernels for it (torch SDPA, xformers memory_efficient_attention, plain ops).
- 2-D RoPE: Su et al. 2021 (arXiv:2104.09864) Eq. (34) applied per image axis, laid out as EVA-02's
  `VisionRotaryEmbeddingFast` used by LightningDiT models/pos_embed.py (first half of each head rotates with the row
  index, second half with the column index; channel pairs (2i, 2i+1) share frequency theta^(-4i/head_dim)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class GeneratorOutput(NamedTuple):
    """What a generator returns when asked for its hidden tokens (`return_hidden=True`)."""

    output: torch.Tensor  # (B, C_out, H, W) network output
    hidden: torch.Tensor  # (B, L, D) tokens after block `repa_depth` (REPA, arXiv:2410.06940 §3.2)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (DiT §3.2); x (B, L, D), shift/scale (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) scalars, GLIDE/DiT layout [cos | sin].

    emb(t)_i = cos(t * w_i), emb(t)_{i + dim/2} = sin(t * w_i), w_i = max_period^(-i / (dim/2)), i < dim/2.
    t: (B,) -> (B, dim). Odd `dim` gets a trailing zero column, as DiT.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding [sin(p w_i) | cos(p w_i)], w_i = 10000^(-i / (dim/2)) (MAE/DiT). pos (M,) -> (M, dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a square token grid (DiT models.py `get_2d_sincos_pos_embed`).

    Token k = r * grid_size + c (row-major, as a flattened conv output). The first dim/2 channels embed the COLUMN c,
    the last dim/2 the ROW r (the reference's meshgrid puts w first). Returns (grid_size**2, dim) in float32.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    idx = torch.arange(grid_size, dtype=torch.float64)
    rows = idx.repeat_interleave(grid_size)  # (L,) r for token k
    cols = idx.repeat(grid_size)  # (L,) c for token k
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()  # (L, dim)


def rope_2d_angles(head_dim: int, grid_size: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (L, head_dim/2) of 2-D axial RoPE on a square grid, LightningDiT/EVA-02 layout.

    Channel pair j = (2j, 2j+1) of a head is rotated by angle[k, j] for token k = r * grid_size + c. Pairs in the first
    half of the head (j < head_dim/4) turn with the row r, pairs in the second half with the column c; in each half
    pair i has frequency f_i = theta^(-2i / (head_dim/2)), so angle = r f_i (first half) or c f_i (second half).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (head_dim/4,)
    pos = torch.arange(grid_size, dtype=torch.float32)
    ang = pos[:, None] * freqs[None]  # (grid, head_dim/4)
    ang_r = ang[:, None, :].expand(grid_size, grid_size, half // 2)  # (grid_r, grid_c, head_dim/4)
    ang_c = ang[None, :, :].expand(grid_size, grid_size, half // 2)
    return torch.cat([ang_r, ang_c], dim=-1).reshape(grid_size * grid_size, half)  # (L, head_dim/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (Su et al. Eq. 34): rotate channel pair (x_2j, x_2j+1) of x (..., L, Dh) by the angle whose cos/sin
    tables (L, Dh/2) are given, i.e. multiply x_2j + i x_2j+1 by cos + i sin. Computed as one complex product in
    float32 (there is no complex bf16), returned in x's dtype. The tables stay real so `module.to(dtype)` keeps them."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., L, Dh/2) complex
    return torch.view_as_real(xc * torch.complex(cos.float(), sin.float())).flatten(-2).type_as(x)  # (..., L, Dh)


class MissingExtraError(ImportError, ValueError):
    """A setting needs an optional package that is not installed. An ImportError (the package is missing) and a
    ValueError (the setting cannot be used as given), so ldm's CLI reports it in one line with the install command."""


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(Dh)) V (Vaswani et al. Eq. 1) in plain torch ops; q, k, v (B, H, L, Dh) -> (B, L, H*Dh)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, L)
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)  # (B, L, H*Dh)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's F.scaled_dot_product_attention (flash / memory-efficient / math kernel chosen by torch)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, L, H*Dh)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory_efficient_attention, which takes (B, L, H, Dh) (check_attention_backend ran at build)."""
    import xformers.ops as xops

    q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # (B, L, H, Dh) each
    return xops.memory_efficient_attention(q, k, v).flatten(2)  # (B, L, H*Dh)


ATTENTION_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
    "math": math_attention,
}


def check_attention_backend(backend: str) -> None:
    """Refuse an unknown backend (ValueError) or xformers when it is not installed (MissingExtraError, naming the
    install command), when a network is built rather than at its first forward."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend={backend!r}; expected one of {sorted(ATTENTION_BACKENDS)}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise MissingExtraError("attention 'xformers' (model.attention / attn_backend) needs the xformers "
                                    "package: pip install 'ldm[xformers]'") from e


def drop_labels(
    y: torch.Tensor,
    null_id: int,
    prob: float,
    force_drop: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Classifier-free-guidance label dropout (Ho & Salimans 2022, arXiv:2207.12598 §3.2; DiT `token_drop`).

    Labels where `force_drop` is true, or else with probability `prob` (drawn from `generator`, one generator per
    sample (a list of B: sample i's draw comes from generator i, whatever batch it is in), or torch's global RNG when
    None), are replaced by `null_id`. y: (B,) long -> (B,) long.
    """
    if force_drop is not None:
        if force_drop.shape != y.shape:
            raise ValueError(f"force_drop has shape {tuple(force_drop.shape)}; expected {tuple(y.shape)}")
        drop = force_drop.to(device=y.device, dtype=torch.bool)
    elif prob > 0 and generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != y.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {y.shape[0]} labels; pass one per sample")
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generator])  # (B,)
        drop = u.to(y.device) < prob
    elif prob > 0:
        drop = torch.rand(y.shape, generator=generator, device=y.device) < prob
    else:
        return y
    return torch.where(drop, torch.full_like(y, null_id), y)


def check_label_settings(num_classes: int, class_dropout_prob: float) -> None:
    """Constructor check shared by the generators: num_classes >= 0 (0 = unconditional), dropout a probability."""
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes}; expected >= 0 (0 = unconditional)")
    if not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"class_dropout_prob={class_dropout_prob}; expected a probability in [0, 1]")


def condition_labels(
    y: torch.Tensor | None,
    *,
    batch: int,
    num_classes: int,
    dropout_prob: float,
    force_drop: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | None = None,
    net: str = "generator",
) -> torch.Tensor | None:
    """The label ids a generator embeds, one convention for DiT and the UNet adapter (DiT `LabelEmbedder`).

    Ids 0..num_classes-1 are classes and id num_classes is the null label of classifier-free guidance (the embedding
    table has num_classes + 1 rows). y=None means every row is null. Labels then go through `drop_labels` with
    `dropout_prob` (pass 0 outside training; null rows draw their dropout too, so the RNG stream does not depend on
    whether labels were given), from `generator`: one, one per sample (training), or None (torch's global RNG). Unconditional nets (num_classes=0) take no labels and get None.
    y: (B,) long or None -> (B,) long or None. `net` names the network in error messages.
    """
    if num_classes == 0:
        if y is not None:
            raise ValueError(f"this {net} is unconditional (num_classes=0) but labels y were given")
        return None
    if y is None:
        y = torch.full((batch,), num_classes, dtype=torch.long, device=device)
    elif y.min() < 0 or y.max() > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null); "
                         f"got [{int(y.min())}, {int(y.max())}]")
    return drop_labels(y, num_classes, dropout_prob, force_drop, generator)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the scalar time, then Linear-SiLU-Linear (DiT `TimestepEmbedder`)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B,) -> (B, D)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g over the last dim, computed in float32 (LightningDiT models/rmsnorm.py)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class GeluMlp(nn.Module):
    """fc2(GELU_tanh(fc1(x))), the ViT/DiT feed-forward net (timm `Mlp` with approximate GELU, as DiT)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """w3(SiLU(x W1) * (x W2)) with W1, W2 fused into `w12` (Shazeer 2020 Eq. 6; LightningDiT `SwiGLUFFN`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (B, L, hidden) each
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU width as LightningDiT computes it: int(2/3 * int(dim * mlp_ratio)) (1152 -> 3072 at ratio 4)."""
    return int(2 / 3 * int(dim * mlp_ratio))


def check_generator_inputs(x: torch.Tensor, t: torch.Tensor, in_channels: int, input_size: int) -> torch.Tensor:
    """Validate a generator's (x, t) and return t as (B,) (a scalar t is broadcast to the batch)."""
    B = x.shape[0]
    if x.shape[1:] != (in_channels, input_size, input_size):
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {in_channels}, {input_size}, {input_size})")
    t = t.expand(B) if t.ndim == 0 else t
    if t.shape != (B,):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({B},)")
    return t
