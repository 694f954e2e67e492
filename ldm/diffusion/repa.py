"""REPA: representation alignment of a generator's hidden tokens to a frozen encoder's patch features.

Paper: Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than You
Think" (arXiv:2410.06940), §3.2, the REPA objective:
    L_REPA(theta, phi) = -E[ 1/N sum_n sim(y_n, h_phi(h_t^[n])) ],
with y_n the encoder's feature of patch n, h_t^[n] the generator's hidden token n after block k, h_phi a trainable
MLP projector and sim the cosine similarity. The total loss is L_diffusion + lambda L_REPA.
Reference: sihyun-yu/REPA models/sit.py `build_mlp` (Linear-SiLU-Linear-SiLU-Linear, width 2048, applied to the
output of block `encoder_depth` = 8 of SiT-XL) and loss.py `SILoss` (per-sample mean over tokens of -cos; the
batch mean and lambda = 0.5 (train.py `--proj-coeff`) are applied by the caller here).

Token grids: REPA pairs SiT/2 at 32 x 32 latents (16 x 16 tokens) with DINOv2 at 224 px (16 x 16 patches), so the
counts agree. When they differ (other patch sizes, resolutions or a UNet's mid block), `repa_loss` resizes the
ENCODER feature grid to the generator's token grid, both square: shrinking averages the encoder patches each
generator token covers (area interpolation, exact block means for integer factors), enlarging interpolates
bilinearly. Features are normalised after resizing, so each token is compared by direction only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_REPA_DEPTH = 8  # block whose output is aligned (REPA train.py --encoder-depth)
DEFAULT_REPA_WEIGHT = 0.5  # lambda (REPA train.py --proj-coeff)
DEFAULT_PROJECTOR_DIM = 2048  # REPA models/sit.py projector_dim


class REPAProjector(nn.Module):
    """h_phi: Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, D_enc), applied per token."""

    def __init__(self, hidden_size: int, encoder_dim: int, hidden_dim: int = DEFAULT_PROJECTOR_DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, encoder_dim),
        )
        for m in self.mlp:  # REPA's SiT initialises every Linear, projectors included, with xavier-uniform / zero bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)  # (B, L, D) -> (B, L, D_enc)


def build_projector(hidden_size: int, encoder_dim: int, *, hidden_dim: int = DEFAULT_PROJECTOR_DIM) -> REPAProjector:
    """The REPA projector from the generator width (`net.hidden_size`) to the encoder's (`encoder.feature_dim`)."""
    return REPAProjector(hidden_size, encoder_dim, hidden_dim)


def resize_token_grid(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, L, D) on a square grid -> (B, num_tokens, D): area averaging when shrinking, bilinear when enlarging."""
    B, L, D = tokens.shape
    g_in, g_out = math.isqrt(L), math.isqrt(num_tokens)
    if g_in * g_in != L or g_out * g_out != num_tokens:
        raise ValueError(f"cannot resize {L} tokens to {num_tokens}: both must be square grids")
    if L == num_tokens:
        return tokens
    grid = tokens.transpose(1, 2).reshape(B, D, g_in, g_in)  # (B, D, g, g)
    if g_out < g_in:
        grid = F.interpolate(grid, size=(g_out, g_out), mode="area")
    else:
        grid = F.interpolate(grid, size=(g_out, g_out), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)  # (B, num_tokens, D)


def repa_loss(hidden_proj: torch.Tensor, enc_feats: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss -1/N sum_n cos(y_n, h_phi(h^[n])) (§3.2): (B, L, D_enc), (B, L', D_enc) -> (B,).

    `hidden_proj` are the projected generator tokens, `enc_feats` the frozen encoder's patch tokens (no gradient
    flows into them); if L' != L the encoder grid is resized to the generator's (module docstring).
    """
    if hidden_proj.ndim != 3 or enc_feats.ndim != 3 or hidden_proj.shape[0] != enc_feats.shape[0] \
            or hidden_proj.shape[2] != enc_feats.shape[2]:
        raise ValueError(f"hidden_proj {tuple(hidden_proj.shape)} and enc_feats {tuple(enc_feats.shape)} must be "
                         "(B, L, D) with the same batch size and feature width D")
    target = resize_token_grid(enc_feats.detach().to(hidden_proj.dtype), hidden_proj.shape[1])  # (B, L, D)
    cos = (F.normalize(hidden_proj, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)  # (B, L)
    return -cos.mean(dim=1)  # (B,)
