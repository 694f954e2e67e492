"""The on-disk checkpoint format (the only module that writes or reads it).

    runs/<name>/checkpoints/step_0000100/
        model.safetensors   the Task's full state_dict (generator/tokenizer, discriminator, projector, ...)
        ema.safetensors     EMA weights of Task.ema_module() (absent when EMA is off)
        state.pt            {format_version, step, data_position, optimizers, schedulers, scaler, rng (one entry per
                            process), config, git_sha} -- plain tensors and containers, loadable with weights_only=True
    runs/<name>/latest      text file: "checkpoints/step_0000100"

A checkpoint is written into `checkpoints/.tmp-step_...`, every file fsynced, then renamed into place (an atomic
operation on POSIX file systems) and only then is `latest` replaced (write tmp + fsync + os.replace). A process
killed at any moment leaves either the old or the new checkpoint behind `latest`, never half of one; stale `.tmp-*`
folders are removed at the next save.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STEP_DIR = "step_{:07d}"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights, views): store independent contiguous copies."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.device.type != "meta" else id(v)
        out[k] = v.detach().clone().contiguous() if ptr in seen or not v.is_contiguous() else v.detach()
        seen.add(ptr)
    return {k: v.cpu() for k, v in out.items()}


def save_tensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(_plain_tensors(state), str(path), metadata=metadata)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
