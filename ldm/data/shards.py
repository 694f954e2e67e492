"""Tar shards in the WebDataset layout: reading them as an image source, and writing them (`ldm make-shards`).

Layout (WebDataset's, https://github.com/webdataset/webdataset#the-webdataset-format): uncompressed tar files whose
consecutive members sharing a key (the path up to the first dot of the file name) form one sample; here a sample is
`key.jpg|jpeg|png|webp|bmp` (the image) plus an optional `key.cls` (the class label as decimal text) and/or
`key.json` ({"label": int, "class": name, ...}; `.cls` wins when both are present), and optionally its caption(s):
`key.txt` (one caption per non-empty line) or a "caption" / "captions" / "text" in `key.json` (ldm/data/captions.py;
the .txt wins). `data.source` names a shard set by a brace pattern, `shards/train-{000000..000127}.tar` (ranges keep
their zero padding; `{a,b}` lists work too).

Reading. Each shard gets an index (the byte offset and size of every sample's image, its label, and where its caption
member is), built once by scanning the tar headers and kept beside the shard (`<shard>.index.npz`; `ldm make-shards`
writes it with the shard) or, when the shard's folder is read-only, in `$LDM_CACHE_DIR/shard-index/`. Opening a shard
set loads these indices (a few ms per shard), so a process starts without reading any image. `ShardSource` is then an
ordinary `ImageSource`: item i is read with one positioned read (os.pread) at its offset, and everything that takes a
source (training with `ImageDataset`, the latent cache, evaluation, statistics) takes shards. In training the batch
order comes from `ldm.data.sampler.ShardBatchSampler`: every process and loader worker reads its own shards, visited in
an order drawn from (seed, epoch), through a shuffle buffer, resumable at a micro-batch position like the folder
sources; and a worker reads the members of each batch in file order (`ImageDataset.__getitems__`), moving forward
through its shard. The shuffle buffer holds item indices in the sampler, not bytes in the worker (so it costs no memory
and the position is one integer): a worker reads each image when its batch comes, so its reads sweep forward through a
window of a few `data.shuffle_buffer` items of its shards rather than strictly sequentially.

Why our own reader and not the `webdataset` package: its streaming pipeline (`WebDataset`) keeps its position (shard
iterators, shuffle buffer) inside the loader workers with no way to save and restore it, so a resumed run would not
see the batches an unbroken run sees, and it cannot read sample i for the latent cache, evaluation or bad-file
replacement; its indexed `wids.ShardListDataset` reads sample i, but the per-worker shard order and the one-integer
resume position would still be ours to write. A tar index and `tarfile` give all of it here without a dependency. The
format stays WebDataset's: shards written here are plain WebDataset tars, and shards laid out as webdataset's
`TarWriter` (or img2dataset, tarp) writes them load here.

A compressed shard (.tar.gz) cannot be read at an offset: it is refused with the way to convert it.

Writing (`make_shards`): the images of any source (folder, .zip/.tar/.tar.gz archive, ADM .npz, the digits, or
other shards) in the source's order, `shard_size` samples per shard, as `key.<ext>` with the file's original bytes
(arrays are stored as lossless PNG), `key.cls`, `key.json` ({"name": original name, "label", "class"}) and, when
the source stores captions (`--captions auto`: a folder's captions.jsonl or sidecar .txt / .json files, the caption
members of shards; or a captions.jsonl given), `key.txt` with the image's captions one per line (a caption that
would not survive that, e.g. one holding a line break, goes into key.json's "captions" list instead). Members
carry fixed metadata (mtime 0, root owner), so a shard's bytes depend only on its images: one process and several
(shard s is written by process s mod world) write identical files. Each shard goes to a temporary file that is
renamed when complete, and its index, written last, marks it finished: a re-run of the same command skips finished
shards. `make-shards.json` in the output folder records the plan (source, its fingerprint, counts, classes) and the
brace pattern to train with. Files are copied as they are, undecoded: an unreadable image stays unreadable in the
shard and is skipped when read, by `data.on_error` as for a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.manifest import cache_dir
from ldm.data.sources import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageSource,
    decode_image,
    is_compressed,
    is_junk,
    path_parts,
)

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_SUFFIX = ".index.npz"
RECORD_FILE = "make-shards.json"
OPEN_FILES = 16  # shard files a process keeps open (least recently used closed first)
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------------------------ patterns
def expand_braces(pattern: str) -> list[str]:
    """All names of a brace pattern, in order: `{000..012}` is a zero-padded range (padding from the first bound),
    `{a,b}` a list; several groups expand left to right (the `braceexpand` rules WebDataset uses)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        if int(last) < int(first):
            raise ValueError(f"shard pattern {pattern!r}: the range {{{body}}} runs backwards")
        items = [f"{k:0{len(first)}d}" for k in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range {{000000..000127}} nor a list "
                         f"{{a,b}}")
    return [name for item in items for name in expand_braces(head + item + tail)]


# ------------------------------------------------------------------------------------------------------ the index
@dataclass
class ShardIndex:
    """The samples of one shard, in file order: image member names, their data offsets and sizes, labels (-1: none),
    class names found in the .json members ({label: name}), and the shard file's size and mtime it describes."""

    members: list[str]
    offsets: np.ndarray      # (n,) int64, byte offset of each image's data
    sizes: np.ndarray        # (n,) int64
    labels: np.ndarray       # (n,) int64, -1 where a sample has no label
    class_names: dict[int, str]
    file_size: int
    file_mtime_ns: int
    plan_id: str = ""        # make_shards' plan, for shards it wrote
    captions: np.ndarray | None = None  # (n, 3) int64: offset, size, kind (CAPTION_*) of each caption member; None:
    #                                     an index written before captions were indexed (ShardSource rescans)


CAPTION_NONE, CAPTION_TXT, CAPTION_JSON = 0, 1, 2  # where a sample's caption is: nowhere, key.txt, key.json


def _split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's rule: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _label_from(cls_bytes: bytes | None, json_bytes: bytes | None, where: str) -> tuple[int, str | None]:
    """(label or -1, class name or None) of a sample from its .cls and .json members."""
    info = {}
    if json_bytes is not None:
        try:
            info = json.loads(json_bytes)
        except ValueError as err:
            raise ValueError(f"{where}.json is not valid JSON ({err})") from None
        info = info if isinstance(info, dict) else {}
    name = info.get("class") if isinstance(info.get("class"), str) else None
    if cls_bytes is not None:
        try:
            return int(cls_bytes.decode().strip()), name
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{where}.cls holds {cls_bytes[:40]!r}, not an integer class label") from None
    label = info.get("label")
    return (label, name) if isinstance(label, int) and not isinstance(label, bool) else (-1, name)


def _caption_member(by_ext: dict, json_bytes: bytes | None) -> tuple[int, int, int]:
    """(offset, size, kind) of a sample's caption member: key.txt, else key.json when it holds a caption key (the rule
    of ldm.data.captions.captions_from_members); (-1, 0, CAPTION_NONE) without one."""
    from ldm.data.captions import CAPTION_JSON_KEYS

    if "txt" in by_ext:
        return by_ext["txt"].offset_data, by_ext["txt"].size, CAPTION_TXT
    if json_bytes is not None:
        info = json.loads(json_bytes)  # valid: _label_from parsed it first
        if isinstance(info, dict) and any(k in info for k in CAPTION_JSON_KEYS):
            return by_ext["json"].offset_data, by_ext["json"].size, CAPTION_JSON
    return -1, 0, CAPTION_NONE


def scan_shard(path: Path) -> ShardIndex:
    """Index a shard by reading its tar headers (and its small .cls/.json members), in file order."""
    if is_compressed(path):
        raise ValueError(f"shard {str(path)!r} is compressed; shards must be plain (uncompressed) tar files to be read "
                         f"at an offset: decompress it (gunzip) or rewrite the data with `ldm make-shards`")
    members, offsets, sizes, labels, names, captions = [], [], [], [], {}, []
    try:
        with tarfile.open(path, "r:") as tf:
            for key, group in itertools.groupby((m for m in tf if m.isfile() and not is_junk(path_parts(m.name))),
                                                key=lambda m: _split_key(m.name)[0]):
                by_ext = {_split_key(m.name)[1]: m for m in group}
                image = next((m for ext, m in by_ext.items() if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)
                if image is None:  # a sample without an image (metadata only): not an image
                    continue
                small = {e: tf.extractfile(by_ext[e]).read() for e in ("cls", "json") if e in by_ext}
                label, name = _label_from(small.get("cls"), small.get("json"), f"{path}:{key}")
                if label >= 0 and name is not None:
                    names[label] = name
                members.append(image.name)
                offsets.append(image.offset_data)
                sizes.append(image.size)
                labels.append(label)
                captions.append(_caption_member(by_ext, small.get("json")))
    except tarfile.TarError as err:
        raise ValueError(f"shard {str(path)!r} is not a readable tar file ({err})") from None
    st = os.stat(path)
    return ShardIndex(members, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                      np.array(labels, dtype=np.int64), names, st.st_size, st.st_mtime_ns,
                      captions=np.array(captions, dtype=np.int64).reshape(-1, 3))


def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(strings).encode(), dtype=np.uint8)


def _unblob(arr: np.ndarray) -> list[str]:
    text = arr.tobytes().decode()
    return text.split("\n") if text else []


def _index_paths(shard: Path) -> list[Path]:
    """Where a shard's index may be: beside it, else in the cache directory."""
    key = hashlib.sha256(str(shard.absolute()).encode()).hexdigest()[:16]
    return [shard.with_name(shard.name + INDEX_SUFFIX), cache_dir() / "shard-index" / f"{key}.npz"]


def write_index(index: ShardIndex, shard: Path) -> Path | None:
    """Save `index` beside `shard` (or in the cache directory when that folder is read-only); returns where."""
    for path in _index_paths(shard):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, version=np.int64(INDEX_VERSION), members=_blob(index.members), offsets=index.offsets,
                         sizes=index.sizes, labels=index.labels,
                         class_labels=np.array(sorted(index.class_names), dtype=np.int64),
                         class_names=_blob([index.class_names[k] for k in sorted(index.class_names)]),
                         shard_file=np.array([index.file_size, index.file_mtime_ns], dtype=np.int64),
                         plan_id=np.array(index.plan_id),
                         **({"captions": index.captions} if index.captions is not None else {}))
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    return None


def read_index(shard: Path) -> ShardIndex | None:
    """The stored index of `shard` if it describes the file as it is (same size and modification time), else None."""
    try:
        st = os.stat(shard)
    except OSError:
        return None
    for path in _index_paths(shard):
        try:
            with np.load(path) as d:
                if int(d["version"]) != INDEX_VERSION or d["shard_file"].tolist() != [st.st_size, st.st_mtime_ns]:
                    continue
                return ShardIndex(_unblob(d["members"]), d["offsets"], d["sizes"], d["labels"],
                                  dict(zip(d["class_labels"].tolist(), _unblob(d["class_names"]))),
                                  st.st_size, st.st_mtime_ns, str(d["plan_id"]),
                                  d["captions"] if "captions" in d.files else None)
        except (OSError, ValueError, KeyError, EOFError):
            continue
    return None


def shard_index(shard: Path) -> ShardIndex:
    """The index of `shard`: the stored one, else a scan, stored for the next process."""
    index = read_index(shard)
    if index is None:
        index = scan_shard(shard)
        write_index(index, shard)
    return index


# ------------------------------------------------------------------------------------------------------ reading
class ShardSource(ImageSource):
    """The samples of a shard set, shard after shard in pattern order, each shard's in file order.

    `shard_ranges[s]` = (first, end) item indices of shard s (what ShardBatchSampler deals to processes and workers).
    Item names are `<shard file name>:<member>`. Labels come from the .cls/.json members (all samples or none must
    have one); class names from the .json members' "class" where every label has one, else "0", "1", ...
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.shards = [Path(p).expanduser() for p in expand_braces(pattern)]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data source {pattern!r}: {len(missing)} of {len(self.shards)} shards do not "
                                    f"exist (first: {missing[0]!r}); write shards with `ldm make-shards SOURCE --out "
                                    f"DIR` and give the pattern it prints")
        self.indices = [shard_index(p) for p in self.shards]
        empty = [str(p) for p, ix in zip(self.shards, self.indices) if not ix.members]
        if empty:
            raise ValueError(f"shard {empty[0]!r} holds no images ({'/'.join(IMAGE_EXTENSIONS)} members); remove it "
                             f"from the pattern")
        counts = [len(ix.members) for ix in self.indices]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S + 1,)
        self.shard_ranges = [(int(a), int(b)) for a, b in zip(self.starts[:-1], self.starts[1:])]
        self.offsets = np.concatenate([ix.offsets for ix in self.indices])
        self.sizes = np.concatenate([ix.sizes for ix in self.indices])
        labels = np.concatenate([ix.labels for ix in self.indices])
        self._names: list[str] | None = None  # before _labels, whose refusal names a sample
        self.labels, self.classes = self._labels(labels)
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> open file descriptor, this process
        self._pid = os.getpid()

    def _labels(self, labels: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
        if (labels < 0).all():
            return None, []
        if (labels < 0).any():
            i = int(np.flatnonzero(labels < 0)[0])
            raise ValueError(f"{self.names[i]} has no class label (.cls or .json 'label') while other samples of "
                             f"{self.pattern!r} have one: label every sample or none")
        num = int(labels.max()) + 1
        found = {k: v for ix in self.indices for k, v in ix.class_names.items()}
        named = all(c in found for c in range(num))
        classes = [found[c] if named else str(c) for c in range(num)]
        return labels, classes

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def names(self) -> list[str]:
        if self._names is None:  # built when first asked (1.28 M strings take a moment): reading needs none
            self._names = [f"{p.name}:{m}" for p, ix in zip(self.shards, self.indices) for m in ix.members]
        return self._names

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, position in it) of item i."""
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, i - int(self.starts[s])

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
        else:
            self._files[s] = os.open(self.shards[s], os.O_RDONLY)
            if len(self._files) > OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        return self._files[s]

    def raw(self, i: int) -> tuple[bytes, str]:
        s, j = self.locate(i)
        size = int(self.sizes[i])
        data = os.pread(self._fd(s), size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"{self.shards[s]}: short read of member {self.indices[s].members[j]} (the file changed "
                          f"after it was indexed?)")
        return data, _split_key(self.indices[s].members[j])[1].rsplit(".", 1)[-1]

    def read(self, i: int, min_size: int = 1) -> np.ndarray:
        s, j = self.locate(i)
        name = f"{self.shards[s]}:{self.indices[s].members[j]}"
        try:
            data, _ = self.raw(i)
        except OSError as err:
            raise BadImageError(f"{name}: cannot read ({err})") from None
        return decode_image(data, name, min_size)

    def captions(self) -> list[list[str]] | None:
        """The captions of every item from its key.txt / key.json member (ldm.data.captions.captions_from_members),
        in item order; None when no sample has one. Some samples with a caption and others without are refused, as
        labels are. Shards indexed by an older ldm (no caption locations) are scanned again and their index
        rewritten."""
        from ldm.data.captions import captions_from_members

        for s, ix in enumerate(self.indices):
            if ix.captions is None:
                fresh = scan_shard(self.shards[s])
                fresh.plan_id = ix.plan_id  # make_shards' finished-shard marker stays valid
                write_index(fresh, self.shards[s])
                self.indices[s] = fresh
        kinds = np.concatenate([ix.captions[:, 2] for ix in self.indices])
        if (kinds == CAPTION_NONE).all():
            return None
        if (kinds == CAPTION_NONE).any():
            i = int(np.flatnonzero(kinds == CAPTION_NONE)[0])
            raise ValueError(f"{self.names[i]} has no caption (key.txt, or key.json with a 'caption') while other "
                             f"samples of {self.pattern!r} have one: caption every sample or none")
        out = []
        for s, ix in enumerate(self.indices):
            for member, (offset, size, kind) in zip(ix.members, ix.captions.tolist()):
                data = os.pread(self._fd(s), size, offset)
                where = f"{self.shards[s]}:{_split_key(member)[0]}"
                out.append(captions_from_members(data if kind == CAPTION_TXT else None,
                                                 data if kind == CAPTION_JSON else None, where))
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = OrderedDict(), None  # descriptors stay with the process that opened them
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _fingerprint_items(self) -> Iterator:
        """Shard names, their sizes and their indices' contents: unchanged by copying the shards elsewhere."""
        for p, ix in zip(self.shards, self.indices):
            digest = hashlib.sha256(_blob(ix.members).tobytes() + ix.sizes.tobytes() + ix.labels.tobytes())
            yield (p.name, ix.file_size, digest.hexdigest())


# ------------------------------------------------------------------------------------------------------ writing
@dataclass
class ShardPlan:
    """What `make_shards` writes: `count` samples of a source in `shard_size` shards named `prefix-NNNNNN.tar`."""

    source: str
    data_fingerprint: str
    count: int
    shard_size: int
    prefix: str
    classes: list[str]
    captions_sha: str = ""  # sha of the caption texts written as key.txt members ("": none)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    @property
    def width(self) -> int:
        return max(6, len(str(self.num_shards - 1)))

    def shard_name(self, s: int) -> str:
        return f"{self.prefix}-{s:0{self.width}d}.tar"

    def pattern(self, out_dir: Path) -> str:
        return str(out_dir / f"{self.prefix}-{{{0:0{self.width}d}..{self.num_shards - 1:0{self.width}d}}}.tar")

    def plan_id(self) -> str:
        fields = [self.data_fingerprint, self.count, self.shard_size, self.prefix, INDEX_VERSION]
        fields += [self.captions_sha] if self.captions_sha else []  # plans without captions keep their id
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` as `name` with fixed metadata (mtime 0, root, 0644): the bytes depend only on the content."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(info, io.BytesIO(data))


def raw_samples(source: ImageSource, positions: range, order: list[int]) -> Iterator[tuple[int, bytes, str]]:
    """(source index, file bytes, extension) of the samples at `positions` of the source's storage `order`, read in
    that order (a compressed tar streams through the archive once)."""
    indices = [order[p] for p in positions]
    if hasattr(source, "iter_raw"):
        yield from source.iter_raw(indices)
        return
    for i in indices:
        data, ext = source.raw(i)
        yield i, data, ext


def _caption_members(captions: list[str]) -> tuple[bytes | None, list[str] | None]:
    """(key.txt bytes, None) for an image's captions when one per line reads them back unchanged (the .txt rule of
    ldm.data.captions), else (None, the list for key.json's "captions"): e.g. a caption holding a line break."""
    body = "\n".join(captions)
    if body.splitlines() == captions and all(c == c.strip() and c for c in captions):
        return (body + "\n").encode("utf-8"), None
    return None, list(captions)


def _write_shard(source: ImageSource, plan: ShardPlan, order: list[int], s: int, out_dir: Path,
                 captions=None) -> None:
    final = out_dir / plan.shard_name(s)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    width = max(6, len(str(plan.count - 1)))
    first = s * plan.shard_size
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        positions = range(first, min(first + plan.shard_size, plan.count))
        for p, (i, data, ext) in zip(positions, raw_samples(source, positions, order)):
            key = f"{p:0{width}d}"
            _tar_member(tf, f"{key}.{ext}", data)
            meta = {"name": source.names[i]}
            if source.labels is not None:
                label = int(source.labels[i])
                _tar_member(tf, f"{key}.cls", f"{label}\n".encode())
                meta.update(label=label, **({"class": source.classes[label]} if source.classes else {}))
            if captions is not None:  # a CaptionSet: the image's captions as key.txt (or in key.json)
                txt, listed = _caption_members(captions.captions_of(i))
                if txt is not None:
                    _tar_member(tf, f"{key}.txt", txt)
                else:
                    meta["captions"] = listed
            _tar_member(tf, f"{key}.json", (json.dumps(meta, sort_keys=True) + "\n").encode())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    index = scan_shard(final)  # the reader's own index of what was written: the finished-shard marker, written last
    index.plan_id = plan.plan_id()
    if write_index(index, final) is None:
        raise OSError(f"cannot write the index of {final} (is {out_dir} writable?)")


def _captions_sha(caption_set) -> str:
    """Identity of the captions a plan writes (their texts and which image has which): "" for none."""
    if caption_set is None:
        return ""
    h = hashlib.sha256(caption_set.texts_sha().encode())
    h.update(caption_set.offsets.tobytes() + caption_set.ids.tobytes())
    return h.hexdigest()[:16]


def _finished(plan: ShardPlan, out_dir: Path, s: int) -> bool:
    index = read_index(out_dir / plan.shard_name(s))
    expected = min(plan.shard_size, plan.count - s * plan.shard_size)
    return index is not None and index.plan_id == plan.plan_id() and len(index.members) == expected


def _refuse_other_plan(out_dir: Path, plan: ShardPlan) -> None:
    record = out_dir / RECORD_FILE
    if not record.is_file():
        return
    old = json.loads(record.read_text())
    if old.get("plan_id") != plan.plan_id():
        raise ValueError(f"{str(out_dir)!r} already holds shards of another source or shard size, or other captions ("
                         f"{old.get('source')!r}, {old.get('count')} samples in shards of {old.get('shard_size')}, "
                         f"captions {old.get('captions')}); choose another --out directory or delete this one")


def make_shards(source_spec: str, out_dir: str | Path, *, shard_size: int, prefix: str = "shard",
                image_size: int = 32, progress: bool = True, captions: str = "auto") -> dict:
    """Write the images of `source_spec` as WebDataset shards under `out_dir` (see the module docstring). Call it from
    every process of a distributed launch: shard s is written by process s mod world, then the main process checks
    them all and completes make-shards.json. Returns the record (with "pattern", the data.source to train with).
    `captions`: "auto" (the captions the source stores, if any: ldm.data.captions.stored_captions), "none", or a
    captions.jsonl manifest path; written as key.txt members."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from ldm.data.captions import stored_captions
    from ldm.data.sources import open_source
    from ldm.io import atomic_write_text

    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*", prefix):
        raise ValueError(f"prefix={prefix!r}: use letters, digits, '_' and '-' (no dots: a dot would end the key)")
    source = open_source(source_spec, image_size, random_access=False)
    order = source.storage_order() if hasattr(source, "storage_order") else list(range(len(source)))
    caption_set = stored_captions(source, captions)
    plan = ShardPlan(source=source_spec, data_fingerprint=source.fingerprint(), count=len(source),
                     shard_size=shard_size, prefix=prefix, classes=list(source.classes),
                     captions_sha=_captions_sha(caption_set))
    out_dir = Path(out_dir)
    _refuse_other_plan(out_dir, plan)
    record = {"format_version": INDEX_VERSION, "plan_id": plan.plan_id(), "source": source_spec,
              "data_fingerprint": plan.data_fingerprint, "count": plan.count, "shard_size": shard_size,
              "num_shards": plan.num_shards, "prefix": prefix, "classes": plan.classes,
              "pattern": plan.pattern(out_dir), "complete": False,
              "captions": None if caption_set is None else caption_set.origin}
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    if state.is_main_process and not (out_dir / RECORD_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()
    mine = [s for s in range(rank, plan.num_shards, world) if not _finished(plan, out_dir, s)]
    kept = len(range(rank, plan.num_shards, world)) - len(mine)
    if kept:
        log.info("rank %d: %d finished shard(s) kept, %d to write", rank, kept, len(mine))
    for s in tqdm(mine, desc=f"make-shards{f' rank {rank}/{world}' if world > 1 else ''}", unit="shard",
                  disable=not (progress and state.is_main_process), dynamic_ncols=True):
        _write_shard(source, plan, order, s, out_dir, caption_set)
    state.wait_for_everyone()
    if state.is_main_process:
        unfinished = [plan.shard_name(s) for s in range(plan.num_shards) if not _finished(plan, out_dir, s)]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} shard(s) of {out_dir} are not finished after writing (first: "
                               f"{unfinished[0]})")
        record["complete"] = True
        atomic_write_text(out_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()
    return record


__all__ = ["ShardIndex", "ShardSource", "expand_braces", "make_shards", "scan_shard", "shard_index"]
