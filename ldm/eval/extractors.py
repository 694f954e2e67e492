"""Feature extractors for Fréchet distances, precision/recall and IS: one interface, a small name -> builder dict.

An `Extractor` maps uint8 images (B, C, H, W) to a dict of (B, D) float32 tensors with some of the keys
  "features"  the space of the Fréchet distance and of precision/recall (Inception: pool_3, 2048-d),
  "spatial"   sFID features (Inception only: mixed_6/conv, 2023-d),
  "logits"    class logits for an Inception-Score-style metric.
It has a `name`, and the metric it yields is named after it: "FID" for Inception, "FD_<name>" otherwise, so a
Fréchet distance in another feature space is never mistaken for FID. `cache_key()` identifies the network weights and
the preprocessing, for the reference-statistics cache.

Built-in extractors (EXTRACTORS):
  inception  the FID Inception-v3 (ldm/eval/inception.py), TF-2015 weights from a local file.
  dinov2     DINOv2 ViT-L/14 CLS token as in Stein et al. 2023 (arXiv:2306.04675, dgm-eval `models/dinov2.py`):
             bicubic resize to 224, ImageNet mean/std; the network is ldm.encoders' "dinov2_vitl14" (`load_vit`:
             official `dinov2_vitl14_pretrain.pth` or timm format, local weights only). timm resamples the position
             embeddings to 224 once, at load time, instead of per forward as the official hub model does, and the
             resize runs on tensors rather than PIL images: FD_dinov2 is close to, not bit for bit, dgm-eval's.
  digits     the small digits classifier (ldm/encoders/digits.py), weights committed in ldm/assets.
Frozen vision networks come from ldm.encoders, the one registry of them (Inception, used for FID only, lives in
ldm/eval/inception.py); the builders here add the image-level preprocessing and outputs. Any other nn.Module mapping
preprocessed float images to (B, D) works through `ModuleExtractor`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.encoders import IMAGENET_MEAN, IMAGENET_STD, load_vit
from ldm.encoders.digits import DigitsFeatures, load_digits_classifier, preprocess_digits

OUTPUT_KEYS = ("features", "spatial", "logits")


@contextlib.contextmanager
def full_precision(device: torch.device):
    """Disable TF32 convolutions on CUDA while extracting (PyTorch allows them by default; they shift features by
    ~1e-3 relative, far more than the float32 port's 1e-5 agreement with the TF graph). No-op on CPU."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


def weights_digest(module: nn.Module) -> str:
    """sha256 (16 hex) over the module's state dict (names, shapes, dtypes and bytes): identifies the weights."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Extractor(nn.Module):
    """Base class. Subclasses set `name`, `outputs`, `preprocessing` (a text description) and implement
    `forward(images_uint8, outputs) -> dict`; `net` is the wrapped network (hashed for the cache key)."""

    name: str = "extractor"
    outputs: tuple[str, ...] = ("features",)
    preprocessing: str = ""

    @property
    def metric_name(self) -> str:
        return "FID" if self.name == "inception" else f"FD_{self.name}"

    def cache_key(self) -> str:
        if not hasattr(self, "_digest"):
            self._digest = weights_digest(self.net)
        return f"{self.name}|{self.preprocessing}|weights={self._digest}"

    def check_outputs(self, outputs: tuple[str, ...]) -> tuple[str, ...]:
        missing = sorted(set(outputs) - set(self.outputs))
        if missing:
            raise ValueError(f"extractor {self.name!r} provides {self.outputs}; {missing} requested")
        return outputs


class InceptionExtractor(Extractor):
    """The FID Inception-v3; features = pool_3 (2048), spatial = mixed_6/conv[:7] (2023), logits (1008, no bias)."""

    name = "inception"
    outputs = ("features", "spatial", "logits")
    preprocessing = "uint8 -> TF1 bilinear 299 -> (x-128)/128"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def has_classifier(self) -> bool:
        """False for weight files without the 1008-way head (fc all zero): their Inception Score is meaningless."""
        return bool(self.net.fc.weight.abs().sum() > 0)

    def forward(self, x: torch.Tensor, outputs: tuple[str, ...] = ("features",)) -> dict[str, torch.Tensor]:
        outputs = self.check_outputs(tuple(outputs))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        rename = {"features": "pool", "spatial": "spatial", "logits": "logits"}
        with full_precision(x.device):
            out = self.net(x, outputs=tuple(rename[k] for k in outputs))
        return {k: out[rename[k]] for k in outputs}


class ImagePreprocess:
    """uint8 (B, C, H, W) -> float: to [0, 1], optional grey -> RGB, resize to size x size, (x - mean) / std."""

    def __init__(self, size: int | None, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "bicubic"):
        if mode not in ("bicubic", "bilinear"):
            raise ValueError(f"mode={mode!r}; expected 'bicubic' or 'bilinear'")
        self.size, self.mode = size, mode
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W); got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        y = x.float() / 255.0
        if self.size is not None and y.shape[-2:] != (self.size, self.size):
            y = F.interpolate(y, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return (y - self.mean.to(y.device)) / self.std.to(y.device)

    def __repr__(self) -> str:
        return (f"uint8/255 -> {self.mode} antialias {self.size} -> (x-{tuple(self.mean.flatten().tolist())})"
                f"/{tuple(self.std.flatten().tolist())}")


class ModuleExtractor(Extractor):
    """Any nn.Module as an extractor: `features = module(preprocess(x))` (B, D); `logits_fn`, when given, maps the
    preprocessed images to class logits (used for an IS-style score)."""

    def __init__(self, module: nn.Module, name: str, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 *, logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, description: str | None = None):
        super().__init__()
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"extractor name {name!r} must be a non-empty identifier (letters, digits, '_')")
        self.net = module.eval().requires_grad_(False)
        self.name = name
        self.preprocess = preprocess
        self.logits_fn = logits_fn
        self.outputs = ("features", "logits") if logits_fn is not None else ("features",)
        self.preprocessing = description if description is not None else repr(preprocess)

    def forward(self, x: torch.Tensor, outputs: tuple[str, ...] = ("features",)) -> dict[str, torch.Tensor]:
        outputs = self.check_outputs(tuple(outputs))
        out = {}
        with full_precision(x.device):
            y = self.preprocess(x)
            if "features" in outputs:
                out["features"] = self.net(y).float().flatten(1)  # (B, D)
            if "logits" in outputs:
                out["logits"] = self.logits_fn(y).float()  # (B, K)
        return out


# ------------------------------------------------------------------------------------------------------ builders
def build_inception(weights: str | os.PathLike | None = None, *, download: bool = False) -> InceptionExtractor:
    from ldm.eval.inception import load_inception

    return InceptionExtractor(load_inception(weights, download=download))


DINOV2_ENV = "LDM_DINOV2_WEIGHTS"


def build_dinov2(weights: str | os.PathLike | None = None) -> ModuleExtractor:
    """DINOv2 ViT-L/14 CLS features (timm architecture) from a local checkpoint: `weights`, $LDM_DINOV2_WEIGHTS, or
    the caches `ldm.encoders.find_weights` searches (torch hub checkpoints/dinov2_vitl14_pretrain.pth, Hugging Face
    timm/vit_large_patch14_dinov2.lvd142m)."""
    model = load_vit("dinov2_vitl14", weights if weights is not None else os.environ.get(DINOV2_ENV), image_size=224)
    # without a head, model(x) is the final-norm CLS token (B, 1024): dinov2's x_norm_clstoken
    pre = ImagePreprocess(224, IMAGENET_MEAN, IMAGENET_STD, mode="bicubic")
    return ModuleExtractor(model, "dinov2", pre, description=f"dinov2 vitl14 CLS; {pre!r}")


def build_digits(weights: str | os.PathLike | None = None) -> ModuleExtractor:
    """The shipped digits classifier: features = its penultimate layer (B, 64), logits = its head (B, 10)."""
    net = load_digits_classifier(weights)
    return ModuleExtractor(DigitsFeatures(net), "digits", preprocess_digits, logits_fn=net,
                           description="uint8 -> channel mean -> bilinear antialias 32 -> [-1, 1]")


EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "inception": build_inception,
    "dinov2": build_dinov2,
    "digits": build_digits,
}


def build_extractor(name: str, weights: str | os.PathLike | None = None, **kwargs) -> Extractor:
    """Build a registered extractor by name; `weights` is its local weight file (None: its default search)."""
    if name not in EXTRACTORS:
        raise ValueError(f"extractor={name!r}; expected one of {sorted(EXTRACTORS)} (or pass an Extractor / "
                         f"ModuleExtractor instance)")
    return EXTRACTORS[name](weights, **kwargs)
