"""Sample-quality and reconstruction metrics other than the Fréchet distance: IS, precision/recall, PSNR, SSIM.

- Inception Score (Salimans et al. 2016, arXiv:1606.03498, Sec. 4): IS = exp(E_x KL(p(y|x) || p(y))), computed per
  split and averaged (improved-gan `inception_score/model.py`, the ADM evaluator `compute_inception_score`,
  torch-fidelity `metric_isc.py`).
- Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991, Eqs. 1-3): each set's manifold is the
  union of hyperspheres around its points with radius = distance to the k-th nearest neighbour (k = 3);
  precision = fraction of samples inside the reference manifold, recall = fraction of references inside the sample
  manifold. Follows `ManifoldEstimator` / `DistanceBlock` of the ADM evaluator (guided-diffusion
  evaluations/evaluator.py): squared Euclidean distances ||u||^2 - 2 u.v + ||v||^2 clipped at 0, the k-th neighbour
  counted after the point itself, membership `d^2 <= r^2`.
- PSNR = 10 log10(255^2 / MSE) per image on uint8 values; SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5,
  K1 = 0.01, K2 = 0.03) via torchmetrics. LPIPS (Zhang et al. 2018) is the tokenizer's LPIPS-VGG network
  (ldm/tokenizers/losses.py `build_lpips`), so evaluation and the training loss measure the same thing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ IS
def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
    """Inception Score of (N, K) logits: mean and std over `splits` contiguous splits [i N / s, (i+1) N / s).

    In float64: log p(y|x) = log_softmax(logits), p(y) = mean of p(y|x) over the split, score = exp(mean_x KL).
    With N = 50,000 and 10 splits the splits are the ADM evaluator's 5,000-image chunks (ADM reports the mean).
    `shuffle_seed` permutes rows first with numpy RandomState(seed), as torch-fidelity does (its default seed 2020).
    """
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).double().cpu()
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"inception_score needs (N, K) logits with N >= splits={splits}; got {tuple(logits.shape)}")
    n = logits.shape[0]
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p = torch.log_softmax(logits, dim=1)  # (N, K)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, K)
        log_q = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log of the split's marginal p(y)
        kl = (part.exp() * (part - log_q)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------------ P/R
def _sq_distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, m) squared distances max(||u||^2 - 2 u.v + ||v||^2, 0) in `dtype`; float16 falls back to float32 when
    it overflows, as ADM's DistanceBlock does."""
    a, b = u.to(dtype), v.to(dtype)
    d = (a.square().sum(1)[:, None] - 2 * a @ b.T + b.square().sum(1)[None, :]).clamp_min(0)
    if dtype != torch.float32 and not torch.isfinite(d).all():
        return _sq_distances(u, v, torch.float32)
    return d.float()


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = 4096,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) squared distance of each point to its k-th nearest neighbour in the same set (the point itself is the
    0-th). Column blocks keep memory at block x block; the k+1 smallest are merged across blocks."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set; got {n}")
    radii = torch.empty(n)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        best = None
        for c0 in range(0, n, block):
            d = _sq_distances(rows, features[c0:c0 + block], dtype)  # (r, c)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values  # (r, <= k+1), ascending
        radii[r0:r0 + block] = best[:, k].cpu()
    return radii


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int,
            dtype: torch.dtype) -> torch.Tensor:
    """(N,) bool: point i lies in some hypersphere (centre_j, radius_j), i.e. min_j d^2(i, j) - r_j^2 <= 0."""
    out = torch.zeros(points.shape[0], dtype=torch.bool)
    radii = radii.to(centres.device)
    for r0 in range(0, points.shape[0], block):
        rows = points[r0:r0 + block]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=points.device)
        for c0 in range(0, centres.shape[0], block):
            d = _sq_distances(rows, centres[c0:c0 + block], dtype)  # (r, c)
            hit |= (d <= radii[c0:c0 + block][None, :]).any(dim=1)
        out[r0:r0 + block] = hit.cpu()
    return out


def precision_recall(ref_features: np.ndarray | torch.Tensor, sample_features: np.ndarray | torch.Tensor, *,
                     k: int = 3, block: int = 4096, distance_dtype: str = "float32",
                     device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall of samples w.r.t. references (module docstring), k = 3 as in ADM.

    `distance_dtype="float16"` reproduces ADM's arithmetic (distances in half precision, float32 when they
    overflow); the default float32 is the more exact computation of the same quantities.
    """
    dtypes = {"float32": torch.float32, "float16": torch.float16}
    if distance_dtype not in dtypes:
        raise ValueError(f"distance_dtype={distance_dtype!r}; expected one of {sorted(dtypes)}")
    dtype = dtypes[distance_dtype]
    ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32), device=device)
    fake = torch.as_tensor(np.asarray(sample_features, dtype=np.float32), device=device)
    if ref.dim() != 2 or fake.dim() != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) and (M, D) features; got {tuple(ref.shape)}, "
                         f"{tuple(fake.shape)}")
    r_ref = manifold_radii(ref, k, block, dtype)
    r_fake = manifold_radii(fake, k, block, dtype)
    precision = _inside(fake, ref, r_ref, block, dtype).double().mean().item()
    recall = _inside(ref, fake, r_fake, block, dtype).double().mean().item()
    return precision, recall


# ------------------------------------------------------------------------------------------------------ recon
def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W); got shape {tuple(x.shape)}")
    return x.double()


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of uint8-valued images (B, C, H, W): 10 log10(255^2 / MSE); inf where the images are equal."""
    if recon.shape != target.shape:
        raise ValueError(f"psnr: shapes differ {tuple(recon.shape)} vs {tuple(target.shape)}")
    mse = (_as_float_images(recon) - _as_float_images(target)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of uint8-valued images (data range 255), torchmetrics' Gaussian-window SSIM (module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if recon.shape != target.shape:
        raise ValueError(f"ssim: shapes differ {tuple(recon.shape)} vs {tuple(target.shape)}")
    if min(recon.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 px (Gaussian window 11); got {tuple(recon.shape[-2:])}")
    return structural_similarity_index_measure(_as_float_images(recon), _as_float_images(target), data_range=255.0,
                                               reduction="none")
