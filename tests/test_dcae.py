"""DC-AE (`tokenizer.kind: dc`, ldm/tokenizers/dcae.py): the residual shortcuts against hand-computed values, a tiny
DC-AE learning on the digits through the shared loop (20 steps here, 300 in the slow test), export -> diffusers
`AutoencoderDC.from_pretrained` -> bit-identical decoding, export -> load -> latent cache -> a generator trains,
diffusers-made (released-style) folders loading and fine-tuning, EQ-VAE / VA-VAE on a DC-AE, the shipped presets
against the released architectures, and one-line errors for bad input.

The test tokenizer is f8 (4 stages) on 32-px digits: the released f32 layout would leave 1x1 latents there. It keeps
the released models' structure: a depth-0 first stage, ResBlocks (BatchNorm, ReLU in the decoder) then
EfficientViT blocks.
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL
from safetensors.torch import load_file, save_file

from ldm.config import ConfigError, load_config
from ldm.tokenizers import export_tokenizer, load_tokenizer
from ldm.tokenizers.dcae import load_autoencoder_dc
from ldm.tokenizers.export import Tokenizer, build_tokenizer
from ldm.tokenizers.kinds import KINDS, kind_of

SIZE = 32
TINY = ["stage=tokenizer", f"data.image_size={SIZE}", "data.class_cond=false", "tokenizer.kind=dc",
        "tokenizer.latent_channels=8", "tokenizer.block_out_channels=[16,32,32,32]",
        "tokenizer.norm_num_groups=16",  # DC-AE has no GroupNorm; the config's width check reads this key
        "tokenizer.dc.encoder_block_types=[ResBlock,ResBlock,EfficientViTBlock,EfficientViTBlock]",
        "tokenizer.dc.decoder_block_types=[ResBlock,ResBlock,EfficientViTBlock,EfficientViTBlock]",
        "tokenizer.dc.encoder_layers_per_block=[0,1,1,1]", "tokenizer.dc.decoder_layers_per_block=[0,1,1,1]",
        "tokenizer.dc.decoder_norm_types=[batch_norm,batch_norm,rms_norm,rms_norm]",
        "tokenizer.dc.decoder_act_fns=[relu,relu,silu,silu]", "tokenizer.perceptual_weight=0",
        "tokenizer.disc_layers=2", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=100000",
        "train.sample_every=100000", "train.ema_decay=0.9", "optim.name=adam", "optim.lr=1e-3",
        "optim.betas=[0.5,0.9]", "optim.grad_clip=0"]


def _cfg(root, name, *extra):
    return load_config(None, [*TINY, f"name={name}", f"train.run_root={root}", *extra])


@functools.cache
def _heldout(n=128):
    """The last n digits (never the first batches the short runs see), 32 px in [-1, 1]."""
    from ldm.data.images import build_dataset

    data = build_dataset(load_config(None, TINY).data)
    return torch.stack([data[(i, 0)]["image"] for i in range(len(data) - n, len(data))])


@torch.no_grad()
def _l1(model, x):
    kind = kind_of(model)
    was = model.training
    model.eval()
    try:
        return float((kind.decode(model, kind.encode(model, x)) - x).abs().mean())
    finally:
        model.train(was)


def _train(root, name, steps, *extra, measure=True):
    """(run dir, held-out L1 of the initial and the trained live autoencoder (None unless `measure`), the task)."""
    from ldm.train.loop import fit
    from ldm.train.tokenizer_task import build_tokenizer_task

    cfg = _cfg(root, name, f"train.max_steps={steps}", *extra)
    torch.manual_seed(0)
    task, data = build_tokenizer_task(cfg)
    before = _l1(task.autoencoder, _heldout()) if measure else None
    fit(cfg, task, data, progress=False)
    return cfg.run_dir, before, _l1(task.autoencoder, _heldout()) if measure else None, task


def _logs(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run20(tmp_path_factory):
    """20 steps, L1 only, then the PatchGAN from step 10 (its adaptive weight reads the decoder's output conv)."""
    return _train(tmp_path_factory.mktemp("dc"), "dc20", 20, "tokenizer.disc_start=10")


@pytest.fixture(scope="module")
def exported(run20, tmp_path_factory):
    from ldm.tokenizers.stats import compute_tokenizer_stats

    run = run20[0]
    compute_tokenizer_stats(run, load_config(None, TINY).data, num_images=64, batch_size=32)
    return run, export_tokenizer(run, tmp_path_factory.mktemp("export") / "dc")


# ------------------------------------------------------------------------------------------------------ residual shortcuts
def test_downsample_shortcut_is_space_to_channel_then_channel_averaging():
    """Paper Fig. 4 / reference PixelUnshuffleChannelAveragingDownSampleLayer: pixel-unshuffle by 2 (channel
    c*4 + dy*2 + dx holds x[c, 2i+dy, 2j+dx]), then the mean of consecutive groups of 4*C_in / C_out channels. With
    C_in = 2, C_out = 4 each output channel is the mean of one row of a 2x2 input channel."""
    from diffusers.models.autoencoders.autoencoder_dc import DCDownBlock2d

    block = DCDownBlock2d(2, 4, downsample=True, shortcut=True)
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)  # the conv path is zero: the output is the shortcut alone
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])[None]  # (1, 2, 2, 2)
    expected = torch.tensor([1.5, 3.5, 5.5, 7.5]).view(1, 4, 1, 1)  # (1+2)/2, (3+4)/2, (5+6)/2, (7+8)/2
    assert torch.equal(block(x).detach(), expected)


def test_upsample_shortcut_is_channel_duplicating_then_channel_to_space():
    """Reference ChannelDuplicatingPixelUnshuffleUpSampleLayer: each channel repeated 4*C_out / C_in times, then
    pixel-shuffle by 2. With C_in = 4 (values a, b, c, d), C_out = 2: out[0] = [[a, a], [b, b]], out[1] = [[c, c],
    [d, d]]."""
    from diffusers.models.autoencoders.autoencoder_dc import DCUpBlock2d

    block = DCUpBlock2d(4, 2, interpolate=False, shortcut=True)
    torch.nn.init.zeros_(block.conv.weight)
    torch.nn.init.zeros_(block.conv.bias)
    z = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    expected = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[3.0, 3.0], [4.0, 4.0]]])[None]
    assert torch.equal(block(z).detach(), expected)


def test_latent_shortcuts_average_and_duplicate_channel_groups():
    """Encoder output: conv_out(h) + mean over consecutive groups of C / c channels; decoder input: conv_in(z) + each
    latent channel repeated C / c times (C the last width, c the latent channels)."""
    torch.manual_seed(0)
    model = build_tokenizer(_cfg("/unused", "x").tokenizer, SIZE)
    enc, dec = model.encoder, model.decoder
    for conv in (enc.conv_out, dec.conv_in):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    h = torch.randn(2, 32, 4, 4)
    expected = torch.stack([h[:, 4 * k:4 * k + 4].mean(1) for k in range(8)], dim=1)  # 32 channels -> 8 groups of 4
    out = enc.conv_out(h) + h.unflatten(1, (-1, enc.out_shortcut_average_group_size)).mean(2)
    torch.testing.assert_close(out, expected)
    z = torch.randn(2, 8, 4, 4)
    dup = torch.cat([z[:, k:k + 1].expand(-1, 4, -1, -1) for k in range(8)], dim=1)  # (2, 32, 4, 4)
    torch.testing.assert_close(dec.conv_in(z) + z.repeat_interleave(dec.in_shortcut_repeats, dim=1), dup)


# ------------------------------------------------------------------------------------------------------ the kind
def test_kind_builds_the_configured_network():
    cfg = _cfg("/unused", "x")
    model = build_tokenizer(cfg.tokenizer, SIZE)
    kind = kind_of(model)
    assert kind is KINDS["dc"] and kind.family == "deterministic" and kind.regularisers == ("eq", "va")
    assert kind.downsample(model) == 8 and kind.latent_channels(model) == 8
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    assert kind.encode(model, x).shape == (3, 8, 4, 4) and kind.decode(model, kind.encode(model, x)).shape == x.shape
    enc = kind.encode_train(model, x, cfg=cfg.tokenizer, draws=None)
    assert enc.loss.item() == 0.0 and enc.logs == {}
    # a depth-0 first stage: the decoder's last conv sits inside its factor-2 pixel-shuffle block
    assert kind.decoder_last_layer(model) is model.decoder.conv_out.conv.weight
    assert kind.encoder_last_layer(model) is model.encoder.conv_out.weight
    again = kind.from_arch(json.loads(json.dumps(kind.arch(model))))
    assert kind.arch(again) == kind.arch(model)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ training
def test_tiny_dc_trains_20_steps_and_the_loss_falls(run20):
    run, before, after, _ = run20
    logs = _logs(run)
    assert after < 0.75 * before, (before, after)
    assert logs[-1]["train/loss_rec"] < logs[0]["train/loss_rec"]
    assert "train/loss_g" in logs[-1] and "train/d_weight" in logs[-1]  # the GAN is on from step 10
    assert not any(k.startswith("train/loss_kl") for k in logs[-1])  # a plain autoencoder: no KL term


def test_resume_is_bit_exact(tmp_path):
    """2 + 2 steps (re-running the command resumes) == 4 steps: weights, EMA and the decoder's BatchNorm statistics,
    with the GAN on from step 1."""
    from ldm.cli import main

    common = [*TINY, f"train.run_root={tmp_path}", "train.ckpt_every=2", "tokenizer.disc_start=1",
              "train.batch_size=8", "--no-progress"]
    assert main(["train", *common, "name=whole", "train.max_steps=4"]) == 0
    assert main(["train", *common, "name=split", "train.max_steps=2"]) == 0
    assert main(["train", *common, "name=split", "train.max_steps=4"]) == 0
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step_0000004" / f))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step_0000004" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert any("running_mean" in k for k in a)


@pytest.mark.slow
def test_tiny_dc_trains_300_steps_on_the_digits(tmp_path):
    """Phase 1 of the paper (L1, all layers) for 300 steps; prints the held-out numbers."""
    run, before, after, _ = _train(tmp_path, "dc300", 300, "tokenizer.disc_start=100000")
    rows = [r["train/loss_rec"] for r in _logs(run)]
    first, last = sum(rows[:5]) / 5, sum(rows[-5:]) / 5
    print(f"\nDC-AE f8c8 300 steps: held-out L1 {before:.4f} -> {after:.4f}; train L1 (5-log means) "
          f"{first:.4f} -> {last:.4f}")
    assert last < 0.5 * first and after < 0.5 * before


def test_eq_vae_and_va_vae_train_a_dc_ae(tmp_path):
    """Both act on the latent: EQ-VAE resizes / rotates the 4x4 latent at the downsampling factor 8, VA-VAE aligns
    a 1x1 projection of it with the shipped digits encoder's features (adaptive weight at encoder.conv_out)."""
    run, *_ = _train(tmp_path, "eq", 3, "train.log_every=1", "tokenizer.eq.enabled=true",
                     "tokenizer.eq.p_equivariance=1.0", "tokenizer.eq.scale_num_min=16", measure=False)
    assert {r["train/eq_mode"] for r in _logs(run)} == {2.0}  # the equivariance mode every step
    run, *_ = _train(tmp_path, "va", 2, "train.log_every=1", "tokenizer.va.enabled=true",
                     "tokenizer.va.encoder=digits", measure=False)
    assert all(r["train/loss_vf"] > 0 and r["train/vf_weight"] > 0 for r in _logs(run))


# ------------------------------------------------------------------------------------------------------ export / load
def test_export_loads_with_from_pretrained_and_decodes_bit_identically(exported):
    from ldm.tokenizers.stats import STATS_FILE, load_latent_stats

    run, out = exported
    tok = load_tokenizer(run)
    assert tok.kind == "dc" and tok.downsample == 8 and tok.latent_channels == 8 and tok.stats is not None
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderDC"
    vae = AutoencoderDC.from_pretrained(out, local_files_only=True).eval()
    z = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode(z).sample.detach(), tok.decode(z))
    x = _heldout(8)
    assert torch.equal(vae.encode(x).latent.detach(), tok.encode(x))
    # the statistics: the scalar factor in the diffusers config, per channel beside it, both of these weights
    stats = load_latent_stats(out / STATS_FILE)
    assert stats.fingerprint == tok.fingerprint and len(stats.mean) == 8
    assert vae.config.scaling_factor == pytest.approx(stats.scaling_factor)
    again = load_tokenizer(out)
    assert again.fingerprint == tok.fingerprint and again.stats is not None
    assert again.scaling_factor == pytest.approx(stats.scaling_factor)
    # `ldm eval latents` on a deterministic kind: channel statistics and equivariance, no posterior or codebook
    from ldm.eval.latents import diagnose_tokenizer

    report = diagnose_tokenizer(again, "digits", image_size=SIZE, num_images=16, scales=(0.5,))
    assert report["tokenizer"]["kind"] == "dc" and report["tokenizer"]["latent_shape"] == [8, 4, 4]
    assert "posterior" not in report and "codebook" not in report and report["equivariance"]


def test_export_load_cache_and_a_generator_trains(exported, tmp_path):
    from ldm.data.latents import build_latent_cache, read_cache_meta
    from ldm.train.generator_task import build_generator_task
    from ldm.train.loop import fit

    _, out = exported
    tok = load_tokenizer(out)
    cache = tmp_path / "cache"
    build_latent_cache(tok, "digits", cache, image_size=SIZE, batch_size=512, progress=False)
    meta = read_cache_meta(cache)
    assert meta.tokenizer_kind == "dc" and list(meta.latent_shape) == [8, 4, 4]
    assert meta.tokenizer_fingerprint == tok.fingerprint
    cfg = load_config(None, ["name=g", f"train.run_root={tmp_path}", f"tokenizer.checkpoint={out}",
                             "tokenizer.kind=dc", "tokenizer.latent_channels=8", f"data.latents={cache}",
                             f"data.image_size={SIZE}", "model.preset=DiT-Pico/2", "train.batch_size=64",
                             "train.max_steps=60", "train.log_every=10", "train.ckpt_every=100000",
                             "train.sample_every=100000", "optim.lr=2e-3", "sample.steps=4"])
    torch.manual_seed(0)
    task, data = build_generator_task(cfg)
    fit(cfg, task, data, progress=False)
    losses = [r["train/loss"] for r in _logs(tmp_path / "g")]
    assert losses[-1] < losses[0], losses
    images = task.generate(task.model, torch.arange(4), [0, 1, 2, 3], seed=0)  # sampled latents -> DC decoder
    assert images.shape == (4, 3, SIZE, SIZE) and torch.isfinite(images).all()


def _released_style_folder(path):
    """A folder as diffusers writes the released ones: a SANA-style DC-AE (conv downsampling, interpolating
    upsampling, EViTS5 blocks with 5x5 multi-scale aggregation, string-valued norm / activation) with its config's
    scaling_factor (SANA's 0.41407), made by diffusers alone."""
    torch.manual_seed(1)
    model = AutoencoderDC(latent_channels=8, encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                          encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
                          encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                          encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
                          attention_head_dim=16, downsample_block_type="conv", upsample_block_type="interpolate",
                          decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    model.save_pretrained(path)
    return model.eval()


def test_released_style_folder_loads_and_fine_tunes(tmp_path):
    model = _released_style_folder(tmp_path / "sana_style")
    tok = load_tokenizer(tmp_path / "sana_style")
    assert tok.kind == "dc" and tok.downsample == 4 and tok.scaling_factor == pytest.approx(0.41407)
    assert tok.stats is None  # diffusers' DC-AE configs carry no per-channel statistics
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(tok.encode(x), model.encode(x).latent.detach())
    # as tokenizer.pretrained: the architecture and weights come from the folder, training continues
    run, *_ = _train(tmp_path, "ft", 2, f"tokenizer.pretrained={tmp_path / 'sana_style'}", measure=False)
    trained = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    moved = max(float((trained[f"autoencoder.{k}"] - v).abs().max()) for k, v in model.state_dict().items()
                if v.is_floating_point())
    assert moved > 1e-5
    assert load_tokenizer(run).downsample == 4


# ------------------------------------------------------------------------------------------------------ presets
# dc-ae-f32c32-in-1.0 / dc-ae-f64c128-in-1.0 as diffusers scripts/convert_dcae_to_diffusers.py get_ae_config and
# efficientvit dc_ae.py dc_ae_f32c32 / dc_ae_f64c128 state them
RELEASED = {
    "dc_f32c32_imagenet256": {"latent_channels": 32, "widths": [128, 256, 512, 512, 1024, 1024],
                              "enc_depths": [0, 4, 8, 2, 2, 2], "dec_depths": [0, 5, 10, 2, 2, 2], "factor": 32,
                              "image_size": 256},
    "dc_f64c128_imagenet512": {"latent_channels": 128, "widths": [128, 256, 512, 512, 1024, 1024, 2048],
                               "enc_depths": [0, 4, 8, 2, 2, 2, 2], "dec_depths": [0, 5, 10, 2, 2, 2, 2],
                               "factor": 64, "image_size": 512},
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_paper_presets_build_the_released_architectures(name):
    from conftest import REPO

    want = RELEASED[name]
    cfg = load_config(REPO / "configs" / "tokenizer" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_tokenizer(cfg.tokenizer, cfg.data.image_size)
    c, n = model.config, len(want["widths"])
    assert cfg.data.image_size == want["image_size"] and model.spatial_compression_ratio == want["factor"]
    assert c.latent_channels == want["latent_channels"]
    assert list(c.encoder_block_out_channels) == list(c.decoder_block_out_channels) == want["widths"]
    assert list(c.encoder_layers_per_block) == want["enc_depths"]
    assert list(c.decoder_layers_per_block) == want["dec_depths"]
    vit = ["ResBlock"] * 3 + ["EfficientViTBlock"] * (n - 3)
    assert list(c.encoder_block_types) == list(c.decoder_block_types) == vit
    assert list(c.decoder_norm_types) == ["batch_norm"] * 3 + ["rms_norm"] * (n - 3)
    assert list(c.decoder_act_fns) == ["relu"] * 3 + ["silu"] * (n - 3)
    assert all(list(s) == [] for s in c.encoder_qkv_multiscales + c.decoder_qkv_multiscales)
    assert (c.downsample_block_type, c.upsample_block_type, c.attention_head_dim) == ("pixel_unshuffle",
                                                                                    "pixel_shuffle", 32)
    assert cfg.tokenizer.disc_weight == 0  # phase 1: reconstruction loss only


def test_tiny_preset_and_the_docs_digits_example_run(tmp_path):
    """docs/tokenizers.md's DC-AE digits commands as written, through the CLI (two steps per training run)."""
    from conftest import REPO

    from ldm.cli import main

    doc = (REPO / "docs" / "tokenizers.md").read_text().replace("\\\n", " ")
    start = doc.index("ldm train configs/tokenizer/tiny_dc_f8.yaml\nldm tokenizer-stats")
    commands = [line.split() for line in doc[start:doc.index("```", start)].splitlines()]
    assert [c[:2] for c in commands] == [["ldm", "train"], ["ldm", "tokenizer-stats"], ["ldm", "cache-latents"],
                                         ["ldm", "train"]]
    short = [f"train.run_root={tmp_path}", "train.max_steps=2", "train.batch_size=8", "train.ckpt_every=1000",
             "--no-progress"]
    for command in commands:
        args = [w.replace("runs/", f"{tmp_path}/") for w in command[1:]]
        if args[0] == "train":
            args += short
        elif args[0] == "tokenizer-stats":
            args += ["--num", "64"]
        assert main(args) == 0, command
    tok = load_tokenizer(tmp_path / "tiny_dc_f8")
    assert (tok.kind, tok.downsample, tok.latent_channels) == ("dc", 8, 8) and tok.stats is not None
    gen = load_config(tmp_path / "dit_ti1_dc" / "config.yaml")
    assert gen.model.preset == "DiT-Ti/1" and gen.tokenizer.kind == "dc"
    assert (tmp_path / "dit_ti1_dc" / "checkpoints" / "step_0000002").is_dir()


# ------------------------------------------------------------------------------------------------------ adaptation
def _autoencoder_weights(run, file="model.safetensors"):
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))[-1:]
    return {k[len("autoencoder."):] if k.startswith("autoencoder.") else k: v
            for k, v in load_file(str(ckpt / file)).items() if file != "model.safetensors" or
            k.startswith("autoencoder.")}


def _disc_weights(run):
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))[-1:]
    return {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
            if k.startswith("discriminator.") and "running_" not in k and "num_batches" not in k}


def test_decoupled_adaptation_phases_train_only_their_layers(tmp_path, capsys):
    """The digits chain of docs/tokenizers.md: phase 1 (tiny_dc_f8), phase 2 (64 px, reconstruction only, the layers
    next to the latent) and phase 3 (32 px, GAN on, the decoder head), each continuing the previous run. In each
    later phase the weights outside tokenizer.train_only (live and EMA) are bit-identical to the previous phase's,
    those inside moved; phase 2 trains no discriminator, phase 3 does. (A phase starts from the previous run's live
    weights, so its EMA of a frozen weight is that live weight.)"""
    from conftest import REPO

    from ldm.cli import main

    short = [f"train.run_root={tmp_path}", "train.max_steps=3", "train.batch_size=8", "train.ckpt_every=1000",
             "train.sample_every=0", "train.log_every=1", "--no-progress"]
    assert main(["train", "configs/tokenizer/tiny_dc_f8.yaml", *short]) == 0
    previous = tmp_path / "tiny_dc_f8"
    for phase in ("tiny_dc_f8_adapt_latent", "tiny_dc_f8_refine_head"):
        config = REPO / "configs" / "tokenizer" / f"{phase}.yaml"
        trained = load_config(config).tokenizer.train_only
        assert main(["train", str(config), f"tokenizer.pretrained={previous}", *short]) == 0
        run = tmp_path / phase
        for file in ("model.safetensors", "ema.safetensors"):
            before, after = _autoencoder_weights(previous), _autoencoder_weights(run, file)
            assert before.keys() == after.keys()
            inside = {k for k in after if any(k.startswith(f"{n}.") for n in trained)}
            assert inside and all(k.split(".")[0] in ("encoder", "decoder") for k in inside)
            moved = {k for k in after if not torch.equal(before[k], after[k])}
            frozen_moved = {k for k in moved - inside if "running_" not in k and "num_batches" not in k}
            assert not frozen_moved, (phase, file, sorted(frozen_moved)[:5])
            assert any(k in moved for k in inside if after[k].is_floating_point()), (phase, file)
        disc_before, disc_after = (_disc_weights(r) for r in (previous, run))
        assert any(not torch.equal(disc_before[k], disc_after[k]) for k in disc_after) == (
            phase == "tiny_dc_f8_refine_head")
        previous = run
    assert "autoencoder parameters train" in capsys.readouterr().out


def test_train_only_takes_names_and_module_prefixes_and_names_a_miss(tmp_path):
    from ldm.train.tokenizer_task import train_only

    model = build_tokenizer(_cfg(tmp_path, "x").tokenizer, SIZE)
    train_only(model, ["decoder.conv_out", "encoder.conv_out.weight"])
    trained = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trained == ["decoder.conv_out.conv.bias", "decoder.conv_out.conv.weight", "encoder.conv_out.weight"]
    train_only(model, ["decoder.up_blocks.1"])  # a module prefix: not decoder.up_blocks.1x
    assert all(k.startswith("decoder.up_blocks.1.") for k, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"^tokenizer.train_only: \['decoder.up_block'\] name no parameter of this "
                                          r"dc autoencoder; .*'decoder.up_blocks'") as err:
        train_only(model, ["decoder.up_block"])
    assert "\n" not in str(err.value)
    cfg = _cfg(tmp_path, "bad", "tokenizer.train_only=[decoder.nope]")
    from ldm.train.tokenizer_task import build_tokenizer_task

    with pytest.raises(ConfigError, match="decoder.nope"):
        build_tokenizer_task(cfg)
    assert not (tmp_path / "bad").exists()  # refused before the run directory is written


# ------------------------------------------------------------------------------------------------------ bad input
def test_image_size_not_divisible_by_the_factor():
    with pytest.raises(ConfigError, match=r"data.image_size=36 is not divisible by the tokenizer's downsampling "
                                          r"factor 8") as err:
        load_config(None, [*TINY, "data.image_size=36"])
    assert "\n" not in str(err.value)
    tok = Tokenizer(build_tokenizer(_cfg("/unused", "x").tokenizer, SIZE))
    with pytest.raises(ValueError, match=r"image size \(36, 36\) is not divisible by the tokenizer's downsampling "
                                         r"factor 8"):
        tok.encode(torch.zeros(1, 3, 36, 36))


def test_folder_of_another_class_is_one_line(tmp_path):
    AutoencoderKL(block_out_channels=(32,), latent_channels=4).save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match=r"config.json: _class_name is 'AutoencoderKL', not 'AutoencoderDC'$"):
        load_autoencoder_dc(tmp_path / "kl")
    cfg = _cfg(tmp_path, "x", f"tokenizer.pretrained={tmp_path / 'kl'}")
    with pytest.raises(ValueError, match=r"is a kl tokenizer but tokenizer.kind='dc'$"):
        build_tokenizer(cfg.tokenizer, SIZE)
    shutil.copytree(tmp_path / "kl", tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(ValueError, match=r"holds a diffusers AutoencoderTiny, which is not a tokenizer kind") as err:
        load_tokenizer(tmp_path / "tiny")
    assert "\n" not in str(err.value)


def test_missing_weights_are_one_line_naming_the_file(tmp_path, capsys):
    from ldm.cli import main

    _released_style_folder(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "none")
    (tmp_path / "none" / "diffusion_pytorch_model.safetensors").unlink()
    weights = tmp_path / "none" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"^{weights} does not exist") as err:
        load_tokenizer(tmp_path / "none")
    assert "\n" not in str(err.value)
    # a weights file lacking a tensor: diffusers alone would initialise it at random with a warning
    shutil.copytree(tmp_path / "full", tmp_path / "partial")
    weights = tmp_path / "partial" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("decoder.conv_in.bias")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"^{weights}: weights do not match .*missing keys \['decoder.conv_in.bias'\]"):
        load_tokenizer(tmp_path / "partial")
    # a weights file that is no safetensors file at all
    shutil.copytree(tmp_path / "full", tmp_path / "junk")
    (tmp_path / "junk" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: cannot be loaded as the "
                                         r"AutoencoderDC of") as err:
        load_tokenizer(tmp_path / "junk")
    assert "\n" not in str(err.value)
    # the CLI: exit 2, one line
    assert main(["tokenizer-stats", str(tmp_path / "none"), "--data", "digits", "--image-size", "32"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("override, message", [
    ("tokenizer.dc.encoder_block_types=[ResBlock,ResBlock]",
     "tokenizer.dc.encoder_block_types=.* has 2 entries; expected 1 .* or 4"),
    ("tokenizer.dc.decoder_block_types=[Attention]",
     r"tokenizer.dc.decoder_block_types=\['Attention'\]: \['Attention'\] not allowed"),
    ("tokenizer.dc.decoder_layers_per_block=[1,0,1,1]",
     "tokenizer.dc.decoder_layers_per_block=.* 0 for the first stage"),
    ("tokenizer.latent_channels=12", "tokenizer.latent_channels=12 must divide the last width 32"),
    ("tokenizer.block_out_channels=[16,32,48,48]",
     r"4\*32 space-to-channel features, so 4\*32 must be a multiple of 48"),
    ("tokenizer.dc.attention_head_dim=24", "tokenizer.dc.attention_head_dim=24 must divide the width 32"),
    ("tokenizer.dc.decoder_norm_types=[group_norm]", "tokenizer.dc.decoder_norm_types=.* not allowed"),
])
def test_bad_dc_architecture_keys_are_one_line(override, message):
    cfg = load_config(None, [*TINY, override])
    with pytest.raises(ConfigError, match=message) as err:
        build_tokenizer(cfg.tokenizer, SIZE)
    assert "\n" not in str(err.value)
