"""VA-VAE: align the tokenizer's latents with a frozen vision foundation model (the "VF loss").

Yao, Yang, Wang 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models"
(arXiv:2501.01423), §3.2. Reference: hustvl/LightningDiT vavae/ldm/modules/losses/contperceptual.py (forward, the
`vf loss` block) and vavae/ldm/models/autoencoder.py (forward: `z = self.linear_proj(z)` with reverse_proj=True, a
bias-free 1x1 conv from the latent to the foundation feature dimension).

With z' = W z (the projected latent) and f the foundation features at the latent grid (B, D, h, w):

* marginal cosine similarity loss, Eq. (2): L_mcos = mean_{i,j} relu(1 - m1 - cos(z'_ij, f_ij))
* marginal distance-matrix similarity loss, Eq. (3): L_mdms = mean_{i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)
  over all pairs of the h*w positions
* L_vf = w_mdms L_mdms + w_mcos L_mcos, added to the autoencoder loss with the adaptive weight of Eq. (4),
  ||grad L_rec|| / (||grad L_vf|| + 1e-4) (clamped to [0, 1e8]) at the encoder's last conv, times vf_weight.

m1 = 0.5 and m2 = 0.25 in the released model (configs/f16d32_vfdinov2.yaml: cos_margin 0.5, distmat_margin 0.25).
The reference feeds DINOv2 the [-1, 1] image resized bilinearly to 224 px without ImageNet normalisation
(vavae/ldm/models/foundation_models.py): tokenizer.va.preprocess=lightningdit, as the vavae_f16c32 presets set;
the default, repa, gives the encoder REPA's input (ldm.encoders.PREPROCESSING).

`VaRegulariser` adds the VF loss to the tokenizer's training loss (the interface of ldm.tokenizers.regularisers,
built from the config section tokenizer.va).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import VaCfg
from ldm.encoders import features_at_grid, tokens_to_grid  # noqa: F401 (tokens_to_grid: re-exported)
from ldm.frozen import HoldsFrozen
from ldm.tokenizers.kinds import kind_of
from ldm.tokenizers.losses import adaptive_weight


def margin_cosine_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """L_mcos per sample: mean over positions of relu(1 - margin - cos(z_ij, f_ij)); z, f (B, D, h, w) -> (B,)."""
    cos = F.cosine_similarity(z, f, dim=1)  # (B, h, w)
    return F.relu(1.0 - margin - cos).flatten(1).mean(1)


def margin_distance_matrix_loss(z: torch.Tensor, f: torch.Tensor, margin: float) -> torch.Tensor:
    """L_mdms per sample: mean over position pairs of relu(|S_z - S_f| - margin), S = (h*w, h*w) cosine matrices."""
    zn = F.normalize(z.flatten(2), dim=1)  # (B, D, L)
    fn = F.normalize(f.flatten(2), dim=1)  # (B, D, L)
    s_z = torch.einsum("bdi,bdj->bij", zn, zn)  # (B, L, L)
    s_f = torch.einsum("bdi,bdj->bij", fn, fn)  # (B, L, L)
    return F.relu((s_z - s_f).abs() - margin).flatten(1).mean(1)


def vf_loss(z: torch.Tensor, f: torch.Tensor, *, margin_cos: float = 0.5, margin_dist: float = 0.25,
            cos_weight: float = 1.0, distmat_weight: float = 1.0) -> torch.Tensor:
    """L_vf = distmat_weight * L_mdms + cos_weight * L_mcos per sample (B,) (reference contperceptual.py L118-127)."""
    return (distmat_weight * margin_distance_matrix_loss(z, f, margin_dist)
            + cos_weight * margin_cosine_loss(z, f, margin_cos))


class VFAligner(HoldsFrozen, nn.Module):
    """Frozen foundation encoder + the trainable bias-free 1x1 projection of VA-VAE (reverse_proj=True).

    `encoder` is any module mapping images in [-1, 1] to patch tokens (B, L, D) (ldm.encoders.build_encoder gives
    DINOv2/MAE/digits); `feature_dim` is D. The encoder is held frozen (ldm.frozen.HoldsFrozen): outside this
    module's parameters and state_dict, in eval mode, moved along by `.to()`.
    """

    def __init__(self, *, encoder: nn.Module, feature_dim: int, latent_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=False)
        self.add_frozen("encoder", encoder)

    @torch.no_grad()
    def features(self, images: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Foundation features resized (bilinear) to the latent grid: (B, 3, H, W) -> (B, D, h, w)."""
        return features_at_grid(self.frozen("encoder"), images, tuple(latent_hw))

    def forward(self, images: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected latent W z (B, D, h, w), foundation features (B, D, h, w))."""
        return self.proj(z), self.features(images, tuple(z.shape[-2:]))


class VaRegulariser(VFAligner):
    """VA-VAE as a tokenizer regulariser (the interface of ldm.tokenizers.regularisers), built from tokenizer.va.

    Adds vf_weight * w_adaptive * L_vf(W z, f) to the gen loss, with z the sampled (KL) or quantised (VQ) latent of
    the prepared input before any EQ-VAE transform, and w_adaptive the Eq. (4) weight at the encoder's last conv
    (1 when cfg.adaptive is false). Its projection W trains with the autoencoder (state_dict key "va.proj.weight").
    """

    name = "va"
    instant_logs = ()

    def __init__(self, cfg: VaCfg, *, encoder: nn.Module, feature_dim: int, latent_channels: int):
        super().__init__(encoder=encoder, feature_dim=feature_dim, latent_channels=latent_channels)
        self.cfg = cfg

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def transform(self, z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, target

    def loss(self, *, x_in: torch.Tensor, z: torch.Tensor, nll: torch.Tensor,
             autoencoder: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        z_proj, feats = self(x_in, z)  # (B, D, h, w) each
        lvf = vf_loss(z_proj.float(), feats, margin_cos=c.margin_cos, margin_dist=c.margin_dist,
                      cos_weight=c.cos_weight, distmat_weight=c.distmat_weight).mean()
        last = kind_of(autoencoder).encoder_last_layer(autoencoder)
        weight = (adaptive_weight(nll, lvf, last, max_weight=1e8) if c.adaptive
                  else torch.ones((), device=lvf.device)) * c.vf_weight
        return weight * lvf, {"loss_vf": lvf, "vf_weight": weight}

    def gen_parameters(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())


def build_va(cfg: VaCfg, *, autoencoder: nn.Module) -> VaRegulariser:
    """The VA-VAE regulariser of `autoencoder`, with the frozen encoder cfg.encoder (weights cfg.weights) fed the
    images as cfg.preprocess says (ldm.encoders.PREPROCESSING). A missing weights file fails here, before training
    starts."""
    # build_encoder is looked up at call time, so tests can substitute a tiny encoder
    from ldm.encoders import build_encoder
    encoder = build_encoder(cfg.encoder, weights_path=cfg.weights, preprocess=cfg.preprocess)
    latent_channels = kind_of(autoencoder).latent_channels(autoencoder)
    return VaRegulariser(cfg, encoder=encoder, feature_dim=encoder.feature_dim, latent_channels=latent_channels)
