"""Batched, sharded feature extraction: run an Extractor over this process's image batches, gather all processes'
rows and order them by global image index, so 1 or N processes (accelerate launch / torchrun) give the same arrays.

Batches are (uint8 NHWC numpy array, int64 global indices) pairs of one process's shard, as
`ldm.data.images.iter_uint8_batches` yields them. Decoding runs in a background thread one batch ahead of the
network. Gathering pads every process's rows to the largest count, all-gathers them with torch.distributed (NCCL on
GPUs, gloo on CPU) and drops the padding; every process receives the full, index-ordered result.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prefetch(iterator: Iterable, depth: int = 2) -> Iterator:
    """Iterate `iterator` in a daemon thread, `depth` items ahead; exceptions are re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(err)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def to_nchw(batch: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC (numpy or tensor) -> uint8 NCHW tensor on `device`; NCHW tensors pass through."""
    x = torch.as_tensor(batch)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 image batch (B, H, W, C); got {tuple(x.shape)} {x.dtype}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x.to(device, non_blocking=True).contiguous()


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every process's (n_r, ...) tensor (n_r may differ) in rank order."""
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu()


def gather_by_index(arrays: dict[str, np.ndarray], indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All-gather per-process rows and sort them by global index; checks that no index appears twice."""
    rank, world = dist_info()
    if world > 1:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        indices = _gather_rows(torch.from_numpy(indices), device).numpy()
        arrays = {k: _gather_rows(torch.from_numpy(v), device).numpy() for k, v in arrays.items()}
    order = np.argsort(indices, kind="stable")
    indices = indices[order]
    if len(indices) > 1 and (np.diff(indices) == 0).any():
        raise ValueError("the same image index was processed twice: the shards overlap (check rank/world_size)")
    return {k: v[order] for k, v in arrays.items()}, indices


@torch.inference_mode()
def extract_features(batches: Iterable[tuple[np.ndarray, np.ndarray]], extractor: torch.nn.Module,
                     outputs: tuple[str, ...] = ("features",), *, device: torch.device | str | None = None,
                     total: int | None = None, progress: bool = True,
                     desc: str = "features") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run `extractor` over this process's (images, indices) batches; return ({output: (N, D) float32}, indices) for
    ALL processes' images, ordered by index."""
    device = torch.device(device) if device is not None else next(extractor.parameters()).device
    rank, _ = dist_info()
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    seen: list[np.ndarray] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress or rank != 0)
    for images, idx in prefetch(batches):
        idx = np.asarray(idx, dtype=np.int64)
        out = extractor(to_nchw(images, device), outputs=outputs)
        for k in outputs:
            chunks[k].append(out[k].float().cpu().numpy())
        seen.append(idx)
        bar.update(len(idx))
    bar.close()
    if not seen:  # an empty shard still needs the feature widths for the all-gather
        probe = extractor(torch.zeros((1, 3, 64, 64), dtype=torch.uint8, device=device), outputs=outputs)
        local = {k: np.zeros((0, probe[k].shape[1]), np.float32) for k in outputs}
        local_idx = np.zeros((0,), np.int64)
    else:
        local = {k: np.concatenate(v) for k, v in chunks.items()}
        local_idx = np.concatenate(seen)
    return gather_by_index(local, local_idx)
