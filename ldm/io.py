"""The ground floor for files: atomic writes with fsync, safetensors tensor files, the git sha, PNG image grids.

Everything above writes through these helpers, so a process killed at any moment leaves either the old file or the
new one, never half of one (write to a temporary name in the same folder, fsync, os.replace, fsync the folder).
Nothing here imports from the rest of ldm.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file


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


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (checkpoint files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(_plain_tensors(state), str(path), metadata=metadata)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------------ image grids
def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (3, H', W') in [0, 1] with `nrow` images per row."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(images.detach().float().cpu().add(1).div(2).clamp(0, 1), nrow=nrow, padding=padding,
                        pad_value=1.0)


def save_image_grid(grid: torch.Tensor, path: Path) -> None:
    """(3, H, W) float in [0, 1] -> PNG."""
    arr = (grid.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
