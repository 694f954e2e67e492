"""EQ-VAE transforms: exact rotations, the same tau on image and latent, draw probabilities over 10^4 draws."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ldm.tokenizers.eq import (
    EqTransform,
    eq_scales,
    equivariance_error,
    prior_scale_image,
    rotate90,
    sample_eq_transform,
    scaled_size,
    transform_latent_and_image,
)


def test_scale_set_matches_reference():
    assert eq_scales() == [s / 32 for s in range(8, 32)]  # zelaki/eqvae autoencoder.py L124


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_is_exactly_rot90(k):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(rotate90(x, k), torch.rot90(x, k, dims=[-1, -2]))
    # k = 1 with dims [-1, -2] is a clockwise quarter turn: the first row becomes the last column
    if k == 1:
        assert torch.equal(rotate90(x, 1)[0, 0, :, -1], x[0, 0, 0, :])
    assert torch.equal(rotate90(rotate90(x, k), 4 - k), x)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_same_transform_reaches_image_and_latent(k):
    """z is a downsampled copy of x (f x f average pooling). For s = 1/2, bilinear resizing (align_corners=False) is
    exactly 2x2 average pooling, which commutes with pooling and rotation: tau(z) must equal pool(tau(x))."""
    f = 4
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(k))
    z = F.avg_pool2d(x, f)  # (2, 3, 8, 8)
    z_t, x_t = transform_latent_and_image(z, x, EqTransform("equivariance", (0.5, 0.5), k), downsample=f)
    assert z_t.shape == (2, 3, 4, 4) and x_t.shape == (2, 3, 16, 16)
    torch.testing.assert_close(z_t, F.avg_pool2d(x_t, f), rtol=1e-5, atol=1e-6)


def test_anisotropic_and_non_dyadic_scales_keep_image_and_latent_aligned():
    z, x = torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 64, 64)
    z_t, x_t = transform_latent_and_image(z, x, EqTransform("equivariance", (9 / 32, 27 / 32), 1), downsample=8)
    # latent 8 x 8 -> floor(8 * 9/32) = 2, floor(8 * 27/32) = 6, then a quarter turn swaps the axes
    assert z_t.shape[-2:] == (6, 2) and x_t.shape[-2:] == (48, 16)
    # at 256 px with the /32 scales the sizes equal the reference's scale_factor resizing of both
    for s in eq_scales():
        h = scaled_size(32, 32, (s, s))[0]
        assert h * 8 == math.floor(256 * s) and h == math.floor(32 * s)
    with pytest.raises(ValueError, match="downsample"):
        transform_latent_and_image(z, torch.zeros(1, 3, 60, 64), EqTransform("equivariance", (0.5, 0.5), 0), 8)


def test_prior_scale_image_is_a_multiple_of_the_downsampling():
    x = torch.randn(1, 3, 64, 64)
    assert prior_scale_image(x, EqTransform("prior_scale", (9 / 32, 9 / 32), 0), 8).shape[-2:] == (16, 16)
    assert prior_scale_image(x, EqTransform("prior_scale", (0.5, 0.5), 0), 8).shape[-2:] == (32, 32)


def test_draw_probabilities_over_10k_draws():
    g = torch.Generator().manual_seed(0)
    scales = eq_scales()
    n = 10_000
    draws = [sample_eq_transform(scales=scales, generator=g) for _ in range(n)]
    modes = Counter(d.mode for d in draws)

    def close(count, p, total=n):  # within 4.5 binomial standard deviations
        return abs(count - total * p) < 4.5 * math.sqrt(total * p * (1 - p))

    assert close(modes["equivariance"], 0.5)
    assert close(modes["prior_scale"], 0.5 * 0.25)
    assert close(modes["plain"], 0.5 * 0.75)
    eq = [d for d in draws if d.mode == "equivariance"]
    rot = Counter(d.rotations for d in eq)
    assert set(rot) == {1, 2, 3} and all(close(rot[k], 1 / 3, len(eq)) for k in rot)
    sc = Counter(d.scale[0] for d in eq)
    assert set(sc) == set(scales) and all(d.scale[0] == d.scale[1] for d in eq)  # isotropic by default
    chi2 = sum((c - len(eq) / 24) ** 2 / (len(eq) / 24) for c in sc.values())
    assert chi2 < 60  # 23 degrees of freedom: P(chi2 > 60) < 1e-4
    assert all(d.rotations == 0 and d.scale == (1.0, 1.0) for d in draws if d.mode == "plain")


def test_draw_options():
    g = torch.Generator().manual_seed(1)
    scales = eq_scales()
    draws = [sample_eq_transform(scales=scales, p_equivariance=1.0, anisotropic=True, rotate=False, generator=g)
             for _ in range(200)]
    assert all(d.mode == "equivariance" and d.rotations == 0 for d in draws)
    assert any(d.scale[0] != d.scale[1] for d in draws)
    never = [sample_eq_transform(scales=scales, p_equivariance=0.0, p_prior_scale=0.0, generator=g) for _ in range(50)]
    assert all(d.mode == "plain" for d in never)
    # the global RNG is used without a generator, so reseeding repeats the draws (bit-exact resume)
    torch.manual_seed(5)
    a = [sample_eq_transform(scales=scales) for _ in range(20)]
    torch.manual_seed(5)
    assert a == [sample_eq_transform(scales=scales) for _ in range(20)]


def test_equivariance_error_is_zero_for_an_equivariant_map_and_positive_otherwise():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert equivariance_error(lambda v: v, lambda v: v, x, downsample=1, scales=[0.5, 0.75]) == 0.0
    err = equivariance_error(lambda v: v, lambda v: v.flip(-1), x, downsample=1, scales=[0.5])
    assert err > 0.1
