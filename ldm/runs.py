"""Run directories and the checkpoint format, read side: resolution, loading, strict state loading, the run logger.

    runs/<name>/config.yaml          the resolved config of the run
    runs/<name>/train.log            the 'ldm' logger's file (rank 0)
    runs/<name>/latest               text file: "checkpoints/step_0000100"
    runs/<name>/checkpoints/step_0000100/
        model.safetensors   the Task's full state_dict (generator/tokenizer, discriminator, projector, ...)
        ema.safetensors     EMA weights of Task.ema_module() (absent when EMA is off)
        state.pt            {format_version, step, data_position, optimizers, schedulers, scaler, rng (one entry per
                            process), config, task, git_sha} -- plain tensors and containers (weights_only=True)

`ldm.train.checkpoint` is the only writer; everything that reads a run (sampling, export, the pipeline, resume) reads
it through this module.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

FORMAT_VERSION = 1
STEP_DIR = "step_{:07d}"
LOG_FORMAT = "[%(asctime)s] %(message)s"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points at, or None when the run has none."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    target = Path(run_dir) / pointer.read_text().strip()
    if not (target / "state.pt").is_file() or not (target / "model.safetensors").is_file():
        raise FileNotFoundError(f"{pointer} points at {target}, which is not a complete checkpoint (missing "
                                f"state.pt or model.safetensors); remove {pointer} to start over or restore the folder")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (-> its latest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint directory (with state.pt) nor a run directory "
                                f"with a 'latest' checkpoint")
    return found


def load_checkpoint(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{model, ema (or None), state} from a checkpoint directory; torch.load with weights_only=True."""
    ckpt_dir = Path(ckpt_dir)
    state = torch.load(ckpt_dir / "state.pt", map_location=map_location, weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: checkpoint format {state.get('format_version')} is not supported "
                         f"(this version reads format {FORMAT_VERSION})")
    ema_path = ckpt_dir / "ema.safetensors"
    return {"model": load_file(str(ckpt_dir / "model.safetensors"), device=str(map_location)),
            "ema": load_file(str(ema_path), device=str(map_location)) if ema_path.is_file() else None,
            "state": state}


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that lists the missing and unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: state dict does not match the model; missing keys {result.missing_keys[:10]}"
                         f"{'...' if len(result.missing_keys) > 10 else ''}, unexpected keys "
                         f"{result.unexpected_keys[:10]}{'...' if len(result.unexpected_keys) > 10 else ''}")


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Configure the 'ldm' logger: INFO to stdout and <run_dir>/train.log on the main process, errors elsewhere."""
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
