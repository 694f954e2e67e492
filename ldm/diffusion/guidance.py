"""Classifier-free guidance with a guidance interval (pure wrapper around a class-conditional network).

    out = uncond + w (cond - uncond)   for times t in [t_lo, t_hi] (OUR time: t = 0 data, t = 1 noise),
    out = cond                         elsewhere,
(Ho & Salimans 2022 arXiv:2207.12598 Eq. 6; the interval of Kynkaanniemi et al. 2024 arXiv:2404.07724). Guidance is
linear in the network output and every prediction conversion of paths.py is affine in it at fixed (x_t, t), so
guiding eps, v, velocity or x0 gives the same x0 / eps.

cond and uncond come from ONE batched forward of 2B samples, the unconditional half with the null class id
`num_classes` (DiT/SiT label-dropout embedding row; DiT models.py forward_with_cfg). Outside the interval only the
conditional half is evaluated.

Which time decides whether an evaluation is guided (`rule`, GUIDANCE_RULES):
  per_eval    the time the network is evaluated at (default).
  step_start  the start time of the sampler step the evaluation belongs to: samplers pass it as `step_start` where an
              evaluation lies inside a step (Heun's corrector at s of the step t -> s; samplers.make_denoiser), so a
              step is guided as a whole. REPA's Heun (samplers.py euler_sampler, heun=True) decides its corrector
              evaluation from t_cur this way. Samplers with one evaluation per step are the same under both rules.

Peers' settings in our time:
  REPA (sihyun-yu/REPA samplers.py, data at t = 0 like ours): guided when guidance_low <= t <= guidance_high, so
      --guidance-high 0.7 is interval=(0.0, 0.7); its Heun (euler_sampler, heun=True) is rule="step_start".
  LightningDiT (hustvl/LightningDiT models/lightningdit.py forward_with_cfg, SiT time t_s = 1 - t, data at t_s = 1):
      unguided when t_s < cfg_interval_start, so cfg_interval_start 0.11 is interval=(0.0, 0.89) and 0.125 is
      (0.0, 0.875); `interval_from_sit_time(0.11)` does the conversion.
  channels="first3": DiT, SiT and LightningDiT guide only output channels 0-2 (a quirk kept for reproducing their
      numbers, facebookresearch/DiT issue #41); the default "all" guides every prediction channel. The learned-sigma
      variance channels (learned_sigma=True, the second half) are never guided: they come from the conditional half.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

CHANNELS = ("all", "first3")
GUIDANCE_RULES = ("per_eval", "step_start")


def interval_from_sit_time(start: float = 0.0, end: float = 1.0) -> tuple[float, float]:
    """A guidance interval [start, end] in SiT/LightningDiT time (t_s = 1 - t) as our (t_lo, t_hi)."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"SiT-time interval ({start}, {end}); expected 0 <= start <= end <= 1")
    return 1.0 - end, 1.0 - start


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    y: Tensor,
    *,
    num_classes: int,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: str = "all",
    learned_sigma: bool = False,
    rule: str = "per_eval",
) -> Callable[..., Tensor]:
    """Wrap model(x, t, y) (OUR t) into model_fn(x, t, step_start=None) that returns the guided output for the class
    labels y (B,); `rule` says whether t or step_start (B,) (the start of the sampler step, None = t) is checked
    against the interval.

    scale = 1 is the conditional model (a single forward). The result plugs into
    samplers.make_denoiser(..., step_aware=True).
    """
    if channels not in CHANNELS:
        raise ValueError(f"cfg channels={channels!r}; expected one of {list(CHANNELS)}")
    if rule not in GUIDANCE_RULES:
        raise ValueError(f"guidance rule={rule!r}; expected one of {list(GUIDANCE_RULES)}")
    t_lo, t_hi = (float(v) for v in interval)
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"guidance interval={interval}; expected 0 <= t_lo <= t_hi <= 1 in ldm time (t = 1 noise)")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}; classifier-free guidance needs a class-conditional model")
    y = torch.as_tensor(y)
    if y.ndim != 1 or bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"class labels must be a 1-D tensor of ids in [0, {num_classes - 1}]")
    y_null = torch.full_like(y, num_classes)

    def model_fn(x: Tensor, t: Tensor, step_start: Tensor | None = None) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} samples for {y.shape[0]} class labels")
        yb, yn = y.to(x.device), y_null.to(x.device)
        t_rule = step_start if rule == "step_start" and step_start is not None else t  # (B,)
        inside = (t_rule >= t_lo) & (t_rule <= t_hi)  # (B,)
        if scale == 1.0 or not bool(inside.any()):
            return model(x, t, yb)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([yb, yn]))  # (2B, C_out, ...)
        cond, uncond = out.chunk(2)  # (B, C_out, ...) each
        k = 3 if channels == "first3" else (cond.shape[1] // 2 if learned_sigma else cond.shape[1])
        guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (B, k, ...)
        guided = torch.where(inside.view(-1, *([1] * (x.ndim - 1))), guided, cond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)  # (B, C_out, ...)

    return model_fn
