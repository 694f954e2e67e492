"""TokenizerTask: the generator loss equals an independent computation, phases touch only their own parameters,
disc_start gating, the adaptive weight at the decoder's last conv, EQ-VAE and VA-VAE wiring, grids."""

import pytest
import torch
from torch import nn

from ldm.config import EqCfg, TokenizerCfg, VaCfg
from ldm.tokenizers.discriminator import NLayerDiscriminator
from ldm.tokenizers.eq import build_eq
from ldm.tokenizers.kl import build_autoencoder_kl
from ldm.tokenizers.regularisers import build_regularisers
from ldm.tokenizers.va import VaRegulariser, vf_loss
from ldm.tokenizers.vq import VQAutoencoder
from ldm.train.tokenizer_task import TokenizerTask

EQ_HALF = {"enabled": True, "scale_num_min": 1, "scale_num_max": 1, "scale_den": 2}  # the scale set {0.5}


def _kl_task(**kw):
    torch.manual_seed(0)
    ae = build_autoencoder_kl(latent_channels=4, block_out_channels=[32, 32], layers_per_block=1,
                              mid_block_attention=False)
    disc = NLayerDiscriminator(filters=8, layers=1)
    cfg = TokenizerCfg(perceptual_weight=0.0, **kw)
    return TokenizerTask(cfg, autoencoder=ae, discriminator=disc, lpips=None,
                         regularisers=build_regularisers(cfg, autoencoder=ae))


def _batch(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "label": torch.zeros(n, dtype=torch.long)}


def test_generator_loss_equals_the_ldm_formula():
    task = _kl_task(kl_weight=1e-2, logvar_init=0.5, disc_start=100)
    batch = _batch()
    torch.manual_seed(7)
    out = task(batch, step=0, phase="gen")
    # independent: posterior from diffusers' own encode(), the same noise draw, decode(), LDM's reduction
    vae, x = task.autoencoder, batch["image"]
    torch.manual_seed(7)
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn_like(post.mean)
    rec = (x - vae.decode(z).sample).abs()
    nll = (rec / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2
    kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).sum() / 2
    torch.testing.assert_close(out.loss, nll + 1e-2 * kl, rtol=1e-5, atol=1e-4)
    assert out.logs["loss_rec"] == pytest.approx(float(rec.mean().detach()), rel=1e-5)
    assert "loss_g" not in out.logs  # before disc_start the GAN term is off


def test_phases_touch_only_their_parameters_and_disc_start_gates():
    task = _kl_task(disc_start=1)
    batch = _batch()
    with pytest.raises(RuntimeError, match="before its gen phase"):
        task(batch, step=0, phase="disc", micro=3)
    task(batch, step=0, phase="gen").loss.backward()
    assert all(p.grad is None for p in task.discriminator.parameters())
    d0 = task(batch, step=0, phase="disc")
    assert float(d0.loss) == 0.0  # disc_factor = 0 before disc_start
    task.zero_grad(set_to_none=True)
    out = task(batch, step=1, phase="gen")
    assert "loss_g" in out.logs and out.logs["d_weight"] > 0
    out.loss.backward()
    assert all(p.grad is None for p in task.discriminator.parameters())  # gen phase: D's parameters frozen
    task.zero_grad(set_to_none=True)
    d1 = task(batch, step=1, phase="disc")
    assert float(d1.loss) > 0
    d1.loss.backward()
    assert all(p.grad is None for p in task.autoencoder.parameters())  # disc phase: cached, detached inputs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.discriminator.parameters())
    groups = task.param_groups()
    assert set(map(id, groups["disc"])) == set(map(id, task.discriminator.parameters()))
    assert not any(p is task.logvar for p in groups["gen"])  # LDM never optimises logvar


def test_learn_logvar_adds_it_to_the_generator_group():
    task = _kl_task(learn_logvar=True)
    assert any(p is task.logvar for p in task.param_groups()["gen"])
    assert "logvar" in task.state_dict() and not any(k.startswith("lpips") for k in task.state_dict())


def test_adaptive_weight_in_the_task_matches_a_manual_computation():
    task = _kl_task(disc_weight=0.5, disc_start=0)
    batch = _batch()
    torch.manual_seed(3)
    out = task(batch, step=0, phase="gen")
    vae, x, w = task.autoencoder, batch["image"], task.autoencoder.decoder.conv_out.weight
    torch.manual_seed(3)
    post = vae.encode(x).latent_dist
    x_rec = vae.decode(post.mean + post.std * torch.randn_like(post.mean)).sample
    nll = (x - x_rec).abs().sum() / 2
    g = -task.discriminator(x_rec).mean()
    gn, = torch.autograd.grad(nll, w, retain_graph=True)
    gg, = torch.autograd.grad(g, w)
    assert out.logs["d_weight"] == pytest.approx(0.5 * float(gn.norm() / (gg.norm() + 1e-4)), rel=1e-4)


def test_eq_mode_reconstructs_the_transformed_image_for_vq():
    torch.manual_seed(0)
    ae = VQAutoencoder(block_out_channels=[32, 32], layers_per_block=1, z_channels=32, codebook_size=16, code_dim=4,
                       mid_block_attention=False)
    task = TokenizerTask(TokenizerCfg(perceptual_weight=0.0, disc_start=0), autoencoder=ae,
                         discriminator=NLayerDiscriminator(filters=8, layers=1), lpips=None,
                         regularisers=[build_eq(EqCfg(**EQ_HALF, p_equivariance=1.0, anisotropic=False, rotate=True),
                                                autoencoder=ae)])
    batch = _batch(size=16)
    out = task(batch, step=0, phase="gen")
    assert out.logs["eq_mode"] == 2.0 and "vq_perplexity" in out.logs and "loss_commit" in out.logs
    target, x_rec = task._cache[0]
    assert target.shape == x_rec.shape == (2, 3, 8, 8)
    rotated = [torch.rot90(nn.functional.interpolate(batch["image"], size=(8, 8), mode="bilinear",
                                                     align_corners=False), k, dims=[-1, -2]) for k in (1, 2, 3)]
    assert any(torch.allclose(target, r) for r in rotated)
    out.loss.backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through through the transformed latent
    assert float(task(batch, step=0, phase="disc").loss) > 0


def test_prior_scale_mode_downscales_the_input():
    task = _kl_task(eq=EqCfg(**EQ_HALF, p_equivariance=0.0, p_prior_scale=1.0), disc_start=0)
    out = task(_batch(size=16), step=0, phase="gen")
    assert out.logs["eq_mode"] == 1.0 and task._cache[0][0].shape[-1] == 8


class TinyViT(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.feature_dim = dim

    def forward(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)  # (B, L, D)


def test_va_loss_is_added_with_its_adaptive_weight_at_the_encoder():
    torch.manual_seed(0)
    vit = TinyViT()
    base = _kl_task()
    va = VaRegulariser(VaCfg(enabled=True, vf_weight=0.1, margin_cos=0.5, margin_dist=0.25), encoder=vit,
                       feature_dim=8, latent_channels=4)
    task = TokenizerTask(TokenizerCfg(perceptual_weight=0.0, disc_start=10), autoencoder=base.autoencoder,
                         discriminator=base.discriminator, lpips=None, regularisers=[va])
    batch = _batch()
    torch.manual_seed(5)
    out = task(batch, step=0, phase="gen")
    vae, x = task.autoencoder, batch["image"]
    torch.manual_seed(5)
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn_like(post.mean)
    nll = (x - vae.decode(z).sample).abs().sum() / 2
    lvf = vf_loss(va.proj(z), va.features(x, (8, 8))).mean()
    w = vae.encoder.conv_out.weight
    gn, = torch.autograd.grad(nll, w, retain_graph=True)
    gv, = torch.autograd.grad(lvf, w)
    assert out.logs["loss_vf"] == pytest.approx(float(lvf.detach()), rel=1e-5)
    assert out.logs["vf_weight"] == pytest.approx(0.1 * float(gn.norm() / (gv.norm() + 1e-4)), rel=1e-4)
    assert any(p is va.proj.weight for p in task.param_groups()["gen"])
    assert not any(k.startswith("va.frozen") or "embed" in k for k in task.state_dict())


def test_visualize_grid():
    task = _kl_task()
    grid = task.visualize(_batch(n=3), None)
    assert grid.shape == (3, 2 * 16 + 3 * 2, 3 * 16 + 4 * 2) and 0 <= float(grid.min()) <= float(grid.max()) <= 1
    assert task.autoencoder.training  # restored after the eval-mode reconstruction


def test_disc_phase_optimizer_settings_and_regulariser_sections():
    from ldm.tokenizers.regularisers import REGULARISERS

    base = _kl_task()
    task = TokenizerTask(base.cfg, autoencoder=base.autoencoder, discriminator=base.discriminator, lpips=None,
                         disc_lr=2e-4, disc_betas=[0.5, 0.9])
    assert task.optimizer_settings("disc") == {"lr": 2e-4, "betas": (0.5, 0.9)}
    assert task.optimizer_settings("gen") == {} and base.optimizer_settings("disc") == {}
    for name in REGULARISERS:  # each regulariser is built from its own section of the tokenizer config
        assert getattr(TokenizerCfg(), name).enabled is False
    cfg = TokenizerCfg(eq=EqCfg(enabled=True), va=VaCfg(enabled=True, encoder="digits"))
    built = build_regularisers(cfg, autoencoder=base.autoencoder)
    assert [r.name for r in built] == list(REGULARISERS) and built[0].instant_logs == ("eq_mode",)


def test_vanilla_gan_pairs_the_softplus_d_loss_with_the_minus_mean_g_loss():
    task = _kl_task(disc_start=0, disc_loss="vanilla", disc_adaptive=False, disc_weight=0.5)
    batch = _batch()
    out = task(batch, step=0, phase="gen")
    target, x_rec = task._cache[0]
    logits_fake = task.discriminator(x_rec)  # train-mode BatchNorm: the batch's own statistics, as in the task
    assert out.logs["loss_g"] == pytest.approx(float(-logits_fake.mean()), rel=1e-5)  # taming: -mean D(x_rec)
    assert out.logs["d_weight"] == pytest.approx(0.5)
    real, fake = task.discriminator(target), task.discriminator(x_rec)
    d = task(batch, step=0, phase="disc")
    expected = 0.5 * (nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean())  # vanilla_d_loss
    assert d.logs["loss_d"] == pytest.approx(float(expected), rel=1e-5)


def test_per_sample_posterior_draws_and_keyed_eq_draw_do_not_depend_on_the_global_rng():
    """With "sample_seed" in the batch, the gen loss of a batch is a function of the batch (the posterior noise per
    sample, the EQ-VAE transform from (seed, step, micro)), not of torch's global RNG, which it leaves as it was;
    without it (or for a run begun before per-sample draws, per its checkpoint's task facts) the global RNG draws."""
    task = _kl_task(eq=EqCfg(**EQ_HALF, p_equivariance=0.5))
    batch = {**_batch(4), "sample_seed": torch.arange(4, dtype=torch.int64) + 7}
    losses, states = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(task(batch, step=3, phase="gen").logs)
        states.append(torch.get_rng_state())
        task(batch, step=3, phase="disc")
    assert losses[0] == losses[1]
    torch.manual_seed(1)
    assert torch.equal(states[0], torch.get_rng_state())  # the keyed draws did not advance the global stream
    assert task.describe() == {"draws": "per_sample"}
    task.resume_facts({})  # a checkpoint without "draws": written before per-sample draws
    assert not task.per_sample_draws and task.describe() == {"draws": "global"}
    torch.manual_seed(1)
    legacy = task(batch, step=3, phase="gen").logs
    torch.manual_seed(1)
    assert task({"image": batch["image"]}, step=3, phase="gen").logs == legacy  # the sample seeds are not used
    task.resume_facts({"draws": "per_sample"})
    assert task.per_sample_draws
