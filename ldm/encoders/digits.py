"""A small CNN classifier of scikit-learn's handwritten digits: the offline frozen network of the embedded digits.

Two views of it serve the layers above: its penultimate features are the feature space of the quickstart's FD
(`ldm.eval.extractors`, "digits"), and its conv trunk is a patch-feature encoder, the offline stand-in for DINOv2 in
VA-VAE and the latent diagnostics (`ldm.encoders.build_encoder("digits")`, `DigitsPatchFeatures`).

Inception FID needs weights that are not always at hand (no internet). For the embedded digits the quickstart reports
FD_digits instead: the Fréchet distance between Gaussians fitted to this classifier's penultimate features (64-d),
the same construction as FID (Heusel et al. 2017) in a domain network's feature space (as e.g. MNIST-FID work uses a
LeNet). It is NOT comparable with Inception FID, and results always carry the extractor's name.

Data: scikit-learn's 1,797 digits (8x8, values 0..16), prepared by `ldm.data.embedded.digits_arrays` (scaled to 8 bits,
bicubic upsampling, three identical channels). A fixed stratified split (seed 0) holds out 20 % for testing.
Preprocessing (any uint8 image batch): mean over channels -> bilinear antialiased resize to 32x32 -> [-1, 1].
The weights in ldm/assets/digits_classifier.safetensors are produced by `python -m ldm.tools.train_digits_classifier`
(deterministic, CPU, about a minute).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DIGITS_SIZE = 32
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.safetensors"


def preprocess_digits(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with C in {1, 3} -> float (B, 1, 32, 32) in [-1, 1]: grey = channel mean, then resize."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"digits classifier expects uint8 images (B, 1|3, H, W); got {tuple(x.shape)} {x.dtype}")
    g = x.float().mean(dim=1, keepdim=True) / 255.0  # (B, 1, H, W)
    if g.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        g = F.interpolate(g, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return g * 2 - 1  # (B, 1, 32, 32)


class DigitsClassifier(nn.Module):
    """Five 3x3 conv + BN + ReLU layers (32 -> 16 -> 8 px), global average pool, a hidden layer (the features) and a
    linear head. `features(x)` returns the (B, feature_dim) penultimate activations used for FD_digits."""

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

        def conv(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        w = width
        self.body = nn.Sequential(conv(1, w), conv(w, w), nn.MaxPool2d(2),
                                  conv(w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                  conv(2 * w, 4 * w))
        self.hidden = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 4w, 8, 8)
        return F.relu(self.hidden(h.mean(dim=(2, 3))))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class DigitsFeatures(nn.Module):
    """The classifier's penultimate features as a forward pass: (B, 1, 32, 32) in [-1, 1] -> (B, feature_dim), the
    feature space of FD_digits. The classifier sits under `classifier`: the extractor's cache key hashes the
    parameter names, so the attribute name is part of the reference-statistics identity."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)  # (B, feature_dim)


class DigitsPatchFeatures(nn.Module):
    """The classifier's conv trunk as a patch-feature network: images in [0, 1] (B, 3, 32, 32) -> grey in [-1, 1] ->
    trunk (B, 4w, 8, 8) -> tokens (B, 64, 4w). Supervised on the digit classes, not self-supervised, and 8 x 8 px
    per token; `ldm.encoders.build_encoder("digits")` wraps it in a FrozenEncoder."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=1, keepdim=True) * 2 - 1  # (B, 1, 32, 32)
        return self.body(g).flatten(2).transpose(1, 2)  # (B, 64, 4w)


def digits_split(image_size: int = DIGITS_SIZE, test_fraction: float = 0.2,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): the embedded digits as uint8 (N, S, S, 3), split
    stratified by class with a fixed seed (the held-out part is never used for training)."""
    from sklearn.model_selection import train_test_split

    from ldm.data.embedded import digits_arrays

    images, labels = digits_arrays(image_size)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                                              stratify=labels)
    return tr_x, tr_y, te_x, te_y


def save_digits_classifier(model: DigitsClassifier, path: str | os.PathLike, **info: str) -> Path:
    """safetensors file with one metadata entry, "config": JSON {"model": constructor kwargs, **info} (a single key
    keeps the file byte-identical between runs; safetensors does not order several keys)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps({"model": model.config, **info}, sort_keys=True)})
    return path


def load_digits_classifier(path: str | os.PathLike | None = None,
                           device: torch.device | str = "cpu") -> DigitsClassifier:
    """The committed classifier (or the file at `path`) in eval mode; FileNotFoundError says how to make one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"digits classifier weights {str(file)!r} not found; recreate them with "
                                f"`python -m ldm.tools.train_digits_classifier --out {file}`")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{str(file)!r} has no 'config' metadata: not written by save_digits_classifier")
    model = DigitsClassifier(**json.loads(meta["config"])["model"])
    model.load_state_dict(load_file(str(file)), strict=True)
    return model.eval().requires_grad_(False).to(device)
