"""Noise paths (interpolants) and conversions between model predictions.

THE time convention of ldm (every module follows it; peers are converted at their boundary):

    t = 0 is data, t = 1 is noise,    x_t = alpha(t) * x0 + sigma(t) * eps,    eps ~ N(0, I).

Peers disagree: SiT / LightningDiT (willisma/SiT transport/path.py) put data at t = 1 (their alpha_t = t is the
coefficient of the data), REPA (sihyun-yu/REPA loss.py, samplers.py) and SD3 use ours. A SiT time t_s is t = 1 - t_s.

Paths (`PATHS`, `get_path`):
  "linear"      flow matching / rectified flow (Lipman et al. 2023 arXiv:2210.02747, Liu et al. 2023 arXiv:2209.03003):
                alpha = 1 - t, sigma = t.  (SiT ICPlan with t -> 1 - t.)
  "gvp"         SiT's generalised VP path (Ma et al. 2024 arXiv:2401.08740 Sec. 3): alpha = cos(pi t / 2), sigma = sin(pi t / 2).
  "vp"          SiT's VP path (VPCPlan, Song et al. 2021 arXiv:2011.13456 Eq. 33 with beta_min = 0.1, beta_max = 20):
                log alpha = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma = sqrt(1 - alpha^2).
  "ddpm_linear" DDPM linear betas 1e-4 .. 0.02 over T = 1000 steps (Ho et al. 2020 arXiv:2006.11239 Sec. 4; DiT/ADM
                `get_named_beta_schedule("linear")`, which scales both ends by 1000 / T).
  "ddpm_cosine" Nichol & Dhariwal 2021 (arXiv:2102.09672 Eq. 17): alpha_bar(u) = f(u) / f(0), f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2,
                betas clipped at 0.999 (DiT/ADM `squaredcos_cap_v2`, `betas_for_alpha_bar`).

Discrete schedules in continuous time. A DDPM schedule has alphas_cumprod[i], i = 0 .. T-1 (index i = "i + 1 noising steps").
We place index i at t_i = (i + 1) / T and clean data at t = 0 (alphas_cumprod = 1), so
    alpha(t_i)^2 = alphas_cumprod[i],   t = 0 <-> data,   t = 1 <-> the last DDPM step i = T - 1.
Between the knots k / T (k = 0 .. T) log alpha_bar is interpolated linearly, as DPM-Solver's `NoiseScheduleVP("discrete")`
does (LuChengTHU/dpm-solver, same knots (i + 1) / T). The network of a discrete model (DiT, ADM) takes the integer
index i as its timestep input: `DiscretePath.model_time(t) = T t - 1`. Continuous paths feed t itself (`model_time(t) = t`).
Every function of ldm.diffusion calls `model_fn(x, t)` with OUR t; whoever wraps a network maps t with `path.model_time`.

Predictions (`PREDICTIONS`) a network may output, all defined for any path:
  "eps"       eps
  "x0"        x0
  "v"         v = alpha eps - sigma x0  (Salimans & Ho 2022 arXiv:2202.00512 Sec. 4, there in VP form alpha^2 + sigma^2 = 1;
              for other paths the same formula, inverted with alpha^2 + sigma^2 != 1 below)
  "velocity"  u = d x_t / dt = alpha'(t) x0 + sigma'(t) eps in OUR time (for "linear": u = eps - x0; SiT's velocity is -u)
  "score"     grad log p_t(x_t) = -eps / sigma
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


def _time(t, device=None) -> Tensor:
    """Times as a float64 tensor (path coefficients are computed in float64 and cast at the point of use)."""
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient, shape () or (B,), against x of shape (B, ...), in x's dtype."""
    c = torch.as_tensor(c, device=x.device).to(x.dtype)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(f"time/coefficient of shape {tuple(c.shape)} does not match a batch of shape {tuple(x.shape)}")
    return c.view(-1, *([1] * (x.ndim - 1)))


def shift_time(t, shift: float) -> Tensor:
    """Timestep shift t' = s t / (1 + (s - 1) t) (SD3, Esser et al. 2024 arXiv:2403.03206 Eq. 23), in OUR time.

    s > 1 moves times towards noise (t = 1). LightningDiT's `timestep_shift` s_L acts on SiT time t_s = 1 - t; the same
    map in our time is shift = 1 / s_L (LightningDiT's 0.3 is our 1 / 0.3 = 3.33).
    """
    if shift <= 0:
        raise ValueError(f"shift={shift!r}; expected a positive number (1 = no shift)")
    t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
    return shift * t / (1 + (shift - 1) * t)


class Path(ABC):
    """x_t = alpha(t) x0 + sigma(t) eps. Subclasses give alpha, sigma, their t-derivatives, and the inverse of sigma / alpha.

    Methods take t as a float or a tensor of any shape and return float64 tensors of t's shape.
    """

    name = "path"

    @abstractmethod
    def alpha(self, t) -> Tensor: ...

    @abstractmethod
    def sigma(self, t) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t) -> Tensor: ...

    @abstractmethod
    def d_sigma(self, t) -> Tensor: ...

    @abstractmethod
    def t_from_nsr(self, nsr) -> Tensor:
        """Inverse of the noise-to-signal ratio sigma / alpha (the EDM / k-diffusion 'sigma')."""

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) together (one table lookup on DDPM paths)."""
        return self.alpha(t), self.sigma(t)

    def nsr(self, t) -> Tensor:
        """sigma(t) / alpha(t), the EDM sigma of Karras et al. 2022 (arXiv:2206.00364 Eq. 4 with s(t) = alpha)."""
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t) -> Tensor:
        """log SNR = 2 log(alpha / sigma) (= 2 lambda of DPM-Solver, Lu et al. 2022 arXiv:2206.00927)."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def model_time(self, t) -> Tensor:
        """The timestep input of a network of this path: t itself for continuous paths."""
        return torch.as_tensor(t)

    def noise(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps (t of shape () or (B,))."""
        a, s = self.alpha_sigma(_time(t, x0.device))
        return expand_like(a, x0) * x0 + expand_like(s, x0) * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(Path):
    """alpha = 1 - t, sigma = t (flow matching / rectified flow)."""

    name = "linear"

    def alpha(self, t):
        return 1 - _time(t)

    def sigma(self, t):
        return _time(t)

    def d_alpha(self, t):
        return torch.full_like(_time(t), -1.0)

    def d_sigma(self, t):
        return torch.ones_like(_time(t))

    def t_from_nsr(self, nsr):
        nsr = _time(nsr)
        return torch.where(torch.isinf(nsr), torch.ones_like(nsr), nsr / (1 + nsr))  # t / (1 - t) = nsr


class GVPPath(Path):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) (SiT GVPCPlan in our time)."""

    name = "gvp"

    def alpha(self, t):
        return torch.cos(_time(t) * math.pi / 2)

    def sigma(self, t):
        return torch.sin(_time(t) * math.pi / 2)

    def d_alpha(self, t):
        return -math.pi / 2 * torch.sin(_time(t) * math.pi / 2)

    def d_sigma(self, t):
        return math.pi / 2 * torch.cos(_time(t) * math.pi / 2)

    def t_from_nsr(self, nsr):
        return torch.atan(_time(nsr)) * 2 / math.pi  # tan(pi t / 2) = nsr


class VPPath(Path):
    """SiT's VP path: log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma = sqrt(1 - alpha^2).

    This is VPCPlan of willisma/SiT transport/path.py with its t_s = 1 - t (Song et al. 2021 arXiv:2011.13456 Eq. 33).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VPPath(beta_min={beta_min}, beta_max={beta_max}); expected 0 <= beta_min < beta_max")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t):
        t = _time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t):
        return -0.5 * _time(t) * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def d_alpha(self, t):
        return self.alpha(t) * self._d_log_alpha(t)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)  # from alpha^2 + sigma^2 = 1

    def t_from_nsr(self, nsr):
        # alpha^2 = 1 / (1 + nsr^2): solve (d/4) t^2 + (b0/2) t + L = 0 with L = log alpha = -log1p(nsr^2) / 2.
        log_alpha = -0.5 * torch.log1p(_time(nsr) ** 2)
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return (-b + torch.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)

    def __repr__(self):
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (numpy.interp) for increasing xp; linear extrapolation outside."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class DiscretePath(Path):
    """A DDPM beta schedule seen in continuous time: index i sits at t = (i + 1) / T, data at t = 0 (module docstring)."""

    def __init__(self, betas: Tensor, name: str = "discrete"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("DiscretePath betas must be a 1-D sequence of at least 2 values in (0, 1]")
        self.name = name
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,): alpha_bar_i, Ho et al. 2020 Eq. 4
        self._knots = torch.arange(self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps  # k / T
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])  # (T + 1,)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, device) -> tuple[Tensor, Tensor]:
        """(knots, log alpha_bar at the knots) on `device`, copied once per device."""
        if device not in self._on_device:
            self._on_device[device] = (self._knots.to(device), self._log_ab.to(device))
        return self._on_device[device]

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Knot segment k = floor(T t) (clamped to 0 .. T-1) holding t, T t, and the table on t's device."""
        u = t * self.num_timesteps
        return u.floor().long().clamp(0, self.num_timesteps - 1), u, self._table(t.device)[1]

    def _log_alpha_bar(self, t):
        """log alpha_bar, linear between the uniform knots k / T (a direct lookup, no search)."""
        seg, u, log_ab = self._segment(_time(t))
        lo = log_ab[seg]
        return lo + (u - seg) * (log_ab[seg + 1] - lo)

    def _slope(self, t):
        """d log alpha_bar / dt on the knot segment holding t (piecewise constant)."""
        seg, _, log_ab = self._segment(_time(t))
        return (log_ab[seg + 1] - log_ab[seg]) * self.num_timesteps

    def alpha(self, t):
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def alpha_sigma(self, t):
        log_ab = self._log_alpha_bar(t)
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))

    def d_alpha(self, t):
        return 0.5 * self.alpha(t) * self._slope(t)

    def d_sigma(self, t):
        return -0.5 * torch.exp(self._log_alpha_bar(t)) * self._slope(t) / self.sigma(t)

    def t_from_nsr(self, nsr):
        nsr = _time(nsr)
        target = -torch.log1p(nsr**2)  # log alpha_bar = -log(1 + nsr^2); log alpha_bar decreases in t
        knots, log_ab = self._table(nsr.device)
        t = _interp(-target.reshape(-1), -log_ab, knots)
        return t.reshape(nsr.shape).clamp(0, 1)

    def model_time(self, t):
        """DiT/ADM network timestep: the index i = T t - 1, rounded when t is within 1e-3 steps of a knot."""
        i = _time(t) * self.num_timesteps - 1
        return torch.where((i - i.round()).abs() < 1e-3, i.round(), i)

    def index(self, t) -> Tensor:
        """The integer index i of times on the training grid t = (i + 1) / T; ValueError for other times."""
        i = _time(t) * self.num_timesteps - 1
        ir = i.round()
        if bool(((i - ir).abs() > 1e-3).any()) or bool(((ir < 0) | (ir > self.num_timesteps - 1)).any()):
            raise ValueError(f"{self.name}: times must lie on the grid t = (i + 1) / {self.num_timesteps}, i = 0 .. "
                             f"{self.num_timesteps - 1} (sample them with sample_timesteps(kind='discrete'))")
        return ir.long()

    def __repr__(self):
        return f"DiscretePath(name={self.name!r}, T={self.num_timesteps})"


def ddpm_linear_path(num_timesteps: int = 1000) -> DiscretePath:
    """Ho et al. 2020 linear betas, 1e-4 .. 0.02 at T = 1000, both ends scaled by 1000 / T (ADM/DiT)."""
    scale = 1000 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    return DiscretePath(betas, name="ddpm_linear")


def ddpm_cosine_path(num_timesteps: int = 1000, max_beta: float = 0.999) -> DiscretePath:
    """Nichol & Dhariwal 2021 Eq. 17: beta_i = min(1 - f((i + 1) / T) / f(i / T), max_beta)."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
    return DiscretePath(betas, name="ddpm_cosine")


PATHS: dict[str, Callable[..., Path]] = {
    "linear": LinearPath,
    "gvp": GVPPath,
    "vp": VPPath,
    "ddpm_linear": ddpm_linear_path,
    "ddpm_cosine": ddpm_cosine_path,
}


def get_path(name: str, **kwargs) -> Path:
    """Build a path by name (kwargs go to its factory, e.g. num_timesteps=1000 or beta_min/beta_max)."""
    if name not in PATHS:
        raise ValueError(f"path={name!r}; expected one of {sorted(PATHS)}")
    return PATHS[name](**kwargs)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; expected one of {list(PREDICTIONS)}")


def prediction_target(prediction: str, x0: Tensor, eps: Tensor, t, path: Path) -> Tensor:
    """What an ideal network of the given prediction type outputs for (x0, eps) at time t (module docstring)."""
    check_prediction(prediction)
    t = _time(t, x0.device)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, s = (expand_like(c, x0) for c in path.alpha_sigma(t))
    if prediction == "v":
        return a * eps - s * x0  # Salimans & Ho 2022 Sec. 4
    if prediction == "velocity":
        return expand_like(path.d_alpha(t), x0) * x0 + expand_like(path.d_sigma(t), x0) * eps  # d x_t / dt
    return -eps / s  # score of N(alpha x0, sigma^2 I) at x_t


def x0_eps_from_prediction(prediction: str, output: Tensor, x_t: Tensor, t, path: Path) -> tuple[Tensor, Tensor]:
    """Invert `prediction_target` given x_t: the (x0, eps) pair that a network output implies."""
    check_prediction(prediction)
    t = _time(t, x_t.device)
    a, s = (expand_like(c, x_t) for c in path.alpha_sigma(t))
    if prediction == "eps":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    if prediction == "v":
        n = a * a + s * s  # alpha x_t - sigma v = (alpha^2 + sigma^2) x0; sigma x_t + alpha v = (alpha^2 + sigma^2) eps
        return (a * x_t - s * output) / n, (s * x_t + a * output) / n
    if prediction == "velocity":
        da, ds = expand_like(path.d_alpha(t), x_t), expand_like(path.d_sigma(t), x_t)
        det = a * ds - s * da  # solve [a s; da ds] (x0, eps) = (x_t, u)
        return (ds * x_t - s * output) / det, (a * output - da * x_t) / det
    eps = -s * output  # score
    return (x_t - s * eps) / a, eps


def convert_prediction(output: Tensor, x_t: Tensor, t, *, path: Path, src: str, dst: str) -> Tensor:
    """Convert a network output from prediction type `src` to `dst` at (x_t, t)."""
    x0, eps = x0_eps_from_prediction(src, output, x_t, t, path)
    return prediction_target(dst, x0, eps, t, path)
