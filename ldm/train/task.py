"""What a model must provide to be trained by `ldm.train.loop.fit`.

Both stages are a `Task`: one `nn.Module` that owns every trainable part (the tokenizer and its discriminator, or the
generator and its REPA projector) plus frozen helpers (LPIPS, a frozen tokenizer or vision encoder). The loop wraps the
whole task once with accelerate (DDP), so `forward` is the single entry point and gradient synchronisation works.

A step runs each phase in `phases` in order (tokenizer: "gen" then "disc"; generator: "model"); for each phase the
loop calls `task(batch, step=step, phase=phase, micro=i)` on every micro-batch of the accumulation window, back-
propagates the returned loss, clips, and steps the optimizer of that phase. Each phase has its own optimizer, built
from optim.* with the task's `optimizer_settings(phase)` overrides. The loop knows no stage or phase names: what
differs between stages is declared here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class StepOutput(NamedTuple):
    loss: torch.Tensor          # scalar to back-propagate (already weighted and reduced over the batch)
    logs: dict[str, float]      # detached scalars, flat "name" keys; the loop prefixes "train/"


class Task(nn.Module, abc.ABC):
    """Base class: subclasses set `phases` and implement the methods below."""

    phases: tuple[str, ...] = ("model",)
    # log keys (without "train/") that are settings drawn per step, logged as their value at the logging step;
    # every other scalar is averaged over the steps since the previous log
    instant_logs: tuple[str, ...] = ()

    @abc.abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters each phase's optimizer updates: {phase: [params]}."""

    def optimizer_settings(self, phase: str) -> dict:
        """Overrides of optim.* for this phase's optimizer ("lr", "betas"); {} uses optim.* as they are."""
        return {}

    def compile_modules(self, compile_fn: Callable[[nn.Module], None]) -> list[str]:
        """train.compile: hand each sub-module worth compiling to `compile_fn`, which compiles it in place
        (nn.Module.compile: parameter names, hence checkpoints, stay the same); returns their names (relative to the
        task). The default compiles nothing."""
        return []

    @abc.abstractmethod
    def ema_module(self) -> nn.Module:
        """The sub-module whose weights are averaged by EMA and exported (the autoencoder or the generator)."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], *, step: int, phase: str, micro: int = 0) -> StepOutput:
        """Loss of one micro-batch for one phase."""

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], ema: nn.Module | None) -> torch.Tensor | None:
        """An image grid (3, H, W) in [0, 1] for TensorBoard and samples/, or None."""
        return None

    def describe(self) -> dict:
        """Plain facts stored in every checkpoint (state.pt "task") that inference needs without the data, e.g. the
        latent shape and number of classes of a generator. A resumed run is refused when a key ending in
        "fingerprint" (a frozen tokenizer's) has another value than in the checkpoint; "<x>_source" beside
        "<x>_fingerprint" is named in that message."""
        return {}

    def resume_facts(self, saved: dict) -> None:
        """Adopt what the checkpoint being resumed recorded (its describe()) before training continues."""

    @torch.no_grad()
    def evaluate(self, ema: nn.Module | None, step: int) -> dict[str, float]:
        """Periodic evaluation metrics (flat "val/..." keys); called on every process (it may shard work)."""
        return {}
