"""sigma-VAE (ldm/tokenizers/sigma_vae.py; LatentLM, Sun et al. 2024, arXiv:2412.08635): the noise scale and the
noise follow the paper's distributions (Kolmogorov-Smirnov tests against their analytic CDFs), the KL term equals
hand values and torch.distributions' KL less its sigma-only part, draws are per image (batch split / resume
invariant), off leaves the KL kind bit-identical, only kind=kl takes it, and a run trains and resumes bit-exactly."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import integrate, special, stats

from ldm.config import ConfigError, load_config
from ldm.tokenizers.kinds import get_kind
from ldm.tokenizers.kl import build_autoencoder_kl, encode_posterior
from ldm.tokenizers.sigma_vae import sigma_vae_encoded, sigma_vae_kl, sigma_vae_noise

C = 0.75


def _gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _product_normal_cdf(t: np.ndarray, c: float) -> np.ndarray:
    """P(sigma * eps <= t) for sigma ~ N(0, c^2), eps ~ N(0, 1) independent: with a = |t| / c, the product of two
    standard normals has P(|XY| <= a) = a (K0(a) L_{-1}(a) + K1(a) L0(a)) (Bessel K, modified Struve L)."""
    a = np.abs(t) / c
    with np.errstate(invalid="ignore"):
        half = a * (special.k0(a) * special.modstruve(-1, a) + special.k1(a) * special.modstruve(0, a)) / 2
    return 0.5 + np.sign(t) * np.where(a > 0, half, 0.0)


def _product_normal_cdf_by_quadrature(t: float, c: float) -> float:
    """The same probability as int phi(u) Phi(t / (c |u|)) du, numerically."""
    def f(u):
        return math.exp(-u * u / 2) / math.sqrt(2 * math.pi) * special.ndtr(t / (c * abs(u))) if u else 0.0
    return integrate.quad(f, -12, 12, points=[0.0], limit=200)[0]


def test_sigma_and_noise_have_the_papers_distributions():
    n = 3000
    noise, sigma = sigma_vae_noise((n, 2, 3, 3), C, draws=_gens(range(n)), device=torch.device("cpu"))
    # the scale: one sigma per image, sigma ~ N(0, C^2)
    assert stats.kstest(sigma.double().numpy() / C, "norm").pvalue > 0.01
    # one element per image is sigma * eps, the product of two independent normals (density K0(|x|/C) / (pi C))
    for t in (-2.0, -0.3, 0.0, 0.1, 1.0):
        assert float(_product_normal_cdf(np.array(t), C)) == pytest.approx(_product_normal_cdf_by_quadrature(t, C),
                                                                           abs=1e-9)
    x = noise[:, 0, 0, 0].double().numpy()
    assert stats.kstest(x, lambda t: _product_normal_cdf(t, C)).pvalue > 0.01
    # and a plain N(0, C^2) is rejected: the test has power against the Gaussian of a KL posterior of the same variance
    assert stats.kstest(x / C, "norm").pvalue < 1e-3
    # within an image the scale is shared: noise / sigma is N(0, 1) across its elements
    eps = (noise / sigma.view(-1, 1, 1, 1)).flatten().double().numpy()
    assert stats.kstest(eps, "norm").pvalue > 0.01
    # E[(sigma eps)^2] = C^2 (the variance term), within 4 standard errors (Var[(sigma eps)^2] = 9 C^4 - C^4)
    assert abs(float((x ** 2).mean()) - C ** 2) < 4 * math.sqrt(8 * C ** 4 / n)


def test_draws_are_per_image_whatever_the_batch():
    whole, s_whole = sigma_vae_noise((6, 2, 2, 2), C, draws=_gens(range(10, 16)), device=torch.device("cpu"))
    parts = [sigma_vae_noise((3, 2, 2, 2), C, draws=_gens(seeds), device=torch.device("cpu"))
             for seeds in (range(10, 13), range(13, 16))]
    assert torch.equal(whole, torch.cat([p[0] for p in parts]))
    assert torch.equal(s_whole, torch.cat([p[1] for p in parts]))
    g = torch.Generator().manual_seed(12)  # image i: sigma first, then eps, from its own generator
    s = torch.randn((), generator=g)
    e = torch.randn((2, 2, 2), generator=g)
    assert torch.equal(whole[2], s * C * e)
    torch.manual_seed(0)
    a = sigma_vae_noise((4, 1, 2, 2), C, draws=None, device=torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(a[0], sigma_vae_noise((4, 1, 2, 2), C, draws=None, device=torch.device("cpu"))[0])
    with pytest.raises(ValueError, match="got 2 generators for a batch of 4"):
        sigma_vae_noise((4, 1, 2, 2), C, draws=_gens([0, 1]), device=torch.device("cpu"))


def test_kl_term_equals_hand_values_and_the_gaussian_kl_less_its_sigma_part():
    mean = torch.tensor([[[[1.0]], [[2.0]], [[3.0]]], [[[0.0]], [[-1.0]], [[0.5]]]])  # (2, 3, 1, 1)
    # 0.5 * (1 + 4 + 9) = 7 and 0.5 * (0 + 1 + 0.25) = 0.625; batch mean 3.8125
    assert float(sigma_vae_kl(mean)) == pytest.approx(3.8125, abs=0)
    sigma = torch.tensor([0.3, -1.7])  # any fixed scales: the mean part does not depend on them
    q = torch.distributions.Normal(mean, sigma.abs().view(-1, 1, 1, 1))
    full = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    sigma_part = 3 * 0.5 * (sigma ** 2 - 1 - torch.log(sigma ** 2))
    assert float((full - sigma_part).mean()) == pytest.approx(3.8125, rel=1e-6)
    enc = sigma_vae_encoded(mean, kl_weight=0.01, c_sigma=C, draws=_gens([0, 1]))
    assert float(enc.loss) == pytest.approx(0.038125, rel=1e-7) and float(enc.logs["loss_kl"]) == 3.8125
    noise, s = sigma_vae_noise(mean.shape, C, draws=_gens([0, 1]), device=torch.device("cpu"))
    assert torch.equal(enc.z, mean + noise) and float(enc.logs["sigma_abs"]) == pytest.approx(float(s.abs().mean()))


def _tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4,
                                mid_block_attention=False, sample_size=8)


def test_kl_kind_off_is_bit_identical_and_on_uses_the_mean_only():
    from ldm.tokenizers.losses import kl_diagonal_gaussian

    vae, kind = _tiny_vae(), get_kind("kl")
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    off = load_config(overrides=["tokenizer.kl_weight=0.5"]).tokenizer
    assert off.sigma_vae.enabled is False
    enc = kind.encode_train(vae, x, cfg=off, draws=_gens([5, 6, 7]))
    post = encode_posterior(vae, x)  # what the KL kind computed before sigma-VAE existed
    assert torch.equal(enc.z, post.sample(_gens([5, 6, 7])))
    assert torch.equal(enc.loss, 0.5 * kl_diagonal_gaussian(post.mean.float(), post.logvar.float()).mean())
    on = load_config(overrides=["tokenizer.kl_weight=0.5", "tokenizer.sigma_vae.enabled=true",
                                f"tokenizer.sigma_vae.c_sigma={C}"]).tokenizer
    enc = kind.encode_train(vae, x, cfg=on, draws=_gens([5, 6, 7]))
    noise, _ = sigma_vae_noise(post.mean.shape, C, draws=_gens([5, 6, 7]), device=x.device)
    assert torch.equal(enc.z, post.mean + noise)
    assert torch.equal(enc.loss, 0.5 * sigma_vae_kl(post.mean))
    enc.loss.backward()  # the log-variance half of the moments is unused: zero gradient on its output channels
    assert vae.quant_conv.weight.grad[4:].abs().sum() == 0 and vae.quant_conv.weight.grad[:4].abs().sum() > 0


def test_only_the_kl_kind_takes_it():
    with pytest.raises(ConfigError, match=r"^tokenizer\.sigma_vae\.enabled=true applies to tokenizer\.kind=kl only, "
                                          r"not tokenizer\.kind='vq'; set tokenizer\.sigma_vae\.enabled=false$"):
        load_config(overrides=["tokenizer.kind=vq", "tokenizer.sigma_vae.enabled=true"])
    with pytest.raises(ConfigError, match="tokenizer.sigma_vae.c_sigma=0"):
        load_config(overrides=["tokenizer.sigma_vae.c_sigma=0"])


def test_a_sigma_vae_trains_and_resumes_bit_exactly(tmp_path):
    from ldm.cli import main

    args = ["train", "--no-progress", "stage=tokenizer", "data.image_size=16", "data.class_cond=false",
            "tokenizer.block_out_channels=[16,16]", "tokenizer.norm_num_groups=8", "tokenizer.layers_per_block=1",
            "tokenizer.mid_block_attention=false", "tokenizer.perceptual_weight=0", "tokenizer.disc_layers=1",
            "tokenizer.sigma_vae.enabled=true", "tokenizer.kl_weight=1e-3", "train.batch_size=4", "train.log_every=1",
            "train.ckpt_every=2", "optim.name=adam", "optim.lr=1e-3", f"train.run_root={tmp_path}"]
    assert main([*args, "name=whole", "train.max_steps=4"]) == 0
    assert main([*args, "name=split", "train.max_steps=2"]) == 0
    assert main([*args, "name=split", "train.max_steps=4"]) == 0
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step_0000004" / f))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step_0000004" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    logs = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert '"train/sigma_abs"' in logs and '"train/loss_kl"' in logs
