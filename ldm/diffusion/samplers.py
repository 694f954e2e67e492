"""Samplers: pure functions that carry noise x_T at t = ts[0] to data at t = ts[-1] (time convention of paths.py).

Every sampler has the signature (STYLE.md Sec. 4)

    sample_<name>(denoise, x_T, ts, *, path, generator=None, callback=None, **options) -> x at ts[-1]

  denoise(x, t)  -> Denoised(x0, eps[, var_values]) for x of shape (B, ...) and t of shape (B,) in OUR time. Build it
                  from a network with make_denoiser(model_fn, path=..., prediction=...): the only place where a
                  prediction type (eps / x0 / v / velocity / score) is converted. Samplers need both x0 and eps, which
                  every prediction gives without dividing by a vanishing coefficient (see make_denoiser).
                  An evaluation that lies inside a step rather than at its start (Heun's corrector) also passes
                  step_start=(B,) times of the step's start, which a step-aware model_fn (guidance.py rule
                  "step_start") reads; every other evaluation is at its step's start.
  ts             1-D, strictly decreasing times, normally from time_grid(); ts[-1] = 0 ends on data.
  generator      None (torch's global RNG), one torch.Generator, or a LIST of one generator per sample: then sample i
                 draws only from generators[i] and does not depend on the batch it is drawn in (edm2
                 generate_images.py StackedRandomGenerator). See randn_like.
  callback       called after every step with {"i", "t", "t_next", "x", "denoised"}.

Samplers (SAMPLERS) and their update equations:
  ddpm            ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020 arXiv:2006.11239 Eq. 6-7),
                  written for any path as in Kingma et al. 2021 (VDM, arXiv:2107.00630 Eq. 26-27); any grid, e.g. DiT's
                  respacing of 250 of 1000 steps (time_grid(250, "respaced")); variance fixed_small / fixed_large /
                  learned_range (Nichol & Dhariwal 2021 Eq. 15; DiT gaussian_diffusion.py p_mean_variance).
  ddim            Song et al. 2021 (arXiv:2010.02502) Eq. 12 with sigma_eta of Eq. 16, written with the path's SNR.
  dpm_solver++    multistep DPM-Solver++ of order 1-3 (Lu et al. 2022, arXiv:2211.01095 Alg. 2 for 2M; the third-order
                  multistep update of their code / diffusers DPMSolverMultistepScheduler), data prediction in lambda time.
  euler, heun     the probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps (= the velocity of flow matching);
                  Heun is Alg. 1 of Karras et al. 2022 (arXiv:2206.00364) without churn, Euler its first stage.
  dopri5          adaptive Dormand-Prince on the same ODE via torchdiffeq (optional dependency; SiT's default ODE
                  sampler, atol 1e-6, rtol 1e-3).
  euler_maruyama  SiT's reverse SDE dx = [u - w(t) score] dt + sqrt(2 w(t)) dW (willisma/SiT transport/transport.py
                  sample_sde, integrators.py sde; REPA samplers.py euler_maruyama_sampler), with SiT's diffusion forms and
                  its final deterministic "Mean" step over the last interval of ts.

From a sample config (ldm.config.SampleCfg): sampler_times gives the time grid, and sampler_options the keyword options
of SAMPLER_OPTIONS, the table of which config fields each sampler reads.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ldm.diffusion.paths import DiscretePath, Path, check_prediction, shift_time, x0_eps_from_prediction

if TYPE_CHECKING:
    from ldm.config import SampleCfg


class Denoised(NamedTuple):
    """What a sampler needs from the network at (x_t, t)."""

    x0: Tensor  # (B, C, ...) data prediction
    eps: Tensor  # (B, C, ...) noise prediction
    var_values: Tensor | None = None  # (B, C, ...) DiT learned-range values in [-1, 1] (sample_ddpm only)


Denoiser = Callable[..., Denoised]  # denoise(x, t, step_start=None)
Generator = torch.Generator | Sequence[torch.Generator] | None


def make_denoiser(model_fn: Callable[..., Tensor], *, path: Path, prediction: str, learned_sigma: bool = False,
                  step_aware: bool = False) -> Denoiser:
    """Wrap model_fn(x, t) -> output (OUR t) as denoise(x, t, step_start=None) -> Denoised, converting `prediction`
    with paths.py.

    learned_sigma=True: the output has 2C channels, [prediction, variance values] (DiT).
    step_aware=True: model_fn(x, t, step_start) also takes the start time (B,) of the sampler step the evaluation
    belongs to (t itself unless a sampler says otherwise), as guidance.classifier_free_guidance's model_fn does.
    Which end of the time axis a prediction can reach: eps needs alpha(t) > 0 (t < 1 on "linear"/"gvp"), x0 needs
    sigma(t) > 0 (t > 0), velocity and v are finite on the whole of [0, 1].
    """
    check_prediction(prediction)

    def denoise(x: Tensor, t: Tensor, step_start: Tensor | None = None) -> Denoised:
        out = model_fn(x, t, t if step_start is None else step_start) if step_aware else model_fn(x, t)
        var_values = None
        if learned_sigma:
            out, var_values = out.split(x.shape[1], dim=1)  # (B, C, ...) each
        x0, eps = x0_eps_from_prediction(prediction, out, x, t, path)
        return Denoised(x0, eps, var_values)

    return denoise


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like x from one generator, or one generator per sample (a list of B)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]).to(x.device)


# --- time grids ---------------------------------------------------------------------------------------------------

TIME_GRIDS = ("uniform", "shifted", "karras", "respaced", "sde")


def respaced_indices(num_timesteps: int, num_steps: int) -> list[int]:
    """DiT/ADM `space_timesteps(T, "K")` with one section: K indices of 0 .. T-1 evenly strided, both ends kept."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps}; expected 1 .. num_timesteps={num_timesteps}")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    return sorted({round(k * stride) for k in range(num_steps)})


def time_grid(n: int, kind: str = "uniform", *, path: Path | None = None, t_max: float = 1.0, t_min: float = 0.0,
              shift: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
              num_timesteps: int = 1000, last_step_size: float = 0.04) -> Tensor:
    """n steps as n + 1 decreasing float64 times.

    uniform   t_i = t_max + i / n (t_min - t_max).
    shifted   the uniform grid through t' = shift t / (1 + (shift - 1) t) (SD3 Eq. 23; LightningDiT's timestep_shift s_L
              is shift = 1 / s_L here, see paths.shift_time).
    karras    Karras et al. 2022 Eq. 5 in EDM sigma = sigma / alpha: sigma_i = (sigma_max^(1/rho) + i / (n - 1)
              (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n, then 0; mapped to t with path.t_from_nsr.
    respaced  DiT's respacing of a T = num_timesteps DDPM: t = (i + 1) / T for the respaced_indices, then t = 0.
    sde       SiT / REPA's Euler-Maruyama grid: n times from t_max to last_step_size evenly, then t = 0 (the last
              interval is sample_euler_maruyama's "mean" step; n steps = n NFE as SiT's num_sampling_steps).
    """
    if n < 1:
        raise ValueError(f"time grid n={n}; expected at least 1 step")
    if kind not in TIME_GRIDS:
        raise ValueError(f"time grid kind={kind!r}; expected one of {list(TIME_GRIDS)}")
    if kind in ("uniform", "shifted"):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"t_max={t_max}, t_min={t_min}; expected 0 <= t_min < t_max <= 1")
        ts = torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)
        return shift_time(ts, shift) if kind == "shifted" else ts
    if kind == "sde":
        if n < 2 or not 0.0 < last_step_size < t_max <= 1.0:
            raise ValueError(f"time_grid(kind='sde') needs n >= 2 and 0 < last_step_size={last_step_size} < t_max={t_max}")
        return torch.cat([torch.linspace(t_max, last_step_size, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    if kind == "karras":
        if path is None:
            raise ValueError("time_grid(kind='karras') needs path= to map EDM sigmas to t")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}; expected 0 < sigma_min < sigma_max")
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho  # Eq. 5
        return torch.cat([path.t_from_nsr(sig), torch.zeros(1, dtype=torch.float64)])
    idx = respaced_indices(num_timesteps, n)
    ts = torch.tensor([(i + 1) / num_timesteps for i in reversed(idx)], dtype=torch.float64)
    return torch.cat([ts, torch.zeros(1, dtype=torch.float64)])


# --- helpers --------------------------------------------------------------------------------------------------------


def _times(ts) -> list[float]:
    ts = [float(v) for v in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError("ts must hold at least 2 strictly decreasing times in [0, 1] (noise at ts[0], data at ts[-1])")
    return ts


def _batch_time(t: float, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)  # (B,)


class _Coef(NamedTuple):
    a: float  # alpha(t)
    s: float  # sigma(t)
    da: float  # alpha'(t)
    ds: float  # sigma'(t)


def _grid_coefs(path: Path, ts: list[float], derivatives: bool = False) -> list[_Coef]:
    """Path coefficients at every grid time as Python floats, computed once per sampling call."""
    t = torch.tensor(ts, dtype=torch.float64)
    a, s = path.alpha(t).tolist(), path.sigma(t).tolist()
    nan = [math.nan] * len(ts)
    da, ds = (path.d_alpha(t).tolist(), path.d_sigma(t).tolist()) if derivatives else (nan, nan)
    return [_Coef(*v) for v in zip(a, s, da, ds)]


def _velocity(d: Denoised, c: _Coef) -> Tensor:
    """dx/dt of the probability-flow ODE = alpha'(t) x0 + sigma'(t) eps (the flow-matching velocity)."""
    return c.da * d.x0 + c.ds * d.eps


def _lambda(a: float, s: float) -> float:
    """lambda = log(alpha / sigma) (Lu et al. 2022), +-inf at the ends."""
    if a <= 0:
        return -math.inf
    if s <= 0:
        return math.inf
    return math.log(a) - math.log(s)


def _report(callback, i: int, t: float, s: float, x: Tensor, d: Denoised) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "t_next": s, "x": x, "denoised": d.x0})


# --- samplers -------------------------------------------------------------------------------------------------------

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def sample_ddpm(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, variance: str = "fixed_small",
                generator: Generator = None, callback=None) -> Tensor:
    """Ancestral sampling: x_s ~ N(mu(x_t, x0_hat), var) for each step t -> s of ts; no noise on a step to s = 0.

    With alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (VDM Eq. 26-27):
      mu = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0_hat
      fixed_small: var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2   (DDPM's beta~, Ho et al. Eq. 7)
      fixed_large: var = sigma_{t|s}^2                         (DDPM's beta)
      learned_range: log var = f log sigma_{t|s}^2 + (1 - f) log(beta~), f = (var_values + 1) / 2 (DiT, IDDPM Eq. 15).
    On a DDPM path with ts = time_grid(K, "respaced") this is DiT's SpacedDiffusion p_sample_loop.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r}; expected one of {list(VARIANCES)}")
    ts = _times(ts)
    cs = _grid_coefs(path, ts)
    x = x_T
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        d = denoise(x, _batch_time(t, x))
        (a_t, s_t, _, _), (a_s, s_s, _, _) = cs[i], cs[i + 1]
        a_ts = a_t / a_s
        var_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)  # sigma_{t|s}^2, the step's beta
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * d.x0
        if s_s > 0:
            var_small = max(var_ts * s_s**2 / s_t**2, 1e-20)
            if variance == "fixed_small":
                std = math.sqrt(var_small)
            elif variance == "fixed_large":
                std = math.sqrt(var_ts)
            else:
                if d.var_values is None:
                    raise ValueError("variance='learned_range' needs make_denoiser(..., learned_sigma=True)")
                frac = (d.var_values + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(max(var_ts, 1e-20)) + (1 - frac) * math.log(var_small)))
            x = mean + std * randn_like(x, generator)
        else:
            x = mean
        _report(callback, i, t, s, x, d)
    return x


def sample_ddim(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, eta: float = 0.0, generator: Generator = None,
                callback=None) -> Tensor:
    """DDIM (Song et al. 2021 Eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,

    c^2 = eta^2 sigma_s^2 (1 - SNR_t / SNR_s), which on VP paths is Eq. 16's
    eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s). eta = 0 is the deterministic DDIM, eta = 1 equals sample_ddpm
    with fixed_small variance.
    """
    if eta < 0:
        raise ValueError(f"eta={eta}; expected >= 0")
    ts = _times(ts)
    cs = _grid_coefs(path, ts)
    x = x_T
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        d = denoise(x, _batch_time(t, x))
        (a_t, s_t, _, _), (a_s, s_s, _, _) = cs[i], cs[i + 1]
        c2 = 0.0
        if eta > 0 and s_s > 0:
            snr_ratio = (a_t * s_s / (a_s * s_t)) ** 2  # SNR_t / SNR_s
            c2 = eta**2 * s_s**2 * max(1.0 - snr_ratio, 0.0)
        x = a_s * d.x0 + math.sqrt(max(s_s**2 - c2, 0.0)) * d.eps
        if c2 > 0:
            x = x + math.sqrt(c2) * randn_like(x, generator)
        _report(callback, i, t, s, x, d)
    return x


def sample_dpm_solver_pp(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, order: int = 2,
                         lower_order_final: bool = True, generator: Generator = None, callback=None) -> Tensor:
    """Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) on data predictions m = x0_hat, h = lambda_s - lambda_t:

      1st order: x_s = sigma_s / sigma_t x - alpha_s (e^-h - 1) m0                                  (their Eq. 8, = DDIM)
      2M:        ... - 0.5 alpha_s (e^-h - 1) D1,  D1 = (m0 - m1) / r0, r0 = h_prev / h            (Alg. 2)
      3M:        x_s = sigma_s / sigma_t x - alpha_s phi1 m0 + alpha_s phi2 D1 - alpha_s phi3 D2, phi1 = e^-h - 1,
                 phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2, with D1, D2 from the last three m (dpm-solver code).
    The first steps warm up with lower orders; a step to sigma = 0 returns alpha_s x0_hat (the first-order limit);
    lower_order_final with fewer than 15 steps lowers the last steps as diffusers' DPMSolverMultistepScheduler does.
    `generator` is unused (deterministic); accepted for the common signature.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order={order}; expected 1, 2 or 3")
    ts = _times(ts)
    cs = _grid_coefs(path, ts)
    n = len(ts) - 1
    x = x_T
    hist: list[tuple[Tensor, float]] = []  # (m, lambda) of earlier steps, newest last
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        d = denoise(x, _batch_time(t, x))
        (a_t, s_t, _, _), (a_s, s_s, _, _) = cs[i], cs[i + 1]
        lam_t, lam_s = _lambda(a_t, s_t), _lambda(a_s, s_s)
        m0 = d.x0
        k = min(order, len(hist) + 1)
        if lower_order_final and n < 15:
            k = 1 if i == n - 1 else (min(k, 2) if i == n - 2 else k)
        if s_s == 0:
            x = a_s * m0
        else:
            h = lam_s - lam_t
            phi1 = math.expm1(-h)
            x = (s_s / s_t) * x - (a_s * phi1) * m0
            if k >= 2:
                (m1, lam1) = hist[-1]
                r0 = (lam_t - lam1) / h
                d1_0 = (m0 - m1) / r0
                if k == 2:
                    x = x - (0.5 * a_s * phi1) * d1_0
                else:
                    (m2, lam2) = hist[-2]
                    r1 = (lam1 - lam2) / h
                    d1_1 = (m1 - m2) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi2 = phi1 / h + 1
                    phi3 = phi2 / h - 0.5
                    x = x + (a_s * phi2) * d1 - (a_s * phi3) * d2
        hist = (hist + [(m0, lam_t)])[-2:]
        _report(callback, i, t, s, x, d)
    return x


def sample_euler(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, generator: Generator = None,
                 callback=None) -> Tensor:
    """Euler on the probability-flow ODE: x_s = x_t + (s - t) u(x_t, t), u = alpha' x0_hat + sigma' eps_hat."""
    ts = _times(ts)
    cs = _grid_coefs(path, ts, derivatives=True)
    x = x_T
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        d = denoise(x, _batch_time(t, x))
        x = x + (s - t) * _velocity(d, cs[i])
        _report(callback, i, t, s, x, d)
    return x


def sample_heun(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, generator: Generator = None,
                callback=None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022 Alg. 1, S_churn = 0): an Euler step, then the trapezoidal correction
    x_s = x_t + (s - t) (u(x_t, t) + u(x_euler, s)) / 2, skipped on a step to s = 0 as in Alg. 1 (2n - 1 NFE).
    The corrector evaluation at s belongs to the step from t: it passes step_start = t (REPA's guidance rule)."""
    ts = _times(ts)
    cs = _grid_coefs(path, ts, derivatives=True)
    x = x_T
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        t_b = _batch_time(t, x)  # (B,)
        d = denoise(x, t_b)
        u = _velocity(d, cs[i])
        x_euler = x + (s - t) * u
        if s > 0:
            u_next = _velocity(denoise(x_euler, _batch_time(s, x), step_start=t_b), cs[i + 1])
            x = x + (s - t) * 0.5 * (u + u_next)
        else:
            x = x_euler
        _report(callback, i, t, s, x, d)
    return x


def sample_dopri5(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, atol: float = 1e-6, rtol: float = 1e-3,
                  generator: Generator = None, callback=None) -> Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq.odeint, method 'dopri5') on dx/dt = alpha' x0_hat + sigma' eps_hat.

    SiT's default ODE sampler (atol 1e-6, rtol 1e-3). The solver chooses its own steps; ts only fixes the start, the
    end and the times reported to `callback`. The ODE is evaluated at ts[-1], so end at t > 0 for x0-predicting models.
    """
    try:
        from torchdiffeq import odeint
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "sampler 'dopri5' needs the optional package torchdiffeq: pip install torchdiffeq (or pip install 'ldm[ode]')"
        ) from err
    ts = _times(ts)

    def func(t: Tensor, x: Tensor) -> Tensor:
        tf = float(t)
        c = _grid_coefs(path, [tf], derivatives=True)[0]
        return _velocity(denoise(x, _batch_time(tf, x)), c)

    grid = torch.tensor(ts, dtype=torch.float64 if x_T.dtype == torch.float64 else torch.float32, device=x_T.device)
    xs = odeint(func, x_T, grid, method="dopri5", atol=atol, rtol=rtol)  # (len(ts), B, ...)
    if callback is not None:
        for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
            callback({"i": i, "t": t, "t_next": s, "x": xs[i + 1], "denoised": None})
    return xs[-1]


def _sde_diffusion(form: str, t: float, c: _Coef, norm: float, path_name: str) -> float:
    """SiT's diffusion coefficients w(t) (path.py compute_diffusion) moved to our time (t_SiT = 1 - t)."""
    if form == "constant":
        return norm
    if form == "sigma":
        return norm * c.s
    if form == "linear":
        return norm * t
    if form == "SBDM":  # sigma^2 d/dt log(sigma / alpha): score-based diffusion's g^2 / 2 (SiT compute_drift)
        if c.a <= 0:
            raise ValueError(f"diffusion_form='SBDM' is infinite at t={t} on path {path_name!r}; start ts below it "
                             "(SiT starts at 1 - 1e-3)")
        return norm * (c.s * c.ds - c.s * c.s * c.da / c.a)
    if form == "decreasing":
        return 0.25 * (1 - norm * math.cos(math.pi * t)) ** 2
    return norm * math.sin(math.pi * t) ** 2  # "increasing-decreasing"


DIFFUSION_FORMS = ("constant", "sigma", "linear", "SBDM", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "euler", "tweedie", None)


def sample_euler_maruyama(denoise: Denoiser, x_T: Tensor, ts, *, path: Path, diffusion_form: str = "sigma",
                          diffusion_norm: float = 1.0, last_step: str | None = "mean", generator: Generator = None,
                          callback=None) -> Tensor:
    """Euler-Maruyama on SiT's reverse SDE, in our time (dt < 0):

      x_s = x_t + (s - t) [u - w(t) score] + sqrt(2 w(t) (t - s)) z,  u = alpha' x0_hat + sigma' eps_hat, score = -eps_hat / sigma
    (SiT: dX = [v + w s] dt_SiT + sqrt(2 w) dW with t_SiT = 1 - t). w(t) from `diffusion_form` (SiT's default "sigma",
    w = sigma(t), which on the linear path is REPA's w = t). The last interval of ts is SiT's last step:
    "mean" x_s = x_t + (s - t)[u - w score] without noise (SiT default; ts = linspace(1, 0.04, K) then 0 reproduces
    SiT/REPA with last_step_size 0.04), "euler" the ODE step x_t + (s - t) u, "tweedie" x0_hat, None a noisy EM step.
    """
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"diffusion_form={diffusion_form!r}; expected one of {list(DIFFUSION_FORMS)}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step={last_step!r}; expected one of {list(LAST_STEPS)}")
    ts = _times(ts)
    cs = _grid_coefs(path, ts, derivatives=True)
    n = len(ts) - 1
    x = x_T
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        d = denoise(x, _batch_time(t, x))
        u = _velocity(d, cs[i])
        w = _sde_diffusion(diffusion_form, t, cs[i], diffusion_norm, path.name)
        drift = u + (w / cs[i].s) * d.eps  # u - w * score
        if i < n - 1 or last_step is None:
            x = x + (s - t) * drift + math.sqrt(2 * w * (t - s)) * randn_like(x, generator)
        elif last_step == "mean":
            x = x + (s - t) * drift
        elif last_step == "euler":
            x = x + (s - t) * u
        else:
            x = d.x0
        _report(callback, i, t, s, x, d)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm_solver++": sample_dpm_solver_pp,
    "euler": sample_euler,
    "heun": sample_heun,
    "dopri5": sample_dopri5,
    "euler_maruyama": sample_euler_maruyama,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


# --- from a sample config ---------------------------------------------------------------------------------------------
# Which SampleCfg fields each sampler reads, besides steps / time_grid / shift (sampler_times) and the guidance fields
# (guidance.py). Options not listed keep the sampler's defaults: dpm_solver++ order 2, dopri5 SiT's atol / rtol,
# euler_maruyama SiT's "sigma" diffusion and "mean" last step. A new sampler option is read here and nowhere else.
SampleOptions = Callable[["SampleCfg", bool], dict]


def _no_options(sample_cfg: SampleCfg, learned_sigma: bool) -> dict:
    return {}


SAMPLER_OPTIONS: dict[str, SampleOptions] = {
    # a network that learns its variance (DiT learn_sigma) samples with it; otherwise DDPM's fixed_small
    "ddpm": lambda sample_cfg, learned_sigma: {"variance": "learned_range"} if learned_sigma else {},
    "ddim": lambda sample_cfg, learned_sigma: {"eta": sample_cfg.eta},
    "dpm_solver++": _no_options,
    "euler": _no_options,
    "heun": _no_options,
    "dopri5": _no_options,
    "euler_maruyama": _no_options,
}


def sampler_options(sample_cfg: SampleCfg, learned_sigma: bool) -> dict:
    """Keyword options for SAMPLERS[sample_cfg.sampler], read from the sample config as SAMPLER_OPTIONS says."""
    get_sampler(sample_cfg.sampler)  # an unknown name fails with the list of samplers
    return SAMPLER_OPTIONS[sample_cfg.sampler](sample_cfg, learned_sigma)


def sampler_times(sample_cfg: SampleCfg, path: Path) -> Tensor:
    """The time grid for `sample_cfg` (steps, time_grid, shift); DDPM paths use DiT's respacing of their T steps and
    the Euler-Maruyama SDE uses SiT/REPA's grid (uniform from 1 to 0.04, then a final mean step to 0)."""
    if isinstance(path, DiscretePath):
        return time_grid(sample_cfg.steps, "respaced", num_timesteps=path.num_timesteps)
    if sample_cfg.sampler == "euler_maruyama" and sample_cfg.time_grid == "uniform" and sample_cfg.steps >= 2:
        return time_grid(sample_cfg.steps, "sde")
    return time_grid(sample_cfg.steps, sample_cfg.time_grid, path=path, shift=sample_cfg.shift)
