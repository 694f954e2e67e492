"""The latent contract: per-channel latent mean/std and the SD-style scalar scaling factor.

Stage 2 normalises latents either per channel, (z - mean_c) / std_c (LightningDiT's latent_stats), or by one scalar,
z * scaling_factor with scaling_factor = 1 / std(all latent values) (LDM §4.3.2 / ldm/models/diffusion/ddpm.py
`scale_by_std`: `1. / z.flatten().std()`, which gave SD-VAE's 0.18215). Both are estimated here in one pass, with
float64 running sums, and written as JSON beside the tokenizer (`latent_stats.json`) together with the fingerprint of
the weights they describe. Standard deviations are Bessel-corrected like torch.std.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

STATS_FILE = "latent_stats.json"


@dataclass
class LatentStats:
    mean: list[float]          # per channel, (C,)
    std: list[float]           # per channel, (C,)
    scaling_factor: float      # 1 / std over every latent value
    num_images: int
    fingerprint: str = ""      # tokenizer weights these statistics belong to
    sample_posterior: bool = False

    def mean_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.mean, device=device).view(1, -1, 1, 1)

    def std_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.std, device=device).view(1, -1, 1, 1)


class RunningMoments:
    """Float64 sums of z and z^2 per channel (and over everything) for (B, C, h, w) latents."""

    def __init__(self, channels: int):
        self.n = 0  # values per channel
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to("cpu", torch.float64).transpose(0, 1).flatten(1)  # (C, B*h*w)
        self.n += z.shape[1]
        self.s1 += z.sum(1)
        self.s2 += z.square().sum(1)

    def merge(self, other: "RunningMoments") -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2

    def result(self, num_images: int, fingerprint: str = "", sample_posterior: bool = False) -> LatentStats:
        if self.n < 2:
            raise ValueError("latent statistics need at least two latent values per channel")
        mean = self.s1 / self.n
        var = (self.s2 - self.n * mean.square()) / (self.n - 1)
        total = self.n * len(self.s1)
        mean_all = self.s1.sum() / total
        var_all = (self.s2.sum() - total * mean_all ** 2) / (total - 1)
        return LatentStats(mean=mean.tolist(), std=var.clamp_min(0).sqrt().tolist(),
                           scaling_factor=float(1.0 / math.sqrt(max(float(var_all), 1e-30))), num_images=num_images,
                           fingerprint=fingerprint, sample_posterior=sample_posterior)


@torch.no_grad()
def compute_latent_stats(encode: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor], *,
                         num_images: int, channels: int, fingerprint: str = "",
                         sample_posterior: bool = False) -> LatentStats:
    """Encode up to `num_images` images (batches (B, 3, H, W) in [-1, 1]) and return their latent statistics.

    Under torch.distributed each process encodes its own shard; the sums are all-reduced so every process gets the
    statistics of all of them (`num_images` then counts images over all processes).
    """
    import torch.distributed as dist

    moments, seen = RunningMoments(channels), 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per_rank = math.ceil(num_images / world)
    for batch in images:
        if seen >= per_rank:
            break
        batch = batch[: per_rank - seen]
        moments.update(encode(batch))
        seen += batch.shape[0]
    if seen == 0:
        raise ValueError("no images were given to compute latent statistics")
    if world > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        packed = torch.cat([torch.tensor([moments.n, seen], dtype=torch.float64), moments.s1, moments.s2]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        c = len(moments.s1)
        moments.n, seen = int(packed[0]), int(packed[1])
        moments.s1, moments.s2 = packed[2:2 + c], packed[2 + c:]
    return moments.result(seen, fingerprint, sample_posterior)


def save_latent_stats(stats: LatentStats, path: str | Path) -> Path:
    """Write the JSON atomically (a directory gets `latent_stats.json`)."""
    from ldm.io import atomic_write_text

    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    atomic_write_text(path, json.dumps(asdict(stats), indent=2) + "\n")
    return path


def load_latent_stats(path: str | Path) -> LatentStats:
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no latent statistics at {str(path)!r}; compute them with `ldm tokenizer-stats`")
    data = json.loads(path.read_text())
    missing = [k for k in ("mean", "std", "scaling_factor", "num_images") if k not in data]
    if missing:
        raise ValueError(f"{str(path)!r} is not a latent statistics file: missing keys {missing}")
    known = set(LatentStats.__dataclass_fields__)
    return LatentStats(**{k: v for k, v in data.items() if k in known})


def compute_tokenizer_stats(path: str | Path, data_cfg, *, num_images: int, batch_size: int = 64,
                            device: str | torch.device | None = None, write: bool = True) -> tuple[LatentStats, Path]:
    """`ldm tokenizer-stats`: statistics of the tokenizer at `path` (run dir, checkpoint, export or diffusers folder)
    over the first `num_images` images of `data_cfg` (centre crops, no flips), written to latent_stats.json beside it
    (the run directory for runs and checkpoints). Returns (stats, json path)."""
    import dataclasses

    from ldm.data.images import build_dataset
    from ldm.tokenizers.export import is_run_or_checkpoint, load_tokenizer

    tok = load_tokenizer(path, device=device)
    dev = next(tok.parameters()).device
    data = build_dataset(dataclasses.replace(data_cfg, crop="center" if data_cfg.crop == "random" else data_cfg.crop,
                                             hflip=False))
    n = min(num_images, len(data))
    batches = (torch.stack([data[(i, 0)]["image"] for i in range(s, min(n, s + batch_size))]).to(dev)
               for s in range(0, n, batch_size))
    stats = compute_latent_stats(tok.encode, batches, num_images=n, channels=tok.latent_channels,
                                 fingerprint=tok.fingerprint)
    path = Path(path)
    if is_run_or_checkpoint(path):
        from ldm.runs import resolve_checkpoint

        path = resolve_checkpoint(path).parent.parent
    out = path / STATS_FILE
    if write:
        save_latent_stats(stats, out)
    return stats, out
