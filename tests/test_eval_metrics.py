"""IS, precision/recall, PSNR and SSIM against closed forms, hand computations and torch-fidelity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.eval.metrics import inception_score, manifold_radii, precision_recall, psnr, ssim


# ------------------------------------------------------------------------------------------------------ IS
def test_inception_score_closed_forms():
    k = 8
    confident = torch.eye(k) * 60.0  # image i is class i with certainty: KL = log K in every image -> IS = K
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-9)
    uniform = torch.zeros(16, k)  # p(y|x) = p(y): KL = 0 -> IS = 1
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0))
    # two splits: a confident half (IS 4) and a constant half (IS 1) -> mean 2.5, std 1.5
    halves = torch.cat([torch.eye(4) * 60.0, torch.zeros(4, 4)])
    assert inception_score(halves, splits=2) == pytest.approx((2.5, 1.5), rel=1e-9)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 1008, generator=g) * 3  # N not divisible by the splits
    for shuffle in (False, True):
        ref = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
        mean, std = inception_score(logits, splits=10, shuffle_seed=2020 if shuffle else None)
        assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
        assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    with pytest.raises(ValueError, match="N >= splits=10"):
        inception_score(logits[:5])


# ------------------------------------------------------------------------------------------------------ P/R
def brute_force_pr(ref: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 Eqs. 1-3 written out with full distance matrices (independent of the blocked code)."""
    def radii(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, r):
        d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        return (d <= r[None, :]).any(axis=1)

    return float(inside(fake, ref, radii(ref)).mean()), float(inside(ref, fake, radii(fake)).mean())


def test_manifold_radii_by_hand():
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # squared distance to the 3rd neighbour after the point itself (10: neighbours 3, 2, 1 -> 9^2)
    assert manifold_radii(pts, k=3).tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]
    assert manifold_radii(pts, k=3, block=2).tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]  # merged across column blocks
    with pytest.raises(ValueError, match="more than 3 points"):
        manifold_radii(pts[:3], k=3)


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 16)).astype(np.float32)
    assert precision_recall(a, a) == (1.0, 1.0)  # identical sets
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)  # disjoint, far apart
    # samples that reproduce one of the references' two far-apart modes exactly: precision 1, recall exactly 1/2
    ref = np.concatenate([rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 50.0]).astype(np.float32)
    assert precision_recall(ref, ref[:200]) == (1.0, 0.5)


def test_precision_recall_equals_brute_force_and_fp16_path():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((257, 8)).astype(np.float32)
    fake = (rng.standard_normal((131, 8)) * 1.3 + 0.3).astype(np.float32)
    expected = brute_force_pr(ref.astype(np.float64), fake.astype(np.float64), k=3)
    assert precision_recall(ref, fake, block=50) == pytest.approx(expected, abs=1e-12)
    half = precision_recall(ref, fake, distance_dtype="float16")  # ADM's arithmetic: a few borderline points move
    assert half == pytest.approx(expected, abs=0.03)
    with pytest.raises(ValueError, match="distance_dtype='float64'"):
        precision_recall(ref, fake, distance_dtype="float64")


# ------------------------------------------------------------------------------------------------------ recon
def test_psnr_by_hand():
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    y = x.clone()
    y[0] += 5  # MSE 25 -> 10 log10(255^2 / 25)
    y[1, :, :4] += 10  # MSE 100 / 2 = 50
    values = psnr(y, x)
    assert values[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 25), rel=1e-12)
    assert values[1].item() == pytest.approx(10 * math.log10(255 ** 2 / 50), rel=1e-12)
    assert math.isinf(psnr(x, x)[0].item())


def test_ssim_constant_images_closed_form():
    # constant images a, b: sigma = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2
    a, b = 100.0, 140.0
    x = torch.full((1, 3, 16, 16), int(a), dtype=torch.uint8)
    y = torch.full((1, 3, 16, 16), int(b), dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(y, x).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    noisy = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.allclose(ssim(noisy, noisy), torch.ones(2, dtype=torch.float64))
    assert (ssim(noisy, noisy.flip(0)) < 0.2).all()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
