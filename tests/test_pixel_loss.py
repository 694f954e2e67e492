"""Pixel-space loss (issue #15): the distance and time window against hand values, the decode with gradients equal to
the tokenizer's own decode (KL and VQ), training from a latent cache with the decoded target, bit-exact resume with the
loss on, the bad-input one-liners, and: with both new options off, runs are bit-identical to the code before them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_decoder_losses_off import (
    fit_generator,
    generator_cfg,
    run_off_cases,
    tiny_vae,
    weights_digest,
)

from ldm.config import ConfigError, load_config
from ldm.diffusion.pixel_loss import pixel_distance, time_window


def test_pixel_distance_and_time_window_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    b = torch.tensor([[[[0.0, 2.0], [5.0, 3.0]]]])
    assert pixel_distance(a, b, "l2").tolist() == [(1 + 0 + 4 + 1) / 4]
    assert pixel_distance(a, b, "l1").tolist() == [(1 + 0 + 2 + 1) / 4]
    assert time_window(torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0]), 0.3, 0.7).tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="diffusion.pixel_loss.distance='l3'"):
        pixel_distance(a, b, "l3")


def test_decode_with_gradients_is_the_tokenizers_decode(tmp_path):
    """decoder_features.decode runs the same modules as Tokenizer.decode (KL with post_quant_conv, VQ): bit-equal
    images, and gradients reach the latent only."""
    from ldm.tokenizers.decoder_features import decode, decoder_features
    from ldm.tokenizers.export import Tokenizer, load_tokenizer
    from ldm.tokenizers.vq import VQAutoencoder

    torch.manual_seed(0)
    vq = VQAutoencoder(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, z_channels=4,
                       codebook_size=16, code_dim=3)
    for tok in (load_tokenizer(tiny_vae(tmp_path / "vae")), Tokenizer(vq)):
        z = torch.randn(2, tok.latent_channels, 4, 4, requires_grad=True)
        images = decode(tok.model, z)
        assert torch.equal(images, tok.decode(z.detach()))
        images.square().mean().backward()
        assert z.grad is not None and all(p.grad is None for p in tok.parameters())
        feats = decoder_features(tok.model, z.detach(), [1])  # the decoder stops after up block 0
        assert len(feats) == 1 and feats[0].shape[-1] == 8


def _cfg(root, vae, name, *extra):
    return generator_cfg(root, vae, name, "diffusion.pixel_loss.enabled=true", *extra)


_fit = fit_generator


def test_resume_with_the_pixel_loss_on_is_bit_exact(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    extra = ["train.ckpt_every=2", "diffusion.pixel_loss.t_max=0.6", "diffusion.pixel_loss.distance=l1"]
    _fit(_cfg(tmp_path, vae, "straight", "train.max_steps=4", *extra))
    _fit(_cfg(tmp_path, vae, "resumed", "train.max_steps=2", *extra))
    _fit(_cfg(tmp_path, vae, "resumed", "train.max_steps=4", *extra))
    straight = weights_digest(tmp_path / "straight" / "checkpoints" / "step_0000004")
    assert weights_digest(tmp_path / "resumed" / "checkpoints" / "step_0000004") == straight


def test_latent_cache_with_the_decoded_target(tmp_path):
    """From a latent cache the true latents come from the cache and the target is their decoding; the image target
    is refused there with one line."""
    from ldm.data.latents import build_latent_cache
    from ldm.tokenizers.export import load_tokenizer

    vae = tiny_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    build_latent_cache(load_tokenizer(vae), "digits", cache, image_size=16, batch_size=256, progress=False)
    with pytest.raises(ConfigError, match="diffusion.pixel_loss.target=image needs the training images") as err:
        _fit(_cfg(tmp_path, vae, "img", f"data.latents={cache}", "train.max_steps=1"))
    assert "\n" not in str(err.value)
    _fit(_cfg(tmp_path, vae, "dec", f"data.latents={cache}", "diffusion.pixel_loss.target=decoded", "diffusion.latent_norm=none",
              "diffusion.lpl.enabled=true", "diffusion.lpl.snr_min=0", "train.max_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "dec" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/pixel"] > 0 and r["train/lpl"] > 0 for r in rows)


def test_bad_inputs_are_one_line_errors(tmp_path):
    from torch import nn

    from ldm.diffusion.paths import get_path
    from ldm.tokenizers.stats import LatentNormalizer
    from ldm.train.generator_task import build_generator_task
    from ldm.train.generator_terms import build_generator_terms

    cfg = load_config(None, ["diffusion.pixel_loss.enabled=true", "data.latents=/nowhere",
                             "diffusion.pixel_loss.target=decoded"])
    with pytest.raises(ConfigError, match="diffusion.pixel_loss.enabled=true needs the tokenizer's decoder: set "
                                          "tokenizer.checkpoint=<the tokenizer run or export the latent cache was "
                                          "made with>") as err:
        build_generator_task(cfg)
    assert "\n" not in str(err.value)

    class Foreign(nn.Module):  # an imported tokenizer whose decoder is one opaque network
        def __init__(self):
            super().__init__()
            self.model, self.downsample = nn.Module(), 8
            self.model.decoder = nn.Sequential(nn.Conv2d(4, 3, 1))

    cfg = load_config(None, ["diffusion.pixel_loss.enabled=true"])
    with pytest.raises(ValueError, match="diffusion.pixel_loss: the tokenizer's decoder \\(Sequential\\) has no named "
                                         "feature blocks") as err:
        build_generator_terms(cfg.diffusion, path=get_path("linear"), tokenizer=Foreign(),
                              normalizer=LatentNormalizer("none", 4))
    assert "\n" not in str(err.value)
    cfg = load_config(None, ["diffusion.pixel_loss.enabled=true", "diffusion.pixel_loss.t_min=0.8",
                             "diffusion.pixel_loss.t_max=0.2"])
    with pytest.raises(ConfigError, match="t_min=0.8 > t_max=0.2"):
        build_generator_terms(cfg.diffusion, path=get_path("linear"), tokenizer=Foreign(),
                              normalizer=LatentNormalizer("none", 4))


def test_both_options_off_trains_bit_identically_to_the_code_before_them(tmp_path):
    """The three runs of tests/fixtures/make_decoder_losses_off.py (flow; DDPM eps + learned sigma, no labels; REPA
    through the new term seam), trained again now: the digests its run at commit acc4e70 recorded."""
    expected = json.loads((FIXTURES / "decoder_losses_off.json").read_text())["digests"]
    assert run_off_cases(tmp_path) == expected


@pytest.mark.slow
def test_replication_decoder_study_smoke(tmp_path):
    """bench/replication/run.py --study decoder_losses --tiny: the plain and pixel post-training arms train, the
    post arm starts from plain's 50 % EMA and shares its first two gFD numbers, the paired table is printed (a few
    minutes on 2 cores; slow-marked)."""
    from conftest import run_python

    proc = run_python(["bench/replication/run.py", "--study", "decoder_losses", "--tiny", "--seeds", "0", "--arms",
                       "plain,pixel_post", "--run-root", str(tmp_path), "--no-docs"], timeout=1200)
    runs = json.loads((tmp_path / "tiny" / "results_decoder_losses.json").read_text())["runs"]
    plain, post = runs
    assert (plain["arm"], post["arm"]) == ("plain", "pixel_post") and plain["steps"] == post["steps"]
    assert post["gfd_digits"][:2] == plain["gfd_digits"][:2] and post["gfd_digits"][2] != plain["gfd_digits"][2]
    assert "| pixel_post / plain_post |" not in proc.stdout and "gFD_digits @" in proc.stdout
