"""Rank-0 logging: stdlib logger (stdout + <run>/train.log), TensorBoard scalars and images, metrics.jsonl."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LOG_FORMAT = "[%(asctime)s] %(message)s"


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Configure the 'ldm' logger: INFO to stdout and train.log on the main process, errors only elsewhere."""
    logger = logging.getLogger("ldm")
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_ldm", False):
            logger.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        h._ldm = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return logger


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    """(3, H, W) float in [0, 1] -> PNG."""
    arr = (grid.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (3, H', W') in [0, 1] with `nrow` images per row."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(images.detach().float().cpu().add(1).div(2).clamp(0, 1), nrow=nrow, padding=padding,
                        pad_value=1.0)


class MetricsWriter:
    """TensorBoard + metrics.jsonl on the main process; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float], jsonl: bool = True) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        if jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        if self.enabled:
            self.tb.add_image(tag, grid.clamp(0, 1), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
