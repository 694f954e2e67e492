"""Training objectives of diffusion and flow models: timestep samplers and per-sample losses (pure functions).

Time convention of ldm.diffusion.paths: t = 0 data, t = 1 noise, x_t = alpha(t) x0 + sigma(t) eps. `model_fn(x_t, t)`
always receives OUR t (a network that wants another timestep input is wrapped with `path.model_time`, see paths.py).

Pieces and their sources:
  sample_timesteps   uniform; logit-normal t = sigmoid(N(m, s^2)) (SD3, Esser et al. 2024 arXiv:2403.03206 Eq. 19;
                     LightningDiT transport/transport.py `sample_logit_normal` with m = 0, s = 1 — in SiT time, so a
                     mean m there is -m here); shift t' = s t / (1 + (s - 1) t) (SD3 Eq. 23); DDPM's discrete
                     indices i ~ U{0 .. T-1} at t = (i + 1) / T (DiT train.py `torch.randint(0, T)`).
  training_loss      MSE to the target of the chosen prediction (eps: Ho et al. 2020 Eq. 14; v: Salimans & Ho 2022;
                     velocity: flow matching, Lipman et al. 2023 Eq. 23 / SiT transport.py `training_losses`), mean over
                     all non-batch dimensions;
                     optional min-SNR-gamma weighting (Hang et al. 2023 arXiv:2303.09556 Eq. 8, written for any prediction);
                     optional velocity-direction loss 1 - cos(pred, target) over channels, mean over positions
                     (LightningDiT transport/transport.py `use_cosine_loss`, weight 1 in their recipe);
                     optional DiT learned-sigma hybrid loss L_simple + L_vlb (Nichol & Dhariwal 2021 Sec. 3.1; DiT
                     diffusion/gaussian_diffusion.py `training_losses` and `_vb_terms_bpd`, LEARNED_RANGE variance).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ldm.diffusion.paths import (
    DiscretePath,
    Path,
    check_prediction,
    expand_like,
    prediction_target,
    shift_time,
    x0_eps_from_prediction,
)
from ldm.diffusion.samplers import randn_like

TIMESTEP_KINDS = ("uniform", "logit_normal", "discrete")
WEIGHTINGS = (None, "min_snr")


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sample_timesteps(
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    num_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw n training times in our convention.

    kind="uniform":      t ~ U(0, 1).
    kind="logit_normal": t = sigmoid(u), u ~ N(mean, std^2) (SD3 Eq. 19). LightningDiT (SiT time) uses mean 0, std 1,
                         which is the same distribution here; a SiT-time mean m is mean = -m here.
    kind="discrete":     t = (i + 1) / num_timesteps, i ~ U{0 .. num_timesteps - 1} (DDPM / DiT training indices).
    Then the shift t' = shift t / (1 + (shift - 1) t) (SD3 Eq. 23; shift > 1 favours noise), and finally the affine map
    to [t_min, t_max] (SiT's train_eps guard: t * (t1 - t0) + t0). Both are unavailable for "discrete".
    """
    if kind not in TIMESTEP_KINDS:
        raise ValueError(f"timestep kind={kind!r}; expected one of {list(TIMESTEP_KINDS)}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"t_min={t_min}, t_max={t_max}; expected 0 <= t_min < t_max <= 1")
    if kind == "discrete":
        if shift != 1.0 or (t_min, t_max) != (0.0, 1.0):
            raise ValueError("kind='discrete' takes neither shift nor t_min/t_max (the grid is fixed by num_timesteps)")
        i = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
        return ((i + 1).to(torch.float64) / num_timesteps).to(dtype)
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    else:
        if std <= 0:
            raise ValueError(f"logit_normal std={std}; expected > 0")
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device, dtype=torch.float64))
    if shift != 1.0:
        t = shift_time(t, shift)
    return (t_min + (t_max - t_min) * t).to(dtype)


def min_snr_weight(t, *, path: Path, prediction: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma loss weight for the MSE of `prediction` (Hang et al. 2023 Eq. 8), shape of t.

    The paper weights the x0-space error by min(SNR, gamma). For a prediction p, ||p_hat - p||^2 = k_p ||x0_hat - x0||^2
    at fixed x_t with k_x0 = 1, k_eps = SNR, k_v = (alpha^2 + sigma^2)^2 / sigma^2 (= SNR + 1 on VP paths),
    k_velocity = ((alpha' sigma - alpha sigma') / sigma)^2, k_score = SNR / sigma^2, so the weight is min(SNR, gamma) / k_p.
    This reproduces the paper's min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v on VP paths.
    """
    check_prediction(prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = path.alpha(t), path.sigma(t)
    snr = (a / s) ** 2
    k = {
        "x0": lambda: torch.ones_like(snr),
        "eps": lambda: snr,
        "v": lambda: (a * a + s * s) ** 2 / (s * s),
        "velocity": lambda: ((path.d_alpha(t) * s - a * path.d_sigma(t)) / s) ** 2,
        "score": lambda: snr / (s * s),
    }[prediction]()
    return torch.clamp(snr, max=gamma) / k


def velocity_direction_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - cos(pred, target) over the channel dimension, mean over positions: (B, C, ...) -> (B,).

    LightningDiT transport/transport.py: mean_flat(1 - cosine_similarity(model_output, ut, dim=1)).
    """
    dot = (pred * target).sum(dim=1)
    norms = pred.norm(dim=1).clamp(min=eps) * target.norm(dim=1).clamp(min=eps)
    return mean_flat(1 - dot / norms)


# --- DiT / improved-DDPM variational bound (learned variance) ---------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that ADM/DiT use (diffusion_utils.py), kept for parity."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of N(means, e^(2 log_scales)) integrated over x's 8-bit bin of width 2/255 in [-1, 1]
    (Ho et al. 2020 Eq. 13; edge bins take the tails), elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _posterior_tables(path: DiscretePath) -> dict[str, Tensor]:
    """q(x_{i-1} | x_i, x0) coefficients per index i (Ho et al. 2020 Eq. 6-7), float64, shape (T,)."""
    betas, ab = path.betas, path.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    var = betas * (1 - ab_prev) / (1 - ab)
    return {
        "coef_x0": betas * ab_prev.sqrt() / (1 - ab),
        "coef_xt": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
        # the variance is 0 at i = 0; ADM/DiT clip its log by repeating the value of i = 1
        "log_var_clipped": torch.log(torch.cat([var[1:2], var[1:]])),
        "log_beta": torch.log(betas),
    }


def vlb_terms(x0: Tensor, x_t: Tensor, index: Tensor, *, x0_hat: Tensor, var_values: Tensor, path: DiscretePath) -> Tensor:
    """One term of the variational bound in bits per dimension, per sample (B,) (DiT `_vb_terms_bpd`).

    index i > 0: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)); i = 0: the decoder NLL -log p(x0 | x_1-step).
    p's mean is the posterior mean at x0_hat; its log variance is LEARNED_RANGE (Nichol & Dhariwal 2021 Eq. 15):
    frac log beta_i + (1 - frac) log beta~_i with frac = (var_values + 1) / 2.
    """
    tab = {k: v.to(x0.device) for k, v in _posterior_tables(path).items()}

    def take(name: str) -> Tensor:
        return expand_like(tab[name][index], x0)

    true_mean = take("coef_x0") * x0 + take("coef_xt") * x_t
    true_log_var = take("log_var_clipped")
    model_mean = take("coef_x0") * x0_hat + take("coef_xt") * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * take("log_beta") + (1 - frac) * take("log_var_clipped")
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var))
    return torch.where(index == 0, nll / math.log(2.0), kl)


def _draw_t_and_noise(x0: Tensor, t: Tensor | None, noise: Tensor | None,
                      generator: torch.Generator | Sequence[torch.Generator] | None, *, path: Path,
                      timesteps: str | None, **time_kw) -> tuple[Tensor, Tensor]:
    """The given t / noise, or draws: t first, then the noise, from one generator, from each sample's own generator
    (a list of B), or from torch's global RNG (None)."""
    b = x0.shape[0]
    per_sample = generator is not None and not isinstance(generator, torch.Generator)
    if per_sample and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}; pass one per sample")
    if t is None:
        kind = timesteps or ("discrete" if isinstance(path, DiscretePath) else "uniform")
        extra = {"num_timesteps": path.num_timesteps} if isinstance(path, DiscretePath) else {}

        def draw(n, g, device):
            return sample_timesteps(n, kind, generator=g, device=device, **time_kw, **extra)

        t = (torch.cat([draw(1, g, g.device).to(x0.device) for g in generator]) if per_sample
             else draw(b, generator, x0.device))
    t = torch.as_tensor(t, device=x0.device)
    if t.shape != (b,):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({b},)")
    if noise is None:
        noise = (randn_like(x0, generator) if per_sample
                 else torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
    return t, noise


def training_loss(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    path: Path,
    prediction: str,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    timesteps: str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    weighting: str | None = None,
    min_snr_gamma: float = 5.0,
    cos_loss_weight: float = 0.0,
    learned_sigma: bool = False,
    state: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample training loss (B,) and a dict of detached batch-mean scalars.

    x_t = alpha(t) x0 + sigma(t) eps; out = model_fn(x_t, t) (our t);
    loss = w(t) * mean_flat((out - target)^2) + cos_loss_weight * (1 - cos(out, target)) [+ L_vlb if learned_sigma],
    with target = prediction_target(prediction, x0, eps, t) and w = 1 or min-SNR-gamma.
    t / noise default to draws from `generator`: t from sample_timesteps(timesteps, mean=logit_mean, std=logit_std,
    shift, t_min, t_max) where timesteps defaults to "discrete" on DDPM paths and "uniform" otherwise. `generator` is
    one generator, one per sample (a list of B: sample i's t, then its noise, come from generator i, so they do not
    depend on the batch it is in; training keys them by global sample index), or None (torch's global RNG).
    learned_sigma=True (DiT): the model outputs 2C channels, the first C are the prediction, the last C the
    LEARNED_RANGE variance values in [-1, 1]; the VLB term sees the prediction detached (DiT `frozen_out`) and needs a
    DDPM path and times on its grid.
    `state`, when given, receives what auxiliary terms need to form the clean-latent estimate: x_t, t (as
    drawn), noise and out (the prediction, the first C channels with learned_sigma); the returns do not change.
    """
    check_prediction(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {list(WEIGHTINGS)}")
    if learned_sigma and not isinstance(path, DiscretePath):
        raise ValueError(f"learned_sigma=True needs a DDPM path (ddpm_linear, ddpm_cosine), got {path.name!r}")
    t, noise = _draw_t_and_noise(x0, t, noise, generator, path=path, timesteps=timesteps, mean=logit_mean,
                                 std=logit_std, shift=shift, t_min=t_min, t_max=t_max)
    x_t = path.noise(x0, noise, t)  # (B, C, ...)
    out = model_fn(x_t, t.to(x0.dtype))  # (B, C, ...) or (B, 2C, ...)
    if learned_sigma:
        if out.shape[1] != 2 * x0.shape[1]:
            raise ValueError(f"learned_sigma=True expects {2 * x0.shape[1]} output channels, got {out.shape[1]}")
        out, var_values = out.split(x0.shape[1], dim=1)  # (B, C, ...) each
    if out.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match the data shape {tuple(x0.shape)}")
    if state is not None:
        state.update(x_t=x_t, t=t, noise=noise, out=out)
    target = prediction_target(prediction, x0, noise, t, path)
    mse = mean_flat((out - target) ** 2)
    weight = min_snr_weight(t, path=path, prediction=prediction, gamma=min_snr_gamma).to(mse) if weighting else 1.0
    loss = weight * mse
    logs = {"mse": mse.detach().mean()}
    if weighting:
        logs["weight"] = weight.detach().mean()
    if cos_loss_weight:
        cos = velocity_direction_loss(out, target)
        loss = loss + cos_loss_weight * cos
        logs["cos"] = cos.detach().mean()
    if learned_sigma:
        x0_hat, _ = x0_eps_from_prediction(prediction, out.detach(), x_t, t, path)
        vb = vlb_terms(x0, x_t, path.index(t), x0_hat=x0_hat, var_values=var_values, path=path)
        loss = loss + vb
        logs["vb"] = vb.detach().mean()
    logs["loss"] = loss.detach().mean()
    return loss, logs
