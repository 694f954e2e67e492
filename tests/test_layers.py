"""Shared generator layers vs hand-computed values (ldm/models/layers.py)."""

import math

import pytest
import torch

from ldm.models.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope,
    condition_labels,
    drop_labels,
    modulate,
    rope_2d_angles,
    sincos_pos_embed_2d,
    swiglu_hidden,
    timestep_embedding,
)


def test_timestep_embedding_matches_hand_values():
    # dim 4: half = 2, w = [1, 10000^(-1/2) = 0.01]; layout [cos | sin] (DiT / GLIDE)
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 4)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)]])
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([3.0]), 5)[0, -1] == 0  # odd dims get a zero column


def test_sincos_pos_embed_layout_columns_first():
    # dim 8 -> 4 channels per axis, w = [1, 10000^(-1/2)] -> [sin(p), sin(p/100), cos(p), cos(p/100)]
    def one_d(p):
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    emb = sincos_pos_embed_2d(8, 3)  # token k = r * 3 + c
    assert emb.shape == (9, 8)
    for r, c in [(0, 0), (0, 2), (2, 1)]:
        torch.testing.assert_close(emb[r * 3 + c], torch.tensor(one_d(c) + one_d(r)))  # column half first


def test_modulate_is_x_times_one_plus_scale_plus_shift():
    x, shift, scale = torch.randn(2, 5, 3), torch.randn(2, 1, 3), torch.randn(2, 1, 3)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


def test_rope_angles_hand_values():
    # head_dim 8: half 4, f = [1, 10000^(-2/4) = 0.01]; token (r=2, c=1) of a 3x3 grid -> [2, 0.02, 1, 0.01]
    ang = rope_2d_angles(8, 3)
    assert ang.shape == (9, 4)
    torch.testing.assert_close(ang[2 * 3 + 1], torch.tensor([2.0, 0.02, 1.0, 0.01]))


def test_rope_rotates_pairs_and_preserves_norms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=g)  # (B, H, L, Dh), 4x4 grid
    ang = rope_2d_angles(8, 4)
    y = apply_rope(x, ang.cos(), ang.sin())
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # pair (x0, x1) of token k rotated by angle a: (x0 cos a - x1 sin a, x0 sin a + x1 cos a)
    k, a = 5, ang[5, 0]
    x0, x1 = x[..., k, 0], x[..., k, 1]
    torch.testing.assert_close(y[..., k, 0], x0 * torch.cos(a) - x1 * torch.sin(a))
    torch.testing.assert_close(y[..., k, 1], x0 * torch.sin(a) + x1 * torch.cos(a))


def test_rope_scores_depend_only_on_the_2d_offset():
    g = torch.Generator().manual_seed(1)
    grid, dh = 6, 16
    ang = rope_2d_angles(dh, grid)
    cos, sin = ang.cos(), ang.sin()
    q, k = torch.randn(dh, generator=g), torch.randn(dh, generator=g)

    def score(pq, pk):  # rotate q at grid position pq and k at pk, return their dot product
        qs = q.expand(grid * grid, dh)[None, None]
        ks = k.expand(grid * grid, dh)[None, None]
        rq, rk = apply_rope(qs, cos, sin)[0, 0], apply_rope(ks, cos, sin)[0, 0]
        return rq[pq[0] * grid + pq[1]] @ rk[pk[0] * grid + pk[1]]

    s = score((1, 2), (0, 0))
    torch.testing.assert_close(score((4, 5), (3, 3)), s, atol=1e-5, rtol=1e-5)  # same offset (1, 2)
    torch.testing.assert_close(score((5, 2), (4, 0)), s, atol=1e-5, rtol=1e-5)
    assert (score((2, 1), (0, 0)) - s).abs() > 1e-3  # transposed offset differs: rows and columns are distinct


def test_drop_labels_rate_and_forcing():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, 10, 0.1, generator=torch.Generator().manual_seed(1))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # std of the rate is 0.002
    assert torch.equal(out[~dropped], y[~dropped])
    again = drop_labels(y, 10, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    force = torch.zeros_like(y, dtype=torch.bool)
    force[:3] = True
    forced = drop_labels(y, 10, 0.5, force_drop=force)
    assert forced[:3].eq(10).all() and torch.equal(forced[3:], y[3:])
    assert torch.equal(drop_labels(y, 10, 0.0), y)
    with pytest.raises(ValueError, match="force_drop"):
        drop_labels(y, 10, 0.1, force_drop=force[:5])


def test_rmsnorm_formula():
    x = torch.tensor([[3.0, 4.0]])
    norm = RMSNorm(2, eps=0.0)
    norm.weight.data = torch.tensor([1.0, 2.0])
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(norm(x), torch.tensor([[3 / rms, 2 * 4 / rms]]))


def test_swiglu_formula_and_width():
    assert swiglu_hidden(1152, 4.0) == 3072  # LightningDiT-XL: int(2/3 * 4608)
    assert swiglu_hidden(384, 4.0) == 1024
    m = SwiGLU(4, 3)
    x = torch.randn(2, 4)
    h = x @ m.w12.weight.T + m.w12.bias
    a, b = h[:, :3], h[:, 3:]
    expected = (a * torch.sigmoid(a) * b) @ m.w3.weight.T + m.w3.bias
    torch.testing.assert_close(m(x), expected)


def test_condition_labels_null_range_and_unconditional():
    """The one label convention of DiT and the UNet: None -> null id, ids checked, dropout only when asked."""
    y = torch.tensor([0, 3, 9])
    assert torch.equal(condition_labels(None, batch=3, num_classes=10, dropout_prob=0.0), torch.full((3,), 10))
    assert torch.equal(condition_labels(y, batch=3, num_classes=10, dropout_prob=0.0), y)
    forced = condition_labels(y, batch=3, num_classes=10, dropout_prob=0.0, force_drop=torch.tensor([1, 0, 1]))
    assert forced.tolist() == [10, 3, 10]
    assert condition_labels(None, batch=3, num_classes=0, dropout_prob=0.1) is None
    with pytest.raises(ValueError, match="UNet is unconditional"):
        condition_labels(y, batch=3, num_classes=0, dropout_prob=0.0, net="UNet")
    with pytest.raises(ValueError, match="labels must lie in"):
        condition_labels(torch.tensor([11]), batch=1, num_classes=10, dropout_prob=0.0)
