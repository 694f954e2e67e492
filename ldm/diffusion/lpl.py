"""Latent perceptual loss (LPL): Berrada et al., "Boosting Latent Diffusion with Perceptual Objectives", ICLR 2025,
arXiv:2411.04873. Pure functions of decoder feature maps; ldm/tokenizers/decoder_features.py computes the features,
ldm/train/generator_terms.py wires the term into training.

For the true clean latent z_0 and the model's estimate z^_0 (both in the tokenizer's latent space) the frozen decoder
gives feature maps phi_l = phi_l(z_0) and phi^_l = phi_l(z^_0) at blocks l in B. The loss of one sample is

    L_LPL = (1 / |B|) sum_l w_l * (1 / C_l) sum_c [ sum_p m_lc(p) (n(phi^_l)_c(p) - n(phi_l)_c(p))^2 / sum_p m_lc(p) ]

with
  * n = cross normalisation (the paper's "CN" layer), per channel: both maps standardised with the mean and standard
    deviation over the positions p of the ESTIMATE's map, (phi - mu^_c) / (sigma^_c + 1e-6), sigma Bessel-corrected
    (torch.std), as `normalize_features` of the diffusers research project's train_sdxl_lpl.py (the authors' reference
    implementation ported to diffusers: statistics of the predicted features, eps 1e-6). That project's lpl_loss.py
    `get_loss` normalises differently (by the L2 norm over channels at each position, LPIPS-style); the per-channel
    form is the one the paper's ablation favours. Departure: the statistics are detached, so the loss is a per-channel
    reweighted squared error and cannot be lowered by inflating the estimate's feature variance.
  * m = the outlier mask of the TARGET map (the paper's "OD" step), as the reference `remove_outliers`: per sample and
    channel, values outside (q_0.02 - 2 s, q_0.98 + 2 s) are outliers (q the 2 % / 98 % order statistics by
    kthvalue, s the map's std), then the inlier mask is dilated with a k_close window and eroded with a k_open one
    (k_open = ceil(5 / d), k_close = ceil(3 / d) for a map at 1/d of the output resolution; 2 -> 3 and 2 -> 1
    respectively). Only maps at 1/2 of the output resolution or finer are masked (the reference masks its blocks 2
    (d = 2), 3 and 4 (d = 1) on SD-VAE). Departure: a map too small for the 2 % order statistic (< 50 positions)
    uses the 1st / last value instead of failing. A consequence of dilating before eroding: an outlier spot less than
    3 px wide on a full-resolution map is closed over and kept, a wider one is masked with a 2 px margin.
  * w_l = the inverse of block l's upscaling factor over the mid block, h_0 / h_l (the reference's "pow_law"
    2^-min(l, 3) on SD-VAE, where blocks 3 and 4 share one resolution), unless given.
  * the per-(sample, channel) masked mean, then the channel mean and the 1 / |B| block average, as the reference's
    `get_loss` reduction.
The time gate (only high SNR, where z^_0 is a usable estimate) and the weight are applied per sample by
`lpl_gate` and the caller. Gradients flow into z^_0 only; the target branch is computed without gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-6


def outlier_kernels(downsample: float) -> tuple[int, int]:
    """(k_open, k_close) of the morphological clean-up for a map at 1/downsample of the output resolution."""
    k_open, k_close = math.ceil(5 / downsample), math.ceil(3 / downsample)
    return (3 if k_open == 2 else k_open), (1 if k_close == 2 else k_close)


def outlier_mask(feat: Tensor, downsample: float, *, quantile: float = 0.02, std_mult: float = 2.0) -> Tensor:
    """Inlier mask (B, C, H, W) bool of a target feature map (module docstring, "m")."""
    b, c, h, w = feat.shape
    flat = feat.detach().float().reshape(b, c, h * w)
    n = h * w
    k_lo, k_hi = max(1, int(n * quantile)), max(1, int(n * (1 - quantile)))
    q_lo = flat.kthvalue(k_lo, dim=-1).values[..., None, None]  # (B, C, 1, 1)
    q_hi = flat.kthvalue(k_hi, dim=-1).values[..., None, None]
    margin = std_mult * flat.std(dim=-1)[..., None, None]
    f = feat.detach().float()
    inlier = ((q_lo - margin < f) & (f < q_hi + margin)).float()
    k_open, k_close = outlier_kernels(downsample)
    inlier = F.max_pool2d(inlier, k_close, stride=1, padding=(k_close - 1) // 2)  # dilate the inliers
    inlier = -F.max_pool2d(-inlier, k_open, stride=1, padding=(k_open - 1) // 2)  # erode them
    return inlier > 0.5


def cross_normalize(est: Tensor, target: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """Both maps standardised per (sample, channel) by the estimate's detached spatial mean and std."""
    ref = est.detach()
    mu = ref.mean(dim=(2, 3), keepdim=True)
    sd = ref.std(dim=(2, 3), keepdim=True) + eps
    return (est - mu) / sd, (target - mu) / sd


def depth_weights(shapes: Sequence[Sequence[int]], latent_size: int) -> list[float]:
    """w_l = latent_size / H_l: the inverse of each block's upscaling over the mid block (module docstring)."""
    return [latent_size / s[-2] for s in shapes]


def lpl_distance(est_feats: Sequence[Tensor], target_feats: Sequence[Tensor], *, weights: Sequence[float],
                 downsamples: Sequence[float], mask_outliers: bool = True, max_mask_downsample: float = 2.0) -> Tensor:
    """Per-sample LPL (B,) from feature maps of the estimate (with gradients) and of the target (module docstring).

    `downsamples[l]` is the output resolution over map l's (for the outlier kernels and which maps are masked)."""
    if not (len(est_feats) == len(target_feats) == len(weights) == len(downsamples)) or not est_feats:
        raise ValueError(f"lpl_distance got {len(est_feats)} estimate maps, {len(target_feats)} target maps, "
                         f"{len(weights)} weights and {len(downsamples)} downsampling factors; expected equal, >= 1")
    total = None
    for est, tgt, w, d in zip(est_feats, target_feats, weights, downsamples):
        if est.shape != tgt.shape:
            raise ValueError(f"feature maps differ in shape: {tuple(est.shape)} vs {tuple(tgt.shape)}")
        est, tgt = est.float(), tgt.float().detach()
        e, t = cross_normalize(est, tgt)
        sq = (e - t) ** 2  # (B, C, H, W)
        if mask_outliers and d <= max_mask_downsample:
            m = outlier_mask(tgt, d).to(sq.dtype)
            per_channel = (sq * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp(min=1.0)  # (B, C)
        else:
            per_channel = sq.mean(dim=(2, 3))
        term = w * per_channel.mean(dim=1)  # (B,)
        total = term if total is None else total + term
    return total / len(est_feats)


def lpl_gate(snr: Tensor, snr_min: float) -> Tensor:
    """Which samples the LPL applies to: SNR(t) = (alpha / sigma)^2 >= snr_min (the paper applies it at high SNR
    only, where z^_0 is a usable estimate), (B,) bool."""
    return snr >= snr_min
