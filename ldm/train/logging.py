"""Rank-0 metrics: TensorBoard scalars and images, metrics.jsonl (the run logger itself is ldm.runs.setup_logging)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
