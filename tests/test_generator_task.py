"""Stage 2 through the shared loop: learning works (flow matching, eps-prediction, UNet, REPA), samples decode,
latent normalisation is stored in the checkpoint and restored for sampling, bad inputs are refused."""

import dataclasses

import pytest
import torch

from ldm.config import load_config
from ldm.diffusion.objectives import training_loss
from ldm.eval.generator import load_generator
from ldm.tokenizers.stats import LatentNormalizer
from ldm.train.generator_task import build_generator_task
from ldm.train.loop import fit


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(path)
    return path


def _cfg(tmp_path, vae_dir, *extra):
    return load_config(None, ["name=g", f"train.run_root={tmp_path}", f"tokenizer.pretrained={vae_dir}",
                              "data.image_size=16", "model.preset=DiT-Pico/2", "train.batch_size=32",
                              "optim.lr=2e-3", "train.ckpt_every=100000", "train.log_every=50", "sample.steps=4",
                              "train.ema_decay=0.9", "tokenizer.stats_num_images=256", *extra])


def _heldout_loss(task, cfg, n=128):
    """Loss on a fixed held-out set (last digits) with fixed times and noise, so before/after are comparable."""
    from ldm.data.images import build_dataset

    data = build_dataset(cfg.data)
    idx = range(len(data) - n, len(data))
    batch = {"image": torch.stack([data[(i, 0)]["image"] for i in idx]),
             "label": torch.stack([data[(i, 0)]["label"] for i in idx])}
    g = torch.Generator().manual_seed(123)
    x0 = task.latents(batch)
    y = batch["label"] if task.num_classes else None
    task.model.eval()
    with torch.no_grad():
        loss, _ = training_loss(lambda x, t: task.model(x, t, y)[:, :x0.shape[1]] if cfg.model.learn_sigma
                                else task.model(x, t, y), x0, path=task.path, prediction=task.prediction,
                                generator=g)
    task.model.train()
    return float(loss.mean())


def _train_and_compare(tmp_path, vae_dir, steps, *extra):
    cfg = _cfg(tmp_path, vae_dir, f"train.max_steps={steps}", *extra)
    torch.manual_seed(0)
    task, data = build_generator_task(cfg)
    before = _heldout_loss(task, cfg)
    fit(cfg, task, data, progress=False)
    return before, _heldout_loss(task, cfg), task, cfg


def test_flow_matching_dit_learns_and_samples_decode(tmp_path, vae_dir):
    before, after, task, cfg = _train_and_compare(tmp_path, vae_dir, 150)
    assert after < 0.7 * before, (before, after)
    grid = tmp_path / "g" / "samples" / "step_0000150.png"
    assert grid.is_file()
    images = task.generate(task.model, torch.arange(4), [0, 1, 2, 3], seed=0)
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
    # the latent statistics travel in the checkpoint and come back for sampling
    gen = load_generator(tmp_path / "g")
    assert gen.normalizer.kind == "channel"
    assert torch.equal(gen.normalizer.mean, task.normalizer.mean)
    assert torch.equal(gen.normalizer.std, task.normalizer.std)
    again = gen.generate(torch.arange(4), [0, 1, 2, 3], seed=0)
    assert again.shape == (4, 3, 16, 16) and torch.isfinite(again).all()


def test_eps_prediction_ddpm_learns(tmp_path, vae_dir):
    before, after, _, _ = _train_and_compare(tmp_path, vae_dir, 150, "diffusion.path=ddpm_linear",
                                             "diffusion.prediction=eps", "sample.sampler=ddim")
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow  # ~15 s; the DiT tests train the same task through the same GENERATORS seam
def test_unet_learns(tmp_path, vae_dir):
    before, after, task, _ = _train_and_compare(tmp_path, vae_dir, 120, "model.arch=unet",
                                                "model.unet_block_out_channels=[32,64]", "model.unet_layers_per_block=1")
    assert after < 0.7 * before, (before, after)
    assert type(task.model).__name__ == "UNetGenerator"


def test_repa_trains_and_its_loss_falls(tmp_path, vae_dir):
    """REPA with a tiny random ViT as the frozen encoder (no pretrained weights offline): the alignment term falls."""
    import json

    import timm

    import ldm.encoders as encoders

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                            embed_dim=48, depth=2, num_heads=2)
    encoder = encoders.FrozenEncoder(vit, image_size=32, patch_size=8, feature_dim=48, num_prefix_tokens=1)
    cfg = _cfg(tmp_path, vae_dir, "train.max_steps=80", "diffusion.repa=true", "diffusion.repa_depth=1",
               "diffusion.repa_proj_dim=64", "train.log_every=10")
    import ldm.train.generator_task as gt

    original = encoders.build_encoder
    encoders.build_encoder = lambda name, weights_path=None: encoder
    try:
        torch.manual_seed(0)
        task, data = gt.build_generator_task(cfg)
    finally:
        encoders.build_encoder = original
    fit(cfg, task, data, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    repa = [r["train/repa"] for r in rows if "train/repa" in r]
    assert len(repa) == 8 and repa[-1] < repa[0] - 0.05, repa


def test_latent_normalizer_round_trip():
    z = torch.randn(2, 3, 4, 4) * 3 + 1
    for norm in (LatentNormalizer("channel", 3, mean=[1.0, 2.0, 3.0], std=[2.0, 3.0, 4.0]),
                 LatentNormalizer("scalar", 3, scale=0.18215), LatentNormalizer("none", 3)):
        torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    ch = LatentNormalizer("channel", 3, mean=[1.0, 2.0, 3.0], std=[2.0, 3.0, 4.0])
    torch.testing.assert_close(ch.normalize(z)[:, 1], (z[:, 1] - 2.0) / 3.0)
    torch.testing.assert_close(LatentNormalizer("scalar", 3, scale=0.5).normalize(z), z * 0.5)
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        LatentNormalizer("channel", 3, mean=[0.0, 0.0], std=[1.0, 1.0])


def test_load_generator_refuses_bad_requests(tmp_path, vae_dir):
    cfg = _cfg(tmp_path, vae_dir, "train.max_steps=2", "train.ema=false")
    fit(cfg, progress=False)
    with pytest.raises(ValueError, match="has no EMA weights"):
        load_generator(tmp_path / "g")
    assert load_generator(tmp_path / "g", use_ema=False).used_ema is False
    from ldm.tokenizers.kl import build_autoencoder_kl

    other = tmp_path / "other_vae"
    torch.manual_seed(1)
    build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(other)
    with pytest.raises(ValueError, match="is not the one generator"):
        load_generator(tmp_path / "g", use_ema=False, tokenizer=str(other))


def test_periodic_fid_during_training(tmp_path, vae_dir):
    import json

    cfg = _cfg(tmp_path, vae_dir, "train.max_steps=2", "train.eval_every=2", "eval.extractor=digits",
               "eval.num_samples=24", "eval.batch_size=16", "train.log_every=2")
    fit(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    fd = [r["val/fd_digits"] for r in rows if "val/fd_digits" in r]
    assert len(fd) == 1 and 0.0 < fd[0] < float("inf")


def test_generator_stage_needs_a_tokenizer(tmp_path):
    cfg = load_config(None, ["name=g", f"train.run_root={tmp_path}"])
    with pytest.raises(ValueError, match="needs a frozen tokenizer"):
        build_generator_task(cfg)


def test_generators_dict_and_frozen_tokenizer_outside_the_state(tmp_path, vae_dir):
    """GENERATORS builds each arch from ModelCfg; the task's state is network + normaliser (tokenizer held frozen);
    the normaliser takes diffusion.scaling_factor first, then the tokenizer's numbers."""
    from ldm.models import GENERATORS, build_generator_model

    cfg = _cfg(tmp_path, vae_dir, "diffusion.latent_norm=scalar", "diffusion.scaling_factor=0.5")
    for arch in GENERATORS:
        model_cfg = dataclasses.replace(cfg.model, arch=arch, unet_block_out_channels=[16, 32])
        net = build_generator_model(model_cfg, latent_channels=4, latent_size=8, num_classes=3)
        assert net(torch.zeros(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2])).shape == (2, 4, 8, 8)
    task, _ = build_generator_task(cfg)
    assert {k.split(".")[0] for k in task.state_dict()} == {"model", "normalizer"}
    assert float(task.normalizer.scale) == 0.5 and task.tokenizer is task.generator().tokenizer
    assert not any(p is q for p in task.parameters() for q in task.tokenizer.parameters())


def test_per_sample_draws_split_over_batches_and_legacy_runs_keep_the_global_rng(tmp_path, vae_dir):
    """With "sample_seed" in the batch, each sample's time, noise and CFG label dropout come from its own generators:
    the loss of a batch is the mean of its halves' losses (as when it is split over two processes) whatever torch's
    global RNG holds. A run begun before per-sample draws (no "draws" in its checkpoint's task facts) keeps them."""
    cfg = _cfg(tmp_path, vae_dir, "model.class_dropout=0.5", "tokenizer.stats_num_images=32")
    task, data = build_generator_task(cfg)
    items = [data[(i, 0, 1000 + i)] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]

    def loss(b, seed):
        torch.manual_seed(seed)
        return float(task(b, step=0, phase="model").loss)

    whole = loss(batch, 1)
    assert whole == pytest.approx(sum(loss(h, 2 + i) for i, h in enumerate(halves)) / 2, rel=1e-6)
    assert task.describe()["draws"] == "per_sample"
    task.resume_facts({"kind": "generator"})
    assert task.describe()["draws"] == "global"
    assert loss(batch, 1) != loss(batch, 2)  # the global RNG draws again
