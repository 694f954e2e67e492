"""Pixel-space objective for (post-)training a latent generator: Zhang et al., "Pixel-Space Post-Training of Latent
Diffusion Models", arXiv:2409.17565 (supervised variant). Pure functions; ldm/train/generator_terms.py wires it in.

The model's clean-latent estimate z^_0 (from its output through the path's conversion, ldm.diffusion.paths
`x0_eps_from_prediction`) is decoded by the frozen tokenizer decoder D and compared in pixel space with a target
image, per sample:

    L_pixel = mean_{c, h, w} d(D(z^_0), x_target),    d = squared error ("l2") or absolute error ("l1"),

added as L = L_latent + lambda * L_pixel for the samples whose time lies in [t_min, t_max] (t = 0 data, t = 1 noise;
the others contribute 0). x_target is the training image ("image") or the tokenizer's reconstruction D(z_0) of the
true latent ("decoded": what the generator can reach through a frozen decoder, and the only target a latent cache
provides). The preference-based variant of the paper (reward / SimPO post-training) needs human preference pairs
this project does not have offline and is not built.
"""

from __future__ import annotations

from torch import Tensor

PIXEL_DISTANCES = ("l2", "l1")


def pixel_distance(decoded: Tensor, target: Tensor, distance: str = "l2") -> Tensor:
    """Per-sample mean over channels and pixels of the squared ("l2") or absolute ("l1") difference: (B,)."""
    if distance not in PIXEL_DISTANCES:
        raise ValueError(f"diffusion.pixel_loss.distance={distance!r}; expected one of {list(PIXEL_DISTANCES)}")
    if decoded.shape != target.shape:
        raise ValueError(f"decoded images {tuple(decoded.shape)} and targets {tuple(target.shape)} differ in shape")
    diff = decoded.float() - target.float()
    err = diff * diff if distance == "l2" else diff.abs()
    return err.reshape(err.shape[0], -1).mean(dim=1)


def time_window(t: Tensor, t_min: float, t_max: float) -> Tensor:
    """Which samples the pixel loss applies to: t_min <= t <= t_max (our time), (B,) bool."""
    return (t >= t_min) & (t <= t_max)
