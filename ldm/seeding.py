"""Derived seeds and per-index generators (STYLE.md §5).

Seeds are hashed from their parts, never added: seed + rank would make (seed, rank 1) collide with (seed + 1, rank 0).
Per-sample randomness comes from one torch.Generator per global sample index (edm2's StackedRandomGenerator idea), so
sample i is the same for any batch size or process count.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers or strings, by hashing."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def index_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per global sample index, seeded by hash(seed, "sample", index)."""
    return [torch.Generator(device=device).manual_seed(derive_seed(seed, "sample", int(i))) for i in indices]
