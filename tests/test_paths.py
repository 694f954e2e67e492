"""Paths and prediction conversions vs closed forms, autograd, numpy and diffusers' schedules."""
import math

import numpy as np
import pytest
import torch

from ldm.diffusion.paths import (
    PATHS,
    PREDICTIONS,
    DiscretePath,
    convert_prediction,
    get_path,
    prediction_target,
    shift_time,
    x0_eps_from_prediction,
)

ALL_PATHS = sorted(PATHS)
TS = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95], dtype=torch.float64)


def test_closed_forms_at_known_t():
    lin, gvp, vp = get_path("linear"), get_path("gvp"), get_path("vp")
    assert float(lin.alpha(0.3)) == pytest.approx(0.7) and float(lin.sigma(0.3)) == pytest.approx(0.3)
    assert float(gvp.alpha(0.5)) == pytest.approx(math.sqrt(0.5)) and float(gvp.sigma(0.5)) == pytest.approx(math.sqrt(0.5))
    # SiT VPCPlan at t_SiT = 1 - t: log alpha = -(1/4)(1 - t_SiT)^2 (20 - 0.1) - (1/2)(1 - t_SiT) 0.1
    t = 0.6
    alpha = math.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    assert float(vp.alpha(t)) == pytest.approx(alpha, rel=1e-12)
    assert float(vp.sigma(t)) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-12)
    assert float(vp.alpha(0.0)) == 1.0 and float(vp.sigma(0.0)) == 0.0


def test_ddpm_linear_matches_numpy_and_diffusers():
    from diffusers import DDPMScheduler

    path = get_path("ddpm_linear")
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # Ho et al. 2020, float64
    i = np.array([0, 1, 10, 499, 998, 999])
    t = torch.tensor((i + 1) / 1000, dtype=torch.float64)
    assert torch.allclose(path.alpha(t) ** 2, torch.tensor(ab[i]), rtol=1e-10, atol=0)
    assert torch.allclose(path.sigma(t) ** 2, torch.tensor(1 - ab[i]), rtol=1e-9, atol=0)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    assert torch.allclose(path.alphas_cumprod, ref, rtol=1e-5, atol=0)
    assert float(path.alpha(0.0)) == 1.0  # clean data at t = 0
    # log alpha_bar is linear between knots: the midpoint is the geometric mean of its neighbours
    mid = float(path.alpha(torch.tensor(10.5 / 1000, dtype=torch.float64)) ** 2)
    assert mid == pytest.approx(math.sqrt(ab[9] * ab[10]), rel=1e-12)


def test_ddpm_cosine_matches_closed_form_and_diffusers():
    from diffusers import DDPMScheduler

    path = get_path("ddpm_cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal Eq. 17
    for i in (0, 100, 500, 900):
        assert float(path.alpha((i + 1) / 1000) ** 2) == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-9)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    assert torch.allclose(path.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)
    assert float(path.betas.max()) == pytest.approx(0.999)  # clipped as in ADM


@pytest.mark.parametrize("name", ALL_PATHS)
def test_derivatives_match_autograd(name):
    path = get_path(name)
    t = (TS + 0.0013).clone().requires_grad_(True)  # off the DDPM knots
    for fn, dfn in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        (grad,) = torch.autograd.grad(fn(t).sum(), t)
        assert torch.allclose(dfn(t.detach()), grad, rtol=1e-6, atol=1e-8), name


@pytest.mark.parametrize("name", ALL_PATHS)
def test_noise_and_targets_vs_formulas(name):
    path = get_path(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    t = (TS + 0.0013).requires_grad_(True)
    x_t = path.noise(x0, eps, t)
    a = path.alpha(t.detach()).view(-1, 1, 1, 1)
    s = path.sigma(t.detach()).view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a * x0 + s * eps)
    # velocity target = d x_t / dt (autograd through the path, per sample)
    (dxdt,) = torch.autograd.grad(x_t, t, grad_outputs=torch.ones_like(x_t), is_grads_batched=False)
    vel = prediction_target("velocity", x0, eps, t.detach(), path)
    assert torch.allclose(vel.sum(dim=(1, 2, 3)), dxdt, rtol=1e-6, atol=1e-8)
    # score = grad_x log N(x; alpha x0, sigma^2 I)
    xt = x_t.detach().requires_grad_(True)
    logp = torch.distributions.Normal(a * x0, s).log_prob(xt).sum()
    (score,) = torch.autograd.grad(logp, xt)
    assert torch.allclose(prediction_target("score", x0, eps, t.detach(), path), score, rtol=1e-8)
    assert torch.equal(prediction_target("eps", x0, eps, t.detach(), path), eps)
    assert torch.equal(prediction_target("x0", x0, eps, t.detach(), path), x0)
    assert torch.allclose(prediction_target("v", x0, eps, t.detach(), path), a * eps - s * x0)


def test_linear_path_hand_values():
    path = get_path("linear")
    x0, eps, t = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.25])
    assert torch.allclose(path.noise(x0, eps, t), torch.tensor([1.25]))  # 0.75 * 2 + 0.25 * (-1)
    assert torch.allclose(prediction_target("velocity", x0, eps, t, path), torch.tensor([-3.0]))  # eps - x0
    assert torch.allclose(path.noise(x0, eps, torch.tensor([0.0])), x0)


@pytest.mark.parametrize("name", ALL_PATHS)
@pytest.mark.parametrize("src", PREDICTIONS)
def test_prediction_round_trips(name, src):
    path = get_path(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x_t = path.noise(x0, eps, TS)
    out = prediction_target(src, x0, eps, TS, path)
    rx0, reps = x0_eps_from_prediction(src, out, x_t, TS, path)
    assert torch.allclose(rx0, x0, atol=1e-9) and torch.allclose(reps, eps, atol=1e-9)
    for dst in PREDICTIONS:
        conv = convert_prediction(out, x_t, TS, path=path, src=src, dst=dst)
        assert torch.allclose(conv, prediction_target(dst, x0, eps, TS, path), atol=1e-8)
        back = convert_prediction(conv, x_t, TS, path=path, src=dst, dst=src)
        assert torch.allclose(back, out, atol=1e-8)


@pytest.mark.parametrize("name", ALL_PATHS)
def test_t_from_nsr_inverts(name):
    path = get_path(name)
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    assert torch.allclose(path.t_from_nsr(path.nsr(t)), t, atol=1e-9)


def test_discrete_time_mapping():
    path = get_path("ddpm_linear")
    i = torch.tensor([0, 1, 249, 999])
    t = (i + 1).double() / 1000
    assert torch.equal(path.model_time(t), i.double())  # DiT's network input is the index
    assert torch.equal(path.index(t.float()), i)
    with pytest.raises(ValueError, match="grid"):
        path.index(torch.tensor([0.0005]))
    assert isinstance(path, DiscretePath) and path.num_timesteps == 1000
    assert get_path("ddpm_linear", num_timesteps=100).betas[-1] == pytest.approx(0.2)  # ADM scaling 1000 / T


def test_shift_time():
    assert float(shift_time(0.5, 3.0)) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert float(shift_time(0.0, 3.0)) == 0.0 and float(shift_time(1.0, 3.0)) == 1.0
    # LightningDiT's shift s_L on SiT time (transport/integrators.py compute_tm) is shift 1 / s_L in ours
    s_l = 0.3
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    t_sit = 1 - t
    lightning = s_l * t_sit / (1 + (s_l - 1) * t_sit)
    assert torch.allclose(1 - lightning, shift_time(t, 1 / s_l), atol=1e-12)
    with pytest.raises(ValueError, match="shift"):
        shift_time(0.5, 0.0)


def test_bad_names():
    with pytest.raises(ValueError, match="ddpm_cosine.*gvp.*linear"):
        get_path("cosine")
    with pytest.raises(ValueError, match="prediction='noise'"):
        prediction_target("noise", torch.zeros(1), torch.zeros(1), 0.5, get_path("linear"))
