"""Timestep samplers vs their distributions (KS), losses vs hand-computed targets, min-SNR vs the paper, DiT's VLB vs an
independent Gaussian-conditioning derivation."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from ldm.diffusion.objectives import (
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    sample_timesteps,
    training_loss,
    velocity_direction_loss,
    vlb_terms,
)
from ldm.diffusion.paths import get_path

N = 100_000


def _draw(kind, **kw):
    return sample_timesteps(N, kind, generator=torch.Generator().manual_seed(0), dtype=torch.float64, **kw).numpy()


def test_uniform_and_logit_normal_ks():
    assert scipy.stats.kstest(_draw("uniform"), "uniform").pvalue > 1e-3
    m, s = 0.3, 0.8
    t = _draw("logit_normal", mean=m, std=s)
    cdf = lambda v: scipy.stats.norm.cdf((np.log(v) - np.log1p(-v) - m) / s)  # P(sigmoid(N(m, s^2)) <= v)
    assert scipy.stats.kstest(t, cdf).pvalue > 1e-3
    assert scipy.stats.kstest(t, "uniform").pvalue < 1e-6  # the test can tell the two apart


def test_shifted_ks():
    s = 3.0
    t = _draw("uniform", shift=s)
    # t' = s u / (1 + (s - 1) u), u ~ U(0, 1)  =>  P(t' <= v) = v / (s - (s - 1) v)
    assert scipy.stats.kstest(t, lambda v: v / (s - (s - 1) * v)).pvalue > 1e-3
    t = _draw("logit_normal", shift=s)
    base = lambda u: scipy.stats.norm.cdf(np.log(u) - np.log1p(-u))
    assert scipy.stats.kstest(t, lambda v: base(v / (s - (s - 1) * v))).pvalue > 1e-3
    assert scipy.stats.kstest(t, base).pvalue < 1e-6


def test_discrete_and_range():
    t = _draw("discrete", num_timesteps=1000)
    i = t * 1000 - 1
    assert np.allclose(i, np.round(i)) and i.min() == 0 and i.max() == 999
    t = _draw("uniform", t_min=0.1, t_max=0.4)
    assert t.min() >= 0.1 and t.max() <= 0.4 and abs(t.mean() - 0.25) < 3e-3
    with pytest.raises(ValueError, match="logit_normal"):
        sample_timesteps(3, "lognorm")
    with pytest.raises(ValueError, match="discrete"):
        sample_timesteps(3, "discrete", shift=2.0)


def _batch(seed=0, shape=(4, 3, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_flow_matching_velocity_loss():
    path = get_path("linear")
    x0, eps = _batch()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    seen = {}

    def model_fn(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return (eps - x0) + 0.1  # exact velocity of x_t = (1 - t) x0 + t eps, plus an offset

    loss, logs = training_loss(model_fn, x0, path=path, prediction="velocity", t=t, noise=eps)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x_t"], (1 - tb) * x0 + tb * eps) and torch.equal(seen["t"], t)
    assert loss.shape == (4,) and torch.allclose(loss, torch.full((4,), 0.01, dtype=torch.float64))
    assert set(logs) == {"mse", "loss"} and not logs["loss"].requires_grad


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddpm_targets(prediction):
    path = get_path("ddpm_linear")
    x0, eps = _batch(1)
    i = torch.tensor([0, 10, 500, 999])
    t = (i + 1).double() / 1000
    ab = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[i.numpy()]).view(-1, 1, 1, 1)
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]  # Salimans & Ho Eq. (v)
    loss, _ = training_loss(lambda x, tt: target, x0, path=path, prediction=prediction, t=t, noise=eps)
    assert torch.allclose(loss, torch.zeros(4, dtype=torch.float64), atol=1e-20)
    loss, _ = training_loss(lambda x, tt: target + 0.5, x0, path=path, prediction=prediction, t=t, noise=eps)
    assert torch.allclose(loss, torch.full((4,), 0.25, dtype=torch.float64))


def test_default_draws_are_seeded():
    path = get_path("linear")
    x0, _ = _batch(2)
    fn = lambda x, t: x * t.view(-1, 1, 1, 1)
    a = training_loss(fn, x0, path=path, prediction="velocity", generator=torch.Generator().manual_seed(5))[0]
    b = training_loss(fn, x0, path=path, prediction="velocity", generator=torch.Generator().manual_seed(5))[0]
    c = training_loss(fn, x0, path=path, prediction="velocity", generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_min_snr_matches_paper_on_vp():
    path, gamma = get_path("ddpm_linear"), 5.0
    t = torch.tensor([0.01, 0.1, 0.3, 0.7], dtype=torch.float64)
    snr = path.alpha(t) ** 2 / path.sigma(t) ** 2
    clip = torch.clamp(snr, max=gamma)
    assert torch.allclose(min_snr_weight(t, path=path, prediction="eps", gamma=gamma), clip / snr)  # Hang et al. Eq. 8
    assert torch.allclose(min_snr_weight(t, path=path, prediction="v", gamma=gamma), clip / (snr + 1))
    assert torch.allclose(min_snr_weight(t, path=path, prediction="x0", gamma=gamma), clip)


@pytest.mark.parametrize("prediction", ["velocity", "eps", "v", "score"])
def test_min_snr_is_x0_space_weight(prediction):
    """w_p ||p_hat - p||^2 = min(SNR, gamma) ||x0_hat - x0||^2 for a perturbed output, on a non-VP path."""
    from ldm.diffusion.paths import prediction_target, x0_eps_from_prediction

    path = get_path("linear")
    x0, eps = _batch(3, (4, 6))
    t = torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=torch.float64)
    x_t = path.noise(x0, eps, t)
    out = prediction_target(prediction, x0, eps, t, path)
    pert = out + 0.3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    x0_hat, _ = x0_eps_from_prediction(prediction, pert, x_t, t, path)
    snr = ((1 - t) / t) ** 2
    lhs = min_snr_weight(t, path=path, prediction=prediction) * ((pert - out) ** 2).sum(1)
    assert torch.allclose(lhs, torch.clamp(snr, max=5.0) * ((x0_hat - x0) ** 2).sum(1))


def test_min_snr_in_training_loss():
    path = get_path("ddpm_linear")
    x0, eps = _batch(5)
    t = torch.tensor([0.01, 0.1, 0.3, 0.7], dtype=torch.float64)
    loss, logs = training_loss(lambda x, tt: eps + 1.0, x0, path=path, prediction="eps", t=t, noise=eps,
                               weighting="min_snr", min_snr_gamma=5.0)
    snr = path.alpha(t) ** 2 / path.sigma(t) ** 2
    assert torch.allclose(loss, torch.clamp(snr, max=5.0) / snr)
    assert "weight" in logs
    with pytest.raises(ValueError, match="weighting"):
        training_loss(lambda x, tt: x, x0, path=path, prediction="eps", t=t, weighting="p2")


def test_velocity_direction_loss():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    ref = (1 - F.cosine_similarity(a, b, dim=1)).mean(dim=(1, 2))
    assert torch.allclose(velocity_direction_loss(a, b), ref, atol=1e-6)
    assert torch.allclose(velocity_direction_loss(a, 2 * a), torch.zeros(3), atol=1e-6)
    assert torch.allclose(velocity_direction_loss(a, -a), torch.full((3,), 2.0), atol=1e-6)
    # LightningDiT: loss = mse + 1 * cos
    path = get_path("linear")
    x0, eps = _batch(7)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    out = lambda x, tt: x  # any prediction
    loss, logs = training_loss(out, x0, path=path, prediction="velocity", t=t, noise=eps, cos_loss_weight=1.0)
    x_t = 0.5 * x0 + 0.5 * eps
    ref = ((x_t - (eps - x0)) ** 2).mean(dim=(1, 2, 3)) + velocity_direction_loss(x_t, eps - x0)
    assert torch.allclose(loss, ref) and "cos" in logs


# --- DiT learned-sigma hybrid loss -------------------------------------------------------------------------------


def _posterior(ab, i, x0, x_t):
    """q(x_{i-1} | x_i, x0) by Gaussian conditioning of x_{i-1} ~ N(sqrt(ab_{i-1}) x0, 1 - ab_{i-1}) on
    x_i | x_{i-1} ~ N(sqrt(1 - b_i) x_{i-1}, b_i)."""
    ab_prev = 1.0 if i == 0 else ab[i - 1]
    b = 1 - ab[i] / ab_prev
    m1, v1 = math.sqrt(ab_prev) * x0, 1 - ab_prev
    prec = 1 / v1 + (1 - b) / b
    return (m1 / v1 + math.sqrt(1 - b) * x_t / b) / prec, 1 / prec, b


def test_vlb_kl_matches_gaussian_conditioning():
    path = get_path("ddpm_linear")
    ab = path.alphas_cumprod.numpy()
    x0, eps = _batch(8, (3, 2, 2, 2))
    idx = torch.tensor([1, 40, 900])
    t = (idx + 1).double() / 1000
    x_t = path.noise(x0, eps, t)
    x0_hat = x0 + 0.05
    var_values = torch.full_like(x0, 1.0)  # frac = 1: log variance = log beta_i
    got = vlb_terms(x0, x_t, idx, x0_hat=x0_hat, var_values=var_values, path=path)
    for k, i in enumerate(idx.tolist()):
        mq, vq, b = _posterior(ab, i, x0[k], x_t[k])
        mp, _, _ = _posterior(ab, i, x0_hat[k], x_t[k])
        q = torch.distributions.Normal(mq, math.sqrt(vq))
        p = torch.distributions.Normal(mp, math.sqrt(b))
        ref = torch.distributions.kl_divergence(q, p).mean() / math.log(2)
        assert float(got[k]) == pytest.approx(float(ref), rel=1e-6)
    # exact mean and frac = 0 (the posterior variance): the KL vanishes
    zero = vlb_terms(x0, x_t, idx, x0_hat=x0, var_values=-torch.ones_like(x0), path=path)
    assert torch.allclose(zero, torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_vlb_decoder_nll_at_first_step():
    path = get_path("ddpm_linear")
    x0 = torch.tensor([[-1.0, -0.2, 0.5, 1.0]], dtype=torch.float64)  # edges take the tails
    eps = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)
    t = torch.tensor([0.001], dtype=torch.float64)
    x_t = path.noise(x0, eps, t)
    got = float(vlb_terms(x0, x_t, torch.tensor([0]), x0_hat=x0, var_values=torch.ones_like(x0), path=path))
    # p(x_0 | x_1) = N(posterior mean at x0 (= x0 at i = 0), beta_0); bins of width 2/255, exact normal CDF
    sd = math.sqrt(1e-4)
    lp = []
    for xv in x0[0].tolist():
        hi, lo = scipy.stats.norm.cdf((1 / 255) / sd), scipy.stats.norm.cdf((-1 / 255) / sd)
        lp.append(math.log(hi) if xv < -0.999 else math.log(1 - lo) if xv > 0.999 else math.log(hi - lo))
    assert got == pytest.approx(-np.mean(lp) / math.log(2), rel=2e-3)  # DiT's tanh CDF approximation


def test_discretized_gaussian_tails():
    x = torch.tensor([-1.0, 0.0, 1.0])
    lp = discretized_gaussian_log_likelihood(x, means=torch.zeros(3), log_scales=torch.zeros(3))
    assert float(lp[0]) == pytest.approx(math.log(scipy.stats.norm.cdf(-1 + 1 / 255)), rel=1e-3)
    assert float(lp[1]) == pytest.approx(math.log(scipy.stats.norm.cdf(1 / 255) - scipy.stats.norm.cdf(-1 / 255)), rel=1e-3)


def test_hybrid_loss_freezes_mean_for_vlb():
    path = get_path("ddpm_linear")
    x0, eps = _batch(9, (2, 3, 2, 2))
    t = torch.tensor([0.05, 0.5], dtype=torch.float64)
    param = torch.randn(2, 6, 2, 2, dtype=torch.float64, requires_grad=True)
    loss, logs = training_loss(lambda x, tt: param, x0, path=path, prediction="eps", t=t, noise=eps,
                               learned_sigma=True)
    assert set(logs) == {"mse", "vb", "loss"}
    loss.sum().backward()
    # the mean channels get only the MSE gradient (DiT's frozen_out); the variance channels get the VLB's
    assert torch.allclose(param.grad[:, :3], 2 * (param[:, :3] - eps).detach() / 12)
    assert param.grad[:, 3:].abs().sum() > 0
    with pytest.raises(ValueError, match="6 output channels"):
        training_loss(lambda x, tt: x, x0, path=path, prediction="eps", t=t, learned_sigma=True)
    with pytest.raises(ValueError, match="DDPM path"):
        training_loss(lambda x, tt: param, x0, path=get_path("linear"), prediction="eps", t=t, learned_sigma=True)
    with pytest.raises(ValueError, match="grid"):
        training_loss(lambda x, tt: param, x0, path=path, prediction="eps", t=t + 0.0004, learned_sigma=True)


@pytest.mark.parametrize("path_name,prediction", [("linear", "velocity"), ("ddpm_linear", "eps")])
def test_per_sample_generators_make_each_loss_independent_of_its_batch(path_name, prediction):
    """One generator per sample: sample i's time and noise (hence its loss) are the same in the whole batch and in
    either half of it, so a batch split over processes draws what one process draws; the distributions are those of
    the batch draw (uniform / discrete times, standard normal noise)."""
    path = get_path(path_name)
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def model_fn(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    def gens(idx):
        return [torch.Generator().manual_seed(100 + i) for i in idx]

    whole, _ = training_loss(model_fn, x0, path=path, prediction=prediction, generator=gens(range(6)))
    halves = [training_loss(model_fn, x0[s], path=path, prediction=prediction, generator=gens(range(6)[s]))[0]
              for s in (slice(0, 3), slice(3, 6))]
    assert torch.equal(whole, torch.cat(halves))
    assert torch.equal(seen[0], torch.cat(seen[1:]))
    # the same per-sample streams drawn one sample at a time, as sample_timesteps and torch.randn draw them
    g = torch.Generator().manual_seed(104)
    kind = "discrete" if path_name.startswith("ddpm") else "uniform"
    t4 = sample_timesteps(1, kind, generator=g)
    assert float(seen[0][4]) == pytest.approx(float(t4[0]))
    with pytest.raises(ValueError, match="one per sample"):
        training_loss(model_fn, x0, path=path, prediction=prediction, generator=gens(range(5)))


def test_per_sample_times_and_noise_follow_the_batch_distributions():
    seen = {}

    def model_fn(x_t, t):
        seen["t"], seen["x_t"] = t, x_t
        return x_t

    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    training_loss(model_fn, torch.zeros(2000, 1), path=get_path("linear"), prediction="velocity", generator=gens,
                  timesteps="logit_normal")
    t = seen["t"].double()
    assert scipy.stats.kstest(torch.logit(t).numpy(), "norm").pvalue > 1e-3  # t = sigmoid(N(0, 1))
    assert scipy.stats.kstest((seen["x_t"][:, 0].double() / t).numpy(), "norm").pvalue > 1e-3  # x_t = t eps at x0 = 0
