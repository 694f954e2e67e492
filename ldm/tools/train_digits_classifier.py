"""Train the digits classifier whose penultimate features define FD_digits (see ldm/encoders/digits.py).

    python -m ldm.tools.train_digits_classifier            # rewrites ldm/assets/digits_classifier.safetensors

Deterministic: fixed seeds, one CPU thread, torch deterministic algorithms, a fixed data order and augmentation drawn
from a seeded generator; the same torch build reproduces the file bit for bit. Takes about a minute on one core.
Augmentation (random rotation +-10 deg, scale 0.9-1.1, shift +-2 px) makes the features robust to how generated
digits differ from the bicubic-upsampled originals.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ldm.encoders.digits import (
    DEFAULT_WEIGHTS,
    DigitsClassifier,
    digits_split,
    preprocess_digits,
    save_digits_classifier,
)

logger = logging.getLogger(__name__)


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation / isotropic scale / shift of (B, 1, S, S) images (border value -1 = background)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * 2 / x.shape[-1])  # +-2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    x = preprocess_digits(torch.from_numpy(images).permute(0, 3, 1, 2))
    return float((model(x).argmax(1).numpy() == labels).mean())


def train(epochs: int = 30, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> tuple[DigitsClassifier, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tr_x, tr_y, te_x, te_y = digits_split()
    x = preprocess_digits(torch.from_numpy(tr_x).permute(0, 3, 1, 2))  # (N, 1, 32, 32)
    y = torch.from_numpy(tr_y)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(random_affine(x[idx], generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d loss %.4f", epoch + 1, total / len(x))
    model.eval()
    return model, accuracy(model, te_x, te_y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="output .safetensors (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    model, acc = train(epochs=args.epochs, seed=args.seed)
    path = save_digits_classifier(model, args.out, heldout_accuracy=f"{acc:.4f}", seed=str(args.seed),
                                  epochs=str(args.epochs), script="ldm/tools/train_digits_classifier.py")
    logger.info("held-out accuracy %.4f; wrote %s in %.0f s", acc, path, time.time() - start)


if __name__ == "__main__":
    main()
