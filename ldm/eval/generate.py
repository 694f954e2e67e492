"""From a generator network to latents and images: guided denoise functions, per-index seeding, batched sampling.

`sample_latents` is the one place that turns a network `model(x, t, y)` (OUR time: t=0 data, t=1 noise) into a
sampler call: CFG wrapper (guidance.py) -> prediction conversion (samplers.make_denoiser) -> time grid -> sampler.
Noise comes from one torch.Generator per sample index (edm2's StackedRandomGenerator idea), so sample i is the same
for any batch size or process count.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from ldm.data.sampler import derive_seed
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.paths import DiscretePath, Path
from ldm.diffusion.samplers import get_sampler, make_denoiser, randn_like, time_grid


def index_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per global sample index, seeded by hash(seed, index)."""
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, "sample", int(i))) for i in indices]


def sampler_times(sample_cfg, path: Path) -> torch.Tensor:
    """The time grid for `sample_cfg` (steps, time_grid, shift); DDPM paths use DiT's respacing of their T steps."""
    if isinstance(path, DiscretePath):
        return time_grid(sample_cfg.steps, "respaced", num_timesteps=path.num_timesteps)
    return time_grid(sample_cfg.steps, sample_cfg.time_grid, path=path, shift=sample_cfg.shift)


def sampler_kwargs(sampler: Callable, sample_cfg, learned_sigma: bool) -> dict:
    """Keyword options a sampler accepts, taken from the sample config."""
    params = inspect.signature(sampler).parameters
    options = {"eta": sample_cfg.eta, "variance": "learned_range" if learned_sigma else None}
    return {k: v for k, v in options.items() if k in params and v is not None}


@torch.no_grad()
def sample_latents(model: Callable, noise: torch.Tensor, y: torch.Tensor | None, *, path: Path, prediction: str,
                   sample_cfg, num_classes: int, learned_sigma: bool = False,
                   generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Integrate from `noise` (B, C, H, W) at t=1 to latents at t=0 with cfg.sample's sampler, steps and guidance.

    `model(x, t, y)` is the generator; y (B,) class ids (None for unconditional). Guidance applies when
    sample_cfg.cfg_scale != 1 on class-conditional models; stochastic samplers draw from `generators`.
    """
    if sample_cfg.cfg_scale != 1.0:
        if num_classes < 1 or y is None:
            raise ValueError(f"sample.cfg_scale={sample_cfg.cfg_scale} needs a class-conditional model; this model "
                             f"is unconditional (use sample.cfg_scale=1)")
        model_fn = classifier_free_guidance(model, y, num_classes=num_classes, scale=sample_cfg.cfg_scale,
                                            interval=tuple(sample_cfg.interval), channels=sample_cfg.cfg_channels,
                                            learned_sigma=learned_sigma)
    else:
        model_fn = (lambda x, t: model(x, t, y)) if y is not None else (lambda x, t: model(x, t, None))
    denoise = make_denoiser(model_fn, path=path, prediction=prediction, learned_sigma=learned_sigma)
    sampler = get_sampler(sample_cfg.sampler)
    return sampler(denoise, noise, sampler_times(sample_cfg, path), path=path, generator=generators,
                   **sampler_kwargs(sampler, sample_cfg, learned_sigma))


def initial_noise(shape: Sequence[int], generators: list[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """x_T ~ N(0, I), one draw per sample from its own generator."""
    return randn_like(torch.empty(len(generators), *shape, device=device), generators)
