"""Vector quantizer: straight-through gradients, VQ-VAE losses, one EMA update by hand, dead-code restarts, entropy
loss and perplexity, and the VQ autoencoder's encode/decode contract."""

import math

import pytest
import torch

from ldm.tokenizers.vq import (
    VectorQuantizer,
    VQAutoencoder,
    codebook_losses,
    ema_codebook_update,
    entropy_loss,
    perplexity,
)


def _quantizer(codes, **kw):
    q = VectorQuantizer(codebook_size=len(codes), code_dim=len(codes[0]), l2_norm=False, **kw)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor(codes, dtype=torch.float32))
        if q.use_ema:
            q.ema_embed_sum.copy_(q.codebook)
    return q


def _as_map(vectors):
    """[(d0, d1), ...] -> (1, D, 1, N)."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, len(vectors[0]), 1, len(vectors))


CODES = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)]
Z = [(0.9, 0.1), (0.1, 1.5), (-0.2, 0.1), (1.2, -0.1)]  # nearest codes 1, 2, 0, 1


def test_nearest_code_and_losses_equal_the_formula():
    q = _quantizer(CODES, beta=0.25).eval()
    z = _as_map(Z).requires_grad_(True)
    out = q(z)
    assert out.indices.flatten().tolist() == [1, 2, 0, 1]
    e = torch.tensor([CODES[i] for i in [1, 2, 0, 1]])
    zz = torch.tensor(Z)
    sq = ((e - zz) ** 2).sum() / zz.numel()  # mean over (C, h, w) of the single sample
    torch.testing.assert_close(out.codebook_loss, sq.view(1))
    torch.testing.assert_close(out.commit_loss, 0.25 * sq.view(1))
    torch.testing.assert_close(out.z_q.detach(), _as_map([CODES[i] for i in [1, 2, 0, 1]]))
    # the codebook term moves the codes only, the commitment term the encoder output only
    out.codebook_loss.sum().backward(retain_graph=True)
    assert z.grad is None and q.codebook.grad is not None
    g_code = q.codebook.grad.clone()
    torch.testing.assert_close(g_code[1], 2 * ((e[0] - zz[0]) + (e[3] - zz[3])) / zz.numel())
    q.codebook.grad = None
    out.commit_loss.sum().backward()
    assert q.codebook.grad is None
    torch.testing.assert_close(z.grad, _as_map((2 * 0.25 * (zz - e) / zz.numel()).tolist()))


def test_codebook_losses_function_per_sample():
    z, zq = torch.zeros(2, 3, 1, 1), torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0, 3.0]).view(2, 3, 1, 1)
    cb, cm = codebook_losses(z, zq, 0.5)
    torch.testing.assert_close(cb, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(cm, torch.tensor([1.5, 1.5]))


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    enc = torch.nn.Conv2d(3, 2, 1)
    q = _quantizer(CODES).eval()
    x = torch.randn(2, 3, 4, 4)
    c = torch.randn(2, 2, 4, 4)
    (q(enc(x)).z_q * c).sum().backward()
    ste_grad = enc.weight.grad.clone()
    enc.weight.grad = None
    (enc(x) * c).sum().backward()  # the straight-through estimator copies dL/dz_q to z
    torch.testing.assert_close(ste_grad, enc.weight.grad)
    assert ste_grad.abs().sum() > 0


def test_l2_normalised_codes_use_cosine_nearest_neighbours():
    q = VectorQuantizer(codebook_size=2, code_dim=2, l2_norm=True).eval()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1]]))
    out = q(_as_map([(0.1, 0.2), (3.0, 1.0)]))
    assert out.indices.flatten().tolist() == [1, 0]  # by angle, not by Euclidean distance of the raw vectors
    torch.testing.assert_close(out.z_q.detach(), _as_map([(0.0, 1.0), (1.0, 0.0)]))


def test_one_ema_update_by_hand():
    decay, eps = 0.9, 1e-5
    size, emb_sum = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    idx = torch.tensor([0, 0, 1])
    new_size, new_sum, book = ema_codebook_update(size, emb_sum, z, idx, decay, eps)
    # N_i = 0.9 N_i + 0.1 n_i with n = [2, 1, 0]
    n_hand = [0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 0]  # [1.1, 1.9, 0.45]
    m_hand = [[0.9 * 1 + 0.1 * 4, 0.9 * 0 + 0.1 * 1], [0.9 * 2 + 0.1 * 0, 0.9 * 2 + 0.1 * 2], [0.0, 0.9]]
    total = sum(n_hand)
    smoothed = [(n + eps) / (total + 3 * eps) * total for n in n_hand]
    book_hand = [[m / s for m in row] for row, s in zip(m_hand, smoothed)]
    torch.testing.assert_close(new_size, torch.tensor(n_hand))
    torch.testing.assert_close(new_sum, torch.tensor(m_hand))
    torch.testing.assert_close(book, torch.tensor(book_hand))


def test_ema_quantizer_updates_its_buffers_in_training_only():
    q = _quantizer(CODES, use_ema=True, ema_decay=0.5)
    assert "codebook" in dict(q.named_buffers()) and not list(q.parameters())
    q.eval()
    q(_as_map(Z))
    torch.testing.assert_close(q.codebook, torch.tensor(CODES))
    q.train()
    out = q(_as_map(Z))
    assert float(out.codebook_loss.abs().sum()) == 0.0  # EMA replaces the codebook loss
    counts = torch.tensor([1.0, 2.0, 1.0])
    size = 0.5 * counts  # cluster sizes start at zero
    emb = 0.5 * torch.tensor(CODES) + 0.5 * torch.tensor([[-0.2, 0.1], [2.1, 0.0], [0.1, 1.5]])
    smoothed = (size + 1e-5) / (size.sum() + 3e-5) * size.sum()
    torch.testing.assert_close(q.codebook, emb / smoothed[:, None])


def test_dead_code_is_restarted_from_the_batch():
    codes = [(0.0, 0.0), (1.0, 0.0), (50.0, 50.0)]  # code 2 is never the nearest
    q = _quantizer(codes, ema_decay=0.5, dead_code_threshold=0.5).train()
    z = _as_map(Z)
    # usage starts at N / K = 4/3 per code; after one step code 2 has 0.5 * 4/3 = 0.67 >= 0.5 (alive)
    torch.manual_seed(0)
    q(z)
    assert torch.equal(q.codebook.detach()[2], torch.tensor([50.0, 50.0]))
    q(z)  # 0.33 < 0.5: dead, replaced by one of the batch vectors, usage reset to N / K
    new = q.codebook.detach()[2]
    assert any(torch.allclose(new, torch.tensor(v)) for v in Z)
    assert float(q.usage[2]) == pytest.approx(4 / 3)
    torch.testing.assert_close(q.codebook.detach()[:2], torch.tensor(codes[:2]))  # live codes untouched


def test_entropy_loss_and_perplexity_by_hand():
    # uniform affinities: per-sample entropy log 2, batch entropy log 2 -> 0
    assert abs(float(entropy_loss(torch.zeros(3, 2), 1.0))) < 1e-4
    # two confident samples on different codes: per-sample entropy ~0, batch entropy log 2
    conf = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    assert float(entropy_loss(conf, 0.1)) == pytest.approx(-math.log(2), abs=1e-4)
    assert float(perplexity(torch.tensor([2.0, 2.0, 0.0, 0.0]))) == pytest.approx(2.0, rel=1e-6)
    assert float(perplexity(torch.tensor([5.0, 0.0]))) == pytest.approx(1.0, rel=1e-6)
    q = VectorQuantizer(codebook_size=4, code_dim=2, entropy_weight=0.5).eval()
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = q(z)
    assert out.entropy_loss.ndim == 0
    out.entropy_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vq_autoencoder_encode_decode_contract():
    torch.manual_seed(0)
    m = VQAutoencoder(block_out_channels=[32, 32], layers_per_block=1, z_channels=32, codebook_size=16, code_dim=4,
                      mid_block_attention=False).eval()
    assert m.downsample == 2 and m.latent_channels == 4
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    q = m.encode(x)
    assert q.z_q.shape == (2, 4, 4, 4) and q.indices.shape == (2, 4, 4) and q.indices.dtype == torch.int64
    torch.testing.assert_close(m.decode(q.indices), m.decode(q.z_q))
    assert m.decode(q.z_q).shape == x.shape
    with pytest.raises(ValueError, match="indices"):
        m.decode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(codebook_size=0, code_dim=4)
