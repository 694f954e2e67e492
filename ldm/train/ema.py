"""Exponential moving average of model weights (Polyak averaging, as DiT train.py `update_ema`)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup_steps: int) -> float:
    """Decay used at `step`: during warm-up min(decay, (1 + step) / (10 + step)) (the TF ExponentialMovingAverage
    num_updates rule), then `decay`."""
    if step < warmup_steps:
        return min(decay, (1.0 + step) / (10.0 + step))
    return decay


class EMA:
    """Holds a frozen copy of `model`; `update` moves it towards the live weights: e <- d*e + (1-d)*w."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        d = ema_decay_at(step, self.decay, self.warmup_steps)
        ema_params = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        floating = [(e, w) for e, w in zip(ema_params, live) if e.dtype.is_floating_point]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [w for _, w in floating], 1.0 - d)
        for e, w in zip(self.model.buffers(), model.buffers()):  # BatchNorm statistics etc. are copied
            e.copy_(w)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ldm.runs import load_state_strict

        load_state_strict(self.model, state, "EMA weights")
