"""Fréchet distance and statistics files, against closed forms and independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from ldm.eval.fid import (
    GaussianStats,
    covariance_warning,
    frechet_distance,
    frechet_distance_eigh,
    frechet_distance_sqrtm,
    has_stats,
    load_stats,
    save_stats,
    stats_from_features,
)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_diagonal_gaussians_closed_form():
    # For diagonal covariances Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    a, b = GaussianStats(mu1, np.diag(s1)), GaussianStats(mu2, np.diag(s2))
    assert frechet_distance_eigh(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_sqrtm(a, b) == pytest.approx(expected, rel=1e-10)
    # 1-D by hand: N(0, 4) vs N(3, 1): 9 + (2 - 1)^2 = 10
    assert frechet_distance(GaussianStats(np.zeros(1), np.eye(1) * 4), GaussianStats(np.full(1, 3.0), np.eye(1))) \
        == pytest.approx(10.0, rel=1e-14)


def test_random_spd_matches_scipy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    for d in (8, 64):
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        a, b = GaussianStats(mu1, s1), GaussianStats(mu2, s2)
        # independent: scipy sqrtm of the symmetric form, and torch-fidelity's eigvals-of-product formula
        r = linalg.sqrtm(s1)
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(r @ s2 @ r)).real
        tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
        assert frechet_distance_sqrtm(a, b) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance_eigh(a, b) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance_eigh(a, b) == pytest.approx(frechet_distance_sqrtm(a, b), rel=1e-9)
        assert frechet_distance_eigh(a, b) == pytest.approx(tf["frechet_inception_distance"], rel=1e-9)


def test_identical_and_singular_statistics():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((10, 40))  # N < D: rank-deficient covariance, as with few images
    s = stats_from_features(feats)
    assert abs(frechet_distance(s, s)) < 1e-9  # noise eigenvalues do not leak into the distance
    other = stats_from_features(rng.standard_normal((10, 40)) + 0.5)
    fast, ref = frechet_distance_eigh(s, other), frechet_distance_sqrtm(s, other)
    assert np.isfinite(fast) and fast == pytest.approx(ref, rel=1e-3)


def test_covariance_warning_names_the_numbers():
    rng = np.random.default_rng(4)
    few = stats_from_features(rng.standard_normal((20, 64)))
    assert np.linalg.matrix_rank(few.sigma) == 19  # the rank bound the warning states
    line = covariance_warning(few, "FD_digits", "samples")
    assert line == ("FD_digits from 20 samples in a 64-d feature space: the covariance is rank-deficient "
                    "(rank <= 19) and the value is biased upward; use more than 64 samples")
    square = covariance_warning(stats_from_features(rng.standard_normal((64, 64))), "FID", "reference images")
    assert "(rank <= 63)" in square and square.endswith("use more than 64 reference images (published FIDs use 50,000)")
    assert covariance_warning(stats_from_features(rng.standard_normal((65, 64))), "FID", "samples") is None
    assert covariance_warning(GaussianStats(np.zeros(64), np.eye(64)), "FID", "samples") is None  # N unknown (ADM)


def test_stats_from_features_by_hand():
    s = stats_from_features(np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    np.testing.assert_allclose(s.mu, [2.0, 2.0])
    # unbiased covariance: deviations (-2,-1), (0,-1), (2,2) -> [[8, 6], [6, 6]] / 2
    np.testing.assert_allclose(s.sigma, [[4.0, 3.0], [3.0, 3.0]])
    assert s.num == 3 and s.sigma.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        stats_from_features(np.zeros((1, 3)))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="feature dimensions differ: 2 vs 3"):
        frechet_distance(GaussianStats(np.zeros(2), np.eye(2)), GaussianStats(np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match="method='exact'"):
        frechet_distance(GaussianStats(np.zeros(2), np.eye(2)), GaussianStats(np.zeros(2), np.eye(2)), "exact")
    with pytest.raises(ValueError, match=r"mu must be \(D,\)"):
        GaussianStats(np.zeros(2), np.eye(3))


def test_stats_file_is_adm_layout(tmp_path):
    rng = np.random.default_rng(3)
    pool, spatial = stats_from_features(rng.standard_normal((20, 5))), stats_from_features(rng.standard_normal((20, 3)))
    path = save_stats(tmp_path / "ref.npz", pool, spatial, meta={"extractor": "x"}, features=np.ones((20, 5)))
    with np.load(path) as raw:  # what the ADM evaluator's read_statistics reads
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(raw.files)
        np.testing.assert_array_equal(raw["sigma_s"], spatial.sigma)
    back = load_stats(path)
    np.testing.assert_array_equal(back["stats"].mu, pool.mu)
    assert back["meta"] == {"extractor": "x"} and back["features"].shape == (20, 5) and back["stats"].num == 20
    # an ADM reference batch written by numpy alone (no meta / num) loads too
    np.savez(tmp_path / "adm.npz", mu=pool.mu, sigma=pool.sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert has_stats(tmp_path / "adm.npz") and load_stats(tmp_path / "adm.npz")["spatial"] is None
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert not has_stats(tmp_path / "images.npz")
    with pytest.raises(ValueError, match="expected arrays 'mu' and 'sigma'"):
        load_stats(tmp_path / "images.npz")


def test_fid_of_torch_features_equals_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((200, 12)), rng.standard_normal((150, 12)) * 1.3 + 0.2
    a, b = stats_from_features(x), stats_from_features(y)
    tm = _compute_fid(*(torch.from_numpy(t) for t in (a.mu, a.sigma, b.mu, b.sigma))).item()
    assert frechet_distance(a, b) == pytest.approx(tm, rel=1e-9)
