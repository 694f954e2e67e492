"""VA-VAE margin losses on hand-made features with known cosines (including the margins' dead zones) and the frozen
foundation-encoder wrapper with a tiny randomly initialised ViT-like module."""

import math

import pytest
import torch
from torch import nn

from ldm.tokenizers.va import VFAligner, margin_cosine_loss, margin_distance_matrix_loss, tokens_to_grid, vf_loss


def _grid(vectors):
    """[(d0, d1, ...), ...] positions along the width -> (1, D, 1, W)."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, len(vectors[0]), 1, len(vectors))


def test_margin_cosine_loss_by_hand():
    z = _grid([(1, 0), (1, 0), (1, 0), (1, 0)])
    f = _grid([(2, 0), (0, 3), (-1, 0), (0.6, 0.8)])  # cosines 1, 0, -1, 0.6
    # margin 0.5: relu(0.5 - cos) = 0, 0.5, 1.5, 0 (0.6 lies in the dead zone cos >= 1 - m)
    torch.testing.assert_close(margin_cosine_loss(z, f, 0.5), torch.tensor([2.0 / 4]))
    # margin 0: 1 - cos = 0, 1, 2, 0.4
    torch.testing.assert_close(margin_cosine_loss(z, f, 0.0), torch.tensor([3.4 / 4]))
    # margin 2: everything is in the dead zone
    assert float(margin_cosine_loss(z, f, 2.0)) == 0.0


def test_margin_distance_matrix_loss_by_hand():
    z = _grid([(1, 0), (0, 1)])  # S_z = [[1, 0], [0, 1]]
    f = _grid([(1, 0), (1, 1)])  # S_f = [[1, c], [c, 1]], c = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(margin_distance_matrix_loss(z, f, 0.0), torch.tensor([2 * c / 4]))
    torch.testing.assert_close(margin_distance_matrix_loss(z, f, 0.25), torch.tensor([2 * (c - 0.25) / 4]))
    assert float(margin_distance_matrix_loss(z, f, 0.8)) == 0.0  # |S_z - S_f| <= 0.71 < m: dead zone
    # invariant to per-position scaling (cosines only)
    torch.testing.assert_close(margin_distance_matrix_loss(z * 3, f * torch.tensor([1.0, 5.0]).view(1, 1, 1, 2), 0.0),
                               torch.tensor([2 * c / 4]))


def test_vf_loss_combines_both_terms():
    g = torch.Generator().manual_seed(0)
    z, f = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    expected = 2.0 * margin_distance_matrix_loss(z, f, 0.25) + 0.5 * margin_cosine_loss(z, f, 0.5)
    torch.testing.assert_close(vf_loss(z, f, margin_cos=0.5, margin_dist=0.25, cos_weight=0.5, distmat_weight=2.0),
                               expected)
    # identical features: both losses vanish at margin 0
    assert float(vf_loss(z, z, margin_cos=0.0, margin_dist=0.0).abs().max()) < 1e-6


def test_tokens_to_grid():
    t = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    g = tokens_to_grid(t, (2, 3))
    assert g.shape == (2, 3, 2, 3) and torch.equal(g[1, :, 1, 2], t[1, 5])
    assert tokens_to_grid(torch.zeros(1, 16, 5)).shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="square"):
        tokens_to_grid(torch.zeros(1, 6, 5))


class TinyViT(nn.Module):
    """Patch embedding + one transformer layer: (B, 3, H, W) -> (B, L, D) patch tokens."""

    def __init__(self, dim=16, patch=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, batch_first=True)
        self.feature_dim = dim

    def forward(self, x):
        return self.block(self.embed(x).flatten(2).transpose(1, 2))


def test_aligner_resizes_features_to_the_latent_grid_and_trains_only_the_projection():
    torch.manual_seed(0)
    vit = TinyViT()
    aligner = VFAligner(encoder=vit, feature_dim=vit.feature_dim, latent_channels=4)
    assert list(aligner.state_dict()) == ["proj.weight"] and aligner.proj.bias is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    z_proj, feats = aligner(x, z)
    assert z_proj.shape == feats.shape == (2, 16, 8, 8)
    raw = tokens_to_grid(vit(x))  # 4 x 4 grid
    torch.testing.assert_close(feats, nn.functional.interpolate(raw, size=(8, 8), mode="bilinear",
                                                                align_corners=False))
    vf_loss(z_proj, feats).mean().backward()
    assert z.grad is not None and aligner.proj.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in vit.parameters())


def test_build_va_feeds_the_encoder_as_tokenizer_va_preprocess_says(monkeypatch):
    from pathlib import Path

    from timm.models.vision_transformer import VisionTransformer

    from ldm import encoders
    from ldm.config import VaCfg, load_config
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.tokenizers.va import build_va

    def tiny_vit(name, weights_path=None, image_size=None):
        torch.manual_seed(0)
        return VisionTransformer(img_size=224, patch_size=14, embed_dim=16, depth=1, num_heads=2, num_classes=0)

    monkeypatch.setattr(encoders, "load_vit", tiny_vit)
    ae = build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    va = build_va(VaCfg(enabled=True, encoder="dinov2_vitl14", preprocess="lightningdit"), autoencoder=ae)
    # LightningDiT forward_dinov2: the [-1, 1] image, bilinear to 224 px, no normalisation
    expected = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(va.frozen("encoder").preprocess(x), expected)
    assert va.features(x, (4, 4)).shape == (1, 16, 4, 4)
    # the presets that follow LightningDiT's recipe use its preprocessing
    for stage in (1, 2, 3):
        cfg = load_config(Path(__file__).parents[1] / "configs" / "tokenizer" / f"vavae_f16c32_stage{stage}.yaml")
        assert cfg.tokenizer.va.preprocess == "lightningdit"
