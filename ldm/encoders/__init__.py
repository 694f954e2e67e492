"""Frozen vision networks: THE registry (DINOv2, MAE and the shipped digits classifier), shared by VA-VAE, REPA, the
latent diagnostics and eval's feature extractors.

Names: the ViTs of `ENCODERS` and `DIGITS_ENCODER` ("digits", ldm/encoders/digits.py); ldm.names.ENCODER_NAMES lists
them for the config. Networks load through `load_vit` / `load_digits_classifier`; `build_encoder` wraps either as a
`FrozenEncoder` of patch tokens, and ldm.eval.extractors wraps the same loaders as image-level feature extractors.

Architectures come from timm, as LightningDiT (vavae/ldm/models/foundation_models.py) and REPA (utils.py
`load_encoders`) use them; weights are read from a local file, never downloaded. `FrozenEncoder` also wraps any
nn.Module that maps preprocessed images (B, 3, S, S) to tokens (B, prefix + L, D) (a timm ViT's `forward_features`,
or the module's own forward), so tests and users can plug in their own.

Preprocessing (`PREPROCESSING`, the config's tokenizer.va.preprocess), images in [-1, 1] (B, 3, H, W) -> (B, 3, S, S):
* "repa": REPA train.py `preprocess_raw_image` (DINOv2 branch): [-1, 1] -> [0, 1] -> ImageNet mean/std
  normalisation -> bicubic resize to the encoder resolution S (224 for 256-px images, a 16 x 16 token grid with
  patch 14). MAE in REPA sees the 256-px image unresized with a 16 x 16 grid, hence its default resolution 256.
* "lightningdit": LightningDiT vavae/ldm/models/foundation_models.py `aux_foundation_model`: the [-1, 1] image as it
  is (no mapping to [0, 1], no ImageNet normalisation), resized bilinearly (align_corners=False) to S: DINOv2 gets
  224 px as the reference's `forward_dinov2`; MAE at its default 256 px sees a 256-px image unresized as
  `forward_mae` does (the reference passes other sizes unresized to its dynamic-size ViT, we resize them to S).
The digits trunk has its own fixed preprocessing ([-1, 1] -> [0, 1], bilinear to 32 px, no normalisation).
The position embedding is resampled to the encoder's grid once at load time (timm `checkpoint_filter_fn`, bicubic,
as REPA's `resample_abs_pos_embed` and LightningDiT's dynamic-size timm ViT do at their own times).

Weights: `build_encoder(name, weights_path)` reads that file; without a path it looks for the official file in
torch hub's cache (`torch.hub.get_dir()/checkpoints/<file>`, where `torch.hub.load` puts DINOv2) and for timm's
safetensors in the Hugging Face cache (`<HF cache>/models--timm--<model>/snapshots/*/model.safetensors`). Both the
official (facebookresearch/dinov2, facebookresearch/mae) and the timm key layouts load (timm converts them).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.encoders.digits import DIGITS_SIZE, DigitsPatchFeatures, load_digits_classifier

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DIGITS_ENCODER = "digits"  # the shipped digits classifier's trunk (ldm/encoders/digits.py), beside the ViTs below

# name -> FrozenEncoder preprocessing settings (see the module docstring for the sources)
PREPROCESSING = {
    "repa": {"to_unit_range": True, "normalize": True, "resize_mode": "bicubic"},
    "lightningdit": {"to_unit_range": False, "normalize": False, "resize_mode": "bilinear"},
}
DIGITS_PREPROCESSING = {"to_unit_range": True, "normalize": False, "resize_mode": "bilinear"}

# name: (timm architecture, timm pretrained tag, official file name, official URL directory, default resolution)
ENCODERS = {
    **{f"dinov2_vit{s}14{reg}": (f"vit_{arch}_patch14{reg}_dinov2", "lvd142m", f"dinov2_vit{s}14{reg}_pretrain.pth",
                                 f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/", 224)
       for s, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")) for reg in ("", "_reg4")},
    "mae_vitb16": ("vit_base_patch16_224", "mae", "mae_pretrain_vit_base.pth",
                   "https://dl.fbaipublicfiles.com/mae/pretrain/", 256),
    "mae_vitl16": ("vit_large_patch16_224", "mae", "mae_pretrain_vit_large.pth",
                   "https://dl.fbaipublicfiles.com/mae/pretrain/", 256),
    "mae_vith14": ("vit_huge_patch14_224", "mae", "mae_pretrain_vit_huge.pth",
                   "https://dl.fbaipublicfiles.com/mae/pretrain/", 224),
}


class FrozenEncoder(nn.Module):
    """Preprocess images in [-1, 1] and return the encoder's patch tokens (B, L, D), without class/register tokens.

    Preprocessing, in this order: (x + 1) / 2 when `to_unit_range`, ImageNet mean/std when `normalize`, a resize
    (`resize_mode`, align_corners=False) to `image_size` when the input has another size. `PREPROCESSING` names the
    settings of REPA and LightningDiT. Parameters are frozen and the module stays in eval mode; forward runs without
    gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int,
        patch_size: int,
        feature_dim: int,
        num_prefix_tokens: int = 0,
        to_unit_range: bool = True,
        normalize: bool = True,
        resize_mode: str = "bicubic",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"resize_mode={resize_mode!r}; expected 'bicubic' or 'bilinear'")
        self.model = model.eval().requires_grad_(False)
        self.image_size, self.patch_size, self.feature_dim = image_size, patch_size, feature_dim
        self.grid_size = image_size // patch_size
        self.num_prefix_tokens, self.normalize, self.resize_mode = num_prefix_tokens, normalize, resize_mode
        self.to_unit_range = to_unit_range
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: dropout / drop-path stay off

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S), S = image_size, the encoder's input (see the class docstring)."""
        x = (images.float() + 1) / 2 if self.to_unit_range else images.float()  # [0, 1] or [-1, 1]
        if self.normalize:
            x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.resize_mode, align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, 3, H, W) in [-1, 1]")
        x = self.preprocess(images)  # (B, 3, S, S)
        run = getattr(self.model, "forward_features", self.model)
        param = next(self.model.parameters(), None)
        tokens = run(x if param is None else x.to(param.dtype))  # (B, prefix + L, D)
        tokens = tokens[:, self.num_prefix_tokens:]  # (B, L, D)
        expected = (images.shape[0], self.grid_size**2, self.feature_dim)
        if tokens.shape != expected:
            raise ValueError(f"encoder returned patch tokens of shape {tuple(tokens.shape)}; expected {expected}")
        return tokens.float()


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Patch tokens (B, L, D) -> feature map (B, D, gh, gw); a square grid is assumed when `grid` is None."""
    b, n, d = tokens.shape
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"foundation encoder returned {n} patch tokens, not a square grid; give its grid size")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"foundation encoder returned {n} tokens, which do not fill its grid {tuple(grid)}")
    return tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])


@torch.no_grad()
def features_at_grid(encoder: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A frozen encoder's patch tokens as a feature map resized (bilinear) to `grid`, e.g. a latent grid:
    (B, 3, H, W) in [-1, 1] -> (B, D, h, w). The token grid is the encoder's `grid_size` (an int or (gh, gw)) when
    it fits the token count, else a square one (an encoder that adapted its grid to the input size). VA-VAE's aligner
    and the latent diagnostics compare latents with these features."""
    tokens = encoder(images).float()  # (B, L, D)
    token_grid = getattr(encoder, "grid_size", None)
    if token_grid is not None:
        token_grid = (token_grid, token_grid) if isinstance(token_grid, int) else tuple(token_grid)
        if token_grid[0] * token_grid[1] != tokens.shape[1]:
            token_grid = None
    f = tokens_to_grid(tokens, token_grid)  # (B, D, gh, gw)
    if tuple(f.shape[-2:]) != tuple(grid):
        f = F.interpolate(f, size=tuple(grid), mode="bilinear", align_corners=False)
    return f


def _hf_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def find_weights(name: str, weights_path: str | Path | None = None) -> Path:
    """The weights file of a named encoder: `weights_path`, or the torch hub / Hugging Face caches."""
    arch, tag, file, url_dir, _ = ENCODERS[name]
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"{name} weights not found at {Path(weights_path).resolve()}")
        return Path(weights_path)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / file
    hf_dir = _hf_cache() / f"models--timm--{arch}.{tag}" / "snapshots"
    candidates = [hub_file, *sorted(hf_dir.glob("*/model.safetensors"))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no weights for encoder {name!r}. Looked for {hub_file} and {hf_dir}/*/model.safetensors. Download "
        f"{url_dir}{file} (or the Hugging Face repo timm/{arch}.{tag}) and pass its path as weights_path.")


def load_vit_weights(model: nn.Module, path: str | Path) -> None:
    """Load an official or timm-layout ViT state dict into a timm VisionTransformer, strictly.

    timm's `checkpoint_filter_fn` converts the DINOv2 layout and resamples the position embedding to the model's grid.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):  # MAE's .pth files also store their args
            sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = checkpoint_filter_fn(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier heads are unused (num_classes=0)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")


def load_vit(name: str, weights_path: str | Path | None = None, *, image_size: int | None = None) -> nn.Module:
    """The timm ViT of a named `ENCODERS` entry at `image_size` (default: the entry's resolution), without a
    classifier head, with the weights `find_weights` locates loaded strictly. Not frozen: the wrappers do that."""
    import timm

    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected {DIGITS_ENCODER!r} or one of {sorted(ENCODERS)}")
    arch, _, _, _, default_size = ENCODERS[name]
    path = find_weights(name, weights_path)  # fail before building a large model
    model = timm.create_model(arch, pretrained=False, img_size=image_size or default_size, num_classes=0)
    load_vit_weights(model, path)
    logger.info("loaded encoder %s (%s) from %s", name, arch, path)
    return model


def build_encoder(
    name: str,
    weights_path: str | Path | None = None,
    *,
    image_size: int | None = None,
    preprocess: str = "repa",
) -> FrozenEncoder:
    """A frozen pretrained encoder by name (see `ENCODERS`), e.g. "dinov2_vitb14" or "mae_vitl16", or "digits": the
    conv trunk of the digits classifier shipped with ldm (4 x width features on an 8 x 8 grid of 32-px digits; works
    offline, so VA-VAE and the latent diagnostics can run without foundation-model weights). `preprocess` names a
    `PREPROCESSING` entry ("repa" or "lightningdit"); "digits" ignores it: its preprocessing is fixed (32 px,
    bilinear, no ImageNet normalisation) and `weights_path` may name another classifier file."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess={preprocess!r}; expected one of {sorted(PREPROCESSING)}")
    if name == DIGITS_ENCODER:
        net = load_digits_classifier(weights_path)
        return FrozenEncoder(DigitsPatchFeatures(net.body), image_size=DIGITS_SIZE, patch_size=4,
                             feature_dim=4 * net.config["width"], **DIGITS_PREPROCESSING)
    model = load_vit(name, weights_path, image_size=image_size)
    return FrozenEncoder(
        model, image_size=image_size or ENCODERS[name][4], patch_size=model.patch_embed.patch_size[0],
        feature_dim=model.embed_dim, num_prefix_tokens=model.num_prefix_tokens, **PREPROCESSING[preprocess],
    )
