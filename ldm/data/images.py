"""The training dataset over an image source (ldm.data.sources), ADM preprocessing, and the one image-batch reader.

Crops (`preprocess`): the ADM centre crop (guided-diffusion `center_crop_arr`), a uniformly placed random crop, or a
plain resize, each to an image_size square; images become (3, H, W) float32 in [-1, 1].

Bad files: a source raises `BadImageError` naming an unreadable file; the dataset either re-raises it
(`on_error="raise"`) or skips it with a counted warning (`on_error="skip"`; see `ImageDataset.skip_counts`), and
`iter_uint8_batches` does the same per image for evaluation and diagnostics.
"""

from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from ldm.data.sampler import split_key
from ldm.data.sources import BadImageError, ImageSource, open_source

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ transforms
def center_crop_arr(arr: np.ndarray, image_size: int) -> np.ndarray:
    """ADM centre crop (guided-diffusion image_datasets.py `center_crop_arr`): halve with BOX while the shorter side
    is >= 2x the target, resize with BICUBIC so the shorter side equals the target, then crop the centre square."""
    img = Image.fromarray(arr)
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    out = np.asarray(img)
    top = (out.shape[0] - image_size) // 2
    left = (out.shape[1] - image_size) // 2
    return out[top:top + image_size, left:left + image_size]


def random_crop_arr(arr: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed image_size square; images with a shorter side below it are first upscaled (BICUBIC)."""
    h, w = arr.shape[:2]
    if min(h, w) < image_size:
        scale = image_size / min(h, w)
        arr = np.asarray(Image.fromarray(arr).resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                                                     resample=Image.BICUBIC))
        h, w = arr.shape[:2]
    top = int(rng.integers(0, h - image_size + 1))
    left = int(rng.integers(0, w - image_size + 1))
    return arr[top:top + image_size, left:left + image_size]


def resize_arr(arr: np.ndarray, image_size: int) -> np.ndarray:
    if arr.shape[0] == image_size and arr.shape[1] == image_size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((image_size, image_size), resample=Image.BICUBIC))


def preprocess(arr: np.ndarray, image_size: int, crop: str, rng: np.random.Generator | None = None) -> np.ndarray:
    if crop == "center":
        return center_crop_arr(arr, image_size)
    if crop == "random":
        return random_crop_arr(arr, image_size, rng if rng is not None else np.random.default_rng(0))
    if crop == "resize":
        return resize_arr(arr, image_size)
    raise ValueError(f"crop={crop!r}; expected 'center', 'random' or 'resize'")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------------ dataset
class SkipCounts(NamedTuple):
    """What on_error="skip" has done so far: `bad` distinct unreadable image files found, `replaced` distinct dataset
    items served by a substitute (the next good image) instead of their own."""

    bad: int
    replaced: int


class ImageDataset(torch.utils.data.Dataset):
    """Training dataset over a source. Items are addressed by (index, item_seed) pairs from `ldm.data.sampler`, so
    random crops and flips are a pure function of the seed: the same batch is produced after a resume or in a worker.
    The sampler's (index, item_seed, sample_seed) keys also return "sample_seed" (int64), the key of the training
    task's per-sample draws.

    With crop="random" every image yields `crops_per_image` items (index // crops_per_image is the image).

    Bad files (on_error="skip") are found at read time, not by a scan: the first read of an unreadable image marks it
    in `bad_mask` (one flag per source image) and the item takes the next good image in source order, marked in
    `replaced_mask` (one flag per item). `skip_counts()` counts both and `bad_names()` names the files. The masks live
    in shared memory, so reads made by DataLoader worker processes count in the process that owns the dataset; they
    cover what this process has read so far. Across processes (ranks), reduce the masks with max (logical or) before
    counting: two ranks can meet the same bad file, one of them while looking for a replacement.
    """

    def __init__(self, source: ImageSource, image_size: int, *, crop: str = "center", crops_per_image: int = 1,
                 hflip: bool = False, on_error: str = "skip", min_size: int = 1, class_cond: bool = True):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
        self.source = source
        self.image_size = image_size
        self.crop = crop
        self.crops_per_image = crops_per_image if crop == "random" else 1
        self.hflip = hflip
        self.on_error = on_error
        self.min_size = min_size
        self.class_cond = class_cond and source.labels is not None
        self.bad_mask = torch.zeros(len(source), dtype=torch.bool).share_memory_()
        self.replaced_mask = torch.zeros(len(self), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.source) * self.crops_per_image

    @property
    def num_classes(self) -> int:
        return self.source.num_classes if self.class_cond else 0

    @property
    def shard_ranges(self) -> list[tuple[int, int]] | None:
        """Item ranges of the source's shards (`ldm.data.shards`), for `ShardBatchSampler`; None for other sources."""
        ranges = getattr(self.source, "shard_ranges", None)
        c = self.crops_per_image
        return None if ranges is None else [(a * c, b * c) for a, b in ranges]

    @property
    def bad(self) -> set[int]:
        """Indices (into the source) of the bad files found so far."""
        return set(torch.nonzero(self.bad_mask).flatten().tolist())

    def bad_names(self) -> list[str]:
        """Source names of the bad files found so far, in source order."""
        return [self.source.names[i] for i in sorted(self.bad)]

    def skip_counts(self) -> SkipCounts:
        """Bad files found and items replaced so far by this process and its DataLoader workers."""
        return SkipCounts(bad=int(self.bad_mask.sum()), replaced=int(self.replaced_mask.sum()))

    def _read(self, image_index: int) -> np.ndarray | None:
        if self.bad_mask[image_index]:
            return None
        try:
            return self.source.read(image_index, self.min_size)
        except BadImageError as err:
            if self.on_error == "raise":
                raise BadImageError(f"{err} (data.on_error=raise; set data.on_error=skip to skip bad files)") from None
            self.bad_mask[image_index] = True
            log.warning("skipping bad image %d so far: %s", int(self.bad_mask.sum()), err)
            return None

    def __getitem__(self, key: tuple[int, ...] | int) -> dict[str, torch.Tensor]:
        index, seed, extra = split_key(key)
        n = len(self.source)
        image_index = index // self.crops_per_image
        for attempt in range(n):  # a skipped file is replaced by the next good one, deterministically
            arr = self._read((image_index + attempt) % n)
            if arr is not None:
                image_index = (image_index + attempt) % n
                if attempt:
                    self.replaced_mask[index] = True
                break
        else:
            raise BadImageError(f"every image in the data source is unreadable (e.g. {self.source.names[0]})")
        rng = np.random.default_rng([seed, index])
        arr = preprocess(arr, self.image_size, self.crop, rng)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        label = int(self.source.labels[image_index]) if self.class_cond else 0
        return {"image": to_tensor(arr), "label": torch.tensor(label, dtype=torch.long), **extra}

    def __getitems__(self, keys: list) -> list[dict[str, torch.Tensor]]:
        """A batch for the DataLoader: the items of `keys`, in that order, read in index order (for shards: forward
        through each file). Every item is a function of its key alone, so the read order changes nothing else."""
        items = {}
        for t in sorted(range(len(keys)), key=lambda t: split_key(keys[t])[0]):
            items[t] = self[keys[t]]
        return [items[t] for t in range(len(keys))]


def build_dataset(data_cfg) -> ImageDataset:
    """ImageDataset from a `DataCfg`."""
    source = open_source(data_cfg.source, data_cfg.image_size)
    return ImageDataset(source, data_cfg.image_size, crop=data_cfg.crop, crops_per_image=data_cfg.crops_per_image,
                        hflip=data_cfg.hflip, on_error=data_cfg.on_error, min_size=data_cfg.min_size,
                        class_cond=data_cfg.class_cond)


def iter_uint8_batches(path: str, batch_size: int, *, size: int | None = None, rank: int = 0, world_size: int = 1,
                       limit: int | None = None, on_error: str = "skip") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (uint8 NHWC batch, global indices) over a source, this process's shard only: THE image-batch reader of
    evaluation, sampling references and diagnostics.

    Sharded by whole batches: global batch b holds images [b*B, (b+1)*B) and goes to process b % world_size, so every
    batch holds the same images for any process count (a network then sees identical batches and gathered features
    are bit-identical for 1 or N processes; gather and sort by index for the full set). `limit` keeps the first
    `limit` images. `size` applies the ADM centre crop; without it all images must already share one size. Bad files
    are skipped (with a warning naming them) or raised, per `on_error`; a batch that loses images to bad files is
    yielded shorter, never refilled.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    source = open_source(path, size or 32)
    n = len(source) if limit is None else min(limit, len(source))
    for start in range(rank * batch_size, n, world_size * batch_size):
        images, indices = [], []
        for i in range(start, min(start + batch_size, n)):
            try:
                arr = source.read(i)
            except BadImageError as err:
                if on_error == "raise":
                    raise
                log.warning("skipping bad image: %s", err)
                continue
            arr = center_crop_arr(arr, size) if size is not None else arr
            if images and arr.shape != images[0].shape:
                raise ValueError(f"{source.names[i]}: image shape {arr.shape} differs from {images[0].shape}; pass "
                                 f"a size (--image-size) to centre-crop all images to one size")
            images.append(arr)
            indices.append(i)
        if images:
            yield np.stack(images), np.asarray(indices, dtype=np.int64)
