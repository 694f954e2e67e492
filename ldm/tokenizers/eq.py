"""EQ-VAE: equivariance regularisation of the latent space under scaling and rotation.

Kouzelis et al. 2025, "EQ-VAE: Equivariance Regularized Latent Space for Improved Generative Image Modeling"
(arXiv:2502.09509), Eq. (3): L_EQ = L_rec(tau(x), D(tau(E(x)))) + lambda_gan L_gan(D(tau(E(x)))) + beta L_reg, i.e.
the usual autoencoder loss with the decoder fed a transformed latent and the target transformed the same way.
Reference: zelaki/eqvae train_eqvae/ldm/models/autoencoder.py (training_step L116-154, forward L96-107):

* with probability p_equivariance (the reference's `p_prior` = 0.5) per batch, the equivariance mode: scale the
  sampled latent by s drawn uniformly from {8/32, ..., 31/32} (bilinear, align_corners=False; anisotropic: s_x and
  s_y drawn independently) and rotate by k*90 deg, k uniform in {1, 2, 3} (`torch.rot90(z, k, dims=[-1, -2])`);
  apply the same transform to the image;
* otherwise the prior-preservation mode: with probability p_prior_scale (0.25) the input image is downscaled by a
  random s and reconstructed as is, else a plain reconstruction.

Randomness comes from a `torch.Generator` when one is given, else from torch's global RNG (the training loop reseeds
it every step, so resumed runs repeat the draws).

`EqRegulariser` plugs this into the tokenizer's training loss (the interface of ldm.tokenizers.regularisers, built
from the config section tokenizer.eq).

Departure (stated): the reference resizes image and latent with the same `scale_factor`, which keeps them aligned
only when H*s is a multiple of the downsampling factor f (true at 256 px with the /32 scale set). Here the latent is
resized to h' = floor(h*s) and the image to exactly h'*f, identical to the reference in that case and shape-consistent
in all others. Downscaled inputs of the prior mode are floored to a multiple of f for the same reason.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import EqCfg

EQ_MODES = ("plain", "prior_scale", "equivariance")


class EqTransform(NamedTuple):
    """One draw: the mode, the (s_y, s_x) scale (1, 1 when unused) and the number k of 90-degree rotations."""
    mode: str
    scale: tuple[float, float]
    rotations: int


def eq_scales(num_min: int = 8, num_max: int = 31, den: int = 32) -> list[float]:
    """The scale set {num_min/den, ..., num_max/den} (reference: [s / 32 for s in range(8, 32)])."""
    return [k / den for k in range(num_min, num_max + 1)]


def _uniform_index(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def sample_eq_transform(*, scales: list[float], p_equivariance: float = 0.5, p_prior_scale: float = 0.25,
                        anisotropic: bool = False, rotate: bool = True,
                        generator: torch.Generator | None = None) -> EqTransform:
    """Draw the per-batch transform of EQ-VAE (reference training_step L120-153)."""
    if not scales:
        raise ValueError("EQ-VAE needs a non-empty scale set")
    if float(torch.rand((), generator=generator)) < p_equivariance:
        s_y = scales[_uniform_index(len(scales), generator)]
        s_x = scales[_uniform_index(len(scales), generator)] if anisotropic else s_y
        k = 1 + _uniform_index(3, generator) if rotate else 0
        return EqTransform("equivariance", (s_y, s_x), k)
    if float(torch.rand((), generator=generator)) < p_prior_scale:
        s = scales[_uniform_index(len(scales), generator)]
        return EqTransform("prior_scale", (s, s), 0)
    return EqTransform("plain", (1.0, 1.0), 0)


def rotate90(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate the two trailing (H, W) axes by k*90 deg as the reference does: torch.rot90(x, k, dims=[-1, -2])."""
    return torch.rot90(x, k, dims=[-1, -2]) if k % 4 else x


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, align_corners=False, no antialiasing (as torch.nn.functional.interpolate in the reference)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def scaled_size(h: int, w: int, scale: tuple[float, float], multiple: int = 1) -> tuple[int, int]:
    """(floor(h*s_y), floor(w*s_x)) floored to a multiple of `multiple`, at least `multiple` (interpolate's floor)."""
    def one(n: int, s: float) -> int:
        return max(multiple, int(math.floor(n * s + 1e-9)) // multiple * multiple)
    return one(h, scale[0]), one(w, scale[1])


def transform_latent_and_image(z: torch.Tensor, x: torch.Tensor, t: EqTransform,
                               downsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tau(z) and tau(x) of the equivariance mode: latent (B, C, h, w) -> (B, C, h', w') and image
    (B, 3, h*f, w*f) -> (B, 3, h'*f, w'*f), both rotated by the same k*90 deg."""
    h, w = z.shape[-2:]
    if x.shape[-2:] != (h * downsample, w * downsample):
        raise ValueError(f"image {tuple(x.shape[-2:])} and latent {(h, w)} do not match downsample={downsample}")
    hs, ws = scaled_size(h, w, t.scale)
    z_t = rotate90(resize(z, (hs, ws)), t.rotations)  # (B, C, h', w')
    x_t = rotate90(resize(x, (hs * downsample, ws * downsample)), t.rotations)  # (B, 3, h'f, w'f)
    return z_t, x_t


def prior_scale_image(x: torch.Tensor, t: EqTransform, downsample: int) -> torch.Tensor:
    """The prior-preservation input: x downscaled by s to a size the autoencoder can reproduce (multiple of f)."""
    return resize(x, scaled_size(x.shape[-2], x.shape[-1], t.scale, multiple=downsample))


class EqRegulariser(nn.Module):
    """EQ-VAE as a tokenizer regulariser (the interface of ldm.tokenizers.regularisers), built from tokenizer.eq.

    Each gen step, `prepare` draws one transform per batch from torch's global RNG, which the TokenizerTask seeds
    by (seed, step, micro-batch) for this call, so every process draws the same transform as one process would;
    it downscales the input in the prior mode; `transform` applies tau to the latent and the target in the
    equivariance mode. Every loss term is then computed as usual on what is decoded; the mode drawn is logged as
    "eq_mode" (index into EQ_MODES). No trainable parameters.
    """

    name = "eq"
    instant_logs = ("eq_mode",)

    def __init__(self, cfg: EqCfg, *, downsample: int):
        super().__init__()
        self.cfg, self.downsample = cfg, downsample
        self.scales = eq_scales(cfg.scale_num_min, cfg.scale_num_max, cfg.scale_den)
        self.draw = EqTransform("plain", (1.0, 1.0), 0)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        self.draw = sample_eq_transform(scales=self.scales, p_equivariance=c.p_equivariance,
                                        p_prior_scale=c.p_prior_scale, anisotropic=c.anisotropic, rotate=c.rotate)
        return prior_scale_image(x, self.draw, self.downsample) if self.draw.mode == "prior_scale" else x

    def transform(self, z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.draw.mode == "equivariance":
            return transform_latent_and_image(z, target, self.draw, self.downsample)
        return z, target

    def loss(self, **_) -> tuple[None, dict[str, torch.Tensor]]:
        return None, {"eq_mode": torch.tensor(float(EQ_MODES.index(self.draw.mode)))}

    def gen_parameters(self) -> list[nn.Parameter]:
        return []


def build_eq(cfg: EqCfg, *, autoencoder: nn.Module) -> EqRegulariser:
    """The EQ-VAE regulariser of `autoencoder` (whose downsampling factor aligns latent and image transforms)."""
    from ldm.tokenizers.kinds import (
        kind_of,  # imports diffusers: keep this module light to import
    )

    return EqRegulariser(cfg, downsample=kind_of(autoencoder).downsample(autoencoder))


@torch.no_grad()
def equivariance_errors(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                        batches: Iterable[torch.Tensor], *, downsample: int, transforms: dict[str, EqTransform],
                        latent_error: bool = True) -> dict:
    """THE equivariance metric: per named transform tau, summed in float64 over image batches (B, 3, H, W) in [-1, 1],

        decoder MSE    mean over pixels of (D(tau(E(x))) - tau(x))^2  (the EQ-VAE paper's error, Table 1 / Fig. 2)
        decoder ratio  RMS(D(tau(E(x))) - tau(x)) / RMS(D(E(x)) - x)   (1 = as good as a plain reconstruction)
        latent error   ||E(tau(x)) - tau(E(x))|| / ||tau(E(x))||, norms over the whole set (0 = E commutes with tau;
                       skipped with latent_error=False, which saves one encoder pass per transform)

    plus the plain reconstruction RMSE ("recon_rmse") and the means over the rotating and the pure-scaling transforms
    ("rotation_mean", "scale_mean", present when the group is not empty).
    """
    keys = ("decoder_mse", "decoder_ratio") + (("latent_error",) if latent_error else ())
    plain = torch.zeros(2, dtype=torch.float64)  # (sum sq error, count)
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in transforms}  # dec sq, dec n, lat sq, lat ref sq
    for x in batches:
        z = encode(x)  # (B, C, h, w)
        plain += torch.tensor([(decode(z) - x).double().square().sum(), x.numel()], dtype=torch.float64)
        for name, t in transforms.items():
            z_t, x_t = transform_latent_and_image(z, x, t, downsample)  # tau(E(x)), tau(x)
            dec = (decode(z_t) - x_t).double().square().sum()
            lat = (encode(x_t) - z_t).double().square().sum() if latent_error else 0.0
            sums[name] += torch.tensor([dec, x_t.numel(), lat, z_t.double().square().sum()], dtype=torch.float64)
    if plain[1] == 0:
        raise ValueError("equivariance_errors: no images")
    rmse = float((plain[0] / plain[1]).sqrt())
    out: dict = {"recon_rmse": rmse, "transforms": {}}
    for name, (dec, n, lat, ref) in sums.items():
        t = transforms[name]
        mse = float(dec / n)
        out["transforms"][name] = {"scale": t.scale[0], "rotations": t.rotations, "decoder_mse": mse,
                                   "decoder_ratio": math.sqrt(mse) / max(rmse, 1e-30)}
        if latent_error:
            out["transforms"][name]["latent_error"] = float((lat / ref.clamp_min(1e-300)).sqrt())
    for group, members in (("rotation", [n for n, t in transforms.items() if t.rotations]),
                           ("scale", [n for n, t in transforms.items() if not t.rotations])):
        if members:
            out[f"{group}_mean"] = {key: float(np.mean([out["transforms"][m][key] for m in members])) for key in keys}
    return out


def equivariance_error(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                       images: torch.Tensor, *, downsample: int, scales: list[float],
                       rotations: tuple[int, ...] = (0, 1, 2, 3)) -> float:
    """Mean squared equivariance error  E_tau || D(tau(E(x))) - tau(x) ||^2 / n_pixels  over every (s, k) pair: the
    decoder MSE of `equivariance_errors`, averaged over the grid (each pair weighs the same).

    The EQ-VAE paper (Table 1, Fig. 2) evaluates reconstructions of transformed latents against transformed images;
    here the images are in [-1, 1] and the error is averaged over pixels, images and the transform grid.
    """
    grid = {str(i): EqTransform("equivariance", (s, s), k)
            for i, (s, k) in enumerate((s, k) for s in scales for k in rotations)}
    res = equivariance_errors(encode, decode, [images], downsample=downsample, transforms=grid, latent_error=False)
    errors = [t["decoder_mse"] for t in res["transforms"].values()]
    return sum(errors) / len(errors)
