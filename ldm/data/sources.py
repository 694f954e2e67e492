"""Image sources: indexable collections of image files (folders, archives, npz arrays, the embedded digits) with
optional integer labels, and the robust decoder that turns a file into (H, W, 3) uint8 RGB.

A *source* is one of:
  - a folder, searched recursively for .jpg/.jpeg/.png/.webp/.bmp; when the images sit in sub-folders of the root,
    each sub-folder is a class and labels are the sorted sub-folder names' indices (ImageNet layout);
  - a .zip or .tar archive, read exactly as its extracted folder would be (same files, labels and classes); a
    compressed tar (.tar.gz, .tgz, ...) only in its own order (`ldm make-shards` converts it): reading image i of one
    re-decompresses the archive up to it, so random access is refused with that advice;
  - an ADM-style .npz (`arr_0` uint8 NHWC, optional `arr_1` labels);
  - the embedded digits (`ldm.data.embedded`);
  - WebDataset tar shards named by a brace pattern, `shards/train-{000000..000127}.tar` (`ldm.data.shards`).

A folder's file list comes from its manifest (`ldm.data.manifest`): one scan, cached beside the folder, read by every
process after.

Folder and archive paths follow two rules before classes are taken (`class_paths`): hidden files and folders (any
component starting with "."; .DS_Store, macOS's ._* AppleDouble forks, .ipynb_checkpoints) and __MACOSX/ are not
images; and a single folder wrapping everything (animals/cat/..., animals/dog/...: how a class folder is usually
zipped) is not a class, so it is stripped, as if the source were animals/ itself. A single folder that holds only
images (cat/*.jpg) stays one class.

Decoding never dies with a bare PIL traceback: the EXIF orientation is applied (a portrait photo is stored as
landscape pixels plus an Orientation tag), CMYK, RGBA/LA/P (composited on white), 16-bit and grayscale images are
converted to 8-bit RGB; corrupt, truncated, zero-byte or too-small files raise `BadImageError` naming the file. What
to do about one (skip it or stop) is the reader's policy: `ldm.data.images.ImageDataset` and `iter_uint8_batches`.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ldm.data.manifest import folder_manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently half-grey


class BadImageError(ValueError):
    """An image file that cannot be decoded into a usable RGB image; the message names the file."""


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def is_compressed(path: str | Path) -> bool:
    """Whether a file starts with the magic bytes of gzip, bzip2, xz or zstd."""
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


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

    def raw(self, i: int) -> tuple[bytes, str]:
        """(encoded bytes, extension) of image i for `ldm make-shards`: a lossless PNG of `read(i)`; sources of files
        return the file's own bytes."""
        buf = io.BytesIO()
        Image.fromarray(self.read(i)).save(buf, format="PNG")
        return buf.getvalue(), "png"

    def fingerprint(self) -> str:
        """Cheap identity of the data: names, sizes and modification times (used for cache keys)."""
        h = hashlib.sha256()
        for item in self._fingerprint_items():
            h.update(str(item).encode())
        return h.hexdigest()[:16]

    def _fingerprint_items(self) -> Iterator:
        yield from self.names


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class FolderSource(ImageSource):
    """Image files under a folder, listed by its manifest (`ldm.data.manifest`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = folder_manifest(self.root, _is_image_name, is_junk)
        if not self.manifest.names:
            raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r} "
                                    f"(hidden files and __MACOSX/ are ignored)")
        self.names = self.manifest.names
        self.labels, self.classes = _labels_from_paths(self.names)

    @property
    def paths(self) -> list[Path]:
        return [self.root / name for name in self.names]

    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        path = os.path.join(self.root, self.names[i])
        return decode_image(path, path, min_size)

    def raw(self, i: int) -> tuple[bytes, str]:
        with open(os.path.join(self.root, self.names[i]), "rb") as f:
            return f.read(), os.path.splitext(self.names[i])[1][1:].lower()

    def _fingerprint_items(self) -> Iterator:
        for name in self.names:
            st = os.stat(os.path.join(self.root, name))
            yield (name, st.st_size, st.st_mtime_ns)


def compressed_tar_refusal(path: str | Path) -> str:
    """Why a compressed tar cannot be read at random, and what to do instead (names `ldm make-shards`)."""
    return (f"{str(path)!r} is a compressed tar: reading one image decompresses the archive from its start up to it, "
            f"so reading images in any order but the archive's costs a pass over the archive per image. Convert it "
            f"once into uncompressed shards with `ldm make-shards {path} --out DIR --shard-size 1000` and use the "
            f"data.source pattern it prints (or extract it into a folder)")


class ArchiveSource(ImageSource):
    """Images inside a .zip or .tar archive; each worker process opens its own handle. `names` are the member names
    (a wrapper folder included); labels follow the same rules as the extracted folder's. A compressed tar is read in
    its own member order only (`storage_order`, `iter_raw`); `read` refuses it (`compressed_tar_refusal`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._pid = None
        self.compressed = False
        if zipfile.is_zipfile(self.path):
            self.kind = "zip"
            with zipfile.ZipFile(self.path) as zf:
                members = [m.filename for m in zf.infolist() if not m.is_dir()]
        elif tarfile.is_tarfile(self.path):
            self.kind = "tar"
            self.compressed = is_compressed(self.path)
            with tarfile.open(self.path) as tf:
                members = [m.name for m in tf.getmembers() if m.isfile()]
        else:
            raise ValueError(f"{str(self.path)!r} is neither a zip nor a tar archive")
        self.names = sorted(m for m in members if m.lower().endswith(IMAGE_EXTENSIONS) and not is_junk(path_parts(m)))
        self._member_order = {m: k for k, m in enumerate(members)}  # position in the archive, for storage_order
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
        return decode_image(self.raw(i)[0], f"{self.path}:{self.names[i]}", min_size)

    def raw(self, i: int) -> tuple[bytes, str]:
        if self.compressed:
            raise ValueError(compressed_tar_refusal(self.path))
        name = self.names[i]
        handle = self._handle()
        data = handle.read(name) if self.kind == "zip" else handle.extractfile(name).read()
        return data, os.path.splitext(name)[1][1:].lower()

    def storage_order(self) -> list[int]:
        """Image indices in the order their members lie in the archive."""
        return sorted(range(len(self.names)), key=lambda i: self._member_order[self.names[i]])

    def iter_raw(self, indices: Sequence[int]) -> Iterator[tuple[int, bytes, str]]:
        """(index, bytes, extension) of `indices`, in that order; for a compressed tar, one pass through the archive
        (the indices must then follow `storage_order`)."""
        if not self.compressed:
            for i in indices:
                yield i, *self.raw(i)
            return
        expected = iter(indices)
        nxt = next(expected, None)
        with tarfile.open(self.path, "r|*") as tf:  # stream mode: one sequential decompression
            for member in tf:
                if nxt is None:
                    return
                if member.name == self.names[nxt]:
                    yield nxt, tf.extractfile(member).read(), os.path.splitext(member.name)[1][1:].lower()
                    nxt = next(expected, None)
        if nxt is not None:
            raise ValueError(f"{self.path}: {self.names[nxt]} was not found in archive order; read a compressed tar "
                             f"in storage_order()")

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


def open_source(spec: str, image_size: int = 32, *, random_access: bool = True) -> ImageSource:
    """Open a data source: 'digits' (embedded), a shard pattern (has braces) or a folder / archive / .npz path.
    A compressed tar is refused unless `random_access=False` (a reader that keeps to its `storage_order`)."""
    if spec == "digits":
        from ldm.data.embedded import digits_source

        return digits_source(image_size)
    if "{" in spec and "}" in spec:
        from ldm.data.shards import ShardSource

        return ShardSource(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {spec!r} does not exist; give 'digits', an image folder, a .zip/.tar "
                                f"archive, an ADM .npz file or a shard pattern (shards/train-{{000000..000127}}.tar)")
    if path.is_dir():
        return FolderSource(path)
    if path.suffix == ".npz":
        return load_npz(path)
    source = ArchiveSource(path)
    if random_access and source.compressed:
        raise ValueError(compressed_tar_refusal(path))
    return source
