"""Tokenizer losses and the PatchGAN, pinned to values computed another way (closed forms, torch.distributions,
hand computations, manual autograd)."""

import math

import pytest
import torch
from torch import nn

from ldm.tokenizers.discriminator import ActNorm, NLayerDiscriminator
from ldm.tokenizers.losses import (
    adaptive_weight,
    adopt_weight,
    build_lpips,
    hinge_d_loss,
    hinge_g_loss,
    kl_diagonal_gaussian,
    lpips_loss,
    nll_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    reconstruction_loss,
)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_diagonal_gaussian(mean, logvar), expected, rtol=1e-5, atol=1e-5)


def test_kl_of_the_prior_is_zero():
    assert kl_diagonal_gaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).abs().max() == 0


def test_nll_with_logvar_by_hand():
    rec = torch.tensor([[[[1.0, 2.0]]], [[[0.5, 0.0]]]])  # (2, 1, 1, 2)
    logvar = torch.tensor(math.log(2.0))
    # image 0: 1/2 + 2/2 + 2 * log 2; image 1: 0.5/2 + 0 + 2 * log 2
    expected = torch.tensor([1.5 + 2 * math.log(2.0), 0.25 + 2 * math.log(2.0)])
    torch.testing.assert_close(nll_loss(rec, logvar), expected)


def test_reconstruction_losses():
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(reconstruction_loss(x, y, "l1"), torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(reconstruction_loss(x, y, "l2"), torch.tensor([0.25, 9.0]))
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(x, y, "huber")


def test_gan_losses_on_fixed_logits_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[-3.0, 0.0], [0.5, -0.5]]).view(2, 1, 1, 2)
    # hinge D: sample 0: real relu(1-2)=0, relu(1-.5)=.5 -> .25; fake relu(1-3)=0, relu(1+0)=1 -> .5; 0.5*(.75)
    # sample 1: real relu(2)=2, relu(1)=1 -> 1.5; fake relu(1.5)=1.5, relu(.5)=.5 -> 1.0; 0.5*(2.5)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor([0.375, 1.25]))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor([1.5, 0.0]))

    def sp(v):
        return math.log1p(math.exp(v))

    ns_d = [0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.0)) / 2),
            0.5 * ((sp(1.0) + sp(0.0)) / 2 + (sp(0.5) + sp(-0.5)) / 2)]
    torch.testing.assert_close(non_saturating_d_loss(real, fake), torch.tensor(ns_d))
    ns_g = [(-math.log(1 / (1 + math.exp(3.0))) - math.log(0.5)) / 2,
            (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.5)))) / 2]
    torch.testing.assert_close(non_saturating_g_loss(fake), torch.tensor(ns_g))


def test_adopt_weight_switches_on_at_disc_start():
    assert adopt_weight(0.5, 9, 10) == 0.0
    assert adopt_weight(0.5, 10, 10) == 0.5


def test_adaptive_weight_matches_manual_autograd_on_two_layer_decoder():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    z, target = torch.randn(6, 3), torch.randn(6, 4)
    out = dec(z)
    l_rec = (out - target).abs().mean()
    l_gan = -(out * torch.linspace(-1, 1, 4)).sum(1).mean()
    w = dec[2].weight
    # manual: d/dW of mean|out - t| = sign(out - t)^T z_h / N ; d/dW of -(out.c).mean = -c^T h / N
    h = torch.tanh(dec[0](z)).detach()
    g_rec = (torch.sign(out - target).detach() / out.numel()).t() @ h
    g_gan = (-torch.linspace(-1, 1, 4).view(4, 1).expand(4, 6) / 6) @ h
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    got = adaptive_weight(l_rec, l_gan, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not got.requires_grad
    # clamping: a vanishing GAN gradient gives the maximum
    assert float(adaptive_weight(l_rec, 0.0 * l_gan, w, max_weight=7.0)) == 7.0


def test_adaptive_weight_refuses_detached_losses():
    with pytest.raises(ValueError, match="autograd"):
        adaptive_weight(torch.tensor(1.0), torch.tensor(2.0), nn.Parameter(torch.ones(1)))


# ------------------------------------------------------------------------------------------------------ LPIPS
def test_lpips_missing_backbone_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        build_lpips()
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_lpips(tmp_path / "nope.pth")


def test_lpips_loads_a_torchvision_vgg_state_dict(tmp_path, caplog):
    import torchvision

    torch.manual_seed(1)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    net = build_lpips(path)
    trunk = dict(net.net.named_parameters())
    torch.testing.assert_close(trunk["slice3.10.weight"], state["features.10.weight"])
    torch.testing.assert_close(trunk["slice5.28.bias"], state["features.28.bias"])
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips_loss(net, x, x.flip(0))
    assert d.shape == (2,) and torch.all(d > 0)
    assert lpips_loss(net, x, x).abs().max() < 1e-6
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="features.0.weight"):
        build_lpips(bad)


def test_random_backbone_is_logged_loudly(caplog):
    with caplog.at_level("WARNING"):
        build_lpips(random_backbone=True)
    assert any("RANDOMLY INITIALISED" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------------------ PatchGAN
def test_patchgan_layout_matches_taming():
    d = NLayerDiscriminator(filters=64, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    # taming NLayerDiscriminator(ndf=64, n_layers=3): 3->64 s2, 64->128 s2, 128->256 s2, 256->512 s1, 512->1 s1
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert [c.bias is None for c in convs] == [False, True, True, True, False]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6


def test_patchgan_init_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator(filters=64, layers=3)
    w = torch.cat([m.weight.detach().flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 5e-4
    bn = torch.cat([m.weight.detach() for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(float(bn.mean()) - 1.0) < 5e-3 and all(float(m.bias.abs().max()) == 0
                                                       for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_actnorm_initialises_to_zero_mean_unit_std():
    x = torch.randn(8, 3, 5, 5) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + 4.0
    a = ActNorm(3).train()
    y = a(x)
    torch.testing.assert_close(y.transpose(0, 1).flatten(1).mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.transpose(0, 1).flatten(1).std(1), torch.ones(3), atol=1e-4, rtol=0)
    assert int(a.initialized) == 1
    torch.testing.assert_close(a(x * 2), (x * 2 + a.loc) * a.scale)  # not re-initialised
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="group")
    assert NLayerDiscriminator(filters=8, layers=2, norm="act")(torch.zeros(1, 3, 16, 16)).shape == (1, 1, 2, 2)


def test_vanilla_changes_only_the_discriminator_loss():
    """disc_loss=vanilla is taming/LDM's: vanilla_d_loss = 0.5 (mean softplus(-D(x)) + mean softplus(D(x_rec))) for
    D, and taming's generator loss -mean D(x_rec) for G, the same as with hinge (vqperceptual.py, contperceptual.py)."""
    from dataclasses import fields

    from ldm.config import TokenizerCfg
    from ldm.tokenizers.losses import D_LOSSES, G_LOSSES, GAN_LOSSES

    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[-3.0, 0.0], [0.5, -0.5]]).view(2, 1, 1, 2)

    def sp(v):
        return math.log1p(math.exp(v))

    # sample 0: real sp(-2), sp(-.5); fake sp(-3), sp(0). sample 1: real sp(1), sp(0); fake sp(.5), sp(-.5)
    d = [0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.0)) / 2),
         0.5 * ((sp(1.0) + sp(0.0)) / 2 + (sp(0.5) + sp(-0.5)) / 2)]
    torch.testing.assert_close(D_LOSSES["vanilla"](real, fake), torch.tensor(d))
    # taming reduces over the whole batch at once: the mean of the per-sample values (equal patch counts)
    taming = 0.5 * (nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean())
    torch.testing.assert_close(D_LOSSES["vanilla"](real, fake).mean(), taming)
    # G: -mean D(x_rec) per sample: -(-3 + 0) / 2 = 1.5, -(0.5 - 0.5) / 2 = 0
    torch.testing.assert_close(G_LOSSES["vanilla"](fake), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(G_LOSSES["hinge"](fake), torch.tensor([1.5, 0.0]))
    assert G_LOSSES["non_saturating"] is non_saturating_g_loss and D_LOSSES["non_saturating"] is non_saturating_d_loss
    assert D_LOSSES["hinge"] is hinge_d_loss
    choices = next(f for f in fields(TokenizerCfg) if f.name == "disc_loss").metadata["choices"]
    assert tuple(D_LOSSES) == tuple(G_LOSSES) == GAN_LOSSES == choices
