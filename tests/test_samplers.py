"""Samplers on data whose exact denoiser is closed form (Gaussian, 2-component Gaussian mixture), convergence orders,
and parity with diffusers' DDPM / DDIM / DPM-Solver++ schedulers driven by the same model and timesteps."""
import dataclasses
import inspect
import math
import sys

import pytest
import torch

from ldm.config import SampleCfg
from ldm.diffusion.paths import DiscretePath, get_path
from ldm.diffusion.samplers import (
    SAMPLER_OPTIONS,
    SAMPLERS,
    get_sampler,
    make_denoiser,
    randn_like,
    respaced_indices,
    sample_ddim,
    sample_ddpm,
    sample_dopri5,
    sample_dpm_solver_pp,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sampler_options,
    sampler_times,
    time_grid,
)

# Data: independent Gaussians per dimension, x0 ~ N(MU, S^2). With x_t = a x0 + s eps, E[x0 | x_t] and E[eps | x_t] are
# linear in x_t, and the probability-flow ODE keeps the standardised value (x_t - a MU) / sqrt(a^2 S^2 + s^2) fixed.
MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
S = torch.tensor([0.6, 1.5], dtype=torch.float64)


def _coefs(path, t, ndim):
    shape = (-1,) + (1,) * (ndim - 1)
    t = t.double()
    return [f(t).view(shape) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma)]


def gaussian_model(path, prediction, mu=MU, s=S):
    """The exact network output of `prediction` for Gaussian data, written from the closed forms (not from paths.py)."""

    def model_fn(x, t):
        a, sg, da, ds = _coefs(path, t, x.ndim)
        v = a * a * s * s + sg * sg
        x0 = mu + a * s * s * (x.double() - a * mu) / v
        eps = sg * (x.double() - a * mu) / v
        out = {"eps": eps, "x0": x0, "velocity": da * x0 + ds * eps}[prediction]
        return out.to(x.dtype)

    return model_fn


def exact_flow(path, x_T, t0, t1, mu=MU, s=S):
    a0, s0, a1, s1 = (float(f(t)) for f, t in ((path.alpha, t0), (path.sigma, t0), (path.alpha, t1), (path.sigma, t1)))
    z = (x_T - a0 * mu) / torch.sqrt(a0 * a0 * s * s + s0 * s0)
    return a1 * mu + torch.sqrt(a1 * a1 * s * s + s1 * s1) * z


def _noise(n, d=2, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- distributions ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops; one thread avoids oversubscribing a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


CASES = [  # sampler, path, prediction, steps, grid kwargs, sampler kwargs, max deviation from the exact ODE map
    ("euler", "linear", "velocity", 100, {}, {}, 0.1),
    ("heun", "linear", "velocity", 20, {}, {}, 0.02),
    ("heun", "gvp", "velocity", 20, {}, {}, 0.02),
    ("dpm_solver++", "ddpm_linear", "eps", 25, {}, {"order": 2}, 0.05),
    ("dpm_solver++", "vp", "eps", 25, {}, {"order": 3}, 0.06),
    ("ddim", "ddpm_cosine", "eps", 100, {}, {"eta": 0.0}, 0.1),
    ("ddpm", "ddpm_linear", "eps", 250, {"kind": "respaced"}, {}, None),
    ("euler_maruyama", "linear", "velocity", 250, {}, {}, None),
    ("dopri5", "linear", "velocity", 1, {}, {}, 0.01),
]


@pytest.mark.parametrize("name,pname,prediction,steps,grid,kw,tol", CASES)
def test_samplers_reach_gaussian_data(name, pname, prediction, steps, grid, kw, tol):
    path = get_path(pname)
    n = 2000
    x_T = _noise(n, seed=1)
    x_T = (x_T - x_T.mean(0)) / x_T.std(0)  # standardised: the exact ODE map then gives exactly mean MU, std S
    ts = time_grid(steps, "sde") if name == "euler_maruyama" else time_grid(steps, **grid)
    den = make_denoiser(gaussian_model(path, prediction), path=path, prediction=prediction)
    x = get_sampler(name)(den, x_T, ts, path=path, generator=torch.Generator().manual_seed(2), **kw)
    if tol is None:  # stochastic: the sample moments of n draws
        assert torch.all((x.mean(0) - MU).abs() < 4 * S / math.sqrt(n) + 0.01), (x.mean(0), MU)
        assert torch.all((x.std(0) / S - 1).abs() < 0.05), (x.std(0), S)
    else:  # deterministic: the discretisation bias alone, and each sample near its exact ODE image
        assert torch.all((x.mean(0) - MU).abs() < 0.02 * S), (x.mean(0), MU)
        assert torch.all((x.std(0) / S - 1).abs() < 0.02), (x.std(0), S)
        ref = exact_flow(path, x_T, float(ts[0]), float(ts[-1]))
        assert (x - ref).abs().max() < tol


def gmm_model(path, weights, means, stds):
    """Exact velocity of a 1-D Gaussian mixture: posterior component weights times per-component Gaussian denoisers."""
    w, m, sd = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))

    def model_fn(x, t):
        a, sg, da, ds = _coefs(path, t, x.ndim)  # (B, 1)
        var = a * a * sd * sd + sg * sg  # (B, K) marginal variance of x_t in each component
        logp = torch.log(w) - 0.5 * torch.log(2 * math.pi * var) - 0.5 * (x - a * m) ** 2 / var
        r = torch.softmax(logp, dim=1)  # (B, K) posterior over components
        x0 = (r * (m + a * sd * sd * (x - a * m) / var)).sum(1, keepdim=True)
        eps = (x - a * x0) / sg
        return da * x0 + ds * eps

    return model_fn


@pytest.mark.parametrize("name,steps", [("heun", 30), ("euler_maruyama", 200), ("dpm_solver++", 30)])
def test_samplers_reach_gaussian_mixture(name, steps):
    path = get_path("linear")
    weights, means, stds = (0.3, 0.7), (-1.5, 1.0), (0.3, 0.5)
    n = 4000
    x_T = _noise(n, d=1, seed=3)
    ts = time_grid(steps, t_max=0.999)
    if name == "euler_maruyama":
        ts = time_grid(steps, "sde", t_max=0.999)
    den = make_denoiser(gmm_model(path, weights, means, stds), path=path, prediction="velocity")
    x = get_sampler(name)(den, x_T, ts, path=path, generator=torch.Generator().manual_seed(4))[:, 0]
    frac_left = float((x < -0.25).double().mean())  # the components are separated at -0.25
    assert abs(frac_left - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n) + 0.01
    mean = 0.3 * -1.5 + 0.7 * 1.0
    var = 0.3 * (0.09 + 1.5**2) + 0.7 * (0.25 + 1.0) - mean**2
    assert abs(float(x.mean()) - mean) < 0.05 and abs(float(x.std()) / math.sqrt(var) - 1) < 0.03


# --- convergence orders -------------------------------------------------------------------------------------------


def _slope(sampler, path, prediction, grid_fn, k=32, **kw):
    x_T = _noise(64, seed=5)
    den = make_denoiser(gaussian_model(path, prediction), path=path, prediction=prediction)
    errs = []
    for n in (k, 2 * k):
        ts = grid_fn(n)
        ref = exact_flow(path, x_T, float(ts[0]), float(ts[-1]))
        errs.append(float((sampler(den, x_T, ts, path=path, **kw) - ref).abs().max()))
    return math.log2(errs[0] / errs[1]), errs


def _lambda_grid(path, t0=0.98, t1=0.02):
    """Steps uniform in lambda = log(alpha / sigma) (the step size of DPM-Solver's convergence theorem)."""

    def grid(n):
        lam = lambda t: float(torch.log(path.alpha(t) / path.sigma(t)))
        ts = path.t_from_nsr(torch.exp(-torch.linspace(lam(t0), lam(t1), n + 1, dtype=torch.float64)))
        ts[0], ts[-1] = t0, t1
        return ts

    return grid


def test_convergence_orders():
    """Error vs the exact ODE solution at K and 2K steps: slope log2(e_K / e_2K) is the order."""
    flow = get_path("linear")
    euler, _ = _slope(sample_euler, flow, "velocity", lambda n: time_grid(n))
    heun, _ = _slope(sample_heun, flow, "velocity", lambda n: time_grid(n))
    vp = get_path("vp")
    ddim, _ = _slope(sample_ddim, vp, "eps", _lambda_grid(vp))
    dpm2, e2 = _slope(sample_dpm_solver_pp, vp, "eps", _lambda_grid(vp), order=2)
    dpm3, e3 = _slope(sample_dpm_solver_pp, vp, "eps", _lambda_grid(vp), order=3)
    assert 0.9 < euler < 1.1 and 0.9 < ddim < 1.1
    assert 1.85 < heun < 2.2 and 1.85 < dpm2 < 2.2
    # 3M warms up with a first-order step whose O(h^2) error limits the global order to 2, but it beats 2M
    assert dpm3 > 1.85 and e3[1] < 0.5 * e2[1]


# --- parity with diffusers ----------------------------------------------------------------------------------------


def _image_model_diffusers(scheduler, prediction="epsilon", learned=False):
    """The Gaussian-data eps model as diffusers sees it: integer timestep -> alphas_cumprod[timestep]."""
    mu, s = 0.3, 0.8

    def model(x, timestep):
        ab = scheduler.alphas_cumprod[int(timestep)].double()
        a, sg = ab.sqrt(), (1 - ab).sqrt()
        eps = (sg * (x.double() - a * mu) / (a * a * s * s + sg * sg)).float()
        return torch.cat([eps, torch.tanh(x)], dim=1) if learned else eps

    return model


def _image_model_ours(path, learned=False):
    mu, s = 0.3, 0.8

    def model_fn(x, t):
        a, sg = path.alpha(t).view(-1, 1, 1, 1), path.sigma(t).view(-1, 1, 1, 1)
        eps = (sg * (x.double() - a * mu) / (a * a * s * s + sg * sg)).float()
        return torch.cat([eps, torch.tanh(x)], dim=1) if learned else eps

    return model_fn


def _run_diffusers(scheduler, model, x, generator=None, **step_kw):
    for timestep in scheduler.timesteps:
        out = model(x, timestep)
        x = scheduler.step(out, timestep, x, generator=generator, **step_kw).prev_sample
    return x


def _our_times(scheduler):
    return torch.tensor([(int(t) + 1) / 1000 for t in scheduler.timesteps] + [0.0], dtype=torch.float64)


X_IMG = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (20, 1.0)])
def test_ddim_matches_diffusers(steps, eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    ref = _run_diffusers(sched, _image_model_diffusers(sched), X_IMG, eta=eta,
                         generator=torch.Generator().manual_seed(8))
    path = get_path("ddpm_linear")
    den = make_denoiser(_image_model_ours(path), path=path, prediction="eps")
    ours = sample_ddim(den, X_IMG, _our_times(sched), path=path, eta=eta, generator=torch.Generator().manual_seed(8))
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("order,steps", [(2, 10), (2, 20), (3, 12), (3, 20), (1, 10)])
def test_dpm_solver_pp_matches_diffusers(order, steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=order,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True)
    sched.set_timesteps(steps)
    ref = _run_diffusers(sched, _image_model_diffusers(sched), X_IMG)
    path = get_path("ddpm_linear")
    den = make_denoiser(_image_model_ours(path), path=path, prediction="eps")
    ours = sample_dpm_solver_pp(den, X_IMG, _our_times(sched), path=path, order=order)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_matches_diffusers(variance):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type=variance)
    sched.set_timesteps(25)
    learned = variance == "learned_range"
    ref = _run_diffusers(sched, _image_model_diffusers(sched, learned=learned), X_IMG,
                         generator=torch.Generator().manual_seed(9))
    path = get_path("ddpm_linear")
    den = make_denoiser(_image_model_ours(path, learned=learned), path=path, prediction="eps", learned_sigma=learned)
    ours = sample_ddpm(den, X_IMG, _our_times(sched), path=path, variance=variance,
                       generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_ddim_eta_one_is_ddpm():
    """DDIM's sigma_eta at eta = 1 is the DDPM posterior variance (Song et al. 2021 Sec. 4.1), same noise stream."""
    path = get_path("ddpm_cosine")
    den = make_denoiser(gaussian_model(path, "eps"), path=path, prediction="eps")
    x_T, ts = _noise(16, seed=10), time_grid(30, "respaced")
    a = sample_ddim(den, x_T, ts, path=path, eta=1.0, generator=torch.Generator().manual_seed(11))
    b = sample_ddpm(den, x_T, ts, path=path, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(a, b, atol=1e-10)


# --- SiT / REPA form of the SDE -------------------------------------------------------------------------------------


def test_euler_maruyama_matches_repa_update():
    """REPA samplers.py euler_maruyama_sampler (same time convention as ours), transcribed: w = t, d = v - w score,
    score from the velocity via REPA's get_score_from_velocity, final mean step without noise."""
    path = get_path("linear")
    model = gaussian_model(path, "velocity")
    steps = 12
    ts = time_grid(steps, "sde")  # SiT/REPA: linspace(1, 0.04, K), then 0
    assert torch.allclose(ts, torch.tensor([1 - 0.96 * k / 11 for k in range(12)] + [0.0], dtype=torch.float64))
    x_T = _noise(5, seed=12)
    g = torch.Generator().manual_seed(13)
    x = x_T.clone()
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        v = model(x, torch.full((5,), t, dtype=torch.float64))
        alpha, d_alpha, sigma, d_sigma = 1 - t, -1.0, t, 1.0
        ratio = alpha / d_alpha
        score = (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)
        d = v - 0.5 * (2 * t) * score
        x = x + d * (t_next - t)
        if i < steps - 1:
            x = x + math.sqrt(2 * t) * torch.randn(x.shape, generator=g, dtype=x.dtype) * math.sqrt(abs(t_next - t))
    den = make_denoiser(model, path=path, prediction="velocity")
    ours = sample_euler_maruyama(den, x_T, ts, path=path, generator=torch.Generator().manual_seed(13))
    assert torch.allclose(ours, x, atol=1e-10)


# --- grids, randomness, options, errors ----------------------------------------------------------------------------


def test_time_grids():
    assert respaced_indices(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]  # stride 999 / 9
    ts = time_grid(250, "respaced")
    assert len(ts) == 251 and float(ts[0]) == 1.0 and float(ts[-2]) == pytest.approx(0.001) and float(ts[-1]) == 0.0
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert torch.allclose(time_grid(2, "shifted", shift=3.0), torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))
    # Karras et al. Eq. 5, n = 3, sigma in [0.002, 80], rho = 7, on the linear path t = sigma / (1 + sigma)
    sig = [80.0, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, 0.002]
    want = [s / (1 + s) for s in sig] + [0.0]
    assert torch.allclose(time_grid(3, "karras", path=get_path("linear")), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="karras"):
        time_grid(3, "karras")
    with pytest.raises(ValueError, match="respaced"):
        time_grid(3, "cosine")


def test_per_sample_generators_do_not_depend_on_batch():
    path = get_path("linear")
    den = make_denoiser(gaussian_model(path, "velocity"), path=path, prediction="velocity")
    ts = time_grid(8)
    x_T = torch.stack([_noise(1, seed=100 + i)[0] for i in range(4)])
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]
    full = sample_euler_maruyama(den, x_T, ts, path=path, generator=gens(range(4)))
    part = sample_euler_maruyama(den, x_T[2:4], ts, path=path, generator=gens(range(2, 4)))
    assert torch.equal(full[2:4], part)
    with pytest.raises(ValueError, match="one per sample"):
        randn_like(x_T, gens(range(3)))
    assert torch.equal(randn_like(x_T, torch.Generator().manual_seed(3)),
                       torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3), dtype=x_T.dtype))


def test_callback_and_nfe():
    path = get_path("linear")
    calls = []

    def model_fn(x, t):
        calls.append(float(t[0]))
        return gaussian_model(path, "velocity")(x, t)

    den = make_denoiser(model_fn, path=path, prediction="velocity")
    seen = []
    sample_heun(den, _noise(2), time_grid(5), path=path, callback=seen.append)
    assert len(calls) == 9 and [s["i"] for s in seen] == [0, 1, 2, 3, 4]  # 2n - 1 evaluations (Karras Alg. 1)
    assert set(seen[0]) == {"i", "t", "t_next", "x", "denoised"}


def test_dopri5_accuracy_and_missing_dependency(monkeypatch):
    path = get_path("gvp")
    den = make_denoiser(gaussian_model(path, "velocity"), path=path, prediction="velocity")
    x_T = _noise(32, seed=14)
    x = sample_dopri5(den, x_T, time_grid(1), path=path, atol=1e-8, rtol=1e-8)
    assert torch.allclose(x, exact_flow(path, x_T, 1.0, 0.0), atol=1e-6)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ModuleNotFoundError, match="pip install torchdiffeq"):
        sample_dopri5(den, x_T, time_grid(1), path=path)


def test_bad_input():
    path = get_path("linear")
    den = make_denoiser(gaussian_model(path, "velocity"), path=path, prediction="velocity")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(den, _noise(2), torch.tensor([0.0, 1.0]), path=path)
    with pytest.raises(ValueError, match="dpm_solver"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="learned_sigma=True"):
        sample_ddpm(den, _noise(2), time_grid(3), path=path, variance="learned_range")
    with pytest.raises(ValueError, match="order=4"):
        sample_dpm_solver_pp(den, _noise(2), time_grid(3), path=path, order=4)
    with pytest.raises(ValueError, match="diffusion_form"):
        sample_euler_maruyama(den, _noise(2), time_grid(3), path=path, diffusion_form="cosine")
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm_solver++", "euler", "heun", "dopri5", "euler_maruyama"}


def _old_sampler_kwargs(sampler, sample_cfg, learned_sigma):
    """eval/generate.py's sampler_kwargs before the option table: the options filtered by the sampler's signature."""
    params = inspect.signature(sampler).parameters
    options = {"eta": sample_cfg.eta, "variance": "learned_range" if learned_sigma else None}
    return {k: v for k, v in options.items() if k in params and v is not None}


def _old_sampler_times(sample_cfg, path):
    """eval/generate.py's sampler_times before it moved to diffusion/samplers.py."""
    if isinstance(path, DiscretePath):
        return time_grid(sample_cfg.steps, "respaced", num_timesteps=path.num_timesteps)
    if sample_cfg.sampler == "euler_maruyama" and sample_cfg.time_grid == "uniform" and sample_cfg.steps >= 2:
        return time_grid(sample_cfg.steps, "sde")
    return time_grid(sample_cfg.steps, sample_cfg.time_grid, path=path, shift=sample_cfg.shift)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_options_and_times_match_the_signature_filter(name):
    assert set(SAMPLER_OPTIONS) == set(SAMPLERS)
    for learned_sigma in (False, True):
        for eta in (0.0, 0.7):
            cfg = SampleCfg(sampler=name, eta=eta)
            assert sampler_options(cfg, learned_sigma) == _old_sampler_kwargs(SAMPLERS[name], cfg, learned_sigma)
    for pname in ("linear", "gvp", "ddpm_linear", "ddpm_cosine"):
        for grid, steps, shift in (("uniform", 1, 1.0), ("uniform", 6, 1.0), ("karras", 5, 1.0), ("shifted", 4, 3.0)):
            cfg = SampleCfg(sampler=name, steps=steps, time_grid=grid, shift=shift)
            new, old = sampler_times(cfg, get_path(pname)), _old_sampler_times(cfg, get_path(pname))
            assert new.dtype == old.dtype and torch.equal(new, old)
    with pytest.raises(ValueError, match="sampler='plms'"):
        sampler_options(dataclasses.replace(SampleCfg(), sampler="plms"), False)
