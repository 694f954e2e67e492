"""Evaluation drivers: reference statistics (with an on-disk cache), generation metrics and reconstruction metrics.

Generation (`evaluate_samples` / `evaluate_batches`): one pass of the extractor over the samples gives the features
(FD / FID and precision/recall), Inception's spatial features (sFID) and logits (IS); the reference side comes from a
statistics file (ADM reference batch or our npz) or from images, whose statistics are cached. This mirrors the ADM
evaluator's `main()` (guided-diffusion evaluations/evaluator.py): FID and sFID from stats, IS from the samples'
logits, precision/recall between reference and sample pool features.

Reconstruction (`evaluate_reconstruction`): images go through a tokenizer's encode-decode callable; rFID =
FD(reconstructions, originals) (as reported by LDM / EQ-VAE / VA-VAE tokenizers), plus mean per-image PSNR, SSIM and
LPIPS.

Cache: reference statistics (mu, sigma, mu_s, sigma_s and the features, ADM npz layout) are stored under
`cache_dir/<key>.npz`, key = sha256(dataset fingerprint | extractor name, preprocessing and weight digest | crop size
| image count). The fingerprint comes from the data source (file names, sizes, modification times; for .npz the file's
size, mtime and a hash of its first and last MiB), so an edited dataset misses the cache and is recomputed.

Metric names carry the extractor: Inception gives fid / sfid / is / precision / recall; any other extractor X gives
fd_X / is_X / precision_X / recall_X (rfid / rfd_X for reconstructions). Every result also has "extractor".
All processes return the same dict; evaluation shards over processes (accelerate launch / torchrun).

Robustness: a metric the inputs cannot support is skipped, not fatal (IS with fewer images than splits,
precision/recall with <= k images, sFID without spatial reference statistics), and a Fréchet distance from fewer
images than feature dimensions is computed but flagged; each such event is logged and its line kept in the result's
"warnings" list (absent when there is none), so summaries carry it. A sample that cannot be read is an error naming
the file (a skipped sample would silently shrink the set); reference images follow the data's skip policy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ldm.data.images import iter_uint8_batches
from ldm.data.sources import BadImageError, open_source
from ldm.eval.extractors import Extractor, InceptionExtractor, build_extractor
from ldm.eval.features import dist_info, extract_features, gather_by_index, prefetch, to_nchw
from ldm.eval.fid import (
    GaussianStats,
    covariance_warning,
    frechet_distance,
    has_stats,
    load_stats,
    save_stats,
    stats_from_features,
)
from ldm.eval.metrics import inception_score, precision_recall, psnr, ssim

logger = logging.getLogger(__name__)

GENERATION_METRICS = ("fd", "sfid", "is", "pr")
RECON_METRICS = ("rfd", "psnr", "ssim", "lpips")


def default_cache_dir() -> Path:
    """$LDM_CACHE_DIR/fid_stats, else ~/.cache/ldm/fid_stats."""
    return Path(os.environ.get("LDM_CACHE_DIR", Path.home() / ".cache" / "ldm")).expanduser() / "fid_stats"


def metric_key(extractor: Extractor, base: str) -> str:
    """'fd' -> 'fid' for Inception, 'fd_<name>' otherwise; other bases get the '_<name>' suffix off Inception."""
    if extractor.name == "inception":
        return {"fd": "fid", "rfd": "rfid"}.get(base, base)
    return f"{base}_{extractor.name}"


def _device(device: torch.device | str | None) -> torch.device:
    """`device`, or this process's accelerate device. Always sets up torch.distributed first when the process was
    started by accelerate launch / torchrun (cpu=True gives a gloo group on machines without CUDA), so shards and
    gathers see the right rank and world size."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return torch.device(device) if device is not None else state.device


def _extractor(extractor: str | Extractor, weights: str | None, device: torch.device) -> Extractor:
    ext = build_extractor(extractor, weights) if isinstance(extractor, str) else extractor
    return ext.to(device)


def _image_batches(path: str, batch_size: int, size: int | None, limit: int | None = None,
                   on_error: str = "skip") -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """This process's shard of the images at `path` (the one reader, ldm.data.images.iter_uint8_batches); bad files
    are skipped with a warning or raised, per `on_error`. A damaged .npz is a ValueError naming it."""
    rank, world = dist_info()
    try:
        yield from iter_uint8_batches(str(path), batch_size, size=size, rank=rank, world_size=world, limit=limit,
                                      on_error=on_error)
    except zipfile.BadZipFile as err:  # np.load of a truncated .npz raises it without the file name
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({err})") from None


def _sample_batches(path: str, batch_size: int, size: int | None,
                    limit: int | None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """`_image_batches` of a sample set, where an unreadable image is an error naming it (skipping it would silently
    evaluate fewer samples); `ldm sample` regenerates the indices whose PNG is missing."""
    try:
        yield from _image_batches(path, batch_size, size, limit, on_error="raise")
    except BadImageError as err:
        raise ValueError(f"unreadable sample {err}; delete that file and re-run `ldm sample` with the same --out, "
                         f"which regenerates missing samples, then evaluate again") from None


def _count(path: str, size: int | None) -> int | None:
    """Number of images at `path` for the progress bar (an .npz is measured from its arr_0 header, not loaded)."""
    p = Path(path)
    try:
        if p.suffix == ".npz" and p.is_file():
            with zipfile.ZipFile(p) as zf, zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            return int(shape[0])
        return len(open_source(str(path), size or 32))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: the reader reports it, naming the file
        return None


# ------------------------------------------------------------------------------------------------------ cache
def dataset_fingerprint(path: str) -> str:
    """Identity of a data source for the cache key (module docstring)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        st = p.stat()
        h = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, st.st_size - (1 << 20)))
            h.update(f.read(1 << 20))
        return h.hexdigest()[:16]
    root = str(p.resolve()) if p.exists() else str(path)
    return hashlib.sha256(f"{root}|{open_source(str(path)).fingerprint()}".encode()).hexdigest()[:16]


def stats_cache_path(path: str, extractor: Extractor, size: int | None, num: int | None,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    key = f"{dataset_fingerprint(path)}|{extractor.cache_key()}|size={size}|num={num}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / f"{extractor.name}-{digest}.npz"


def compute_stats(batches: Iterable[tuple[np.ndarray, np.ndarray]], extractor: Extractor,
                  outputs: Sequence[str] = ("features",), *, device: torch.device | str | None = None,
                  total: int | None = None, progress: bool = True, desc: str = "features") -> dict:
    """Features of this process's (uint8 NHWC, indices) batches, gathered over processes, and their statistics:
    {'stats': GaussianStats of "features", 'spatial': GaussianStats | None, 'features', 'logits' (if asked),
    'indices'}."""
    feats, idx = extract_features(batches, extractor, tuple(outputs), device=device, total=total,
                                  progress=progress, desc=desc)
    out = {"stats": stats_from_features(feats["features"]), "spatial": None, "features": feats["features"],
           "indices": idx}
    if "spatial" in feats:
        out["spatial"] = stats_from_features(feats["spatial"])
    if "logits" in feats:
        out["logits"] = feats["logits"]
    return out


def _stats_outputs(extractor: Extractor) -> tuple[str, ...]:
    return ("features", "spatial") if "spatial" in extractor.outputs else ("features",)


def _save_reference(file: Path, ref: dict, extractor: Extractor, source: str) -> None:
    if dist_info()[0] == 0:
        meta = {"extractor": extractor.cache_key(), "source": str(source), "num": int(ref["stats"].num)}
        save_stats(file, ref["stats"], ref["spatial"], meta=meta, features=ref["features"].astype(np.float32))
        logger.info("cached reference statistics of %s in %s", source, file)
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def reference_stats(ref: str, extractor: Extractor, *, batch_size: int = 64, size: int | None = None,
                    num: int | None = None, need_features: bool = False, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, device: torch.device | str | None = None, progress: bool = True) -> dict:
    """Reference statistics: {'stats', 'spatial' (or None), 'features' (when available), 'meta'}.

    `ref` is a statistics npz (`mu`, `sigma`[, `mu_s`, `sigma_s`]: an ADM reference batch or a file written here) or
    images (folder, archive, ADM .npz with arr_0, 'digits'). Statistics of images are cached (module docstring).
    An ADM batch holding both statistics and images (arr_0) is used as the ADM evaluator does: FID/sFID from its
    statistics, precision/recall from features of its images.
    """
    if has_stats(ref):
        data = load_stats(ref)
        key = data["meta"].get("extractor")
        if key is not None and key != extractor.cache_key():
            raise ValueError(f"statistics file {ref!r} was computed with extractor {key!r}, not "
                             f"{extractor.cache_key()!r}")
        if key is None and not isinstance(extractor, InceptionExtractor):
            raise ValueError(f"{ref!r} holds ADM statistics (Inception pool_3); they cannot be compared with "
                             f"extractor {extractor.name!r}: pass the reference images instead")
        if need_features and "features" not in data:
            with np.load(ref) as f:
                has_images = "arr_0" in f.files
            if has_images:
                data["features"] = _image_reference(ref, extractor, batch_size, size, num, cache_dir, use_cache,
                                                    device, progress)["features"]
        return data
    return _image_reference(ref, extractor, batch_size, size, num, cache_dir, use_cache, device, progress)


def _image_reference(ref: str, extractor: Extractor, batch_size: int, size: int | None, num: int | None,
                     cache_dir, use_cache: bool, device, progress: bool) -> dict:
    file = stats_cache_path(ref, extractor, size, num, cache_dir)
    if use_cache and file.is_file():
        logger.info("reference statistics of %s read from cache %s", ref, file)
        return load_stats(file)
    batches = _image_batches(ref, batch_size, size, num)
    out = compute_stats(batches, extractor, _stats_outputs(extractor), device=device,
                        total=num or _count(ref, size), progress=progress, desc="reference")
    if use_cache:
        _save_reference(file, out, extractor, ref)
    return out


# ------------------------------------------------------------------------------------------------------ warnings
def _note(notes: list[str], message: str) -> None:
    """Log a warning and keep its line for the result's "warnings" (module docstring)."""
    logger.warning(message)
    notes.append(message)


def _check_covariances(notes: list[str], metric: str, *sides: tuple[GaussianStats, str]) -> None:
    """THE rank check of every Fréchet distance (any extractor, FD / sFID / rFD): a note per side whose statistics
    came from no more images than feature dimensions (`covariance_warning`)."""
    for stats, what in sides:
        message = covariance_warning(stats, metric, what)
        if message is not None:
            _note(notes, message)


def _with_warnings(result: dict, notes: list[str]) -> dict:
    if notes:
        result["warnings"] = notes
    return result


# ------------------------------------------------------------------------------------------------------ generation
def evaluate_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], ref: str | dict, *,
                     extractor: str | Extractor = "inception", extractor_weights: str | None = None,
                     metrics: Sequence[str] = GENERATION_METRICS, batch_size: int = 64, size: int | None = None,
                     ref_num: int | None = None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                     device: torch.device | str | None = None, progress: bool = True, fd_method: str = "eigh",
                     is_splits: int = 10, pr_k: int = 3, total: int | None = None) -> dict:
    """Generation metrics of sample batches (this process's shard of (uint8 NHWC, global indices)) against `ref`
    (a path for `reference_stats`, or its result dict). Used by `evaluate_samples` and by periodic FID in training.
    `metrics` is a subset of ('fd', 'sfid', 'is', 'pr'); metrics the extractor or the image counts cannot support
    are skipped, and Fréchet distances from too few images flagged, with a line in result["warnings"] (module
    docstring)."""
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if unknown:
        raise ValueError(f"metrics {unknown} unknown; expected a subset of {GENERATION_METRICS}")
    device = _device(device)
    ext = _extractor(extractor, extractor_weights, device)
    notes: list[str] = []
    wanted = set(metrics)
    if "sfid" in wanted and "spatial" not in ext.outputs:
        wanted.discard("sfid")
    if "is" in wanted and ("logits" not in ext.outputs or (isinstance(ext, InceptionExtractor)
                                                           and not ext.has_classifier)):
        _note(notes, f"Inception Score skipped: extractor {ext.name!r} has no classifier head")
        wanted.discard("is")
    outputs = ["features"] + (["spatial"] if "sfid" in wanted else []) + (["logits"] if "is" in wanted else [])
    if isinstance(ref, dict):
        reference = ref
    else:  # the reference first: a mismatched statistics file fails before the samples' feature pass
        reference = reference_stats(ref, ext, batch_size=batch_size, size=size, num=ref_num,
                                    need_features="pr" in wanted, cache_dir=cache_dir, use_cache=use_cache,
                                    device=device, progress=progress)
    sample = compute_stats(batches, ext, outputs, device=device, total=total, progress=progress, desc="samples")
    result: dict = {"extractor": ext.name, "num_samples": int(len(sample["indices"])),
                    "num_ref": int(reference["stats"].num)}
    if "fd" in wanted:
        _check_covariances(notes, ext.metric_name, (sample["stats"], "samples"),
                           (reference["stats"], "reference images"))
        result[metric_key(ext, "fd")] = frechet_distance(sample["stats"], reference["stats"], fd_method)
    if "sfid" in wanted:
        if reference.get("spatial") is None:
            _note(notes, "sFID skipped: the reference has no spatial statistics (mu_s, sigma_s)")
        else:
            _check_covariances(notes, "sFID", (sample["spatial"], "samples"),
                               (reference["spatial"], "reference images"))
            result["sfid"] = frechet_distance(sample["spatial"], reference["spatial"], fd_method)
    if "is" in wanted:
        _inception_score(result, notes, ext, sample["logits"], is_splits)
    if "pr" in wanted:
        _precision_recall(result, notes, ext, reference.get("features"), sample["features"], pr_k, device)
    return _with_warnings(result, notes)


def _inception_score(result: dict, notes: list[str], ext: Extractor, logits: np.ndarray, splits: int) -> None:
    key = metric_key(ext, "is")
    if len(logits) < splits:
        _note(notes, f"Inception Score ({key}) skipped: {len(logits)} samples are fewer than its {splits} splits; "
                     f"use at least {splits} samples")
        return
    result[key], result[key + "_std"] = inception_score(logits, splits=splits)


def _precision_recall(result: dict, notes: list[str], ext: Extractor, ref_features: np.ndarray | None,
                      features: np.ndarray, k: int, device: torch.device) -> None:
    if ref_features is None:
        _note(notes, "precision/recall skipped: the reference has statistics but no images or features")
        return
    fewest = min(len(ref_features), len(features))
    if fewest <= k:  # the k-th nearest neighbour radius needs k other points in each set
        _note(notes, f"precision/recall skipped: {len(features)} samples and {len(ref_features)} reference images; "
                     f"its k={k} nearest-neighbour radii need more than {k} in each set")
        return
    p, r = precision_recall(ref_features, features, k=k, device=device)
    result[metric_key(ext, "precision")], result[metric_key(ext, "recall")] = p, r


def evaluate_samples(samples: str, ref: str, *, batch_size: int = 64, size: int | None = None,
                     num_samples: int | None = None, **kwargs) -> dict:
    """Generation metrics of the images at `samples` (folder, archive or ADM .npz) against `ref` (see
    `reference_stats`); `num_samples` keeps the first N (by index). An unreadable sample image is a ValueError naming
    it (`_sample_batches`). Keyword arguments as `evaluate_batches`."""
    kwargs["device"] = _device(kwargs.get("device"))  # before sharding: initialises the process group
    total = num_samples or _count(samples, size)
    batches = _sample_batches(samples, batch_size, size, num_samples)
    return evaluate_batches(batches, ref, batch_size=batch_size, size=size, total=total, **kwargs)




# ------------------------------------------------------------------------------------------------------ recon
def _to_uint8(recon: torch.Tensor) -> torch.Tensor:
    """Reconstructions as uint8: uint8 passes; floats are read as [-1, 1] and rounded as when saving a PNG."""
    if recon.dtype == torch.uint8:
        return recon
    return ((recon.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.inference_mode()
def _paired_metrics(pairs: Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]], data: str, *,
                    device: torch.device, extractor: str | Extractor = "inception",
                    extractor_weights: str | None = None, metrics: Sequence[str] = RECON_METRICS,
                    size: int | None = None, num_images: int | None = None, lpips_weights: str | None = None,
                    lpips_model: torch.nn.Module | None = None, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, progress: bool = True, fd_method: str = "eigh") -> dict:
    """Metrics over (original uint8 NCHW, reconstruction uint8 NCHW, indices) triples of this process's shard."""
    from tqdm.auto import tqdm

    unknown = sorted(set(metrics) - set(RECON_METRICS))
    if unknown:
        raise ValueError(f"metrics {unknown} unknown; expected a subset of {RECON_METRICS}")
    ext = _extractor(extractor, extractor_weights, device) if "rfd" in metrics else None
    lp = None
    if "lpips" in metrics:
        from ldm.tokenizers.losses import build_lpips

        lp = (lpips_model if lpips_model is not None else build_lpips(lpips_weights)).to(device)
    cached, file = None, None
    if ext is not None:
        file = stats_cache_path(data, ext, size, num_images, cache_dir)
        cached = load_stats(file) if use_cache and file.is_file() else None
    rows: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        rows.setdefault(key, []).append(value.detach().cpu().numpy())  # PSNR/SSIM float64, features float32

    seen = []
    bar = tqdm(total=num_images or _count(data, size), desc="reconstruction", unit="img",
               disable=not progress or dist_info()[0] != 0)
    for x, recon, idx in pairs:
        if recon.shape != x.shape:
            raise ValueError(f"reconstructions have shape {tuple(recon.shape)}, originals {tuple(x.shape)}")
        if "psnr" in metrics:
            add("psnr", psnr(recon, x))
        if "ssim" in metrics:
            add("ssim", ssim(recon, x))
        if lp is not None:
            pm1 = lambda t: t.float() / 127.5 - 1  # noqa: E731  (LPIPS takes [-1, 1])
            add("lpips", lp(pm1(recon), pm1(x)).flatten())
        if ext is not None:
            add("feat_recon", ext(recon, outputs=("features",))["features"])
            if cached is None:  # the originals' statistics are cached exactly as reference_stats would cache them
                for k, v in ext(x, outputs=_stats_outputs(ext)).items():
                    add(f"feat_orig_{k}", v)
        seen.append(np.asarray(idx, np.int64))
        bar.update(len(idx))
    bar.close()
    if not seen:
        raise ValueError(f"no images read from {data!r}")
    gathered, indices = gather_by_index({k: np.concatenate(v) for k, v in rows.items()}, np.concatenate(seen))
    result: dict = {"num_images": int(len(indices))}
    for k in ("psnr", "ssim", "lpips"):
        if k in gathered:
            result[k] = float(np.mean(gathered[k].astype(np.float64)))
    if ext is not None:
        _reconstruction_fd(result, gathered, ext, cached, file if use_cache else None, data, fd_method)
    return result


def _reconstruction_fd(result: dict, gathered: dict[str, np.ndarray], ext: Extractor, cached: dict | None,
                       cache_file: Path | None, data: str, fd_method: str) -> None:
    """rFD of the gathered reconstruction features against the originals' statistics: `cached`, or computed from
    this pass's features of the originals and then cached in `cache_file` (when given)."""
    result["extractor"] = ext.name
    if cached is None:
        spatial = gathered.get("feat_orig_spatial")
        cached = {"stats": stats_from_features(gathered["feat_orig_features"]),
                  "features": gathered["feat_orig_features"],
                  "spatial": None if spatial is None else stats_from_features(spatial)}
        if cache_file is not None:
            _save_reference(cache_file, cached, ext, data)
    recon = stats_from_features(gathered["feat_recon"])
    notes: list[str] = []
    _check_covariances(notes, f"r{ext.metric_name}", (recon, "reconstructions"), (cached["stats"], "original images"))
    result[metric_key(ext, "rfd")] = frechet_distance(recon, cached["stats"], fd_method)
    _with_warnings(result, notes)


def evaluate_reconstruction(encode_decode: Callable[[torch.Tensor], torch.Tensor], data: str, *,
                            extractor: str | Extractor = "inception", extractor_weights: str | None = None,
                            metrics: Sequence[str] = RECON_METRICS, batch_size: int = 32, size: int | None = None,
                            num_images: int | None = None, lpips_weights: str | None = None,
                            lpips_model: torch.nn.Module | None = None, cache_dir: str | os.PathLike | None = None,
                            use_cache: bool = True, device: torch.device | str | None = None, progress: bool = True,
                            fd_method: str = "eigh") -> dict:
    """Reconstruction metrics of `encode_decode` on the images at `data` (first `num_images` by index):
    rfid (or rfd_<extractor>), psnr, ssim, lpips (means over images), num_images, extractor.

    `encode_decode` takes float images (B, 3, H, W) in [-1, 1] on `device` and returns reconstructions of the same
    shape, either floats in [-1, 1] or uint8; reconstructions are quantised to uint8 (as saved images) before every
    metric. It should be deterministic (e.g. decode the posterior mean) for reproducible numbers.
    LPIPS is LPIPS-VGG with the trunk from `lpips_weights` or torchvision's cache (`lpips_model` overrides it).
    """
    device = _device(device)
    batches = _image_batches(data, batch_size, size, num_images)

    def pairs():
        for images, idx in prefetch(batches):
            x = to_nchw(images, device)  # (B, 3, H, W) uint8
            yield x, _to_uint8(encode_decode(x.float() / 127.5 - 1)), idx

    return _paired_metrics(pairs(), data, extractor=extractor, extractor_weights=extractor_weights, metrics=metrics,
                           size=size, num_images=num_images, lpips_weights=lpips_weights, lpips_model=lpips_model,
                           cache_dir=cache_dir, use_cache=use_cache, device=device, progress=progress,
                           fd_method=fd_method)


def evaluate_pairs(recons: str, data: str, *, batch_size: int = 32, size: int | None = None,
                   num_images: int | None = None, device: torch.device | str | None = None, **kwargs) -> dict:
    """Reconstruction metrics of saved reconstructions `recons` against `data`, paired by index (same count and
    order: sorted file names or array rows). Keyword arguments as `evaluate_reconstruction`."""
    device = _device(device)
    a, b = _image_batches(recons, batch_size, size, num_images), _image_batches(data, batch_size, size, num_images)

    def pairs():
        missing = object()
        for rec, orig in itertools.zip_longest(prefetch(a), prefetch(b), fillvalue=missing):
            if rec is missing or orig is missing or not np.array_equal(rec[1], orig[1]):
                raise ValueError(f"{recons!r} and {data!r} do not pair up image by image (different counts, or "
                                 f"unreadable files skipped in one of them)")
            yield to_nchw(orig[0], device), to_nchw(rec[0], device), orig[1]

    return _paired_metrics(pairs(), data, size=size, num_images=num_images, device=device, **kwargs)


def write_reference_stats(data: str, out: str | os.PathLike, *, extractor: str | Extractor = "inception",
                          extractor_weights: str | None = None, batch_size: int = 64, size: int | None = None,
                          num: int | None = None, device: torch.device | str | None = None,
                          progress: bool = True) -> Path:
    """Compute the statistics (and features) of `data` and write them as an ADM-layout npz at `out`."""
    device = _device(device)
    ext = _extractor(extractor, extractor_weights, device)
    ref = _image_reference(data, ext, batch_size, size, num, None, False, device, progress)
    _save_reference(Path(out), ref, ext, data)
    return Path(out)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (rank 0 only), e.g. to a run's metrics.jsonl."""
    if dist_info()[0] != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
