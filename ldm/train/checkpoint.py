"""The checkpoint writer (the only code that writes checkpoints; `ldm.runs` documents the format and reads it).

A checkpoint is written into `checkpoints/.tmp-step_...`, every file fsynced, then renamed into place (an atomic
operation on POSIX file systems) and only then is `latest` replaced (write tmp + fsync + os.replace). A process
killed at any moment leaves either the old or the new checkpoint behind `latest`, never half of one; stale `.tmp-*`
folders are removed at the next save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ldm.io import atomic_write_text, fsync_path, git_sha, save_tensors
from ldm.runs import FORMAT_VERSION, STEP_DIR


def save_checkpoint(run_dir: Path, step: int, *, model_state: dict, ema_state: dict | None, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoints/step_<7-digit step> atomically, point `latest` at it, prune to the newest `keep_last`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / STEP_DIR.format(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_tensors(tmp / "model.safetensors", model_state)
    if ema_state is not None:
        save_tensors(tmp / "ema.safetensors", ema_state)
    torch.save({"format_version": FORMAT_VERSION, "git_sha": git_sha(), **state}, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_path(tmp)
    if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(ckpt_root)
    atomic_write_text(Path(run_dir) / "latest", f"checkpoints/{final.name}\n")
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final
