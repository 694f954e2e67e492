"""Captions as data: which caption(s) each image of a source has, the templated captions of the embedded digits, the
caption-embedding cache, and the dataset wrapper that hands a training item its caption's embedding.

Where captions come from (`caption_set_for(source, spec)`, the config's text.captions):
  - "auto": the embedded digits get templated captions (below); a folder gets its `captions.jsonl` manifest when the
    root holds one, else per-image sidecar files: `cat/001.txt` (the whole file is one caption; several non-empty
    lines are several captions) or `cat/001.json` ({"caption": "..."} or {"captions": ["...", ...]}, "text" also
    read) beside `cat/001.jpg`;
  - a path to a `.jsonl` manifest: one JSON object per line, {"file": "<name as the source lists it>", "caption":
    "..."} (or "captions": [...], or "text"; "index": i instead of "file" for .npz / digits sources).
Every image must have at least one caption (a missing one is refused, naming the file and the fix). An image with
several captions gets one of them per training item, drawn from hash(item seed, "caption", index): the same after a
resume or in a DataLoader worker, another one next epoch.

The embedded digits' templates: each digit has TEMPLATES x its two names (the word and the numeral) = 10 captions,
"a handwritten digit seven", "the number 7, written by hand", ...; `digit_of_caption` reads the digit back out of a
prompt for the offline evaluation (ldm/eval/prompts.py).

Tar shards (ldm/data/shards.py) carry captions as `key.txt` / `key.json` members, read by the rule a folder's
sidecars follow (`captions_from_members(txt_bytes, json_bytes, where)`); a source that has a `captions()` method
(the captions of each image in source order, or None when it stores none: `ShardSource`) gets them from it under
text.captions=auto. `stored_captions` is what a source stores (files, not the digits' generated templates): what
`ldm make-shards` writes into the shards' `key.txt` members, so shards made from a captioned folder give the very
caption set (texts, order, ids) the folder gives.

The caption-embedding cache (`build_caption_cache` / `read_caption_cache`): the distinct captions of a set, encoded
once by a frozen text encoder (ldm/encoders/text.py) into

    meta.json      encoder fingerprint and source, max_tokens, count, dims, dtype, sha256 of the caption texts
    texts.json     the K distinct captions, in the set's order (row k of the arrays below)
    tokens.npy     (K, L, D) per-token embeddings        mask.npy   (K, L) bool, True = a real token (not padding)
    pooled.npy     (K, Dp) pooled embeddings

The arrays are written to temporary files, fsynced and renamed, meta.json last, so a killed build leaves no cache
that reads as complete. A cache made by another encoder is refused exactly as a latent cache of another tokenizer is
(`ldm.data.latents.check_fingerprint`); one that holds other captions is refused too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.data.latents import check_fingerprint
from ldm.data.sampler import split_key
from ldm.data.sources import ArraySource, FolderSource, ImageSource
from ldm.io import atomic_write_text, fsync_path
from ldm.seeding import derive_seed

# ------------------------------------------------------------------------------------------------------ digits
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {}", "the number {}, written by hand", "a scan of a handwritten {}",
             "a black and white image of the digit {}", "{}")


def digit_captions(digit: int) -> list[str]:
    """The templated captions of one digit: every template with the word ("seven"), then with the numeral ("7")."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit {digit} is not in 0..9")
    return [t.format(name) for name in (DIGIT_WORDS[digit], str(digit)) for t in TEMPLATES]


def digit_of_caption(caption: str) -> int | None:
    """The digit a caption names (a digit word or a single numeral as a whole word), None when it names none or
    several different ones."""
    words = [w.strip(".,;:!?\"'()") for w in caption.lower().split()]
    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in words
             if w in DIGIT_WORDS or (len(w) == 1 and w.isdigit())}
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------------------------------------------ caption sets
@dataclass
class CaptionSet:
    """The captions of each image of a source: `texts` are the K distinct captions (the rows of an embedding cache);
    image i's captions are texts[ids[offsets[i]:offsets[i + 1]]]."""

    texts: list[str]
    offsets: np.ndarray  # (N + 1,) int64
    ids: np.ndarray      # (offsets[-1],) int64
    origin: str          # where they came from, for messages

    @classmethod
    def from_captions(cls, per_image: Sequence[Sequence[str]], origin: str) -> CaptionSet:
        """A set from the captions of each image in source order (each image at least one)."""
        index: dict[str, int] = {}
        ids, offsets = [], [0]
        for i, captions in enumerate(per_image):
            if not captions:
                raise ValueError(f"{origin}: image {i} has no caption")
            ids.extend(index.setdefault(str(c), len(index)) for c in captions)
            offsets.append(len(ids))
        return cls(texts=list(index), offsets=np.asarray(offsets, dtype=np.int64), ids=np.asarray(ids, dtype=np.int64),
                   origin=origin)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def captions_of(self, image: int) -> list[str]:
        return [self.texts[k] for k in self.ids[self.offsets[image]:self.offsets[image + 1]]]

    def pick(self, image: int, item_seed: int, index: int) -> int:
        """The caption id (row of the embedding cache) of training item `index` of `image` under `item_seed`."""
        first, end = int(self.offsets[image]), int(self.offsets[image + 1])
        if end - first == 1:
            return int(self.ids[first])
        return int(self.ids[first + derive_seed(item_seed, "caption", index) % (end - first)])

    def texts_sha(self) -> str:
        return hashlib.sha256(json.dumps(self.texts).encode()).hexdigest()[:16]


def captions_from_texts(body: str) -> list[str]:
    """The captions of a .txt sidecar (or shard member): every non-empty line, stripped."""
    return [line.strip() for line in body.splitlines() if line.strip()]


CAPTION_JSON_KEYS = ("captions", "caption", "text")  # where a .json sidecar / shard member holds captions, in order


def _captions_from_json(data: dict, where: str) -> list[str]:
    for key in CAPTION_JSON_KEYS:
        if key in data:
            value = data[key]
            captions = [value] if isinstance(value, str) else list(value)
            if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                raise ValueError(f"{where}: {key!r} holds no non-empty caption strings")
            return [c.strip() for c in captions]
    raise ValueError(f"{where}: expected a 'caption' (string), 'captions' (list) or 'text' key; found {sorted(data)}")


def captions_from_members(txt: bytes | None, js: bytes | None, where: str) -> list[str]:
    """The captions of one image from its `.txt` and / or `.json` companion (file or shard member; the .txt wins):
    the seam for readers of other containers. `where` names the image in errors (e.g. "shard-0003.tar:000042")."""
    if txt is not None:
        captions = captions_from_texts(txt.decode("utf-8"))
        if not captions:
            raise ValueError(f"{where}.txt: empty caption file")
        return captions
    if js is None:
        raise FileNotFoundError(f"{where}: no caption (.txt or .json)")
    try:
        return _captions_from_json(json.loads(js.decode("utf-8")), f"{where}.json")
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}.json: not valid JSON ({err})") from None


def _sidecar_captions(source: FolderSource) -> CaptionSet:
    per_image = []
    for path in source.paths:
        txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
        if not (txt.is_file() or js.is_file()):
            raise FileNotFoundError(f"no caption for {path}: expected {txt.name} or {js.name} beside it, or a "
                                    f"captions.jsonl manifest in {source.root} (text.captions)")
        per_image.append(captions_from_members(txt.read_bytes() if txt.is_file() else None,
                                               js.read_bytes() if js.is_file() else None, str(path.with_suffix(""))))
    return CaptionSet.from_captions(per_image, f"sidecar captions under {source.root}")


def _manifest_captions(source: ImageSource, manifest: Path) -> CaptionSet:
    by_name = {name: i for i, name in enumerate(source.names)}
    per_image: list[list[str]] = [[] for _ in range(len(source))]
    with open(manifest, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not a JSON object ({err})") from None
            if "file" in row:
                if str(row["file"]) not in by_name:
                    raise ValueError(f"{where}: file {row['file']!r} is not an image of the data source (names are "
                                     f"relative to its root, e.g. {source.names[0]!r})")
                i = by_name[str(row["file"])]
            elif "index" in row and 0 <= int(row["index"]) < len(source):
                i = int(row["index"])
            else:
                raise ValueError(f"{where}: expected a 'file' key (or an 'index' in [0, {len(source)}))")
            per_image[i].extend(_captions_from_json(row, where))
    missing = [source.names[i] for i, c in enumerate(per_image) if not c]
    if missing:
        raise ValueError(f"{manifest}: {len(missing)} image(s) have no caption, e.g. {missing[0]!r}; every image of "
                         f"the data source needs at least one line")
    return CaptionSet.from_captions(per_image, str(manifest))


def caption_set_for(source: ImageSource, spec: str = "auto") -> CaptionSet:
    """The captions of every image of `source`: spec "auto" or a .jsonl manifest path (see the module docstring)."""
    if spec != "auto":
        path = Path(spec).expanduser()
        if path.suffix != ".jsonl" or not path.is_file():
            raise FileNotFoundError(f"text.captions={spec!r}: expected 'auto' or an existing .jsonl caption "
                                    f"manifest")
        return _manifest_captions(source, path)
    if isinstance(source, ArraySource) and source.label.startswith("digits") and source.labels is not None:
        return CaptionSet.from_captions([digit_captions(int(y)) for y in source.labels], "digits templates")
    if isinstance(source, FolderSource):
        manifest = source.root / "captions.jsonl"
        return _manifest_captions(source, manifest) if manifest.is_file() else _sidecar_captions(source)
    if callable(getattr(source, "captions", None)):  # e.g. tar shards with key.txt members
        per_image = source.captions()
        if per_image is not None:
            return CaptionSet.from_captions(per_image, f"captions of {type(source).__name__}")
        raise ValueError(f"text.captions=auto: {type(source).__name__} {getattr(source, 'pattern', '')!r} stores no "
                         f"captions (no key.txt, or key.json with a 'caption', members); write the shards from "
                         f"captioned images (`ldm make-shards DIR --captions auto|FILE.jsonl`) or give a "
                         f"captions.jsonl manifest (text.captions=<file>.jsonl)")
    raise ValueError(f"text.captions=auto finds no captions for {type(source).__name__} sources; give a captions.jsonl "
                     f"manifest (text.captions=<file>.jsonl, one {{\"index\"|\"file\", \"caption\"}} per line)")


def stored_captions(source: ImageSource, spec: str = "auto") -> CaptionSet | None:
    """The captions stored with the images of `source`, None when there are none: spec "none" gives None, a .jsonl
    manifest path its captions; "auto" a folder's captions.jsonl or its sidecar files (when any image has one, every
    image must), or a source's `captions()` (shards' caption members). The digits' templates are generated, not
    stored: None. `ldm make-shards --captions` writes these into the shards."""
    if spec == "none":
        return None
    if spec != "auto":
        return caption_set_for(source, spec)
    if isinstance(source, FolderSource):
        has_any = (source.root / "captions.jsonl").is_file() or any(
            p.with_suffix(".txt").is_file() or p.with_suffix(".json").is_file() for p in source.paths)
        return caption_set_for(source) if has_any else None
    per_image = source.captions() if callable(getattr(source, "captions", None)) else None
    return None if per_image is None else CaptionSet.from_captions(per_image, f"captions of {type(source).__name__}")


# ------------------------------------------------------------------------------------------------------ embeddings
@dataclass
class CaptionEmbeddings:
    """Encoded captions, one row per distinct caption: tokens (K, L, D), mask (K, L) bool, pooled (K, Dp) numpy
    arrays (memory maps when read from a cache)."""

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray

    def rows(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, L, D) float32, mask (B, L) bool, pooled (B, Dp) float32) of rows `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        return (torch.from_numpy(np.array(self.tokens[ids], dtype=np.float32)),
                torch.from_numpy(np.array(self.mask[ids], dtype=bool)),
                torch.from_numpy(np.array(self.pooled[ids], dtype=np.float32)))


CACHE_FORMAT_VERSION = 1
CACHE_META = "meta.json"
CACHE_DTYPES = ("float32", "float16")


@dataclass
class CaptionCacheMeta:
    format_version: int
    encoder_fingerprint: str
    encoder_source: str
    max_tokens: int
    count: int
    token_dim: int
    pooled_dim: int
    dtype: str
    texts_sha: str


def encode_captions(encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    texts: Sequence[str], *, batch_size: int = 64, dtype: str = "float32",
                    progress: bool = False) -> CaptionEmbeddings:
    """Encode `texts` in batches with `encode` (a TextEncoder: list of strings -> (tokens, mask, pooled)) into
    in-memory arrays."""
    from tqdm.auto import tqdm

    parts = []
    for a in tqdm(range(0, len(texts), batch_size), desc="encode captions", unit="batch", disable=not progress):
        tokens, mask, pooled = encode(list(texts[a:a + batch_size]))
        parts.append((tokens.float().cpu().numpy().astype(dtype), mask.cpu().numpy().astype(bool),
                      pooled.float().cpu().numpy().astype(dtype)))
    return CaptionEmbeddings(*(np.concatenate([p[k] for p in parts]) for k in range(3)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    fsync_path(tmp)
    os.replace(tmp, path)


def build_caption_cache(encoder, captions: CaptionSet, out_dir: str | Path, *, batch_size: int = 64,
                        dtype: str = "float32", progress: bool = True) -> CaptionEmbeddings:
    """Encode the distinct captions of `captions` with the frozen `encoder` (ldm.encoders.text.TextEncoder) into a
    cache at `out_dir` and return them (memory-mapped). An existing complete cache of the same encoder and captions
    is read instead; one of another encoder or other captions is refused (ValueError)."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"text.cache_dtype={dtype!r}; expected one of {list(CACHE_DTYPES)}")
    out_dir = Path(out_dir)
    if (out_dir / CACHE_META).is_file():
        return read_caption_cache(out_dir, expected_fingerprint=encoder.fingerprint, captions=captions)
    emb = encode_captions(encoder.encode, captions.texts, batch_size=batch_size, dtype=dtype, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in (("tokens", emb.tokens), ("mask", emb.mask), ("pooled", emb.pooled)):
        _save_npy(out_dir / f"{name}.npy", array)
    atomic_write_text(out_dir / "texts.json", json.dumps(captions.texts, ensure_ascii=False) + "\n")
    meta = CaptionCacheMeta(format_version=CACHE_FORMAT_VERSION, encoder_fingerprint=encoder.fingerprint,
                            encoder_source=str(encoder.source), max_tokens=int(emb.tokens.shape[1]),
                            count=len(captions.texts), token_dim=int(emb.tokens.shape[2]),
                            pooled_dim=int(emb.pooled.shape[1]), dtype=dtype, texts_sha=captions.texts_sha())
    atomic_write_text(out_dir / CACHE_META, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
    return read_caption_cache(out_dir, expected_fingerprint=encoder.fingerprint, captions=captions)


def read_caption_cache(cache_dir: str | Path, *, expected_fingerprint: str | None,
                       captions: CaptionSet | None = None) -> CaptionEmbeddings:
    """The memory-mapped embeddings of a complete cache. FileNotFoundError when there is none; ValueError when it
    was made by another encoder than `expected_fingerprint` or holds other captions than `captions`."""
    cache_dir = Path(cache_dir)
    path = cache_dir / CACHE_META
    if not path.is_file():
        raise FileNotFoundError(f"no caption-embedding cache at {str(cache_dir)!r} ({CACHE_META} not found)")
    data = json.loads(path.read_text())
    if data.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {data.get('format_version')}; this ldm reads "
                         f"{CACHE_FORMAT_VERSION}: delete {cache_dir} to re-encode the captions")
    meta = CaptionCacheMeta(**{f.name: data[f.name] for f in dataclasses.fields(CaptionCacheMeta)})
    check_fingerprint(f"caption-embedding cache {str(cache_dir)!r}", "text encoder", meta.encoder_fingerprint,
                      meta.encoder_source, expected_fingerprint,
                      f"delete {cache_dir} (it is rebuilt at the start of training) or set text.cache to a new "
                      f"directory")
    if captions is not None and meta.texts_sha != captions.texts_sha():
        raise ValueError(f"caption-embedding cache {str(cache_dir)!r} holds other captions ({meta.count} texts, sha "
                         f"{meta.texts_sha}) than {captions.origin} ({len(captions.texts)} texts, sha "
                         f"{captions.texts_sha()}); delete it or set text.cache to a new directory")
    arrays = {name: np.load(cache_dir / f"{name}.npy", mmap_mode="r") for name in ("tokens", "mask", "pooled")}
    expected = {"tokens": (meta.count, meta.max_tokens, meta.token_dim), "mask": (meta.count, meta.max_tokens),
                "pooled": (meta.count, meta.pooled_dim)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{cache_dir}/{name}.npy holds {arrays[name].shape}, expected {shape}: delete the cache "
                             f"directory to re-encode the captions")
    return CaptionEmbeddings(arrays["tokens"], arrays["mask"], arrays["pooled"])


# ------------------------------------------------------------------------------------------------------ dataset
class CaptionedDataset(torch.utils.data.Dataset):
    """A training dataset (ImageDataset or LatentCacheDataset) whose items also carry their caption: "caption_id"
    (long), "text_tokens" (L, D), "text_mask" (L,) bool and "text_pooled" (Dp,). Item `index` shows image
    index // crops_per_image (1 for a cache); its caption is `CaptionSet.pick(image, item_seed, index)`."""

    def __init__(self, base, captions: CaptionSet, embeddings: CaptionEmbeddings):
        if len(captions) * getattr(base, "crops_per_image", 1) != len(base):
            raise ValueError(f"{captions.origin} has captions for {len(captions)} images; the dataset has "
                             f"{len(base)} items")
        self.base, self.captions, self.embeddings = base, captions, embeddings
        self.crops_per_image = getattr(base, "crops_per_image", 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name):  # num_classes, latent_shape, skip counts, ...: the wrapped dataset's
        if name in ("base", "captions", "embeddings", "crops_per_image"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitems__(self, keys):  # the wrapped dataset's batched read (shards: members in file order), captioned
        batched = getattr(self.base, "__getitems__", None)
        items = batched(keys) if batched is not None else [self.base[key] for key in keys]
        return [self._caption(key, item) for key, item in zip(keys, items)]

    def __getitem__(self, key):
        return self._caption(key, self.base[key])

    def _caption(self, key, item: dict) -> dict:
        index, seed, _ = split_key(key)
        cid = self.captions.pick(index // self.crops_per_image, seed, index)
        tokens, mask, pooled = self.embeddings.rows([cid])
        item.update(caption_id=torch.tensor(cid, dtype=torch.long), text_tokens=tokens[0], text_mask=mask[0],
                    text_pooled=pooled[0])
        return item
