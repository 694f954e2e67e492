"""A constant latent channel (std 0) is refused with one line instead of training on NaN."""

from types import SimpleNamespace

import pytest

from ldm.tokenizers.stats import LatentStats, normalizer_for


def _tokenizer(std, scaling_factor=1.0):
    stats = LatentStats(mean=[0.0] * len(std), std=list(std), scaling_factor=scaling_factor, num_images=8)
    return SimpleNamespace(latent_channels=len(std), stats=stats, scaling_factor=None, source="tok",
                           fingerprint="f")


def test_constant_channel_is_refused_by_name():
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\] are constant.*latent_norm=scalar"):
        normalizer_for(_tokenizer([0.5, 0.0, 2.0]), kind="channel")


def test_constant_latents_refuse_scalar_norm():
    with pytest.raises(ValueError, match="latent_norm=none"):
        normalizer_for(_tokenizer([0.0, 0.0], scaling_factor=float("inf")), kind="scalar")


def test_healthy_statistics_pass():
    norm = normalizer_for(_tokenizer([0.5, 2.0]), kind="channel")
    assert norm.std.flatten().tolist() == [0.5, 2.0]
