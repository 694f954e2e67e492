"""The latent contract: per-channel latent mean/std, the SD-style scalar scaling factor, and the normaliser built
from them.

Stage 2 normalises latents either per channel, (z - mean_c) / std_c (LightningDiT's latent_stats), or by one scalar,
z * scaling_factor with scaling_factor = 1 / std(all latent values) (LDM §4.3.2 / ldm/models/diffusion/ddpm.py
`scale_by_std`: `1. / z.flatten().std()`, which gave SD-VAE's 0.18215). Both are estimated here in one pass, with
float64 running sums, and written as JSON beside the tokenizer (`latent_stats.json`) together with the fingerprint of
the weights they describe. Standard deviations are Bessel-corrected like torch.std.

One source: the generator's `LatentNormalizer` takes its numbers from the tokenizer (diffusion.scaling_factor when
given, else the tokenizer's latent_stats.json / its diffusers scaling_factor, else the same estimator run once over
the training images when they are at hand), never from the latent cache's own record (ldm/data/latents.py). The
normaliser's buffers are stored in every generator checkpoint, so sampling uses exactly the training numbers.
`LatentStats` and `RunningMoments` live in ldm/data/latents.py (one layer down, the cache records them too) and are
re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ldm.data.latents import LatentStats, RunningMoments

log = logging.getLogger(__name__)

STATS_FILE = "latent_stats.json"
LATENT_NORMS = ("channel", "scalar", "none")


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
                            device: str | torch.device | None = None, write: bool = True,
                            progress: bool = False) -> tuple[LatentStats, Path]:
    """`ldm tokenizer-stats`: statistics of the tokenizer at `path` (run dir, checkpoint, export or diffusers folder)
    over the first `num_images` images of `data_cfg` (centre crops, no flips), written to latent_stats.json beside it
    (the run directory for runs and checkpoints); `progress` draws a bar of the images encoded. Returns (stats, json
    path)."""
    import dataclasses

    from tqdm.auto import tqdm

    from ldm.data.images import build_dataset
    from ldm.tokenizers.export import is_run_or_checkpoint, load_tokenizer

    tok = load_tokenizer(path, device=device)
    dev = next(tok.parameters()).device
    data = build_dataset(dataclasses.replace(data_cfg, crop="center" if data_cfg.crop == "random" else data_cfg.crop,
                                             hflip=False))
    n = min(num_images, len(data))

    def batches(bar):
        for s in range(0, n, batch_size):
            x = torch.stack([data[(i, 0)]["image"] for i in range(s, min(n, s + batch_size))]).to(dev)
            yield x
            bar.update(len(x))  # resumed once the batch is encoded

    with tqdm(total=n, desc="latent statistics", unit="img", disable=not progress) as bar:
        stats = compute_latent_stats(tok.encode, batches(bar), num_images=n, channels=tok.latent_channels,
                                     fingerprint=tok.fingerprint)
    path = Path(path)
    if is_run_or_checkpoint(path):
        from ldm.runs import resolve_checkpoint

        path = resolve_checkpoint(path).parent.parent
    out = path / STATS_FILE
    if write:
        save_latent_stats(stats, out)
    return stats, out


# ------------------------------------------------------------------------------------------------------ normaliser
class LatentNormalizer(nn.Module):
    """z_norm = (z - mean) / std per channel ("channel"), z * scale ("scalar"), or z ("none").

    The statistics are buffers, so they travel in the state_dict of whatever module holds the normaliser (the
    generator task's checkpoints) and follow `.to(device)`."""

    KINDS = LATENT_NORMS

    def __init__(self, kind: str, channels: int, mean=None, std=None, scale: float | None = None):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"diffusion.latent_norm={kind!r}; expected one of {list(self.KINDS)}")
        self.kind = kind
        mean = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ValueError(f"latent statistics have shapes {tuple(mean.shape)}/{tuple(std.shape)}; expected "
                             f"({channels},) for a {channels}-channel tokenizer")
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())
        self.register_buffer("scale", torch.tensor(1.0 if scale is None else float(scale)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "channel":
            return (z - self.mean) / self.std
        return z * self.scale if self.kind == "scalar" else z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "channel":
            return z * self.std + self.mean
        return z / self.scale if self.kind == "scalar" else z


def normalizer_for(tokenizer, *, kind: str, scaling_factor: float | None = None,
                   images: Iterable[torch.Tensor] | None = None, num_images: int = 1024) -> LatentNormalizer:
    """The normaliser of `kind` for a frozen `tokenizer` (ldm.tokenizers.export.Tokenizer).

    Numbers from, in order: `scaling_factor` (kind "scalar"), the tokenizer's own (its latent_stats.json, or for
    "scalar" its diffusers scaling_factor), or `compute_latent_stats` over the first `num_images` of `images`
    (batches (B, 3, H, W) in [-1, 1]). ValueError when none of them is available.
    """
    c = tokenizer.latent_channels
    if kind == "none":
        return LatentNormalizer("none", c)
    stats = tokenizer.stats
    if kind == "scalar" and (scaling_factor or tokenizer.scaling_factor):
        return LatentNormalizer("scalar", c, scale=scaling_factor or tokenizer.scaling_factor)
    if stats is None:
        if images is None:
            raise ValueError(f"diffusion.latent_norm={kind} needs latent statistics, and tokenizer "
                             f"{tokenizer.source!r} has none stored; run `ldm tokenizer-stats` or give "
                             f"diffusion.scaling_factor")
        stats = compute_latent_stats(tokenizer.encode, images, num_images=num_images, channels=c,
                                     fingerprint=tokenizer.fingerprint)
        log.info("latent statistics computed over %d images: mean %s std %s", stats.num_images,
                 [round(v, 4) for v in stats.mean], [round(v, 4) for v in stats.std])
    if kind == "scalar":
        if not (math.isfinite(stats.scaling_factor) and stats.scaling_factor > 0):
            raise ValueError(f"tokenizer {tokenizer.source!r}: its latents are constant over the statistics images "
                             f"(scaling factor {stats.scaling_factor}); train the tokenizer longer or set "
                             f"diffusion.latent_norm=none")
        return LatentNormalizer("scalar", c, scale=stats.scaling_factor)
    # a constant channel (e.g. an FSQ level never left, a dead KL channel) would divide by zero: NaN at step 0
    flat = [i for i, s in enumerate(stats.std) if not (math.isfinite(s) and s > 0)]
    if flat:
        raise ValueError(f"tokenizer {tokenizer.source!r}: latent channel(s) {flat} are constant over the statistics "
                         f"images (std 0), so diffusion.latent_norm=channel would divide by zero; train the tokenizer "
                         f"longer, or set diffusion.latent_norm=scalar")
    return LatentNormalizer("channel", c, mean=stats.mean, std=stats.std)
