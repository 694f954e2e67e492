"""Latent diagnostics (ldm.eval.latents) on constructed cases with known answers, and `ldm eval latents` end to end."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.eval.latents import (
    alignment,
    channel_stats,
    cknna,
    codebook_stats,
    eq_transforms,
    equivariance_errors,
    high_frequency_share,
    hsic_unbiased,
    kl_per_element,
    linear_cka,
    posterior_stats,
    power_spectrum,
    radial_profile,
    spectrum_summary,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------- channels
def test_channel_stats_equal_numpy():
    z = torch.randn(7, 5, 3, 4, generator=gen(0)) * torch.tensor([0.5, 1, 2, 3, 4]).view(1, 5, 1, 1) + 1.5
    s = channel_stats(z)
    a = z.numpy().astype(np.float64)
    np.testing.assert_allclose(s["mean"], a.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s["std"], a.std(axis=(0, 2, 3)), rtol=1e-12)
    std = a.std(axis=(0, 2, 3))
    assert s["std_ratio"] == pytest.approx(std.max() / std.min(), rel=1e-12)
    assert s["std_cv"] == pytest.approx(std.std() / std.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="latents must be"):
        channel_stats(z[0])


# ----------------------------------------------------------------------------------------------------------- equivariance
F_DOWN = 4


def identity_encode(x):  # latent = f x f average-pooled image
    return F.avg_pool2d(x, F_DOWN)


def identity_decode(z):  # image = nearest-neighbour upsampled latent
    return F.interpolate(z, scale_factor=F_DOWN, mode="nearest")


def test_identity_tokenizer_is_exactly_equivariant_to_rotations():
    """Pooling and nearest upsampling commute with 90-degree rotations: zero latent error; the rotated reconstruction
    is the rotated plain one, so the decoder ratio is exactly 1 on arbitrary images."""
    x = torch.rand(6, 3, 32, 32, generator=gen(1)) * 2 - 1
    res = equivariance_errors(identity_encode, identity_decode, x.split(4), downsample=F_DOWN,
                              transforms=eq_transforms(scales=(0.5,), rotations=(1, 2, 3)))
    for name in ("rot90", "rot180", "rot270"):
        t = res["transforms"][name]
        assert t["latent_error"] < 1e-6
        assert t["decoder_ratio"] == pytest.approx(1.0, abs=1e-6)
    # bilinear x1/2 (align_corners=False) is exactly 2x2 average pooling: it commutes with the f x f pooling too
    assert res["transforms"]["scale0.5"]["latent_error"] < 1e-6
    assert res["rotation_mean"]["latent_error"] < 1e-6
    # RMSE of the plain reconstruction, computed independently
    expected = (identity_decode(identity_encode(x)) - x).double().square().mean().sqrt()
    assert res["recon_rmse"] == pytest.approx(float(expected), rel=1e-9)


def test_identity_tokenizer_on_block_images_has_zero_decoder_error():
    x = identity_decode(torch.rand(4, 3, 8, 8, generator=gen(2)) * 2 - 1)  # piecewise constant on 4 x 4 blocks
    res = equivariance_errors(identity_encode, identity_decode, [x], downsample=F_DOWN,
                              transforms=eq_transforms(scales=(), rotations=(1, 2, 3)))
    assert res["recon_rmse"] < 1e-7
    assert all(t["decoder_mse"] < 1e-12 and t["latent_error"] < 1e-6 for t in res["transforms"].values())
    assert "scale_mean" not in res


def test_position_dependent_encoder_has_the_predicted_latent_error():
    """E(x) = pool(x) + b with a fixed map b: E(rot x) - rot E(x) = b - rot(b), whatever the images."""
    b = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) / 64

    def encode(x):
        return F.avg_pool2d(x, F_DOWN) + b

    x = torch.rand(3, 3, 32, 32, generator=gen(3)) * 2 - 1
    res = equivariance_errors(encode, identity_decode, [x], downsample=F_DOWN,
                              transforms=eq_transforms(scales=(), rotations=(1,)))
    rot = torch.rot90(encode(x), 1, dims=[-1, -2])
    diff = (b - torch.rot90(b, 1, dims=[-1, -2])).expand_as(rot)
    expected = diff.double().norm() / rot.double().norm()
    assert res["transforms"]["rot90"]["latent_error"] == pytest.approx(float(expected), rel=1e-6)
    assert expected > 0.1



def test_equivariance_error_is_the_mean_decoder_mse_over_the_grid():
    """ldm.tokenizers.eq.equivariance_error (the EQ-VAE paper's number) against a direct computation: mean over
    every (s, k) pair of the pixel-mean of (D(tau(E(x))) - tau(x))^2, tau = bilinear x s then k x 90 deg."""
    from ldm.tokenizers.eq import equivariance_error

    def decode(z):
        return F.interpolate(z, scale_factor=F_DOWN, mode="bilinear", align_corners=False)

    x = torch.rand(3, 3, 32, 32, generator=gen(20)) * 2 - 1
    z = identity_encode(x)
    expected = []
    for s in (0.5, 0.75):
        for k in (0, 1, 3):
            h = int(8 * s)
            z_t = torch.rot90(F.interpolate(z, size=(h, h), mode="bilinear", align_corners=False), k, dims=[-1, -2])
            x_t = torch.rot90(F.interpolate(x, size=(h * F_DOWN, h * F_DOWN), mode="bilinear", align_corners=False),
                              k, dims=[-1, -2])
            expected.append(float((decode(z_t) - x_t).double().square().mean()))
    err = equivariance_error(identity_encode, decode, x, downsample=F_DOWN, scales=[0.5, 0.75], rotations=(0, 1, 3))
    assert err == pytest.approx(sum(expected) / len(expected), rel=1e-12) and err > 0.01
    res = equivariance_errors(identity_encode, decode, [x], downsample=F_DOWN, latent_error=False,
                              transforms=eq_transforms(scales=(0.5,), rotations=(1,)))
    assert all("latent_error" not in t for t in res["transforms"].values())
    assert set(res["rotation_mean"]) == {"decoder_mse", "decoder_ratio"}

# ----------------------------------------------------------------------------------------------------------- spectrum
def test_white_noise_has_a_flat_spectrum():
    x = torch.randn(3000, 2, 8, 8, generator=gen(4)) * 1.7
    freq, prof = radial_profile(power_spectrum(x))
    assert freq[0] == pytest.approx(0.25) and freq[-1] == pytest.approx(6 / 4)
    # orthonormal DFT: E|X(k)|^2 = sigma^2 for every k != 0 (the mean removal touches only k = 0)
    np.testing.assert_allclose(prof.numpy(), 1.7**2, rtol=0.05)
    assert float(prof.max() / prof.min()) < 1.1
    # HF share of a flat spectrum = fraction of non-DC frequencies beyond the cutoff, counted by hand
    n_hi = n_all = 0
    for ky, kx in itertools.product(range(8), range(8)):
        fy, fx = (ky if ky < 4 else ky - 8) / 4, (kx if kx < 4 else kx - 8) / 4  # signed frequency / Nyquist
        rho = math.hypot(fy, fx)
        n_all += rho > 0
        n_hi += rho > 0.5
    share = high_frequency_share(power_spectrum(x), 0.5)
    np.testing.assert_allclose(share.numpy(), n_hi / n_all, atol=0.01)


def test_pure_cosine_puts_all_power_in_one_ring():
    w = torch.arange(16, dtype=torch.float64)
    for u, hf in ((3, 0.0), (6, 1.0)):  # rho = u / 8: 0.375 (below the cutoff) and 0.75 (above)
        x = torch.cos(2 * math.pi * u * w / 16).expand(2, 1, 16, 16)
        p = power_spectrum(x)
        freq, prof = radial_profile(p)
        nonzero = (prof[0] > 1e-20).nonzero().flatten().tolist()
        assert nonzero == [u - 1] and freq[u - 1] == pytest.approx(u / 8)
        assert float(high_frequency_share(p, 0.5)[0]) == pytest.approx(hf, abs=1e-12)


def test_power_spectrum_obeys_parseval():
    x = torch.randn(5, 3, 6, 10, generator=gen(5)).double()
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    total = centred.square().sum(dim=(-2, -1)).mean(0)  # (C,)
    torch.testing.assert_close(power_spectrum(x).sum(dim=(-2, -1)), total)
    s = spectrum_summary(x, 0.5)
    assert sum(s["power"]) == pytest.approx(1.0) and 0 < s["hf_share"] < 1
    chunked = spectrum_summary(x, 0.5, chunk=2)  # accumulated over chunks of 2, 2, 1 images
    np.testing.assert_allclose(chunked["power"], s["power"], rtol=1e-12)
    assert chunked["hf_share"] == pytest.approx(s["hf_share"], rel=1e-12)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_share(power_spectrum(x), 1.5)


# ----------------------------------------------------------------------------------------------------------- posterior
def test_kl_per_element_matches_torch_distributions():
    mu = torch.randn(4, 3, 5, 5, generator=gen(6))
    logvar = torch.randn(4, 3, 5, 5, generator=gen(7))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp()),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_element(mu, logvar), ref)
    s = posterior_stats(mu, logvar)
    np.testing.assert_allclose(s["kl_per_element"], ref.mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    assert s["kl_per_image"] == pytest.approx(float(ref.sum(dim=(1, 2, 3)).mean()), rel=1e-12)
    np.testing.assert_allclose(s["posterior_variance"], logvar.double().exp().mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)


def test_codebook_usage_and_perplexity_of_a_known_histogram():
    idx = torch.tensor([0, 1, 2, 3] * 5).view(4, 5)  # 4 of 8 codes, equally often
    s = codebook_stats(idx, 8)
    assert s["codes_used"] == 4 and s["usage"] == 0.5 and s["perplexity"] == pytest.approx(4.0, rel=1e-6)
    s = codebook_stats(torch.zeros(3, 3, dtype=torch.long), 8)  # collapse onto one code
    assert s["codes_used"] == 1 and s["perplexity"] == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------- alignment
def test_linear_cka_matches_the_gram_matrix_definition_and_its_invariances():
    x = torch.randn(40, 6, generator=gen(8)).double()
    y = x[:, :3] @ torch.randn(3, 5, generator=gen(9)).double() + 0.5 * torch.randn(40, 5, generator=gen(10)).double()
    a, b = x.numpy(), y.numpy()
    h = np.eye(40) - 1 / 40
    k, l = a @ a.T, b @ b.T
    ref = np.trace(k @ h @ l @ h) / math.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(11)).double())
    assert linear_cka(x, 3 * x @ q + 2) == pytest.approx(1.0, abs=1e-12)  # orthogonal, isotropic scale, shift


def hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012, Theorem 3: HSIC_1 is the U-statistic over ordered 4-tuples of distinct indices of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (summing all orderings symmetrises the kernel h)."""
    n, total, count = k.shape[0], 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def test_unbiased_hsic_equals_the_u_statistic():
    x = torch.randn(7, 3, generator=gen(12)).double()
    y = torch.randn(7, 2, generator=gen(13)).double()
    k, l = x @ x.T, y @ y.T
    assert float(hsic_unbiased(k, l)) == pytest.approx(hsic_u_statistic(k.numpy(), l.numpy()), rel=1e-10)


def test_cknna_full_neighbourhood_is_unbiased_cka_and_self_alignment_is_one():
    x = F.normalize(torch.randn(8, 3, generator=gen(14)).double(), dim=1)
    y = F.normalize(torch.randn(8, 4, generator=gen(15)).double(), dim=1)
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    ref = hsic_u_statistic(k, l) / math.sqrt(hsic_u_statistic(k, k) * hsic_u_statistic(l, l))
    assert cknna(x, y, topk=7) == pytest.approx(ref, rel=1e-6)
    assert cknna(x, x, topk=3) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="topk"):
        cknna(x, y, topk=8)


def test_alignment_of_latents_with_themselves_is_perfect_and_subsampling_is_seeded():
    z = torch.randn(5, 4, 6, 6, generator=gen(16))
    res = alignment(z, z, topk=5, max_tokens=100, seed=3)
    assert res["num_tokens"] == 100 and res["linear_cka"] == pytest.approx(1.0, abs=1e-12)
    assert res["cknna"] == pytest.approx(1.0, abs=1e-6)
    f = torch.randn(5, 7, 6, 6, generator=gen(17))
    assert alignment(z, f, max_tokens=100, seed=3) == alignment(z, f, max_tokens=100, seed=3)
    with pytest.raises(ValueError, match="grids differ"):
        alignment(z, f[:, :, :3], max_tokens=100)


def test_digits_patch_encoder_returns_the_classifier_trunk_per_position():
    from ldm.encoders import build_encoder
    from ldm.encoders.digits import load_digits_classifier

    enc = build_encoder("digits")
    x = torch.rand(2, 3, 32, 32, generator=gen(18)) * 2 - 1
    tokens = enc(x)  # (B, 64, 64)
    body = load_digits_classifier().body
    ref = body(((x + 1) / 2).mean(1, keepdim=True) * 2 - 1)  # (B, 64, 8, 8)
    assert tokens.shape == (2, 64, 64)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------- driver
def tiny_kl_tokenizer():
    from ldm.tokenizers.export import Tokenizer
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    return Tokenizer(build_autoencoder_kl(latent_channels=3, block_out_channels=[8, 8, 8], layers_per_block=1,
                                          norm_num_groups=4, mid_block_attention=False, sample_size=32))


def test_diagnose_kl_tokenizer_writes_json_and_figure(tmp_path):
    from ldm.encoders import build_encoder
    from ldm.eval.latents import diagnose_tokenizer, load_images

    tok = tiny_kl_tokenizer()
    res = diagnose_tokenizer(tok, "digits", num_images=8, batch_size=8, encoder=build_encoder("digits"),
                             encoder_name="digits", max_tokens=256, scales=(0.5,), out_dir=tmp_path)
    saved = json.loads((tmp_path / "latent_diagnostics.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert (tmp_path / "latent_diagnostics.png").stat().st_size > 10_000
    assert res["tokenizer"]["latent_shape"] == [3, 8, 8] and res["data"]["num_images"] == 8
    assert set(res["equivariance"]["transforms"]) == {"rot90", "rot180", "rot270", "scale0.5"}
    assert res["spectrum"]["latent"]["size"] == [8, 8] and res["spectrum"]["image_at_latent"]["size"] == [8, 8]
    assert len(res["posterior"]["kl_per_element"]) == 3 and res["alignment"]["num_tokens"] == 256
    # the channel statistics are those of the posterior means of the same images
    x = load_images("digits", num_images=8)
    z = tok.encode(x)
    np.testing.assert_allclose(res["channels"]["mean"], z.double().mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-7)


def test_diagnose_vq_tokenizer_reports_the_codebook_and_skips_alignment(tmp_path):
    from ldm.eval.latents import diagnose_tokenizer
    from ldm.tokenizers.export import Tokenizer
    from ldm.tokenizers.vq import VQAutoencoder

    torch.manual_seed(0)
    tok = Tokenizer(VQAutoencoder(block_out_channels=[8, 8], layers_per_block=1, z_channels=8, codebook_size=16,
                                  code_dim=4, norm_num_groups=4, mid_block_attention=False))
    res = diagnose_tokenizer(tok, "digits", num_images=6, batch_size=6, scales=(0.5,))
    idx = tok.encode_indices(__import__("ldm.eval.latents", fromlist=["x"]).load_images("digits", num_images=6))
    assert res["codebook"]["codes_used"] == len(torch.unique(idx)) and res["codebook"]["codebook_size"] == 16
    assert "skipped" in res["alignment"] and "posterior" not in res
    with pytest.raises(ValueError, match="num_images"):
        diagnose_tokenizer(tok, "digits", num_images=1)


def test_cli_eval_latents(tmp_path, capsys):
    from ldm.cli import main

    tok = tiny_kl_tokenizer()
    tok.model.save_pretrained(str(tmp_path / "vae"))
    rc = main(["eval", "latents", "--tokenizer", str(tmp_path / "vae"), "--data", "digits", "--num-images", "8",
               "--out", str(tmp_path / "diag"), "--scales", "0.5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "HF share" in out and "alignment     skipped" in out
    numbers = json.loads(out.strip().splitlines()[-1])
    assert {"hf_share_latent", "rotation_decoder_ratio", "kl_per_image"} <= set(numbers)
    assert (tmp_path / "diag" / "latent_diagnostics.png").is_file()
    assert main(["eval", "latents", "--tokenizer", str(tmp_path / "nope"), "--data", "digits", "--out",
                 str(tmp_path / "d2")]) == 2
    assert "does not exist" in capsys.readouterr().err
