"""The latent cache: a dataset encoded once by a frozen tokenizer into sharded, memory-mapped .npy files.

Layout of a cache directory (shard s holds items [s * shard_size, min((s + 1) * shard_size, count))):

    meta.json                 the plan (tokenizer fingerprint, latent shape, count, dtype, flips, data source and its
                              fingerprint, image size, crop, classes, shard size) and, once complete, the measured
                              statistics of the stored latents (a record; see Statistics below) and what happened to
                              unreadable images (see Bad files below)
    shard_00000.latents.npy   (n, C, h, w) float32 | float16: latents of the images
    shard_00000.flips.npy     (n, C, h, w) latents of the horizontally flipped images (with flips only)
    shard_00000.labels.npy    (n,) int64 class labels (0 when the source has none)
    shard_00000.json          written last, marks the shard finished; holds its float64 moments and its bad files

Encoding. KL tokenizers store the posterior *mean*; VQ tokenizers their quantised latents. The peers store one
posterior *sample* (fast-DiT extract_features.py: `vae.encode(x).latent_dist.sample().mul_(0.18215)` of a randomly
flipped image; LightningDiT extract_features.py with tokenizer/vavae.py `encode_images` -> `posterior.sample()`, once
unflipped and once with p_hflip=1.0). A sample drawn once and frozen in a file adds no augmentation across epochs,
only a fixed noise, and can never agree with encoding on the fly; the mean is deterministic, so the cache holds what
`Tokenizer.encode` returns for the same images (bit for bit in the same batch grouping; across batch sizes CPU/GPU
kernels may differ by float rounding, ~1e-7 here) and training from the cache or from images sees the same latents.
With `flips=True` the latent of the horizontally flipped image is stored too (LightningDiT's `latents_flip`), and
`LatentCacheDataset` picks one of the two per item from the item seed.

Writing is atomic per shard (every array goes to a temporary file that is fsynced and renamed; the shard's .json
marker comes last), shards are dealt round-robin to the processes of `accelerate launch` / `torchrun` (shard s goes
to rank s mod world), and a re-run skips finished shards, so a killed run continues where it stopped. A shard is
always encoded in the same batches whatever the number of processes, so 1 and N processes write identical files.

Bad files. With on_error=skip (the default, as in training) an unreadable image does not stop the cache: its item
holds the latent of the next good image in source order (`ImageDataset`'s rule), so `count` items are stored but
fewer distinct images were encoded. Each shard's marker records the unreadable files among its own items (every
item reads its own image first, so all of them are found while the shard is encoded) and how many of its items were
replaced; meta.json sums the shards: `bad_files`, `bad_file_names` (the first BAD_NAMES_KEPT, in source order) and
`replaced_items`. Counting per shard, not per process, makes the record the same for any number of processes and
for a run that was killed and resumed (a process's own masks only know what it read itself).

Statistics. The cache records the statistics of what it holds (meta.json `stats`, a `LatentStats`): a description
of the cache that `ldm cache-latents` prints and that can be checked against the tokenizer's. Training does NOT
normalise with them: the one source of the normalisation is the tokenizer's statistics (latent_stats.json beside
it, ldm/tokenizers/stats.py, tied to its weights by the fingerprint this cache also records), so a generator
trained from this cache and one trained on images encoded on the fly normalise identically. The cache's numbers
cover every stored latent (images and flips), as float64 sums per shard (`RunningMoments`) merged in shard order, so
they depend neither on the number of processes nor on a random subset (LightningDiT datasets/img_latent_dataset.py
`compute_latent_stats` takes torch.mean / torch.std over up to 10,000 random unflipped latents); std is
Bessel-corrected (torch.std) and the scaling factor is 1 / std of all values (LDM `scale_by_std`).

`LatentStats` and `RunningMoments` are defined here, at the bottom of the latent contract, because both the cache
(data) and the tokenizers (which write latent_stats.json, one layer up) record them; ldm/tokenizers/stats.py
re-exports them with the JSON file format and the normaliser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.sampler import split_key
from ldm.io import fsync_path
from ldm.precision import inference_autocast, resolve_inference_precision

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ statistics
@dataclass
class LatentStats:
    """Per-channel mean/std and the scalar scaling factor of a set of latents (the latent contract's numbers)."""

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

FORMAT_VERSION = 1
META_FILE = "meta.json"
BAD_NAMES_KEPT = 100  # names of unreadable files meta.json lists (the count covers all of them)
DTYPES = ("float32", "float16")
CACHE_CROPS = ("center", "resize")
# meta fields that define the cache's content: a re-run into the same directory must agree on all of them
PLAN_KEYS = ("format_version", "tokenizer_fingerprint", "latent_shape", "count", "dtype", "flips", "data_fingerprint",
             "image_size", "crop", "shard_size")


@dataclass
class CacheMeta:
    format_version: int
    tokenizer_fingerprint: str
    tokenizer_source: str
    tokenizer_kind: str
    tokenizer_scaling_factor: float | None  # the tokenizer's own scalar factor (e.g. SD-VAE 0.18215), if it has one
    latent_shape: list[int]                 # (C, h, w)
    count: int                              # items stored, replaced ones included (a flip is not counted apart)
    dtype: str
    flips: bool
    data_source: str
    data_fingerprint: str
    image_size: int
    crop: str
    num_classes: int                        # 0 when the source has no labels
    shard_size: int
    num_shards: int
    complete: bool = False
    stats: dict[str, Any] | None = None     # LatentStats fields of the stored latents, once complete (a record)
    # once complete (None: unknown, for shards written by an ldm that did not record them; see Bad files above)
    bad_files: int | None = None            # unreadable image files skipped
    bad_file_names: list[str] | None = None # the first BAD_NAMES_KEPT of them, in source order
    replaced_items: int | None = None       # items holding the next good image's latent instead of their own
    precision: str = "fp32"                 # the encoder's autocast precision, "fp32" | "bf16" (older caches: fp32)

    @property
    def latent_stats(self) -> LatentStats | None:
        """What the cache holds, measured; the generator normalises with the tokenizer's statistics instead."""
        return None if self.stats is None else LatentStats(**self.stats)

    @property
    def images_encoded(self) -> int | None:
        """Distinct images whose latents the cache holds (`count` minus the replaced items)."""
        return None if self.replaced_items is None else self.count - self.replaced_items

    def plan(self) -> dict[str, Any]:
        """PLAN_KEYS, and the precision when it is not fp32: a bf16 cache never takes an fp32 cache's shards (nor the
        reverse), while fp32 caches keep the plan id they had before the precision was recorded."""
        extra = {"precision": self.precision} if self.precision != "fp32" else {}
        return {**{k: getattr(self, k) for k in PLAN_KEYS}, **extra}

    def plan_id(self) -> str:
        return hashlib.sha256(json.dumps(self.plan(), sort_keys=True).encode()).hexdigest()[:16]

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.count)


# ------------------------------------------------------------------------------------------------------ files
def shard_files(cache_dir: Path, s: int, flips: bool) -> dict[str, Path]:
    names = ("latents", "flips", "labels") if flips else ("latents", "labels")
    return {name: cache_dir / f"shard_{s:05d}.{name}.npy" for name in names}


def _marker(cache_dir: Path, s: int) -> Path:
    return cache_dir / f"shard_{s:05d}.json"


def _expected_arrays(meta: CacheMeta, s: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    a, b = meta.shard_range(s)
    latent = ((b - a, *meta.latent_shape), np.dtype(meta.dtype))
    out = {"latents": latent, "labels": ((b - a,), np.dtype(np.int64))}
    if meta.flips:
        out["flips"] = latent
    return out


def _shard_problem(cache_dir: Path, meta: CacheMeta, s: int) -> str | None:
    """None when shard s is finished and its arrays have the planned shapes; else what is wrong with it."""
    marker = _marker(cache_dir, s)
    if not marker.is_file():
        return f"{marker.name} is missing"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return f"{marker.name} is unreadable ({err})"
    if info.get("plan_id") != meta.plan_id():
        return f"{marker.name} belongs to another cache plan"
    expected = _expected_arrays(meta, s)
    for name, path in shard_files(cache_dir, s, meta.flips).items():
        if not path.is_file():
            return f"{path.name} is missing"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            return f"{path.name} is unreadable ({err})"
        if (arr.shape, arr.dtype) != expected[name]:
            return f"{path.name} holds {arr.dtype} {arr.shape}, expected {expected[name][1]} {expected[name][0]}"
    return None


def _meta_from_json(path: Path) -> CacheMeta:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); delete the cache directory and re-run "
                         f"`ldm cache-latents`") from None
    fields = {f.name for f in dataclasses.fields(CacheMeta)}
    required = {f.name for f in dataclasses.fields(CacheMeta) if f.default is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{str(path)!r} is not a latent cache description: missing keys {missing}")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has cache format_version {data['format_version']}; this ldm reads version "
                         f"{FORMAT_VERSION}: re-run `ldm cache-latents` into a new directory")
    return CacheMeta(**{k: v for k, v in data.items() if k in fields})


def read_cache_meta(cache_dir: str | Path, *, check_shards: bool = True) -> CacheMeta:
    """The description of a complete cache. FileNotFoundError when there is none or a shard is missing/unfinished
    (the message names the shard); `check_shards=False` returns the plan of a cache still being written."""
    cache_dir = Path(cache_dir)
    path = cache_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no latent cache at {str(cache_dir)!r} ({META_FILE} not found); create one with "
                                f"`ldm cache-latents --tokenizer TOKENIZER --data DATA --out {cache_dir}`")
    meta = _meta_from_json(path)
    if not check_shards:
        return meta
    for s in range(meta.num_shards):
        problem = _shard_problem(cache_dir, meta, s)
        if problem is not None:
            a, b = meta.shard_range(s)
            raise FileNotFoundError(f"latent cache {str(cache_dir)!r} is incomplete: shard {s} of {meta.num_shards} "
                                    f"(items {a}..{b - 1}): {problem}. Re-run the same `ldm cache-latents` command "
                                    f"to finish it (finished shards are kept)")
    if not meta.complete or meta.stats is None:
        raise FileNotFoundError(f"latent cache {str(cache_dir)!r} has all shards but its {META_FILE} was not "
                                f"finalised (the run stopped before the statistics); re-run the same "
                                f"`ldm cache-latents` command")
    return meta


# ------------------------------------------------------------------------------------------------------ dataset
def check_fingerprint(cache: str, maker: str, cached: str, cached_source: str, expected: str | None,
                      fix: str) -> None:
    """The refusal of a cache made by another frozen network: ValueError when `expected` (the fingerprint of the
    `maker` in use, e.g. "tokenizer" or "text encoder"; None = unchecked) differs from `cached`, the one recorded by
    the cache described as `cache`; `fix` says how to make a matching cache. Used by the latent cache and the
    caption-embedding cache (ldm/data/captions.py)."""
    if expected is not None and expected != cached:
        raise ValueError(f"{cache} was encoded by {maker} {cached} ({cached_source}), but the {maker} in use is "
                         f"{expected}. What another {maker} encoded is meaningless to it: {fix}")


class LatentCacheDataset(torch.utils.data.Dataset):
    """Cached latents addressed like `ImageDataset`: items by (index, item_seed) -> {"latent": (C, h, w) float32,
    "label": long} (and "sample_seed" for the sampler's (index, item_seed, sample_seed) keys, as ImageDataset).

    With flips stored, item (i, seed) is the flipped latent iff `np.random.default_rng([seed, i]).random() < 0.5`:
    the very draw `ImageDataset` makes for `hflip` with crop center/resize, so the cache feeds training the same
    latents as encoding on the fly with data.hflip=true, and a resumed run sees the same ones.
    """

    def __init__(self, cache_dir: str | Path, *, expected_fingerprint: str | None, class_cond: bool = True,
                 use_flips: bool = True):
        self.cache_dir = Path(cache_dir)
        self.meta = read_cache_meta(self.cache_dir)
        check_fingerprint(f"latent cache {str(self.cache_dir)!r}", "tokenizer", self.meta.tokenizer_fingerprint,
                          self.meta.tokenizer_source, expected_fingerprint,
                          f"re-run `ldm cache-latents --tokenizer <this tokenizer> --data {self.meta.data_source} "
                          f"--out <new dir>` and point data.latents at that directory")
        self.use_flips = use_flips and self.meta.flips
        self.class_cond = class_cond and self.meta.num_classes > 0
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.meta.count

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes if self.class_cond else 0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta.latent_shape)

    def __getstate__(self) -> dict:  # DataLoader workers re-open the memory maps rather than pickling their data
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            self._shards[s] = {name: np.load(path, mmap_mode="r")
                               for name, path in shard_files(self.cache_dir, s, self.meta.flips).items()}
        return self._shards[s]

    def __getitem__(self, key: tuple[int, ...] | int) -> dict[str, torch.Tensor]:
        index, seed, extra = split_key(key)
        if not 0 <= index < self.meta.count:
            raise IndexError(f"latent cache index {index} out of range [0, {self.meta.count})")
        s, offset = divmod(index, self.meta.shard_size)
        arrays = self._shard(s)
        flip = self.use_flips and np.random.default_rng([seed, index]).random() < 0.5
        latent = torch.from_numpy(np.array(arrays["flips" if flip else "latents"][offset], dtype=np.float32))
        label = int(arrays["labels"][offset]) if self.class_cond else 0
        return {"latent": latent, "label": torch.tensor(label, dtype=torch.long), **extra}


# ------------------------------------------------------------------------------------------------------ writing
class _ShardWriter:
    """Fills the arrays of one shard in temporary .npy memory maps; `commit` makes them final and writes the marker."""

    def __init__(self, cache_dir: Path, meta: CacheMeta, s: int):
        self.cache_dir, self.meta, self.s = cache_dir, meta, s
        for stale in cache_dir.glob(f".shard_{s:05d}.*.tmp-*"):  # left by a killed run that owned this shard
            stale.unlink()
        self.final = shard_files(cache_dir, s, meta.flips)
        self.tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in self.final.items()}
        expected = _expected_arrays(meta, s)
        self.arrays = {k: np.lib.format.open_memmap(self.tmp[k], mode="w+", dtype=expected[k][1], shape=expected[k][0])
                       for k in self.final}
        self.n = expected["labels"][0][0]

    def put(self, offset: int, latents: torch.Tensor, flips: torch.Tensor | None, labels: torch.Tensor) -> None:
        rows = slice(offset, offset + latents.shape[0])
        for name, z in (("latents", latents), ("flips", flips)):
            if z is None:
                continue
            stored = z.detach().cpu().numpy().astype(self.meta.dtype)
            if not np.isfinite(stored).all():
                first = self.meta.shard_range(self.s)[0] + offset
                hint = " (float16 overflows above 65504: use --dtype float32)" if self.meta.dtype == "float16" else ""
                raise ValueError(f"non-finite {name} in shard {self.s} for items {first}..{first + len(stored) - 1}: "
                                 f"the tokenizer produced inf/nan or values that do not fit {self.meta.dtype}{hint}")
            self.arrays[name][rows] = stored
        self.arrays["labels"][rows] = labels.cpu().numpy().astype(np.int64)

    def commit(self, skips: dict[str, Any]) -> None:
        """Make the arrays final, then write the marker with the shard's moments and `skips` (its bad files)."""
        from ldm.io import atomic_write_text

        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        for name, tmp in self.tmp.items():
            fsync_path(tmp)
            os.replace(tmp, self.final[name])
        fsync_path(self.cache_dir)
        moments = RunningMoments(self.meta.latent_shape[0])
        for name in ("latents", "flips") if self.meta.flips else ("latents",):
            stored = np.load(self.final[name], mmap_mode="r")
            for a in range(0, len(stored), 1024):  # fixed chunks: the sums depend only on the shard's content
                moments.update(torch.from_numpy(np.array(stored[a:a + 1024], dtype=np.float64)))
        info = {"shard": self.s, "range": list(self.meta.shard_range(self.s)), "plan_id": self.meta.plan_id(),
                "moments": {"n": moments.n, "s1": moments.s1.tolist(), "s2": moments.s2.tolist()}, "skips": skips}
        atomic_write_text(_marker(self.cache_dir, self.s), json.dumps(info) + "\n")


def _merged_stats(cache_dir: Path, meta: CacheMeta) -> LatentStats:
    """Per-shard float64 moments summed in shard order (independent of how shards were dealt to processes)."""
    total = RunningMoments(meta.latent_shape[0])
    for s in range(meta.num_shards):
        m = json.loads(_marker(cache_dir, s).read_text())["moments"]
        part = RunningMoments(meta.latent_shape[0])
        part.n = m["n"]
        part.s1, part.s2 = (torch.tensor(m[k], dtype=torch.float64) for k in ("s1", "s2"))
        total.merge(part)
    return total.result(meta.count, meta.tokenizer_fingerprint)


def _data_settings(data, image_size: int | None, crop: str | None, on_error: str | None):
    """A DataCfg for the cache: `data` itself (a DataCfg) or a source spec with DataCfg's defaults, plus overrides."""
    from ldm.config import DataCfg

    cfg = data if isinstance(data, DataCfg) else DataCfg(source=str(data))
    overrides = {k: v for k, v in (("image_size", image_size), ("crop", crop), ("on_error", on_error)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.crop not in CACHE_CROPS:
        raise ValueError(f"crop={cfg.crop!r} cannot be cached (a cache stores one fixed view per image); expected one "
                         f"of {list(CACHE_CROPS)}")
    return cfg


def _plan(tokenizer, d, *, flips: bool, dtype: str, shard_size: int):
    """(CacheMeta without statistics, the ImageDataset to encode) for DataCfg `d`."""
    from ldm.data.images import ImageDataset
    from ldm.data.sources import open_source

    f = tokenizer.downsample
    if d.image_size < 1 or d.image_size % f:
        raise ValueError(f"image_size={d.image_size} is not divisible by the tokenizer's downsampling factor {f}; "
                         f"choose a multiple of {f}")
    source = open_source(d.source, d.image_size)
    dataset = ImageDataset(source, d.image_size, crop=d.crop, hflip=False, on_error=d.on_error, min_size=d.min_size,
                           class_cond=True)
    count = len(dataset)
    meta = CacheMeta(format_version=FORMAT_VERSION, tokenizer_fingerprint=tokenizer.fingerprint,
                     tokenizer_source=str(tokenizer.source), tokenizer_kind=tokenizer.kind,
                     tokenizer_scaling_factor=tokenizer.scaling_factor,
                     latent_shape=[tokenizer.latent_channels, d.image_size // f, d.image_size // f], count=count,
                     dtype=dtype, flips=bool(flips), data_source=d.source, data_fingerprint=source.fingerprint(),
                     image_size=d.image_size, crop=d.crop, num_classes=dataset.num_classes, shard_size=shard_size,
                     num_shards=math.ceil(count / shard_size))
    return meta, dataset


def _refuse_other_plan(out_dir: Path, meta: CacheMeta) -> None:
    """ValueError when `out_dir` already holds a cache of another plan (read-only: every process checks, so a refusal
    never leaves one waiting)."""
    if (out_dir / META_FILE).is_file():
        old = read_cache_meta(out_dir, check_shards=False)
        diff = [f"{k}: cached {getattr(old, k)!r}, now {getattr(meta, k)!r}" for k in (*PLAN_KEYS, "precision")
                if getattr(old, k) != getattr(meta, k)]
        if diff:
            raise ValueError(f"{str(out_dir)!r} already holds a different latent cache ({'; '.join(diff)}); choose "
                             f"another --out directory or delete this one")


def _encode_shards(tokenizer, dataset, meta: CacheMeta, out_dir: Path, shards: list[int], *, batch_size: int,
                   num_workers: int, device, progress: bool, desc: str) -> None:
    """Encode and commit `shards`, each in batches that never cross a shard boundary and depend only on the shard,
    so any world size writes the same bytes."""
    from tqdm.auto import tqdm

    plan = [(s, o, a + o, min(a + o + batch_size, b))  # (shard, offset in it, first item, end item)
            for s in shards for a, b in [meta.shard_range(s)] for o in range(0, b - a, batch_size)]
    keys = ([(i, 0) for i in range(first, end)] for _, _, first, end in plan)  # (index, item_seed): no randomness
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=num_workers)
    bar = tqdm(total=sum(end - first for _, _, first, end in plan), unit="img", dynamic_ncols=True, desc=desc,
               disable=not progress)
    writer = None
    for (s, offset, first, end), batch in zip(plan, loader):
        if writer is None:
            writer = _ShardWriter(out_dir, meta, s)
        x = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
        with inference_autocast(meta.precision, x.device.type):
            z = tokenizer.encode(x)  # (B, C, h, w), fp32 (Tokenizer.encode casts its output)
        if tuple(z.shape[1:]) != tuple(meta.latent_shape):
            raise ValueError(f"tokenizer {meta.tokenizer_source} returned latents of shape {tuple(z.shape[1:])}, "
                             f"expected {tuple(meta.latent_shape)} for {meta.image_size} px images")
        with inference_autocast(meta.precision, x.device.type):
            z_flip = tokenizer.encode(torch.flip(x, dims=[-1])) if meta.flips else None
        writer.put(offset, z, z_flip, batch["label"])
        bar.update(end - first)
        if offset + end - first == writer.n:
            writer.commit(_shard_skips(dataset, *meta.shard_range(s)))
            writer = None
    bar.close()


def _shard_skips(dataset, first: int, end: int) -> dict[str, Any]:
    """The unreadable images among items [first, end) (source indices) and how many of these items were replaced.
    A cache has one item per image (no random crops), so item i reads image i first: once the shard's batches are
    encoded, every bad file of the range is in the dataset's `bad_mask`, whoever else read it."""
    bad = torch.nonzero(dataset.bad_mask[first:end]).flatten() + first
    return {"bad": bad.tolist(), "replaced": int(dataset.replaced_mask[first:end].sum())}


def _record_skips(out_dir: Path, meta: CacheMeta, names: list[str]) -> None:
    """Sum the shards' bad files and replaced items into `meta` (left None when a shard's marker predates them)."""
    skips = [json.loads(_marker(out_dir, s).read_text()).get("skips") for s in range(meta.num_shards)]
    if any(k is None for k in skips):
        return
    bad = [i for k in skips for i in k["bad"]]  # shards are disjoint and in order: source order, no duplicates
    meta.bad_files, meta.bad_file_names = len(bad), [names[i] for i in bad[:BAD_NAMES_KEPT]]
    meta.replaced_items = sum(k["replaced"] for k in skips)


def _finalise(out_dir: Path, meta: CacheMeta, names: list[str]) -> None:
    """Rank 0, after every shard is written: check them all, record the merged statistics and the bad files (`names`:
    the source's file names), mark meta.json complete."""
    from ldm.io import atomic_write_text

    for s in range(meta.num_shards):
        problem = _shard_problem(out_dir, meta, s)
        if problem is not None:
            raise RuntimeError(f"shard {s} of {out_dir} is not finished after encoding: {problem}")
    meta.stats = dataclasses.asdict(_merged_stats(out_dir, meta))
    _record_skips(out_dir, meta, names)
    meta.complete = True
    atomic_write_text(out_dir / META_FILE, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")


def build_latent_cache(tokenizer, data, out_dir: str | Path, *, image_size: int | None = None,
                       crop: str | None = None, flips: bool | None = None, batch_size: int = 64,
                       shard_size: int = 4096, dtype: str = "float32", num_workers: int | None = None,
                       on_error: str | None = None, precision: str = "auto", progress: bool = True) -> CacheMeta:
    """Encode `data` with the frozen `tokenizer` (`ldm.tokenizers.export.Tokenizer`) into a cache at `out_dir`.

    `data` is a `DataCfg` (source, image_size, crop, on_error, min_size, num_workers and hflip -> `flips` are taken
    from it) or a source spec (any `ldm.data.sources.open_source` takes) with DataCfg's defaults; keyword arguments that
    are not None override. Call it from every process of a distributed launch: each encodes its own shards (s mod
    world == rank), then rank 0 merges the statistics and the shards' bad-file records and finalises meta.json.
    `precision` ("auto" | "fp32" | "bf16", ldm.precision.resolve_inference_precision) is the encoder's autocast
    precision, recorded in meta.json and part of the plan: a cache is never finished in another precision than it
    was begun in. Returns the complete `CacheMeta`.
    """
    from accelerate import PartialState

    from ldm.io import atomic_write_text

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    d = _data_settings(data, image_size, crop, on_error)
    meta, dataset = _plan(tokenizer, d, flips=d.hflip if flips is None else flips, dtype=dtype, shard_size=shard_size)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"  # PartialState's device below
    meta.precision, why = resolve_inference_precision(precision, device_type, "precision")
    out_dir = Path(out_dir)
    _refuse_other_plan(out_dir, meta)
    # debug: the command's closing summary states the precision; stderr stays free for a one-line error
    log.debug("encoding precision %s (%s)", meta.precision, why)

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if state.is_main_process and not (out_dir / META_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / META_FILE, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
    state.wait_for_everyone()

    mine = [s for s in range(rank, meta.num_shards, world) if _shard_problem(out_dir, meta, s) is not None]
    skipped = len(range(rank, meta.num_shards, world)) - len(mine)
    if skipped:
        log.info("rank %d: %d finished shard(s) kept, %d to encode", rank, skipped, len(mine))
    tokenizer.to(state.device)
    _encode_shards(tokenizer, dataset, meta, out_dir, mine, batch_size=batch_size, device=state.device,
                   num_workers=d.num_workers if num_workers is None else num_workers,
                   progress=progress and state.is_main_process,
                   desc=f"cache-latents{f' rank {rank}/{world}' if world > 1 else ''}")
    state.wait_for_everyone()
    if state.is_main_process:
        _finalise(out_dir, meta, dataset.source.names)
    state.wait_for_everyone()
    return read_cache_meta(out_dir)


__all__ = ["CacheMeta", "LatentCacheDataset", "LatentStats", "RunningMoments", "build_latent_cache", "check_fingerprint",
           "read_cache_meta", "shard_files", "META_FILE"]
