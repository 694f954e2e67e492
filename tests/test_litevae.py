"""LiteVAE (ldm/tokenizers/litevae.py; Sadat et al. 2024, arXiv:2405.14477): the paper's encoder sizes against its
parameter counts, a hand-counted UNet, the wavelet inputs against block means, SMC against StyleGAN2's demodulation by
hand, the KL term against torch.distributions, the tiny preset against tiny_f4 (parameters, latent shape, held-out
PSNR: slow), bad input in one line, EQ-VAE / VA-VAE, and train -> export -> load -> cache -> a generator trains."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import ConfigError, load_config
from ldm.tokenizers.export import build_tokenizer
from ldm.tokenizers.kinds import KINDS
from ldm.tokenizers.litevae import (
    ENCODER_PRESETS,
    FeatureUNet,
    LiteVAE,
    SelfModulatedConv2d,
)

REPO = Path(__file__).resolve().parent.parent
# encoder parameters the paper reports for LiteVAE-S / B / M / L (B: "6.75M", against 34.16M for the VAE encoder)
PAPER_ENCODER_PARAMS = {"LiteVAE-S": 1.03e6, "LiteVAE-B": 6.75e6, "LiteVAE-M": 32.75e6, "LiteVAE-L": 41.42e6}
TINY = ["stage=tokenizer", "data.image_size=16", "data.class_cond=false", "tokenizer.kind=litevae",
        "tokenizer.block_out_channels=[16,16,16]", "tokenizer.norm_num_groups=8", "tokenizer.layers_per_block=1",
        "tokenizer.mid_block_attention=false", "tokenizer.use_quant_conv=false",
        "tokenizer.litevae.extractor_channels=8", "tokenizer.litevae.extractor_mult=[1,2]",
        "tokenizer.litevae.extractor_blocks=1", "tokenizer.litevae.aggregator_channels=8",
        "tokenizer.litevae.aggregator_mult=[1,2]", "tokenizer.litevae.aggregator_blocks=1",
        "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1", "train.batch_size=8", "train.log_every=1",
        "optim.name=adam", "optim.lr=1e-3", "optim.betas=[0.5,0.9]"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_model(**kw) -> LiteVAE:
    torch.manual_seed(0)
    args = {"latent_channels": 4, "extractor_channels": 8, "extractor_mult": [1, 2], "extractor_blocks": 1,
            "aggregator_channels": 8, "aggregator_mult": [1, 2], "aggregator_blocks": 1,
            "block_out_channels": [16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
            "mid_block_attention": False}
    return LiteVAE(**{**args, **kw})


# ------------------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("name", sorted(PAPER_ENCODER_PARAMS))
def test_the_paper_encoder_sizes_have_its_parameter_counts(name):
    with torch.device("meta"):
        model = LiteVAE(latent_channels=12, **ENCODER_PRESETS[name])  # 3 Haar levels (f8), n_z = 12
    count = n_params(model.encoder)
    assert abs(count - PAPER_ENCODER_PARAMS[name]) / PAPER_ENCODER_PARAMS[name] < 0.01, count


def test_the_decoder_is_sd_vae_s():
    from ldm.tokenizers.kl import build_autoencoder_kl

    with torch.device("meta"):
        sd = build_autoencoder_kl()  # SD-VAE kl-f8
        lite = LiteVAE(latent_channels=4)
    assert n_params(lite.decoder) == n_params(sd.decoder) and lite.downsample == 8


def test_a_hand_counted_feature_unet_keeps_the_resolution():
    # conv_in 1->2 (3x3): 20; down ResBlock(2, 2): GN 4 + conv 38 + GN 4 + conv 38 = 84; middle: 2 x 84;
    # up ResBlock(2 + 2 skip -> 2): GN 8 + conv 74 + GN 4 + conv 38 + 1x1 shortcut 10 = 134; norm_out 4; conv_out 19
    unet = FeatureUNet(1, 1, channels=2, mult=[1], blocks=1, groups=1)
    assert n_params(unet) == 20 + 84 + 168 + 134 + 4 + 19
    big = FeatureUNet(12, 12, channels=16, mult=[1, 2, 2], blocks=2, groups=8)
    assert len(big.down) == len(big.up) == 6 and len(big.mid) == 2
    assert big(torch.randn(1, 12, 5, 7)).shape == (1, 12, 5, 7)


def test_each_extractor_sees_its_haar_level_with_ll_the_block_mean():
    model = tiny_model()  # 2 levels
    seen = {}
    for level, extract in enumerate(model.encoder.extractors, start=1):
        extract.register_forward_pre_hook(lambda m, args, level=level: seen.__setitem__(level, args[0]))
    model.encoder.aggregator.register_forward_pre_hook(lambda m, args: seen.__setitem__("agg", args[0]))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = model.encoder(x)
    for level in (1, 2):  # the LL band of level l, scaled by 2^-l, is the mean of each 2^l x 2^l block
        assert seen[level].shape == (2, 12, 16 // 2 ** level, 16 // 2 ** level)
        torch.testing.assert_close(seen[level][:, :3], F.avg_pool2d(x, 2 ** level), atol=1e-6, rtol=0)
    assert seen["agg"].shape == (2, 2 * 12, 4, 4) and moments.shape == (2, 8, 4, 4)


def test_self_modulated_convolution_by_hand():
    conv = SelfModulatedConv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]]).view(2, 3, 1, 1))
        conv.scale.copy_(torch.tensor([1.0, 2.0, 3.0]))
        conv.bias.zero_()
    # w' = s_i w_ij: rows [1, 2, 3] and [0, 4, 0]; demodulated: [1, 2, 3] / sqrt(14) and [0, 1, 0]
    out = conv(torch.ones(1, 3, 1, 1)).flatten().tolist()
    assert out == pytest.approx([6 / 14 ** 0.5, 1.0], abs=1e-6)
    with torch.no_grad():
        conv.weight[0] *= 5.0  # demodulation: an output channel's weight scale does not matter
    assert conv(torch.ones(1, 3, 1, 1)).flatten().tolist() == pytest.approx([6 / 14 ** 0.5, 1.0], abs=1e-6)


def test_smc_replaces_the_decoder_group_norms():
    from diffusers.models.resnet import ResnetBlock2D

    plain, smc = tiny_model(mid_block_attention=True), tiny_model(mid_block_attention=True, smc=True)
    blocks = [m for m in smc.decoder.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(isinstance(b.conv1, SelfModulatedConv2d) and isinstance(b.conv2, SelfModulatedConv2d)
                          and isinstance(b.norm1, nn.Identity) for b in blocks)
    assert isinstance(smc.decoder.conv_out, SelfModulatedConv2d)
    norms = [n for n, m in smc.decoder.named_modules() if isinstance(m, nn.GroupNorm)]
    assert norms == ["mid_block.attentions.0.group_norm"]  # only attention keeps its GroupNorm
    assert smc.decode(torch.randn(1, 4, 4, 4)).shape == (1, 3, 16, 16)
    assert KINDS["litevae"].decoder_last_layer(smc) is smc.decoder.conv_out.weight
    assert len(plain.state_dict()) != len(smc.state_dict())  # the arch record decides which one loads


def test_the_kl_term_and_posterior_sample_against_torch_distributions():
    model, kind = tiny_model(), KINDS["litevae"]
    cfg = load_config(overrides=[*TINY, "tokenizer.kl_weight=0.5"]).tokenizer
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    enc = kind.encode_train(model, x, cfg=cfg, draws=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    post = kind.posterior(model, x)
    q = torch.distributions.Normal(post.mean, torch.exp(0.5 * post.logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(enc.loss, 0.5 * kl)
    torch.testing.assert_close(enc.logs["loss_kl"], kl)
    eps = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)])
    torch.testing.assert_close(enc.z, post.mean + torch.exp(0.5 * post.logvar) * eps)
    assert torch.equal(kind.encode(model, x), post.mean)


# ------------------------------------------------------------------------------------------------------ presets
def test_the_tiny_preset_has_a_quarter_of_tiny_f4_s_encoder_and_its_latent_shape():
    from ldm.tokenizers.export import Tokenizer

    kl_cfg = load_config(REPO / "configs" / "tokenizer" / "tiny_f4.yaml")
    lite_cfg = load_config(REPO / "configs" / "tokenizer" / "tiny_litevae_f4.yaml")
    kl = build_tokenizer(kl_cfg.tokenizer, kl_cfg.data.image_size)
    lite = build_tokenizer(lite_cfg.tokenizer, lite_cfg.data.image_size)
    kl_encoder = n_params(kl.encoder) + n_params(kl.quant_conv)  # everything before the posterior
    assert 4 * n_params(lite.encoder) <= kl_encoder, (n_params(lite.encoder), kl_encoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert Tokenizer(kl).encode(x).shape == Tokenizer(lite).encode(x).shape == (2, 4, 8, 8)
    # the same diffusers Decoder convolutions (the preset's SMC swaps GroupNorm for a per-input-channel style)
    convs = [[m.weight.shape for m in tok.decoder.modules() if isinstance(m, torch.nn.Conv2d)] for tok in (kl, lite)]
    assert convs[0] == convs[1] and lite.config["smc"]


def test_the_imagenet_preset_is_litevae_b_at_f8():
    cfg = load_config(REPO / "configs" / "tokenizer" / "litevae_imagenet256.yaml")
    lv = cfg.tokenizer.litevae
    assert {k: getattr(lv, k) for k in ENCODER_PRESETS["LiteVAE-B"]} == ENCODER_PRESETS["LiteVAE-B"]
    with torch.device("meta"):
        model = build_tokenizer(cfg.tokenizer, cfg.data.image_size)
    assert model.downsample == 8 and model.latent_channels == 12 and model.config["smc"]
    assert abs(n_params(model.encoder) - 6.75e6) / 6.75e6 < 0.01


def test_the_tiny_preset_trains_as_shipped(tmp_path):
    from ldm.train.loop import fit

    cfg = load_config(REPO / "configs" / "tokenizer" / "tiny_litevae_f4.yaml",
                      [f"train.run_root={tmp_path}", "train.max_steps=2", "train.batch_size=8",
                       "train.ckpt_every=1000", "train.log_every=1"])
    assert fit(cfg, progress=False).step == 2


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_image_sizes_and_keys_are_named_in_one_line():
    from ldm.tokenizers.export import Tokenizer

    not_divisible = "^data.image_size=18 is not divisible by the tokenizer's downsampling factor 4"
    with pytest.raises(ConfigError, match=not_divisible):
        load_config(overrides=[*TINY, "data.image_size=18"])
    cfg = load_config(overrides=TINY)
    with pytest.raises(ValueError, match=not_divisible + "; choose a multiple of 4$"):
        build_tokenizer(cfg.tokenizer, 18)
    with pytest.raises(ValueError, match=r"image size \(18, 18\) is not divisible"):
        Tokenizer(build_tokenizer(cfg.tokenizer, 16)).encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match=r"^tokenizer.litevae.norm_num_groups=5 does not divide"):
        build_tokenizer(load_config(overrides=[*TINY, "tokenizer.litevae.norm_num_groups=5"]).tokenizer, 16)
    with pytest.raises(ValueError, match=r"^tokenizer.litevae.extractor_mult=\[\]; expected a non-empty list"):
        build_tokenizer(load_config(overrides=[*TINY, "tokenizer.litevae.extractor_mult=[]"]).tokenizer, 16)
    with pytest.raises(ValueError, match=r"^tokenizer.block_out_channels=\[16\]: litevae needs at least 2 entries"):
        build_tokenizer(load_config(overrides=[*TINY, "tokenizer.block_out_channels=[16]"]).tokenizer, 16)


def test_eq_vae_and_va_vae_apply(tmp_path):
    """Both act on the latent (EQ-VAE: scaled / rotated latents decoded against the same-transformed image; VA-VAE:
    the VF loss on a projection of the latent, its adaptive weight at the aggregator's output conv)."""
    from ldm.train.loop import fit
    from ldm.train.tokenizer_task import build_tokenizer_task

    assert KINDS["litevae"].regularisers == ("eq", "va")
    extra = ["data.image_size=32", "tokenizer.eq.enabled=true", "tokenizer.eq.scale_num_min=16",
             "tokenizer.va.enabled=true", "tokenizer.va.encoder=digits", "tokenizer.disc_start=0",
             "tokenizer.disc_layers=2", "train.max_steps=2", "train.ckpt_every=1000", f"train.run_root={tmp_path}"]
    cfg = load_config(overrides=[*TINY, *extra])
    task, _ = build_tokenizer_task(cfg)
    assert [r.name for r in task.regularisers] == ["eq", "va"]
    assert fit(cfg, progress=False).step == 2
    logs = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_vf" in r for r in logs), logs[-1]


# ------------------------------------------------------------------------------------------------------ end to end
def test_train_export_load_cache_and_a_generator_trains(tmp_path):
    """With self-modulated convolutions on: trained through the CLI, exported to ldm's folder, loaded back with the
    same fingerprint and outputs, cached, and a DiT trains on the cached latents."""
    from ldm.cli import main
    from ldm.data.latents import build_latent_cache
    from ldm.tokenizers import export_tokenizer, load_tokenizer
    from ldm.tokenizers.stats import STATS_FILE, compute_tokenizer_stats
    from ldm.train.loop import fit

    assert main(["train", "--no-progress", *TINY, "tokenizer.litevae.smc=true", "name=lite", "tokenizer.disc_start=0",
                 f"train.run_root={tmp_path}", "train.max_steps=3", "train.ckpt_every=3"]) == 0
    run = load_tokenizer(tmp_path / "lite")
    assert run.kind == "litevae" and run.family == "gaussian" and run.downsample == 4 and run.latent_channels == 4
    compute_tokenizer_stats(tmp_path / "lite", load_config(overrides=TINY).data, num_images=64, batch_size=32)
    out = export_tokenizer(tmp_path / "lite", tmp_path / "export")
    record = json.loads((out / "tokenizer_config.json").read_text())
    assert record["kind"] == "litevae" and record["config"]["smc"] and (out / "tokenizer.safetensors").is_file()
    tok = load_tokenizer(out)
    assert tok.fingerprint == run.fingerprint and (out / STATS_FILE).is_file() and tok.stats is not None
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(tok.encode(x), run.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), run.decode(run.encode(x)))
    post = tok.posterior(x)
    assert post.mean.shape == post.logvar.shape == (4, 4, 4, 4)

    meta = build_latent_cache(tok, "digits", tmp_path / "cache", image_size=16, flips=False, batch_size=64,
                              shard_size=256, progress=False)
    assert meta.tokenizer_kind == "litevae" and meta.latent_shape == [4, 4, 4]
    cached = np.concatenate([np.load(p) for p in sorted((tmp_path / "cache").glob("shard_*.latents.npy"))])
    from ldm.data.embedded import digits_arrays

    first = torch.tensor(digits_arrays(16)[0][:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(cached[:8], tok.encode(first).numpy(), atol=1e-5, rtol=0)

    gen = ["name=g", f"train.run_root={tmp_path}", f"tokenizer.checkpoint={out}", f"data.latents={tmp_path / 'cache'}",
           "data.image_size=16", "tokenizer.kind=litevae", "tokenizer.latent_channels=4", "model.preset=DiT-Pico/2",
           "train.batch_size=32", "train.max_steps=30", "train.log_every=10", "train.ckpt_every=1000",
           "optim.lr=2e-3", "sample.steps=2"]
    result = fit(load_config(None, gen), progress=False)
    losses = [r["train/loss"] for r in map(json.loads, (tmp_path / "g" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert result.step == 30 and losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------------------ slow
def _heldout_psnr(tok, x: torch.Tensor) -> float:
    with torch.no_grad():
        mse = (tok.decode(tok.encode(x)).clamp(-1, 1) - x).square().flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())  # images in [-1, 1]: peak-to-peak 2


@pytest.mark.slow
@pytest.mark.timeout(3600)
# Issue #17's acceptance check (session 7, 1 CPU thread; numbers in docs/tokenizers.md). The earlier preset
# (width-8 / [1, 2] UNets everywhere, 79k encoder parameters, GroupNorm decoder) gave 26.98 dB against 29.39; its
# variants at 300 steps: optim.lr=1e-3 27.53, aggregator_mult=[1,2,2] 26.95, use_quant_conv 25.66, encoder
# norm_num_groups=2 26.09, no 1/2^l input scaling 26.11, pixel-unshuffle instead of average pooling 27.02, smc 27.31.
# What closed the gap: the parameters moved to the aggregator (width 24, the UNet on the latent grid) with SMC.
def test_heldout_psnr_is_within_1_db_of_tiny_f4_at_equal_steps(tmp_path):
    """tiny_f4 (KL) and tiny_litevae_f4 (same latent shape and decoder widths) trained 300 steps each on the first 1,500
    digits; PSNR on the other 297."""
    from ldm.data.embedded import digits_arrays
    from ldm.tokenizers import load_tokenizer
    from ldm.train.loop import fit

    images, labels = digits_arrays(32)
    np.savez(tmp_path / "train.npz", arr_0=images[:1500], arr_1=labels[:1500])
    held = torch.tensor(images[1500:]).permute(0, 3, 1, 2).float() / 127.5 - 1
    psnr = {}
    for preset in ("tiny_f4", "tiny_litevae_f4"):
        cfg = load_config(REPO / "configs" / "tokenizer" / f"{preset}.yaml",
                          [f"train.run_root={tmp_path}", "train.max_steps=300", f"data.source={tmp_path / 'train.npz'}",
                           "train.ckpt_every=100000", "train.sample_every=100000", "train.log_every=100000"])
        torch.manual_seed(0)
        fit(cfg, progress=False)
        psnr[preset] = _heldout_psnr(load_tokenizer(cfg.run_dir, use_ema=False), held)
    print(f"\nheld-out PSNR after 300 steps: tiny_f4 {psnr['tiny_f4']:.2f} dB, tiny_litevae_f4 "
          f"{psnr['tiny_litevae_f4']:.2f} dB")
    assert psnr["tiny_litevae_f4"] > psnr["tiny_f4"] - 1.0
