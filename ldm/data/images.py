"""Image sources (folders, archives, npz arrays), robust decoding, ADM preprocessing and the training dataset.

A *source* is an indexable collection of images with optional integer labels:
  - a folder, searched recursively for .jpg/.jpeg/.png/.webp/.bmp; when the images sit in sub-folders of the root,
    each sub-folder is a class and labels are the sorted sub-folder names' indices (ImageNet layout);
  - a .zip or .tar(.gz) archive, read exactly as its extracted folder would be (same files, labels and classes);
  - an ADM-style .npz (`arr_0` uint8 NHWC, optional `arr_1` labels);
  - the embedded digits (`ldm.data.embedded`).

Folder and archive paths follow two rules before classes are taken (`class_paths`): hidden files and folders (any
component starting with "."; .DS_Store, macOS's ._* AppleDouble forks, .ipynb_checkpoints) and __MACOSX/ are not
images; and a single folder wrapping everything (animals/cat/..., animals/dog/...: how a class folder is usually
zipped) is not a class, so it is stripped, as if the source were animals/ itself. A single folder that holds only
images (cat/*.jpg) stays one class.

Decoding never dies with a bare PIL traceback: the EXIF orientation is applied (a portrait photo is stored as
landscape pixels plus an Orientation tag), CMYK, RGBA/LA/P (composited on white), 16-bit and grayscale images are
converted to 8-bit RGB; corrupt, truncated, zero-byte or too-small files raise `BadImageError` naming the file, which
the dataset either re-raises (`on_error="raise"`) or skips with a counted warning (`on_error="skip"`; see
`ImageDataset.skip_counts`).
"""

from __future__ import annotations

import abc
import io
import logging
import os
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently half-grey


class BadImageError(ValueError):
    """An image file that cannot be decoded into a usable RGB image; the message names the file."""


# ------------------------------------------------------------------------------------------------------ decoding
def to_rgb_uint8(img: Image.Image, name: str = "<image>") -> np.ndarray:
    """Convert any PIL image to an (H, W, 3) uint8 array.

    16-bit and 32-bit integer modes are rescaled to 8 bits (PIL's own convert("RGB") clips them to 255); images with
    alpha (RGBA, LA, P with transparency) are composited on white; CMYK and YCbCr go through PIL's conversion.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    out = np.asarray(img, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise BadImageError(f"{name}: decoded to an unexpected shape {out.shape}")
    return out


def decode_image(data: bytes | str | Path, name: str, min_size: int = 1) -> np.ndarray:
    """Decode bytes or a file path into (H, W, 3) uint8 as displayed (EXIF orientation applied), raising
    `BadImageError` with the file name on failure."""
    try:
        if isinstance(data, (bytes, bytearray)):
            if len(data) == 0:
                raise BadImageError(f"{name}: zero-byte file")
            stream: io.BytesIO | str = io.BytesIO(data)
        else:
            if os.path.getsize(data) == 0:
                raise BadImageError(f"{name}: zero-byte file")
            stream = str(data)
        with Image.open(stream) as img:
            img.load()  # forces a full decode: truncated data fails here, not later
            ImageOps.exif_transpose(img, in_place=True)  # a no-op without an Orientation tag (or with orientation 1)
            arr = to_rgb_uint8(img, name)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None
    if min(arr.shape[:2]) < min_size:
        raise BadImageError(f"{name}: image is {arr.shape[1]}x{arr.shape[0]} px, smaller than the minimum side "
                            f"{min_size} px (data.min_size)")
    return arr


# ------------------------------------------------------------------------------------------------------ sources
def path_parts(rel_path: str) -> list[str]:
    """Components of a relative member path ('/' or '\\' separated), without '' and '.' (tar often stores ./x.png)."""
    return [part for part in rel_path.replace("\\", "/").split("/") if part not in ("", ".")]


def is_junk(parts: Sequence[str]) -> bool:
    """Hidden files and folders (.DS_Store, ._* AppleDouble forks, .ipynb_checkpoints, also '..') and macOS's
    __MACOSX/ metadata folder: never images, whether in a folder or an archive."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def class_paths(rel_paths: Sequence[str]) -> list[list[str]]:
    """Path components with wrapper folders stripped: while every path starts with the same folder and some path lies
    below a sub-folder of it, that folder wraps the data and is no class (animals/cat/1.jpg -> cat/1.jpg). Stripping
    again is a no-op, so a source and its wrapper folder give the same classes; cat/*.jpg alone stays one class."""
    parts = [path_parts(p) for p in rel_paths]
    while (parts and any(len(p) >= 3 for p in parts)
           and all(len(p) >= 2 and p[0] == parts[0][0] for p in parts)):
        parts = [p[1:] for p in parts]
    return parts


def _labels_from_paths(rel_paths: Sequence[str]) -> tuple[np.ndarray | None, list[str]]:
    """Class label = index of the first path component (after `class_paths`) among the sorted class names (None when
    some image lies directly in the root)."""
    firsts = class_paths(rel_paths)
    if not firsts or any(len(parts) < 2 for parts in firsts):
        return None, []
    classes = sorted({parts[0] for parts in firsts})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[parts[0]] for parts in firsts], dtype=np.int64), classes


class ImageSource(abc.ABC):
    """Indexable images + optional labels. `read(i)` returns (H, W, 3) uint8 or raises BadImageError."""

    names: list[str]
    labels: np.ndarray | None
    classes: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        """Image i as (H, W, 3) uint8; raises BadImageError naming the file."""

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def fingerprint(self) -> str:
        """Cheap identity of the data: names, sizes and modification times (used for cache keys)."""
        import hashlib

        h = hashlib.sha256()
        for item in self._fingerprint_items():
            h.update(str(item).encode())
        return h.hexdigest()[:16]

    def _fingerprint_items(self) -> Iterator:
        yield from self.names


class FolderSource(ImageSource):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not is_junk(p.relative_to(self.root).parts))
        if not files:
            raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r} "
                                    f"(hidden files and __MACOSX/ are ignored)")
        self.paths = files
        self.names = [str(p.relative_to(self.root)) for p in files]
        self.labels, self.classes = _labels_from_paths(self.names)

    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        return decode_image(self.paths[i], str(self.paths[i]), min_size)

    def _fingerprint_items(self) -> Iterator:
        for p in self.paths:
            st = p.stat()
            yield (str(p.relative_to(self.root)), st.st_size, st.st_mtime_ns)


class ArchiveSource(ImageSource):
    """Images inside a .zip or .tar archive; each worker process opens its own handle. `names` are the member names
    (a wrapper folder included); labels follow the same rules as the extracted folder's."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._pid = None
        if zipfile.is_zipfile(self.path):
            self.kind = "zip"
            with zipfile.ZipFile(self.path) as zf:
                members = [m.filename for m in zf.infolist() if not m.is_dir()]
        elif tarfile.is_tarfile(self.path):
            self.kind = "tar"
            with tarfile.open(self.path) as tf:
                members = [m.name for m in tf.getmembers() if m.isfile()]
        else:
            raise ValueError(f"{str(self.path)!r} is neither a zip nor a tar archive")
        self.names = sorted(m for m in members if m.lower().endswith(IMAGE_EXTENSIONS) and not is_junk(path_parts(m)))
        if not self.names:
            raise FileNotFoundError(f"no images found inside archive {str(self.path)!r} (hidden files and __MACOSX/ "
                                    f"are ignored)")
        self.labels, self.classes = _labels_from_paths(self.names)

    def _handle(self):
        if getattr(self._local, "pid", None) != os.getpid():  # fresh handle per process (DataLoader workers fork)
            self._local.pid = os.getpid()
            self._local.handle = zipfile.ZipFile(self.path) if self.kind == "zip" else tarfile.open(self.path)
        return self._local.handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        name = self.names[i]
        handle = self._handle()
        data = handle.read(name) if self.kind == "zip" else handle.extractfile(name).read()
        return decode_image(data, f"{self.path}:{name}", min_size)

    def _fingerprint_items(self) -> Iterator:
        st = self.path.stat()
        yield (str(self.path.name), st.st_size, st.st_mtime_ns)
        yield from self.names


class ArraySource(ImageSource):
    """Images held as a uint8 NHWC array (ADM .npz, embedded datasets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str):
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{name}: {len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = [] if labels is None else [str(c) for c in range(self.num_classes)]
        self.names = [f"{name}[{i}]" for i in range(len(images))]
        self.label = name

    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        img = self.images[i]
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else np.asarray(img)

    def _fingerprint_items(self) -> Iterator:
        import hashlib

        yield self.label
        yield self.images.shape
        yield hashlib.sha256(np.ascontiguousarray(self.images[:: max(1, len(self.images) // 64)]).tobytes()).hexdigest()


def load_npz(path: str | Path) -> ArraySource:
    path = Path(path)
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{str(path)!r} has no 'arr_0' array (ADM layout: arr_0 uint8 NHWC, arr_1 labels); "
                                 f"found {list(data.keys())}")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    except (OSError, EOFError, ValueError) as err:
        if isinstance(err, ValueError) and "arr_0" in str(err):
            raise
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({err})") from None
    return ArraySource(images, labels, str(path))


def open_source(spec: str, image_size: int = 32) -> ImageSource:
    """Open a data source: 'digits' (embedded) or a folder / archive / .npz path."""
    if spec == "digits":
        from ldm.data.embedded import digits_source

        return digits_source(image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {spec!r} does not exist; give 'digits', an image folder, a .zip/.tar "
                                f"archive or an ADM .npz file")
    if path.is_dir():
        return FolderSource(path)
    if path.suffix == ".npz":
        return load_npz(path)
    return ArchiveSource(path)


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

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
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
        return {"image": to_tensor(arr), "label": torch.tensor(label, dtype=torch.long)}


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
