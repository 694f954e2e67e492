"""Tokenizer on disk: export -> AutoencoderKL.from_pretrained decodes identically, load_tokenizer for every kind of
folder, latent statistics vs torch, fingerprints, and clear errors for bad input."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from ldm.config import ConfigError, load_config
from ldm.tokenizers import export_tokenizer, load_tokenizer
from ldm.tokenizers.export import build_tokenizer, fingerprint
from ldm.tokenizers.kl import build_autoencoder_kl
from ldm.tokenizers.stats import (
    STATS_FILE,
    compute_latent_stats,
    compute_tokenizer_stats,
    load_latent_stats,
    save_latent_stats,
)

TINY = ["stage=tokenizer", "data.image_size=16", "data.class_cond=false", "tokenizer.block_out_channels=[32,32]",
        "tokenizer.layers_per_block=1", "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1",
        "train.batch_size=4", "train.log_every=1", "train.ema_decay=0.5", "optim.lr=1e-3"]


def _tiny_run(tmp_path, name, *extra):
    """A tokenizer run directory as the training loop leaves it (tokenizer_arch.json, config.yaml, a checkpoint with
    model.safetensors + ema.safetensors), written without training: the EMA weights differ from the live ones."""
    from ldm.config import save_config
    from ldm.runs import FORMAT_VERSION
    from ldm.train.checkpoint import save_checkpoint
    from ldm.train.tokenizer_task import build_tokenizer_task

    cfg = load_config(overrides=[*TINY, f"name={name}", f"train.run_root={tmp_path}", *extra])
    torch.manual_seed(0)
    task, _ = build_tokenizer_task(cfg)
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
           for k, v in task.autoencoder.state_dict().items()}
    save_config(cfg, cfg.run_dir / "config.yaml")
    save_checkpoint(cfg.run_dir, 1, model_state=task.state_dict(), ema_state=ema,
                    state={"format_version": FORMAT_VERSION, "step": 1}, keep_last=2)
    return cfg.run_dir


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = _tiny_run(root, "kl")
    data_cfg = load_config(overrides=TINY).data
    compute_tokenizer_stats(run, data_cfg, num_images=32, batch_size=16)
    return run


def test_export_round_trip_decodes_identically(kl_run, tmp_path):
    tok = load_tokenizer(kl_run)
    assert tok.kind == "kl" and tok.downsample == 2 and tok.latent_channels == 4
    assert tok.source.endswith("ema.safetensors") and tok.stats is not None
    out = export_tokenizer(kl_run, tmp_path / "export")
    vae = AutoencoderKL.from_pretrained(out).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae.decode(z).sample.detach(), tok.decode(z), atol=1e-6, rtol=0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(vae.encode(x).latent_dist.mean.detach(), tok.encode(x), atol=1e-6, rtol=0)
    # the statistics travel with the export: in its config and as latent_stats.json with the same fingerprint
    stats = load_latent_stats(out / STATS_FILE)
    assert vae.config.scaling_factor == pytest.approx(stats.scaling_factor)
    assert list(vae.config.latents_mean) == pytest.approx(stats.mean)
    again = load_tokenizer(out)
    assert again.fingerprint == tok.fingerprint and again.stats is not None
    assert again.scaling_factor == pytest.approx(tok.stats.scaling_factor)


def test_non_ema_weights_and_checkpoint_dirs(kl_run):
    ckpt = sorted((kl_run / "checkpoints").iterdir())[-1]
    raw = load_tokenizer(ckpt, use_ema=False)
    ema = load_tokenizer(ckpt)
    assert raw.source.endswith("model.safetensors") and raw.fingerprint != ema.fingerprint
    assert raw.stats is None  # the stored statistics belong to the EMA weights (fingerprint mismatch)


def test_stats_match_torch(kl_run):
    tok = load_tokenizer(kl_run)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(5, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    stats = compute_latent_stats(tok.encode, batches, num_images=12, channels=4, fingerprint=tok.fingerprint)
    z = torch.cat([tok.encode(b) for b in batches])[:12].double()  # (12, 4, 8, 8): the last batch is cut to 2
    assert stats.num_images == 12
    torch.testing.assert_close(torch.tensor(stats.mean), z.transpose(0, 1).flatten(1).mean(1).float())
    torch.testing.assert_close(torch.tensor(stats.std), z.transpose(0, 1).flatten(1).std(1).float())
    assert stats.scaling_factor == pytest.approx(1.0 / float(z.flatten().std()), rel=1e-6)


def test_plain_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    vae = build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1, sample_size=16)
    vae.register_to_config(scaling_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    tok = load_tokenizer(tmp_path / "vae")
    assert tok.stats is None and tok.scaling_factor == 0.25
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = vae.encode(x).latent_dist
    torch.testing.assert_close(tok.encode(x), post.mean.detach(), atol=1e-6, rtol=0)
    torch.manual_seed(3)
    a = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, tok.encode(x))
    torch.testing.assert_close(tok.decode(post.mean), vae.decode(post.mean).sample.detach(), atol=1e-6, rtol=0)
    # with latents_mean / latents_std in the config they become the stats
    vae.register_to_config(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    vae.save_pretrained(tmp_path / "vae2")
    assert load_tokenizer(tmp_path / "vae2").stats.std == [1.0, 2.0, 3.0, 4.0]


def test_fingerprint_tracks_weights_and_architecture():
    torch.manual_seed(0)
    a = build_autoencoder_kl(block_out_channels=[32, 32], layers_per_block=1)
    fp = fingerprint(a)
    assert fp == fingerprint(a) and len(fp) == 16
    with torch.no_grad():
        a.decoder.conv_out.bias[0] += 1e-3
    assert fingerprint(a) != fp
    a.register_to_config(scaling_factor=0.5)  # inference metadata is not part of the identity
    assert fingerprint(a) == fingerprint(a)


def test_vq_export_round_trip(tmp_path):
    run = _tiny_run(tmp_path, "vq", "tokenizer.kind=vq", "tokenizer.latent_channels=32", "tokenizer.vq.codebook_size=16",
                    "tokenizer.vq.code_dim=4", "tokenizer.vq.ema=true")
    tok = load_tokenizer(run)
    assert tok.kind == "vq" and tok.latent_channels == 4
    out = export_tokenizer(run, tmp_path / "vq_export")
    assert (out / "vq_model.safetensors").is_file() and json.loads((out / "vq_config.json").read_text())["code_dim"] == 4
    again = load_tokenizer(out)
    assert again.fingerprint == tok.fingerprint
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = again.encode_indices(x)
    assert torch.equal(idx, tok.encode_indices(x)) and idx.shape == (2, 8, 8)
    torch.testing.assert_close(again.decode(idx), tok.decode(tok.encode(x)))


# ------------------------------------------------------------------------------------------------------ bad input
def test_image_size_not_divisible_by_downsampling():
    with pytest.raises(ConfigError, match="data.image_size=30.*downsampling factor 4"):
        load_config(overrides=["stage=tokenizer", "data.image_size=30", "tokenizer.block_out_channels=[32,64,64]"])
    cfg = load_config(overrides=["data.image_size=30", "tokenizer.block_out_channels=[32,64,64]"])  # generator-stage config: checked when the tokenizer is built
    with pytest.raises(ValueError, match="data.image_size=30"):
        build_tokenizer(cfg.tokenizer, 30)


def test_codebook_size_zero_and_other_bad_keys():
    with pytest.raises(ConfigError, match="tokenizer.vq.codebook_size=0"):
        load_config(overrides=["tokenizer.vq.codebook_size=0"])
    with pytest.raises(ConfigError, match="tokenizer.attn_levels"):
        load_config(overrides=["tokenizer.attn_levels=[5]"])
    with pytest.raises(ConfigError, match="tokenizer.disc_layers=3 needs images of at least 24 px"):
        load_config(overrides=["stage=tokenizer", "data.image_size=64", "tokenizer.eq.enabled=true"])


def test_missing_lpips_weights_fail_before_training(tmp_path):
    from ldm.train.tokenizer_task import build_tokenizer_task

    cfg = load_config(overrides=[*TINY, "tokenizer.perceptual_weight=1.0", f"train.run_root={tmp_path}",
                                 f"tokenizer.lpips_weights={tmp_path / 'vgg16-397923af.pth'}"])
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_tokenizer_task(cfg)


def test_missing_or_wrong_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(FileNotFoundError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "junk")
    cfg = load_config(overrides=[f"tokenizer.pretrained={tmp_path / 'junk'}"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_tokenizer(cfg.tokenizer, 32)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="missing keys"):
        load_latent_stats(tmp_path / "bad.json")


def test_kl_folder_with_a_tensor_missing_or_no_weights_is_one_line(tmp_path, capsys):
    """diffusers alone would initialise a tensor missing from the file at random with only a warning."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from ldm.cli import main

    build_autoencoder_kl(block_out_channels=[32, 32], layers_per_block=1).save_pretrained(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "partial")
    weights = tmp_path / "partial" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("decoder.conv_in.bias")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: weights do not match "
                                         rf".*config.json: missing keys \['decoder.conv_in.bias'\], "
                                         rf"unexpected keys \[\]$") as err:
        load_tokenizer(tmp_path / "partial")
    assert "\n" not in str(err.value)
    state["decoder.conv_in.bias"], state["decoder.extra"] = torch.zeros(32), torch.zeros(1)  # an extra tensor
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['decoder.extra'\]$"):
        load_tokenizer(tmp_path / "partial")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(weights))} does not exist: the AutoencoderKL "
                                                r"folder has config.json but no weights") as err:
        load_tokenizer(tmp_path / "partial")
    assert "\n" not in str(err.value)
    # the CLI: exit 2, one line
    assert main(["tokenizer-stats", str(tmp_path / "partial"), "--data", "digits", "--image-size", "16"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert load_tokenizer(tmp_path / "full").kind == "kl"  # the intact folder still loads


def test_tokenizer_rejects_bad_shapes(tmp_path):
    vae = build_autoencoder_kl(block_out_channels=[32, 32], layers_per_block=1)
    vae.save_pretrained(tmp_path / "v")
    tok = load_tokenizer(tmp_path / "v")
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="4 latent channels"):
        tok.decode(torch.zeros(1, 3, 8, 8))
    stats = compute_latent_stats(tok.encode, [torch.zeros(2, 3, 16, 16)], num_images=2, channels=4)
    save_latent_stats(stats, tmp_path / "v")
    stats.mean = stats.mean[:2]
    with pytest.raises(ValueError, match="channels"):
        type(tok)(tok.model, stats=stats)


def test_missing_foundation_encoder_weights_fail_before_training(tmp_path):
    from ldm.train.tokenizer_task import build_tokenizer_task

    cfg = load_config(overrides=[*TINY, f"train.run_root={tmp_path}", "tokenizer.va.enabled=true",
                                 "tokenizer.va.encoder=dinov2_vits14",
                                 f"tokenizer.va.weights={tmp_path / 'dinov2_vits14_pretrain.pth'}"])
    with pytest.raises(FileNotFoundError, match="dinov2_vits14"):
        build_tokenizer_task(cfg)


def test_export_without_statistics_writes_no_scaling_not_sd_vae_s_factor(tmp_path, caplog):
    run = _tiny_run(tmp_path, "nostats")
    tok = load_tokenizer(run)
    assert tok.stats is None and tok.scaling_factor is None
    assert tok.model.config.scaling_factor == pytest.approx(0.18215)  # diffusers' default, SD-VAE's factor
    with caplog.at_level("WARNING", logger="ldm.tokenizers.export"):
        out = export_tokenizer(run, tmp_path / "export")
    assert not (out / STATS_FILE).exists()
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == 1.0
    assert load_tokenizer(out).scaling_factor == 1.0
    msg = caplog.text
    assert "scaling_factor=1.0" in msg and "0.18215" in msg and "ldm tokenizer-stats" in msg
    # a diffusers folder declares its own factor: the export keeps it
    vae = build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1, sample_size=16)
    vae.register_to_config(scaling_factor=0.25)
    vae.save_pretrained(tmp_path / "vae")
    again = export_tokenizer(tmp_path / "vae", tmp_path / "vae_export")
    assert json.loads((again / "config.json").read_text())["scaling_factor"] == 0.25
