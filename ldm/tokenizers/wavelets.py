"""The orthonormal 2-D Haar discrete wavelet transform: one level, several levels, and their exact inverses.

Haar (1910); as a filter bank: Mallat, "A theory for multiresolution signal decomposition", IEEE TPAMI 1989. The
1-D orthonormal Haar pair maps (x0, x1) to the approximation (x0 + x1) / sqrt(2) and the detail (x0 - x1) / sqrt(2)
(PyWavelets' `pywt.dwt(x, "haar")`: dec_lo = [1, 1] / sqrt(2), dec_hi = [-1, 1] / sqrt(2) applied as a convolution).
The 2-D transform applies it along the height and then along the width. For each 2x2 block of a channel

        [[a, b],        a = x[2i, 2j],     b = x[2i, 2j+1],
         [c, d]]        c = x[2i+1, 2j],   d = x[2i+1, 2j+1]

it gives four sub-bands (first letter: filter along the height, second: along the width)

        LL = (a + b + c + d) / 2     approximation                       (pywt cA)
        HL = (a + b - c - d) / 2     detail across rows: horizontal edges (pywt cH)
        LH = (a - b + c - d) / 2     detail across columns: vertical edges (pywt cV)
        HH = (a - b - c + d) / 2     diagonal detail                     (pywt cD)

a 4x4 orthogonal matrix with entries +-1/2 (its own transpose is its inverse), so the transform preserves the sum of
squares (Parseval) and the synthesis a = (LL + HL + LH + HH) / 2, b = (LL + HL - LH - HH) / 2,
c = (LL - HL + LH - HH) / 2, d = (LL - HL - LH + HH) / 2 is exact up to float rounding.

Tensor layout: `haar_dwt2` maps (B, C, H, W) to (B, 4C, H/2, W/2), sub-band major: channels [0, C) are LL of input
channels 0..C-1, then HL, LH, HH (as ptwt/pywt coefficients concatenated on the channel axis). Level l of
`haar_wavedec2` is `haar_dwt2` of the LL band of level l-1 (level 0 = the image): (B, 4C, H/2^l, W/2^l). Its LL band
equals 2^l times the mean of each 2^l x 2^l block (the approximation gains sqrt(2) per axis and level).
"""

from __future__ import annotations

import torch

SUBBANDS = ("LL", "HL", "LH", "HH")  # channel blocks of haar_dwt2's output, in order


def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 2-D Haar DWT: (B, C, H, W) -> (B, 4C, H/2, W/2), sub-bands LL, HL, LH, HH."""
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"haar_dwt2 expects (B, C, H, W) with even H and W, got {tuple(x.shape)}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # (B, C, H/2, W/2) each
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    ll = (a + b + c + d) / 2
    hl = (a + b - c - d) / 2
    lh = (a - b + c - d) / 2
    hh = (a - b - c + d) / 2
    return torch.cat([ll, hl, lh, hh], dim=1)  # (B, 4C, H/2, W/2)


def haar_idwt2(y: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `haar_dwt2`: (B, 4C, h, w) sub-bands LL, HL, LH, HH -> (B, C, 2h, 2w)."""
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(f"haar_idwt2 expects (B, 4C, h, w) sub-bands, got {tuple(y.shape)}")
    ll, hl, lh, hh = y.chunk(4, dim=1)  # (B, C, h, w) each
    b, c, h, w = ll.shape
    x = y.new_empty(b, c, 2 * h, 2 * w)
    x[..., 0::2, 0::2] = (ll + hl + lh + hh) / 2  # a
    x[..., 0::2, 1::2] = (ll + hl - lh - hh) / 2  # b
    x[..., 1::2, 0::2] = (ll - hl + lh - hh) / 2  # c
    x[..., 1::2, 1::2] = (ll - hl - lh + hh) / 2  # d
    return x


def haar_wavedec2(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Multi-level analysis: [level 1, ..., level `levels`], level l = haar_dwt2(LL of level l-1), (B, 4C, H/2^l,
    W/2^l). H and W must be multiples of 2**levels."""
    if levels < 1:
        raise ValueError(f"wavelet levels must be >= 1, got {levels}")
    f = 2 ** levels
    if x.dim() != 4 or x.shape[-1] % f or x.shape[-2] % f:
        raise ValueError(f"{levels} Haar levels need (B, C, H, W) with H and W multiples of {f}, got {tuple(x.shape)}")
    out, ll = [], x
    for _ in range(levels):
        coeffs = haar_dwt2(ll)  # (B, 4C, h/2, w/2)
        out.append(coeffs)
        ll = coeffs[:, : coeffs.shape[1] // 4]  # (B, C, h/2, w/2)
    return out


def haar_waverec2(coeffs: list[torch.Tensor]) -> torch.Tensor:
    """Multi-level synthesis, the exact inverse of `haar_wavedec2`: the deepest level is inverted whole; every other
    level contributes its detail bands (HL, LH, HH) to the LL band rebuilt from the level below it."""
    if not coeffs:
        raise ValueError("haar_waverec2 needs at least one level of coefficients")
    ll = haar_idwt2(coeffs[-1])  # (B, C, h, w) = LL of the level above
    for level in reversed(coeffs[:-1]):
        c = level.shape[1] // 4
        ll = haar_idwt2(torch.cat([ll, level[:, c:]], dim=1))  # (B, C, 2h, 2w)
    return ll
