"""Frozen vision encoders (ldm/encoders/) with tiny random timm ViTs and plain modules built here."""

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ldm.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, FrozenEncoder, build_encoder, load_vit_weights


def tiny_vit(img_size=28, seed=0, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                             init_values=1e-5, **kw)  # layer scale as DINOv2


def test_patch_tokens_without_class_token():
    vit = tiny_vit().eval()
    enc = FrozenEncoder(vit, image_size=28, patch_size=14, feature_dim=32, num_prefix_tokens=vit.num_prefix_tokens)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = enc(images)
    assert feats.shape == (2, 4, 32) and enc.grid_size == 2
    expected = vit.forward_features(enc.preprocess(images))[:, 1:]  # drop the class token
    torch.testing.assert_close(feats, expected)
    regs = tiny_vit(reg_tokens=4, no_embed_class=True).eval()  # DINOv2-with-registers layout: 1 + 4 prefix tokens
    enc_r = FrozenEncoder(regs, image_size=28, patch_size=14, feature_dim=32, num_prefix_tokens=regs.num_prefix_tokens)
    assert enc_r(images).shape == (2, 4, 32) and regs.num_prefix_tokens == 5


def test_preprocessing_maps_minus_one_one_to_imagenet_normalised_pixels():
    enc = FrozenEncoder(tiny_vit(), image_size=28, patch_size=14, feature_dim=32, num_prefix_tokens=1)
    images = torch.full((1, 3, 64, 64), 0.5)  # -> 0.75 in [0, 1]; a constant image stays constant under bicubic resize
    x = enc.preprocess(images)
    assert x.shape == (1, 3, 28, 28)
    for ch in range(3):
        torch.testing.assert_close(x[0, ch], torch.full((28, 28), (0.75 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]))
    raw = FrozenEncoder(tiny_vit(), image_size=28, patch_size=14, feature_dim=32, normalize=False,
                        resize_mode="bilinear")
    torch.testing.assert_close(raw.preprocess(images), torch.full((1, 3, 28, 28), 0.75))


def test_encoder_is_frozen_and_accepts_any_module():
    class ConvPatches(torch.nn.Module):  # (B, 3, 16, 16) -> (B, 16, 8), no prefix tokens
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            return self.conv(x).flatten(2).transpose(1, 2)

    enc = FrozenEncoder(ConvPatches(), image_size=16, patch_size=4, feature_dim=8)
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    images = torch.zeros(2, 3, 16, 16, requires_grad=True)
    out = enc(images)
    assert out.shape == (2, 16, 8) and not out.requires_grad
    bad = FrozenEncoder(ConvPatches(), image_size=16, patch_size=4, feature_dim=9)
    with pytest.raises(ValueError, match="expected \\(2, 16, 9\\)"):
        bad(images)
    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        enc(torch.zeros(2, 1, 16, 16))


def test_official_dinov2_layout_and_pos_embed_resampling_load(tmp_path):
    src = tiny_vit(img_size=42, seed=1)  # 3 x 3 grid, like DINOv2's 37 x 37 at 518 px
    sd = dict(src.state_dict(), mask_token=torch.zeros(1, 32))  # the facebookresearch/dinov2 layout has a mask token
    torch.save(sd, tmp_path / "dinov2_tiny_pretrain.pth")
    dst = tiny_vit(img_size=28, seed=2)
    load_vit_weights(dst, tmp_path / "dinov2_tiny_pretrain.pth")  # resampled to 2 x 2
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    same = tiny_vit(img_size=42, seed=3)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))  # timm layout
    load_vit_weights(same, tmp_path / "model.safetensors")
    x = torch.randn(1, 3, 42, 42)
    torch.testing.assert_close(same.eval().forward_features(x), src.eval().forward_features(x))
    torch.save({"cls_token": sd["cls_token"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_vit_weights(tiny_vit(), tmp_path / "partial.pth")


def test_missing_weights_name_the_file_and_the_places_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("dinov2_vitb14")
    msg = str(err.value)
    assert "dinov2_vitb14_pretrain.pth" in msg and str(tmp_path / "torch") in msg and str(tmp_path / "hf") in msg
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        build_encoder("mae_vitl16", tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="dinov2_vits14"):
        build_encoder("dino_v3")


def test_build_encoder_finds_the_torch_hub_file(tmp_path, monkeypatch):
    # a random DINOv2 ViT-S/14 at its native 518 px (37 x 37 grid) saved as the official hub file
    import timm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    src = timm.create_model(ENCODERS["dinov2_vits14"][0], pretrained=False, num_classes=0)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(dict(src.state_dict(), mask_token=torch.zeros(1, 384)),
               tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
    enc = build_encoder("dinov2_vits14")
    assert (enc.image_size, enc.grid_size, enc.feature_dim) == (224, 16, 384)
    feats = enc(torch.zeros(1, 3, 256, 256))
    assert feats.shape == (1, 256, 384)  # REPA: 256 px -> 224 px -> 16 x 16 patches
    torch.testing.assert_close(enc.model.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


def test_features_at_grid_reads_the_encoder_grid_and_resizes_to_the_target():
    from ldm.encoders import features_at_grid, tokens_to_grid

    class Tokens(torch.nn.Module):  # (B, 3, 8, 12) -> (B, 6, 2) tokens on a 2 x 3 grid of 4 x 4 patches
        grid_size = (2, 3)

        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x[:, :2], 4).flatten(2).transpose(1, 2)

    enc = Tokens()
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.avg_pool2d(x[:, :2], 4)  # (B, 2, 2, 3): the tokens as a map, computed directly
    torch.testing.assert_close(features_at_grid(enc, x, (2, 3)), pooled)
    up = features_at_grid(enc, x, (4, 6))
    torch.testing.assert_close(up, torch.nn.functional.interpolate(pooled, size=(4, 6), mode="bilinear",
                                                                   align_corners=False))
    enc.grid_size = 5  # does not fit 6 tokens and 6 is not a square: the error names the token count
    with pytest.raises(ValueError, match="6 patch tokens"):
        features_at_grid(enc, x, (2, 3))
    assert tokens_to_grid(torch.zeros(1, 16, 5)).shape == (1, 5, 4, 4)


# ------------------------------------------------------------------------------------ preprocessing vs the references
class _Recorder(torch.nn.Module):
    """Patch tokens of a random conv, remembering the tensor it was given (what the frozen encoder receives)."""

    def __init__(self, patch=14, dim=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, L, D)


def _repa_transcription(images, size):
    """REPA train.py preprocess_raw_image, DINOv2 branch, on the uint8-range image REPA's loader gives (x / 127.5 - 1
    = images); `size` stands for its 224 * (resolution // 256)."""
    from torchvision.transforms import Normalize

    raw = (images + 1) * 127.5
    x = raw / 255.
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    return torch.nn.functional.interpolate(x, size, mode="bicubic")


def _lightningdit_transcription(images, size):
    """LightningDiT vavae/ldm/models/foundation_models.py aux_foundation_model.forward_dinov2 (224 -> `size`), on the
    [-1, 1] image its LDM ImageNet loader gives (image / 127.5 - 1)."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def test_the_encoder_receives_each_references_preprocessed_image():
    from ldm.encoders import PREPROCESSING

    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for name, transcription in (("repa", _repa_transcription), ("lightningdit", _lightningdit_transcription)):
        rec = _Recorder()
        enc = FrozenEncoder(rec, image_size=28, patch_size=14, feature_dim=8, **PREPROCESSING[name])
        enc(images)
        assert rec.seen.shape == (2, 3, 28, 28)
        torch.testing.assert_close(rec.seen, transcription(images, 28), rtol=0, atol=1e-5)
    # LightningDiT's MAE (forward_mae) sees the image unresized: at the encoder's size nothing touches it
    rec = _Recorder(patch=8)
    FrozenEncoder(rec, image_size=40, patch_size=8, feature_dim=8, **PREPROCESSING["lightningdit"])(images)
    assert torch.equal(rec.seen, images)


def test_build_encoder_applies_the_named_preprocessing(monkeypatch):
    from dataclasses import fields

    from ldm import encoders
    from ldm.config import VaCfg

    monkeypatch.setattr(encoders, "load_vit", lambda name, weights_path=None, image_size=None: tiny_vit(224))
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    light = build_encoder("dinov2_vitl14", preprocess="lightningdit")
    assert torch.equal(light.preprocess(images), _lightningdit_transcription(images, 224))
    repa = build_encoder("dinov2_vitl14")  # the default: REPA's
    torch.testing.assert_close(repa.preprocess(images), _repa_transcription(images, 224), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="preprocess='imagenet'.*lightningdit"):
        build_encoder("dinov2_vitl14", preprocess="imagenet")
    # the config offers exactly the named settings
    choices = next(f for f in fields(VaCfg) if f.name == "preprocess").metadata["choices"]
    assert set(choices) == set(encoders.PREPROCESSING) and VaCfg().preprocess == "repa"
