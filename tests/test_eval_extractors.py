"""The extractor interface: any nn.Module plugs in, metric names follow the extractor, DINOv2 needs local weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.eval.evaluate import evaluate_samples
from ldm.eval.extractors import EXTRACTORS, ImagePreprocess, ModuleExtractor, build_extractor


class MeanColour(torch.nn.Module):
    """A transparent 'feature network': per-channel means of the preprocessed image, (B, 3)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


def test_any_module_is_an_extractor(tmp_path):
    pre = ImagePreprocess(None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ext = ModuleExtractor(MeanColour(), "meancolour", pre)
    assert ext.metric_name == "FD_meancolour" and ext.outputs == ("features",)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 51, 0, 255).astype(np.uint8)  # brighter by 51/255 = 0.2 where nothing clips
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    res = evaluate_samples(str(tmp_path / "b.npz"), str(tmp_path / "a.npz"), extractor=ext, metrics=("fd",),
                           use_cache=False, progress=False, device="cpu", batch_size=16)
    # independent: the Fréchet distance of the 3-d mean-colour features computed here with scipy
    from scipy import linalg

    fa, fb = a.reshape(40, -1, 3).mean(1) / 255, b.reshape(40, -1, 3).mean(1) / 255
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert res["extractor"] == "meancolour" and res["fd_meancolour"] == pytest.approx(expected, rel=1e-5)
    # a different network gives a different cache key
    other = ModuleExtractor(MeanColour(), "meancolour", pre)
    other.net.scale.data.fill_(2.0)
    assert other.cache_key() != ext.cache_key()
    with pytest.raises(ValueError, match="non-empty identifier"):
        ModuleExtractor(MeanColour(), "bad name", pre)


def test_registry_and_dinov2_needs_local_weights(tmp_path, monkeypatch):
    assert sorted(EXTRACTORS) == ["digits", "dinov2", "inception"]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("LDM_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        build_extractor("dinov2")
    monkeypatch.setenv("LDM_DINOV2_WEIGHTS", str(tmp_path / "mine.pth"))
    with pytest.raises(FileNotFoundError, match="mine.pth"):
        build_extractor("dinov2")


def test_preprocess_resizes_and_normalises():
    pre = ImagePreprocess(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), mode="bilinear")
    x = torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)  # grey input is replicated to RGB
    y = pre(x)
    assert y.shape == (1, 3, 4, 4) and torch.allclose(y, torch.full_like(y, 2.0))  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="mode='nearest'"):
        ImagePreprocess(4, (0.5,), (0.5,), mode="nearest")
