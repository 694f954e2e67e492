"""From a `Generator` (ldm/eval/generator.py) to a folder of samples: labels per global index, fixed-shape batches,
PNG / npz / grid writers and the sample-folder identity.

`write_samples` is `ldm sample`: a folder of PNGs named by global index, sharded over processes, resumable,
plus grid.png, an ADM-layout samples.npz and sample_config.yaml (what decides the images: checkpoint, EMA, seed,
classes, every SampleCfg field but SAMPLE_NON_IDENTITY_FIELDS; a folder never mixes two of them).

    out/000000.png ... out/{num-1:06d}.png   sample i: noise from generator hash(seed, i), label labels_for(i)
    out/grid.png                            the first --grid-size samples
    out/samples.npz                         arr_0 (N, H, W, 3) uint8, arr_1 (N,) int64 labels (ADM evaluator input)
    out/sample_config.yaml                  identity + the full resolved run config with the sample section used
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import SAMPLE_NON_IDENTITY_FIELDS, SampleCfg
from ldm.diffusion.samplers import get_sampler
from ldm.eval.features import dist_info
from ldm.eval.generator import Generator, initial_noise, sampling_precision
from ldm.io import atomic_write_text, git_sha
from ldm.seeding import derive_seed, index_generators

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ labels
LABEL_ORDERS = ("cycle", "random", "grid")


def parse_classes(spec: str | Sequence[int] | None, num_classes: int) -> list[int] | None:
    """Class ids to sample from: "all" / None (every class), "0,3,7", "0-9" or a list; None for unconditional models.

    Raises ValueError naming the id and the allowed range when an id is out of range or the model is unconditional.
    """
    if num_classes < 1:
        if spec is not None and spec != "all":
            raise ValueError(f"--classes={spec!r}: this generator is unconditional (num_classes=0); leave --classes "
                             f"out")
        return None
    if spec is None or spec == "all":
        return list(range(num_classes))
    if isinstance(spec, str):
        ids: list[int] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(v) for v in part.split("-"))
                ids.extend(range(lo, hi + 1))
            elif re.fullmatch(r"-?\d+", part):
                ids.append(int(part))
            else:
                raise ValueError(f"--classes={spec!r}: {part!r} is not a class id or a range a-b; expected e.g. "
                                 f"'all', '0,1,2' or '0-9'")
    else:
        ids = [int(v) for v in spec]
    if not ids:
        raise ValueError(f"--classes={spec!r} names no class; expected 'all' or ids in [0, {num_classes - 1}]")
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: class id {bad[0]} is out of range; this generator has {num_classes} classes "
                         f"(ids 0 .. {num_classes - 1})")
    return ids


def labels_for(indices: Sequence[int], classes: list[int] | None, *, seed: int, order: str = "cycle",
               num: int | None = None) -> torch.Tensor | None:
    """Class label of each global sample index: a pure function of (seed, index, classes[, num]).

    cycle   classes[i mod K]: balanced (50 per class for 50k ImageNet samples), a grid with K columns shows one
            class per column.
    random  classes[hash(seed, i) mod K], independent draws as DiT's sample_ddp.py (which uses torch.randint).
    grid    classes[(i // ceil(num / K)) mod K]: consecutive blocks, one class per grid row (needs num).
    """
    if classes is None:
        return None
    if order not in LABEL_ORDERS:
        raise ValueError(f"label order {order!r}; expected one of {list(LABEL_ORDERS)}")
    k = len(classes)
    if order == "cycle":
        pos = [int(i) % k for i in indices]
    elif order == "random":
        pos = [derive_seed(seed, "label", int(i)) % k for i in indices]
    else:
        if num is None:
            raise ValueError("label order 'grid' needs num (the number of samples)")
        per_class = -(-num // k)
        pos = [(int(i) // per_class) % k for i in indices]
    return torch.tensor([classes[p] for p in pos], dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ one batch
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to nearest as DiT sample_ddp.py (127.5 x + 128, floor)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (n, ...) to (size, ...) by repeating the last row (real inputs, so no NaN/inf from the padding)."""
    return x if x.shape[0] == size else torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])


@torch.no_grad()
def generate_batch(gen: Generator, indices: Sequence[int], labels: torch.Tensor | None, *, sample_cfg: SampleCfg,
                   seed: int, batch_size: int, decode_batch: int) -> np.ndarray:
    """uint8 images (n, H, W, C) of the global sample indices `indices` (n <= batch_size) from a Generator.

    Every network call sees a FIXED shape: the sampler a batch of `batch_size` rows and the decoder batches of
    `decode_batch` rows, short batches padded by repeating their last sample (with its own generator objects, so the
    real sample's random stream is untouched). Image i then goes through the same kernels whether it sits in a full
    or a last partial batch, on 1 or N processes, before or after a resume; on CPU the per-row results also do not
    depend on the batch size (tests/test_sample.py), so image i is bit-identical for any --batch.
    """
    n = len(indices)
    if not 1 <= n <= batch_size:
        raise ValueError(f"generate_batch got {n} indices for batch_size={batch_size}")
    padded = list(indices) + [indices[-1]] * (batch_size - n)
    gens = index_generators(seed, padded)
    noise = initial_noise(gen.latent_shape, gens, gen.device)  # (batch_size, C, h, w)
    y = None if labels is None else _pad_rows(labels, batch_size).to(gen.device)
    z = gen.sample_latents(noise, y, sample_cfg=sample_cfg, generators=gens)[:n]
    images = []
    for s in range(0, n, decode_batch):
        chunk = z[s:s + decode_batch]
        images.append(gen.decode(_pad_rows(chunk, decode_batch),
                                 precision=sample_cfg.precision)[:chunk.shape[0]])  # (m, C, H, W)
    return to_uint8(torch.cat(images))


# ------------------------------------------------------------------------------------------------------ sample folders
SAMPLE_CONFIG = "sample_config.yaml"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
GRID_CAPTIONS = "grid.txt"  # text models: the prompts of the grid, row by row
_SAMPLE_FILE = re.compile(r"\d{6,}\.png")


def png_path(out: FsPath, index: int) -> FsPath:
    """The PNG of global sample `index`: 000000.png, 000001.png, ... (wider past 999999)."""
    return FsPath(out) / f"{index:06d}.png"


def save_png(image: np.ndarray, path: FsPath) -> None:
    """Write (H, W, C) uint8 as PNG atomically: a hidden tmp file, then os.replace (a kill leaves all or nothing)."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def read_png(path: FsPath) -> np.ndarray:
    """(H, W, 3) uint8 (grayscale PNGs are expanded to RGB, as the ADM evaluator expects 3 channels)."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
        raise ValueError(f"unreadable sample {path} ({err}); delete it and re-run `ldm sample` with the same --out, "
                         f"which regenerates missing samples") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def is_complete_png(path: FsPath) -> bool:
    """A cheap check (16 bytes read, not a decode, so resuming a 50k-image folder stays fast): the PNG signature at
    the start and the IEND chunk at the end. Catches empty and truncated files, the damage a copy or a full disk
    leaves (save_png itself writes atomically)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_PNG_SIGNATURE) + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return head == _PNG_SIGNATURE and f.read() == _PNG_END
    except OSError:
        return False


def _remove_damaged(out: FsPath, num: int) -> list[FsPath]:
    """Delete sample PNGs that are not complete, so they are regenerated like missing ones; returns them."""
    damaged = [p for p in (png_path(out, i) for i in range(num)) if p.is_file() and not is_complete_png(p)]
    for p in damaged:
        log.warning("sample %s is damaged (empty or truncated PNG): deleted, it will be sampled again", p)
        p.unlink()
    return damaged


def _identity_value(value: Any, like: Any) -> Any:
    """`value` as the plain type of the field default `like` (so 2 and 2.0, or a tuple and a list, compare equal)."""
    if isinstance(like, bool):
        return bool(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, int):
        return int(value)
    if isinstance(like, (list, tuple)):
        return [_identity_value(v, like[0]) if like else v for v in value]
    return value


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


IDENTITY_FIELDS = tuple(f for f in dataclasses.fields(SampleCfg) if f.name not in SAMPLE_NON_IDENTITY_FIELDS)
# identity keys recorded as used rather than as configured, with the value a folder written before the key existed
# was made with: every sample was fp32 before sample.precision
ADDED_IDENTITY_KEYS = {"compute_precision": "fp32"}


def sample_identity(gen: Generator, sample_cfg: SampleCfg, *, seed: int, classes: list[int] | None,
                    label_order: str, num: int, prompts: Sequence[str] | None = None,
                    precision: str = "fp32", prompt_fingerprint: str | None = None) -> dict:
    """Everything that decides what image i looks like. A folder's images all share one identity.

    Every SampleCfg field but SAMPLE_NON_IDENTITY_FIELDS (ldm/config.py) is recorded, so a new sampler option joins
    the identity by being added to SampleCfg; seed and EMA are recorded as used (the `seed` argument, the loaded
    weights). --num (except for label_order "grid", whose block labels depend on it), --batch, the process count
    and --decode-batch are left out: they change how many images or how fast, not which. `precision` is what
    sample.precision resolved to on this device (`sampling_precision`: auto is bf16 on CUDA, fp32 on a CPU without
    native bf16), recorded as compute_precision, so a folder never mixes bf16 and fp32 samples. Prompts are recorded
    as the list (`prompts`) or, for embedding prompts, as the rows' fingerprint (`prompt_fingerprint`), not the file
    name: the same arrays under another name are the same prompts."""
    ident = {"checkpoint": str(FsPath(gen.checkpoint).resolve()), "use_ema": bool(gen.used_ema),
             "tokenizer_fingerprint": gen.tokenizer.fingerprint, "latent_shape": list(gen.latent_shape),
             "seed": int(seed), "classes": classes, "label_order": label_order,
             "compute_precision": precision}
    for f in IDENTITY_FIELDS:
        ident[f.name] = _identity_value(getattr(sample_cfg, f.name), _field_default(f))
    if label_order == "grid":  # block labels depend on num
        ident["num"] = int(num)
    if prompts is not None:  # text models: the labels are ids into this list
        ident["prompts"] = list(prompts)
    if prompt_fingerprint is not None:  # models on precomputed embeddings: ids into the rows of this fingerprint
        ident["prompt_embeddings"] = prompt_fingerprint
    return ident


def _plain(data: dict) -> dict:
    return OmegaConf.to_container(OmegaConf.create(data), resolve=False)


def check_sample_folder(out: FsPath, identity: dict) -> None:
    """Refuse (FileExistsError, nothing written) when `out` holds samples made with a different identity, or sample
    files without the sample_config.yaml that says how they were made.

    A SampleCfg field missing from a folder's recorded identity was added after the folder was written: the folder
    was made with that field's default (a new option's default keeps the images made before it existed), so it is
    read as the default; so are the ADDED_IDENTITY_KEYS (a folder without compute_precision holds fp32 samples)."""
    out = FsPath(out)
    config_file = out / SAMPLE_CONFIG
    if config_file.is_file():
        recorded = (OmegaConf.to_container(OmegaConf.load(config_file)) or {}).get("identity") or {}
        saved = _plain({**{f.name: _identity_value(_field_default(f), _field_default(f)) for f in IDENTITY_FIELDS},
                        **ADDED_IDENTITY_KEYS, **recorded})
        now = _plain(identity)
        diffs = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                 if saved.get(k) != now.get(k)]
        if diffs:
            raise FileExistsError(f"output folder {out} holds samples of another configuration ({config_file}): "
                                  f"{'; '.join(diffs)}. Nothing was written; choose another --out, or delete the "
                                  f"folder to start over")
        return
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir() if _SAMPLE_FILE.fullmatch(p.name) or p.name == NPZ_NAME)
        if found:
            raise FileExistsError(f"output folder {out} holds {len(found)} sample files ({found[0]}, ...) but no "
                                  f"{SAMPLE_CONFIG}, so they cannot be matched to this configuration. Nothing was "
                                  f"written; choose another --out, or delete those files")


def write_npz(out: FsPath, num: int, labels: torch.Tensor | None) -> FsPath:
    """ADM-layout samples.npz from the PNGs 0 .. num-1: arr_0 (N, H, W, 3) uint8, arr_1 (N,) int64 labels (class-
    conditional only; guided-diffusion scripts/image_sample.py). Streamed image by image into the zip, so memory stays
    at one image however large N is; written to a tmp file and renamed."""
    out = FsPath(out)
    first = read_png(png_path(out, 0))
    path, tmp = out / NPZ_NAME, out / f".{NPZ_NAME}.tmp-{os.getpid()}"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num, *first.shape)}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for i in range(num):
                image = first if i == 0 else read_png(png_path(out, i))
                if image.shape != first.shape:
                    raise ValueError(f"{png_path(out, i)} has shape {image.shape}, {png_path(out, 0)} has "
                                     f"{first.shape}; a sample folder must hold images of one size")
                f.write(np.ascontiguousarray(image).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels.numpy().astype(np.int64))
    os.replace(tmp, path)
    return path


def write_grid(out: FsPath, count: int, nrow: int) -> FsPath:
    """grid.png of the first `count` PNGs, `nrow` images per row."""
    from ldm.io import make_grid, save_image_grid

    images = torch.stack([torch.from_numpy(read_png(png_path(out, i))).permute(2, 0, 1) for i in range(count)])
    path = FsPath(out) / GRID_NAME
    save_image_grid(make_grid(images.float() / 127.5 - 1.0, nrow=nrow), path)
    return path


def _grid_columns(count: int, classes: list[int] | None, label_order: str, num: int) -> int:
    if classes is not None and label_order == "cycle" and len(classes) <= 32:
        return min(len(classes), count)  # one class per column
    if classes is not None and label_order == "grid":
        return min(-(-num // len(classes)), count)  # one class per row
    return max(1, math.ceil(math.sqrt(count)))


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------ the writer
def _check_request(gen: Generator, sample_cfg: SampleCfg, *, num: int, seed: int, batch_size: int,
                   decode_batch: int, grid_size: int, classes, label_order: str, prompts=None,
                   prompt_embeddings=None):
    """Validate a write_samples request before anything is written: (run config recorded in the folder, class ids;
    with `prompts` or `prompt_embeddings`, the prompt ids, which take the place of classes)."""
    from ldm.config import validate

    for key, value in (("--num", num), ("--batch", batch_size), ("--decode-batch", decode_batch),
                       ("--grid-size", grid_size)):
        if int(value) < 1:
            raise ValueError(f"{key}={value}; expected a positive integer")
    run_cfg = dataclasses.replace(gen.cfg, sample=dataclasses.replace(sample_cfg, seed=seed, num=num,
                                                                      batch_size=min(batch_size, num)))
    validate(run_cfg)  # ConfigError naming sample.<key>
    get_sampler(sample_cfg.sampler)
    if prompts is not None and prompt_embeddings is not None:
        raise ValueError("--prompt / --prompts and --prompt-embeddings exclude each other: a model trained on "
                         "precomputed embeddings takes --prompt-embeddings, one with a text encoder --prompt")
    if prompts is not None or prompt_embeddings is not None:
        if classes not in (None, "all"):
            raise ValueError(f"--classes={classes!r} and --prompt / --prompts / --prompt-embeddings exclude each "
                             f"other: a text model's samples follow the prompts")
        if prompts is not None:
            gen.set_prompts(prompts)  # ValueError for a generator without a text encoder
        else:
            gen.load_prompt_embeddings(prompt_embeddings)  # ValueError for a generator not trained on embeddings
        if label_order not in LABEL_ORDERS:
            raise ValueError(f"--label-order={label_order!r}; expected one of {list(LABEL_ORDERS)}")
        return run_cfg, list(range(gen.num_prompts))
    if sample_cfg.cfg_scale != 1.0 and gen.num_classes < 1:
        raise ValueError(f"--cfg (sample.cfg_scale={sample_cfg.cfg_scale}): classifier-free guidance needs a class-"
                         f"conditional model, and {gen.checkpoint} is unconditional (num_classes=0); use --cfg 1")
    class_ids = parse_classes(classes, gen.num_classes)
    if label_order not in LABEL_ORDERS:
        raise ValueError(f"--label-order={label_order!r}; expected one of {list(LABEL_ORDERS)}")
    return run_cfg, class_ids


def _start_folder(out: FsPath, record: dict) -> FsPath:
    """Create `out`, drop temporaries of a killed run, write sample_config.yaml (process 0 only)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    atomic_write_text(out / SAMPLE_CONFIG, OmegaConf.to_yaml(OmegaConf.create(_plain(record))))
    return out / SAMPLE_CONFIG


def _finish_folder(out: FsPath, result: dict, *, num: int, classes: list[int] | None, seed: int, label_order: str,
                   grid: bool, grid_size: int, npz: bool, prompts: Sequence[str] | None = None) -> None:
    """Process 0, after every process finished: check no PNG is missing, then samples.npz and grid.png (with
    prompts, grid.txt: the prompt of each grid cell, one line per grid row, cells separated by " | ")."""
    missing = [i for i in range(num) if not png_path(out, i).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} samples are missing after sampling (first: {png_path(out, missing[0])})"
                           f"; run the same command again to fill them in")
    if npz:
        result["npz"] = write_npz(out, num, labels_for(range(num), classes, seed=seed, order=label_order, num=num))
    if grid:
        count = min(grid_size, num)
        ncol = _grid_columns(count, classes, label_order, num)
        result["grid"] = write_grid(out, count, ncol)
        if prompts is not None:
            ids = labels_for(range(count), classes, seed=seed, order=label_order, num=num).tolist()
            rows = [" | ".join(prompts[k] for k in ids[r:r + ncol]) for r in range(0, count, ncol)]
            atomic_write_text(out / GRID_CAPTIONS, "\n".join(rows) + "\n")


def write_samples(gen: Generator, out: str | FsPath, *, num: int, classes: str | Sequence[int] | None = None,
                  label_order: str = "cycle", seed: int | None = None, sample_cfg: SampleCfg | None = None,
                  batch_size: int | None = None, decode_batch: int = 8, grid: bool = True, grid_size: int = 64,
                  npz: bool = True, progress: bool = True, prompts: Sequence[str] | None = None,
                  prompt_embeddings: str | FsPath | None = None) -> dict[str, Any]:
    """Write samples 0 .. num-1 of a Generator to `out` as PNGs (+ grid.png, samples.npz, sample_config.yaml).

    Text models: `prompts` take the place of classes (sample i gets prompt labels_for(i) of the list, by
    label_order), each PNG gets its prompt beside it as NNNNNN.txt (the sidecar caption format of
    ldm/data/captions.py, written before the PNG), grid.png its grid.txt and sample_config.yaml the list.
    Models trained on precomputed embeddings: `prompt_embeddings` (a .npy / .npz, one embedding per row; read by
    Generator.load_prompt_embeddings) take their place; row r's caption text is "embedding:FILE#r", and
    sample_config.yaml records the rows' fingerprint.

    sample_cfg (default gen.cfg.sample) gives sampler, steps, guidance and time grid; seed defaults to its seed.
    Sharded over the processes of torch.distributed (torchrun / accelerate launch): the indices still missing are
    split into contiguous ranges, one per process, so every index is made exactly once; indices whose PNG exists are
    skipped (resume). Bad input fails before anything is written: ValueError for class ids out of range, guidance on
    an unconditional model or bad sizes; FileExistsError for a folder holding another configuration's samples.
    Returns {out, num, written, skipped, grid, npz, config, seconds, images_per_s, processes}; every process returns
    it, the files are written by process 0 after all processes finish.
    """
    from tqdm.auto import tqdm

    from ldm.config import as_container

    if gen.cfg is None:
        raise ValueError("write_samples needs a loaded generator (load_generator / load_official_generator): a sample "
                         "folder records the run config, and this generator carries none")
    sample_cfg = gen.cfg.sample if sample_cfg is None else sample_cfg
    seed = sample_cfg.seed if seed is None else int(seed)
    batch_size = sample_cfg.batch_size if batch_size is None else batch_size
    run_cfg, classes = _check_request(gen, sample_cfg, num=num, seed=seed, batch_size=batch_size,
                                      decode_batch=decode_batch, grid_size=grid_size, classes=classes,
                                      label_order=label_order, prompts=prompts,
                                      prompt_embeddings=prompt_embeddings)
    batch_size = run_cfg.sample.batch_size  # min(--batch, --num): the same on any process count / resume

    out = FsPath(out)
    rank, world = dist_info()
    identity = sample_identity(gen, sample_cfg, seed=seed, classes=classes, label_order=label_order, num=num,
                               prompts=prompts, precision=sampling_precision(sample_cfg.precision, gen.device),
                               prompt_fingerprint=None if prompt_embeddings is None else gen.prompt_fingerprint)
    if prompt_embeddings is not None:
        prompts = gen.prompts  # the caption text of each row, written beside the PNGs as prompts are
    check_sample_folder(out, identity)  # every process checks (read-only) so all fail together
    _barrier(world)
    if rank == 0:
        files = "NNNNNN.png by global index" + (f", {NPZ_NAME}" if npz else "")
        _start_folder(out, {"identity": identity, "num": num, "batch_size": batch_size, "decode_batch": decode_batch,
                            "processes": world, "files": files, "git_sha": git_sha(),
                            **({} if prompt_embeddings is None else {"prompt_embeddings_file": str(prompt_embeddings)}),
                            "run_config": as_container(run_cfg)})
        _remove_damaged(out, num)  # rank 0 only: the others list the folder after the barrier below
    _barrier(world)

    todo = [i for i in range(num) if not png_path(out, i).is_file()]
    _barrier(world)  # every process has listed the same files before any writes a new one
    mine = todo[rank * len(todo) // world:(rank + 1) * len(todo) // world]
    log.info("sampling %d of %d images into %s (%d already there) on %d process(es): %s, %d steps, cfg %g",
             len(todo), num, out, num - len(todo), world, sample_cfg.sampler, sample_cfg.steps, sample_cfg.cfg_scale)
    start = time.perf_counter()
    bar = tqdm(total=len(mine), unit="img", desc="sampling" if world == 1 else f"sampling (rank 0 of {world})",
               disable=not progress or rank != 0, dynamic_ncols=True)
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        labels = labels_for(idx, classes, seed=seed, order=label_order, num=num)
        images = generate_batch(gen, idx, labels, sample_cfg=sample_cfg, seed=seed, batch_size=batch_size,
                                decode_batch=decode_batch)
        for i, image, k in zip(idx, images, labels.tolist() if labels is not None else [None] * len(idx)):
            if prompts is not None:  # the prompt first: a PNG that exists always has its caption
                atomic_write_text(png_path(out, i).with_suffix(".txt"), prompts[k] + "\n")
            save_png(image, png_path(out, i))
        bar.update(len(idx))
    bar.close()
    _barrier(world)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"out": out, "num": num, "written": len(todo), "skipped": num - len(todo),
                              "grid": None, "npz": None, "config": out / SAMPLE_CONFIG, "seconds": seconds,
                              "images_per_s": len(todo) / seconds if todo and seconds > 0 else None,
                              "processes": world}
    if rank == 0:
        _finish_folder(out, result, num=num, classes=classes, seed=seed, label_order=label_order, grid=grid,
                       grid_size=grid_size, npz=npz, prompts=prompts)
    return result
