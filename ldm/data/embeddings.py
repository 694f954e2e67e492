"""Precomputed caption embeddings as data: train a text-conditioned generator on per-image embeddings made by your own
encoder, with no text encoder in the run (`text.embeddings`; docs/conditioning.md).

Formats, `text.embeddings=`:
  sidecar     a file beside each image of a folder source, `cat/001.npy` or `cat/001.npz` next to `cat/001.jpg`:
                .npy (D,)      a pooled embedding (CLIP's image or text embedding, say): the caption is one token,
                               and the same vector is its pooled embedding
                .npy (L, D)    per-token embeddings, every row a real token
                .npz           "tokens" (L, D) [+ "mask" (L,), True / 1 = a real token] [+ "pooled" (Dp,)], or
                               "pooled" (D,) alone; PixArt-alpha's extracted T5 features (its
                               tools/extract_caption_feature.py: "caption_feature" (1, L, D) + "attention_mask"
                               (1, L)) read as tokens and mask
  FILE.npy    one array for the whole source, row i = image i in the source's order (`ldm.data.sources`: sorted
              folder names, .npz / digits rows, shard members): (N, D) pooled or (N, L, D) per-token; memory-mapped
  FILE.npz    "tokens" (N, L, D) [+ "mask" (N, L)] [+ "pooled" (N, Dp)], or "pooled" (N, D) alone

They become the arrays of the caption-embedding cache (ldm.data.captions.CaptionEmbeddings: tokens (N, L, D), mask
(N, L), pooled (N, Dp)) with one "caption" per image, its name (row i = image i), so `CaptionedDataset` and the
generator task consume them exactly as they consume a text encoder's outputs. L is the longest token count in the
data (at most text.max_tokens): shorter embeddings are zero-padded and masked, as an encoder pads captions. Where no
pooled embedding is given, it is the mean of the real tokens (the rule of the T5 path, ldm/encoders/text.py).
`fingerprint` (sha256 of the arrays) identifies them in the generator's checkpoint, as an encoder's fingerprint does.

Refused, in one line naming the file and the fix: a missing file, a dtype that is not float, NaN or infinite values,
mixed widths D (or Dp), pooled (D,) files beside per-token (L, D) ones, pooled given for some images only, more tokens
than text.max_tokens, a mask with no real token, a row count that is not the number of images.

Prompts for sampling such a generator (`ldm sample --prompt-embeddings FILE`, `read_prompt_embeddings`): FILE holds
one embedding per prompt in the stacked formats above (FILE.npy (N, D) / (N, L, D); FILE.npz with tokens / mask /
pooled, or PixArt-alpha's caption_feature / attention_mask), read and completed by the same code as the training
data, checked against what the generator was trained on (token width, at most its caption tokens, pooled width, and
whether its pooled embeddings were given or the token mean) and zero-padded, masked, to its caption tokens. Training
grids of such a run take `grid_rows`: the first distinct embeddings of the training data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.data.captions import CaptionEmbeddings, CaptionSet
from ldm.data.sources import FolderSource, ImageSource

SIDECAR = "sidecar"
TOKEN_KEYS = ("tokens", "caption_feature")  # ours, PixArt-alpha's
MASK_KEYS = ("mask", "attention_mask")
CHUNK_BYTES = 1 << 26  # passes over a memory-mapped array (finiteness, pooled mean, fingerprint) read 64 MiB at a time


@dataclass
class PrecomputedEmbeddings:
    """Embeddings of every image of a source: image i has caption id i (captions.texts[i] = its name)."""

    captions: CaptionSet
    embeddings: CaptionEmbeddings
    fingerprint: str
    source: str  # where they came from, for checkpoints and messages
    pooled_given: bool = False  # a "pooled" array beside the tokens (else pooled = the real tokens' mean, or the one
    #                             token of a pooled-only embedding, which is that mean too)

    @property
    def token_dim(self) -> int:
        return int(self.embeddings.tokens.shape[2])

    @property
    def max_tokens(self) -> int:
        return int(self.embeddings.tokens.shape[1])

    @property
    def pooled_dim(self) -> int:
        return int(self.embeddings.pooled.shape[1])


# ------------------------------------------------------------------------------------------------------ checks
def _chunks(array: np.ndarray):
    """(first row, rows as an in-memory array) of `array` in slices of about CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, array[:1].nbytes))
    for a in range(0, len(array), step):
        yield a, np.asarray(array[a:a + step])


def _check_float(array: np.ndarray, where: str, what: str) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{where}: {what} has dtype {array.dtype}, not a float type; save it as float32 or float16 "
                         f"(array.astype(np.float32))")


def _check_finite(array: np.ndarray, where: str, what: str) -> None:
    """Chunked over the first axis, so a memory-mapped array is read once and never held whole."""
    for a, chunk in _chunks(array):
        bad = ~np.isfinite(chunk)
        if bad.any():
            row = a + int(np.argwhere(bad)[0][0])
            raise ValueError(f"{where}: {what} holds NaN or infinite values (first in row {row}); recompute it")


def _as_mask(mask: np.ndarray, shape: tuple[int, int], where: str) -> np.ndarray:
    if mask.shape != shape:
        raise ValueError(f"{where}: mask has shape {mask.shape}; expected {shape}, one flag per token (True / 1 = a "
                         f"real token)")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{where}: mask must be bool or 0 / 1 integers; got {mask.dtype}")
        mask = mask.astype(bool)
    empty = np.flatnonzero(~mask.any(1))
    if empty.size:
        raise ValueError(f"{where}: the mask of row {int(empty[0])} marks no real token; every embedding needs one")
    return mask


def _pick(arrays: dict, keys: tuple[str, ...]) -> np.ndarray | None:
    return next((arrays[k] for k in keys if k in arrays), None)


# ------------------------------------------------------------------------------------------------------ one array set
def _with_image_axis(array: np.ndarray | None, ndim: int, where: str, what: str, layout: str) -> np.ndarray | None:
    """A sidecar's array with the image axis added; PixArt-alpha saves its features with a leading axis of 1."""
    if array is None or (array.ndim == ndim + 1 and len(array) == 1):
        return array
    if array.ndim != ndim:
        raise ValueError(f"{where}: {what} has shape {array.shape}; expected {layout}")
    return array[None]


def _parse(arrays: dict, where: str, *, sidecar: bool) -> tuple:
    """(tokens (n, L, D) or None, mask (n, L) or None, pooled (n, Dp) or None) of one file's arrays, n = 1 for a
    sidecar. A file holding only a pooled embedding gives tokens None."""
    tokens, mask, pooled = _pick(arrays, TOKEN_KEYS), _pick(arrays, MASK_KEYS), arrays.get("pooled")
    if tokens is None and pooled is None:
        raise ValueError(f"{where}: no 'tokens' (or PixArt's 'caption_feature') and no 'pooled' array; found "
                         f"{sorted(arrays)}")
    if sidecar:
        tokens = _with_image_axis(tokens, 2, where, "tokens", "(L, D) per-token or (D,) pooled embeddings")
        mask = _with_image_axis(mask, 1, where, "mask", "(L,)")
        pooled = _with_image_axis(pooled, 1, where, "pooled", "(D,)")
    if tokens is not None and tokens.ndim != 3:
        raise ValueError(f"{where}: tokens have shape {tokens.shape}; expected (N, L, D) per-token or (N, D) pooled "
                         f"embeddings, one row per image")
    if pooled is not None and pooled.ndim != 2:
        raise ValueError(f"{where}: pooled has shape {pooled.shape}; expected (N, D), one row per image")
    if mask is not None and tokens is None:
        raise ValueError(f"{where}: a mask without tokens; give 'tokens' with it, or leave the mask out")
    if tokens is not None and pooled is not None and len(pooled) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} token rows but {len(pooled)} pooled rows")
    for what, array in (("tokens", tokens), ("pooled", pooled)):
        if array is not None:
            _check_float(array, where, what)
            _check_finite(array, where, what)
    if tokens is not None and mask is not None:
        mask = _as_mask(mask, tokens.shape[:2], where)
    return tokens, mask, pooled


def _read_npy_or_npz(path: Path, *, sidecar: bool) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    where = str(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        else:
            array = np.load(path, mmap_mode=None if sidecar else "r")
            pooled_only = array.ndim == (1 if sidecar else 2)
            arrays = {"pooled" if pooled_only else "tokens": array}
    except (OSError, ValueError, EOFError) as err:  # not a numpy file, truncated, pickled objects
        raise ValueError(f"{where}: not a readable .npy / .npz array file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]}); save it with np.save / np.savez") from None
    return _parse(arrays, where, sidecar=sidecar)


def _masked_mean(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of tokens (n, L, D) over the True positions of mask (n, L), in float32, chunked over n."""
    out = np.empty((len(tokens), tokens.shape[2]), dtype=np.float32)
    for a, chunk in _chunks(tokens):
        m = mask[a:a + len(chunk), :, None]  # (n, L, 1)
        out[a:a + len(chunk)] = (chunk.astype(np.float64) * m).sum(1) / m.sum(1)
    return out


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(f"{array.shape}:{array.dtype}".encode())
        for _, chunk in _chunks(array):
            h.update(np.ascontiguousarray(chunk).tobytes())
    return h.hexdigest()[:16]


def _complete(tokens, mask, pooled, where: str, max_tokens: int) -> CaptionEmbeddings:
    """Fill in what was not given: pooled-only -> one token; no mask -> all real; no pooled -> the real tokens' mean."""
    if tokens is None:
        tokens, mask = pooled[:, None, :], np.ones((len(pooled), 1), dtype=bool)  # (N, 1, D), (N, 1)
    if mask is None:
        mask = np.ones(tokens.shape[:2], dtype=bool)
    if tokens.shape[1] > max_tokens:
        raise ValueError(f"{where}: {tokens.shape[1]} tokens per embedding, more than text.max_tokens={max_tokens}; "
                         f"set text.max_tokens={tokens.shape[1]} (the model cross-attends to at most that many)")
    if pooled is None:
        pooled = _masked_mean(tokens, mask)
    return CaptionEmbeddings(tokens, mask, pooled)


# ------------------------------------------------------------------------------------------------------ sources
def _stacked(source: ImageSource, path: Path, max_tokens: int) -> tuple[CaptionEmbeddings, bool]:
    if not path.is_file():
        raise FileNotFoundError(f"text.embeddings={str(path)!r}: no such file (an .npy / .npz with one row per image "
                                f"of data.source, in its order)")
    tokens, mask, pooled = _read_npy_or_npz(path, sidecar=False)
    rows = len(tokens) if tokens is not None else len(pooled)
    if rows != len(source):
        raise ValueError(f"{path}: {rows} rows for the {len(source)} images of the data source; row i must be image "
                         f"i in the source's order (e.g. {source.names[0]!r} first)")
    return _complete(tokens, mask, pooled, str(path), max_tokens), tokens is not None and pooled is not None


def _sidecars(source: FolderSource, max_tokens: int) -> tuple[CaptionEmbeddings, bool]:
    parts, first = [], None
    for image in source.paths:
        path = next((p for p in (image.with_suffix(".npy"), image.with_suffix(".npz")) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no embedding for {image}: expected {image.with_suffix('.npy').name} or "
                                    f"{image.with_suffix('.npz').name} beside it (text.embeddings=sidecar); every "
                                    f"image needs one")
        part = _read_npy_or_npz(path, sidecar=True)
        first = first or (path, part)
        _check_alike(part, path, *first)
        parts.append(part)
    tokens, mask, pooled = zip(*parts)
    if tokens[0] is None:  # pooled-only embeddings
        return _complete(None, None, np.concatenate(pooled), f"sidecar embeddings under {source.root}",
                         max_tokens), False
    longest = max(t.shape[1] for t in tokens)
    if longest > max_tokens:
        path = source.paths[next(i for i, t in enumerate(tokens) if t.shape[1] == longest)]
        raise ValueError(f"{path.with_suffix('')}.np*: {longest} tokens, more than text.max_tokens={max_tokens}; set "
                         f"text.max_tokens={longest} (the model cross-attends to at most that many)")
    dtype = np.float16 if all(t.dtype == np.float16 for t in tokens) else np.float32
    out = np.zeros((len(tokens), longest, tokens[0].shape[2]), dtype=dtype)  # (N, L, D), zero padding
    out_mask = np.zeros((len(tokens), longest), dtype=bool)
    for i, (t, m) in enumerate(zip(tokens, mask)):
        out[i, :t.shape[1]] = t[0]
        out_mask[i, :t.shape[1]] = True if m is None else m[0]
    return _complete(out, out_mask, None if pooled[0] is None else np.concatenate(pooled).astype(np.float32),
                     f"sidecar embeddings under {source.root}", max_tokens), pooled[0] is not None


def _check_alike(part, path: Path, first_path: Path, first) -> None:
    """One kind and width for every image: mixing them means the files came from different encoders or scripts."""
    (tokens, _, pooled), (tokens0, _, pooled0) = part, first
    if (tokens is None) != (tokens0 is None):
        kind = {True: "a pooled (D,) embedding only", False: "per-token (L, D) embeddings"}
        raise ValueError(f"{path}: {kind[tokens is None]}, but {first_path} holds {kind[tokens0 is None]}; give every "
                         f"image the same kind")
    if (pooled is None) != (pooled0 is None):
        raise ValueError(f"{path}: {'no ' if pooled is None else 'a '}'pooled' array, unlike {first_path}; give it "
                         f"for every image or for none (then it is the mean of the real tokens)")
    for what, a, b in (("token", tokens, tokens0), ("pooled", pooled, pooled0)):
        if a is not None and a.shape[-1] != b.shape[-1]:
            raise ValueError(f"{path}: {what} width {a.shape[-1]}, but {first_path} has {b.shape[-1]}; every image's "
                             f"embedding must come from the same encoder")


def load_embeddings(source: ImageSource, spec: str, *, max_tokens: int) -> PrecomputedEmbeddings:
    """The precomputed embeddings `spec` ("sidecar" or a .npy / .npz path) of every image of `source`."""
    if spec == SIDECAR and isinstance(source, FolderSource):
        (embeddings, given), where = _sidecars(source, max_tokens), f"sidecar embeddings under {source.root}"
    elif spec == SIDECAR:
        raise ValueError(f"text.embeddings=sidecar reads <image>.npy / <image>.npz files beside the images of a "
                         f"folder; a {type(source).__name__} has no such files: give one FILE.npy with a row per "
                         f"image in the source's order (text.embeddings=FILE.npy)")
    else:
        path = Path(spec).expanduser()
        if path.suffix not in (".npy", ".npz"):
            raise ValueError(f"text.embeddings={spec!r}: expected 'sidecar' (an .npy / .npz beside every image) or "
                             f"a .npy / .npz file with one row per image")
        (embeddings, given), where = _stacked(source, path, max_tokens), str(path)
    captions = CaptionSet.from_captions([[name] for name in source.names], f"precomputed embeddings ({where})")
    fingerprint = _fingerprint(embeddings.tokens, embeddings.mask, embeddings.pooled)
    return PrecomputedEmbeddings(captions, embeddings, fingerprint, f"precomputed embeddings {where}", given)


# ------------------------------------------------------------------------------------------------------ prompts
def _padded(embeddings: CaptionEmbeddings, max_tokens: int) -> CaptionEmbeddings:
    """Tokens (N, L, D) zero-padded and masked to (N, max_tokens, D), as shorter training embeddings are padded."""
    n, length, width = embeddings.tokens.shape
    tokens = np.zeros((n, max_tokens, width), dtype=embeddings.tokens.dtype)  # (N, max_tokens, D)
    mask = np.zeros((n, max_tokens), dtype=bool)  # (N, max_tokens)
    tokens[:, :length], mask[:, :length] = embeddings.tokens, embeddings.mask
    return CaptionEmbeddings(tokens, mask, np.asarray(embeddings.pooled))


def read_prompt_embeddings(path: str | Path, *, token_dim: int, max_tokens: int, pooled_dim: int | None,
                           pooled_given: bool | None = None) -> PrecomputedEmbeddings:
    """The prompts of `ldm sample --prompt-embeddings FILE`: one embedding per row of FILE, in the stacked formats of
    text.embeddings, for a generator trained on precomputed embeddings of width `token_dim` with `max_tokens` caption
    tokens (its caption_dim / caption_tokens) and pooled width `pooled_dim` (None: it takes no pooled embedding).

    Read and completed as training data are (`_read_npy_or_npz`, `_complete`: a missing pooled embedding is the mean
    of the real tokens), then zero-padded, masked, to max_tokens. Refused in one line naming the file and the shape
    the generator expects: another width, more tokens than max_tokens, pooled-only (N, D) rows for a generator trained
    on several tokens, a pooled width that is not pooled_dim, and, when `pooled_given` records how the training data
    made their pooled embeddings (None: not recorded), a separate "pooled" array where they had none or none where
    they had one. Prompt i's caption text is "embedding:FILE#i" (FILE as given)."""
    where = str(path)
    path = Path(path).expanduser()
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"--prompt-embeddings {where}: expected a .npy / .npz file with one embedding per prompt")
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-embeddings {where}: no such file (an .npy / .npz with one embedding per "
                                f"prompt)")
    tokens, mask, pooled = _read_npy_or_npz(path, sidecar=False)
    expected = (f"(N, {token_dim}) pooled or (N, 1, {token_dim}) embeddings" if max_tokens == 1 else
                f"(N, L, {token_dim}) per-token embeddings with L <= {max_tokens}")
    rows = len(tokens) if tokens is not None else len(pooled)
    width = (tokens if tokens is not None else pooled).shape[-1]
    if rows == 0:
        raise ValueError(f"{where}: no embedding (0 rows); expected {expected}, one row per prompt")
    if tokens is None and max_tokens > 1:
        raise ValueError(f"{where}: pooled (N, {width}) embeddings, but the generator was trained on per-token "
                         f"embeddings of up to {max_tokens} tokens; expected {expected}")
    if width != token_dim:
        raise ValueError(f"{where}: embeddings of width {width}, but the generator was trained on width {token_dim}; "
                         f"expected {expected}")
    if tokens is not None and tokens.shape[1] > max_tokens:
        raise ValueError(f"{where}: {tokens.shape[1]} tokens per embedding, more than the {max_tokens} the generator "
                         f"was trained on; expected {expected}")
    given = tokens is not None and pooled is not None
    if pooled_dim is not None:  # the generator adds the pooled embedding to its condition
        if pooled_given is not None and given != pooled_given:
            raise ValueError(
                f"{where}: a 'pooled' array, but the generator's pooled embeddings were the mean of the real tokens "
                f"(its training embeddings gave none); leave 'pooled' out" if given else
                f"{where}: no 'pooled' array, but the generator was trained with one beside the tokens; expected an "
                f".npz with 'tokens' (N, L, {token_dim}) and 'pooled' (N, {pooled_dim})")
        pooled_width = pooled.shape[1] if pooled is not None else width
        if pooled_width != pooled_dim:
            raise ValueError(f"{where}: pooled embeddings of width {pooled_width}, but the generator takes "
                             f"{pooled_dim}; expected a 'pooled' (N, {pooled_dim}) array")
    embeddings = _padded(_complete(tokens, mask, pooled, where, max_tokens), max_tokens)
    captions = CaptionSet.from_captions([[f"embedding:{where}#{i}"] for i in range(rows)], f"prompt embeddings {where}")
    # of what the network is given (float32 rows, CaptionEmbeddings.rows): float16 and float32 copies are one prompt set
    fingerprint = _fingerprint(embeddings.tokens.astype(np.float32), embeddings.mask,
                               embeddings.pooled.astype(np.float32))
    return PrecomputedEmbeddings(captions, embeddings, fingerprint, f"prompt embeddings {where}", given)


def grid_rows(pre: PrecomputedEmbeddings, count: int = 10, *, scan: int = 1000) -> PrecomputedEmbeddings:
    """The embeddings of the first `count` training images whose embeddings differ (looking at the first `scan`), as
    prompts: what training grids and periodic FID of a run on precomputed embeddings are conditioned on, as an
    encoder run's are on its first distinct captions. Prompt k's caption text is "embedding of <image name>"."""
    e, picked, seen = pre.embeddings, [], set()
    for i in range(min(scan, len(e.tokens))):
        key = _fingerprint(np.asarray(e.tokens[i]), np.asarray(e.mask[i]), np.asarray(e.pooled[i]))
        if key not in seen:
            seen.add(key)
            picked.append(i)
        if len(picked) == count:
            break
    rows = CaptionEmbeddings(np.asarray(e.tokens[picked]), np.asarray(e.mask[picked]), np.asarray(e.pooled[picked]))
    captions = CaptionSet.from_captions([[f"embedding of {pre.captions.texts[i]}"] for i in picked],
                                        f"the first distinct rows of {pre.source}")
    return PrecomputedEmbeddings(captions, rows, _fingerprint(rows.tokens, rows.mask, rows.pooled), pre.source,
                                 pre.pooled_given)
