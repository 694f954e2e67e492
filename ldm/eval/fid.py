"""Gaussian feature statistics, the Fréchet distance, and ADM-compatible statistics files.

FID (Heusel et al. 2017, arXiv:1706.08500, Eq. 6) is the Fréchet (2-Wasserstein) distance between Gaussians fitted to
two sets of features:

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

sFID (Nash et al. 2021, arXiv:2103.03841) is the same distance on Inception's spatial features; FD_<name> is the same
distance in another feature space (DINOv2, the digits classifier, ...). Everything here is float64 numpy.

Two ways to get Tr (S_1 S_2)^{1/2}:
  - `frechet_distance_sqrtm`: the reference path of TTUR `fid.py` and the ADM evaluator (`FIDStatistics.
    frechet_distance` in guided-diffusion evaluations/evaluator.py): scipy `sqrtm` of the product; if the result is
    not finite, retry with eps*I added to both covariances; fail if the diagonal has an imaginary part > 1e-3, else
    keep the real part.
  - `frechet_distance_eigh` (default, ~10x faster at 2048-d, exact): S_1 S_2 is similar to the symmetric PSD matrix
    M = S_1^{1/2} S_2 S_1^{1/2} (same eigenvalues), so Tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(M)). Two symmetric
    eigendecompositions, no complex arithmetic; eigenvalues under the solver's rounding floor are set to 0.

With N <= D samples the covariance is singular and the distance biased upward: `covariance_warning` says so, with
the numbers (evaluation logs it and records it in the result's "warnings").

Statistics files use the ADM reference-batch layout: `mu`, `sigma` (pool features) and optionally `mu_s`, `sigma_s`
(spatial features), so ADM's published reference batches load directly and files written here load in the ADM
evaluator. Extra arrays (e.g. `features` for precision/recall) and a JSON `meta` string may be stored alongside.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

logger = logging.getLogger(__name__)

FD_METHODS = ("eigh", "sqrtm")


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, plus the number of samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int = 0

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"GaussianStats: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)


def stats_from_features(features: np.ndarray) -> GaussianStats:
    """Sample mean and unbiased covariance (np.cov, ddof=1, as TTUR / ADM / torch-fidelity) in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need a (N, D) feature array with N >= 2 to estimate a covariance; got {features.shape}")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])


def covariance_warning(stats: GaussianStats, metric: str, what: str) -> str | None:
    """A one-line warning when `stats` came from too few samples for its feature dimension, else None.

    N feature vectors give a sample covariance of rank <= N - 1, so with N <= D it is singular: the Fréchet distance
    then lacks most of the Tr (S_1 S_2)^{1/2} term and is biased upward (the bias of FID grows as 1/N, Chong & Forsyth
    2020, arXiv:1911.07023, Sec. 3). `metric` names the distance ("FID", "FD_dinov2", ...), `what` the images the
    statistics came from ("samples", "reference images"). N = 0 means unknown (an ADM statistics file) and is not
    flagged."""
    n, d = stats.num, stats.mu.shape[0]
    if not 0 < n <= d:
        return None
    usual = " (published FIDs use 50,000)" if "FID" in metric else ""
    return (f"{metric} from {n} {what} in a {d}-d feature space: the covariance is rank-deficient (rank <= {n - 1}) "
            f"and the value is biased upward; use more than {d} {what}{usual}")


def _check_pair(a: GaussianStats, b: GaussianStats) -> None:
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]} (statistics from different "
                         f"extractors or layers?)")


def frechet_distance_sqrtm(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance via scipy sqrtm with the TTUR / ADM safeguards (module docstring)."""
    _check_pair(a, b)
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product of covariances; adding {eps} to their diagonals")
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def _noise_floor(eigenvalues: np.ndarray) -> float:
    """Eigenvalues below D * eps * max|lambda| are rounding noise of a symmetric eigensolver (the rank tolerance of
    numpy.linalg.matrix_rank); they are set to 0. This matters when a covariance is singular (fewer samples than
    dimensions): the square roots of ~2000 noise eigenvalues would otherwise add up to ~1e-4."""
    return float(np.abs(eigenvalues).max(initial=0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (noise eigenvalues set to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    w = np.where(w > _noise_floor(w), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance_eigh(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance with Tr (S_1 S_2)^{1/2} = sum sqrt(eig(S_1^{1/2} S_2 S_1^{1/2})) (module docstring)."""
    _check_pair(a, b)
    diff = a.mu - b.mu
    root = _psd_sqrt(a.sigma)
    m = root @ b.sigma @ root
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.where(lam > _noise_floor(lam), lam, 0.0)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def frechet_distance(a: GaussianStats, b: GaussianStats, method: str = "eigh") -> float:
    """Fréchet distance between two GaussianStats; `method` is 'eigh' (fast, default) or 'sqrtm' (ADM's path)."""
    if method == "eigh":
        return frechet_distance_eigh(a, b)
    if method == "sqrtm":
        return frechet_distance_sqrtm(a, b)
    raise ValueError(f"method={method!r}; expected one of {FD_METHODS}")


# ------------------------------------------------------------------------------------------------------ files
def save_stats(path: str | os.PathLike, stats: GaussianStats, spatial: GaussianStats | None = None, *,
               meta: dict | None = None, **arrays: np.ndarray) -> Path:
    """Write an ADM-layout statistics npz (mu, sigma[, mu_s, sigma_s]) atomically; extra arrays and a JSON `meta`
    record (extractor, preprocessing, fingerprint, ...) are stored beside them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"mu": stats.mu, "sigma": stats.sigma, "num": np.int64(stats.num)}
    if spatial is not None:
        payload.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    if meta is not None:
        payload["meta"] = np.array(json.dumps(meta, sort_keys=True))
    payload.update(arrays)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def has_stats(path: str | os.PathLike) -> bool:
    """True when `path` is an .npz holding precomputed `mu` and `sigma` (an ADM reference batch or our stats file)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data.files and "sigma" in data.files


def load_stats(path: str | os.PathLike) -> dict:
    """Read a statistics npz: {'stats': GaussianStats, 'spatial': GaussianStats | None, 'meta': dict, plus any
    extra arrays by name}. Raises ValueError naming the file when `mu`/`sigma` are missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        if not {"mu", "sigma"} <= files:
            raise ValueError(f"{str(path)!r} holds no FID statistics: expected arrays 'mu' and 'sigma' (ADM layout), "
                             f"found {sorted(files)}")
        num = int(data["num"]) if "num" in files else 0
        out = {"stats": GaussianStats(data["mu"], data["sigma"], num), "spatial": None,
               "meta": json.loads(str(data["meta"])) if "meta" in files else {}}
        if {"mu_s", "sigma_s"} <= files:
            out["spatial"] = GaussianStats(data["mu_s"], data["sigma_s"], num)
        for name in files - {"mu", "sigma", "mu_s", "sigma_s", "num", "meta", "arr_0", "arr_1"}:
            out[name] = data[name]
    return out
