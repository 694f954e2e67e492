"""Tokenizer losses: reconstruction, LPIPS, the LDM likelihood with a log-variance, KL, GAN G/D losses, adaptive weight.

Pure functions of tensors (the only module here is the frozen LPIPS network, built by `build_lpips`). Per-sample
losses return a (B,) tensor; the task reduces them. Sources:

* Esser, Rombach, Ommer 2021, "Taming Transformers" (arXiv:2012.09841), reference
  CompVis/taming-transformers taming/modules/losses/vqperceptual.py (hinge_d_loss, vanilla_d_loss,
  calculate_adaptive_weight: Eq. 7).
* Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv:2112.10752), reference
  CompVis/latent-diffusion ldm/modules/losses/contperceptual.py (NLL with a scalar log-variance, summed per image and
  averaged over the batch; KL weight 1e-6) and ldm/modules/distributions/distributions.py (DiagonalGaussian.kl).
* Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (arXiv:1801.03924):
  LPIPS via the `lpips` package with the VGG16 trunk.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (the trunk LPIPS-VGG uses)
REC_LOSSES = ("l1", "l2")
GAN_LOSSES = ("hinge", "vanilla", "non_saturating")  # tokenizer.disc_loss: the keys of D_LOSSES / G_LOSSES


# ----------------------------------------------------------------------------------------------------------- pixels
def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Element-wise |x - x_rec| (l1) or (x - x_rec)^2 (l2), shape (B, C, H, W), unreduced."""
    if kind == "l1":
        return (x - x_rec).abs()
    if kind == "l2":
        return (x - x_rec).square()
    raise ValueError(f"reconstruction loss kind={kind!r}; expected one of {REC_LOSSES}")


def nll_loss(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """LDM negative log-likelihood with a scalar log-variance, per image: sum_{c,h,w} rec / exp(logvar) + logvar.

    `rec` is the element-wise reconstruction term (B, C, H, W), LPIPS already broadcast-added to every pixel as in
    contperceptual.py L47-51 (`rec_loss = |x - x_rec| + w_p * p_loss`). The reference reduces with
    `torch.sum(nll) / B`, i.e. the batch mean of this (B,) vector.
    """
    return (rec / torch.exp(logvar) + logvar).flatten(1).sum(1)  # (B,)


def kl_diagonal_gaussian(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) summed over (C, H, W): 0.5 * sum(mean^2 + var - 1 - logvar).

    Kingma & Welling 2014 (arXiv:1312.6114) Appendix B; latent-diffusion distributions.py DiagonalGaussian.kl().
    The caller clamps logvar to [-30, 20] as that class (and diffusers' DiagonalGaussianDistribution) does.
    """
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)  # (B,)


# ----------------------------------------------------------------------------------------------------------- GAN
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss per sample: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))).

    Lim & Ye 2017 (arXiv:1705.02894); taming vqperceptual.py hinge_d_loss (means over the patch logits).
    """
    real = F.relu(1.0 - logits_real).flatten(1).mean(1)
    fake = F.relu(1.0 + logits_fake).flatten(1).mean(1)
    return 0.5 * (real + fake)  # (B,)


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss per sample: 0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))).

    = 0.5 * (-log sigmoid(D(x)) - log(1 - sigmoid(D(x_rec)))), Goodfellow et al. 2014 Eq. 1; taming vanilla_d_loss.
    """
    real = F.softplus(-logits_real).flatten(1).mean(1)
    fake = F.softplus(logits_fake).flatten(1).mean(1)
    return 0.5 * (real + fake)  # (B,)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's generator loss: -mean D(x_rec) (taming vqperceptual.py L88, LDM contperceptual.py), used there with
    either discriminator loss (`disc_loss: hinge` or `vanilla` changes only the D loss)."""
    return -logits_fake.flatten(1).mean(1)  # (B,)


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean -log sigmoid(D(x_rec)) = mean softplus(-D(x_rec)) (Goodfellow 2014, §3).

    LlamaGen vq_loss.py non_saturating_gen_loss passes its arguments to binary_cross_entropy_with_logits in swapped
    order (input=ones, target=logits), which is linear in the logits; we implement the loss of the paper.
    """
    return F.softplus(-logits_fake).flatten(1).mean(1)  # (B,)


# disc_loss -> (D loss, G loss). "vanilla" is taming/LDM's setting of that name: taming's vanilla_d_loss (= the
# non-saturating D loss) with taming's generator loss, which is -mean D(x_rec) whatever the D loss.
D_LOSSES = {"hinge": hinge_d_loss, "vanilla": non_saturating_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "vanilla": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adopt_weight(weight: float, step: int, start: int) -> float:
    """`weight` from step `start` on, 0 before (taming vqperceptual.py adopt_weight; the `disc_start` switch)."""
    return weight if step >= start else 0.0


def adaptive_weight(loss_main: torch.Tensor, loss_aux: torch.Tensor, last_layer: torch.Tensor, *,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """lambda = ||grad_W L_main|| / (||grad_W L_aux|| + eps), clamped to [0, max_weight] and detached.

    Esser et al. 2021 Eq. 7 with W = the decoder's last conv weight (L_main = L_rec/NLL, L_aux = L_GAN, max 1e4:
    taming vqperceptual.py calculate_adaptive_weight). VA-VAE reuses it with W = the encoder's last conv,
    L_aux = L_vf and max 1e8 (LightningDiT vavae/ldm/modules/losses/contperceptual.py calculate_adaptive_weight_vf).
    Both losses must depend on `last_layer` (the reference hides a failure here behind `except RuntimeError`).
    """
    if not (loss_main.requires_grad and loss_aux.requires_grad):
        raise ValueError("adaptive_weight needs both losses attached to the autograd graph (called under no_grad?)")
    g_main = torch.autograd.grad(loss_main, last_layer, retain_graph=True)[0]
    g_aux = torch.autograd.grad(loss_aux, last_layer, retain_graph=True)[0]
    weight = g_main.norm() / (g_aux.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------- LPIPS
def vgg16_cache_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights: <torch hub dir>/checkpoints/vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_lpips(weights_path: str | Path | None = None, *, random_backbone: bool = False) -> nn.Module:
    """LPIPS-VGG (v0.1, calibrated linear heads shipped with the `lpips` package), frozen, in eval mode.

    The VGG16 trunk is loaded from `weights_path` (a torchvision `vgg16` state dict, e.g. vgg16-397923af.pth) or,
    when None, from torchvision's cache (`vgg16_cache_path()`). Nothing is downloaded: a missing file raises
    FileNotFoundError naming both places. `random_backbone=True` keeps the randomly initialised trunk; LPIPS values
    are then meaningless, which is only acceptable for tests and smoke runs (a warning says so).
    Call with inputs in [-1, 1]; returns (B, 1, 1, 1).
    """
    import lpips

    if not random_backbone:
        path = Path(weights_path) if weights_path is not None else vgg16_cache_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS VGG16 backbone weights not found: {str(path)!r} (tokenizer.lpips_weights="
                f"{None if weights_path is None else str(weights_path)!r}; torchvision cache: "
                f"{str(vgg16_cache_path())!r}). Copy torchvision's {VGG16_FILE} "
                f"(https://download.pytorch.org/models/{VGG16_FILE}) there or set tokenizer.lpips_weights; "
                f"tokenizer.perceptual_weight=0 turns LPIPS off.")
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    if random_backbone:
        log.warning("LPIPS uses a RANDOMLY INITIALISED VGG16 backbone (tokenizer.lpips_random_backbone=true): "
                    "perceptual losses and LPIPS numbers are meaningless; use this for tests and smoke runs only")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_vgg_trunk(net.net, state, path)
    net.eval().requires_grad_(False)
    return net


def _load_vgg_trunk(trunk: nn.Module, state: dict, path: Path) -> None:
    """Copy torchvision `features.<i>.*` tensors into lpips' slice1..5 (which keep torchvision's layer indices)."""
    mapped = {}
    for name, _ in trunk.named_parameters():
        slice_name, index, kind = name.split(".")  # e.g. slice3.10.weight
        key = f"features.{index}.{kind}"
        if key not in state:
            raise ValueError(f"{str(path)!r} is not a torchvision VGG16 state dict: key {key!r} is missing")
        mapped[name] = state[key]
    trunk.load_state_dict(mapped, strict=True)


def lpips_loss(net: nn.Module, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """LPIPS distance per sample, (B,), inputs in [-1, 1]."""
    return net(x.contiguous(), x_rec.contiguous()).flatten()  # (B,)
