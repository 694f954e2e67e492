"""`ldm cache-latents`: encode a dataset once with a frozen tokenizer into a latent cache (see ldm.data.latents);
`ldm make-shards`: write a dataset as WebDataset tar shards (see ldm.data.shards).

Only argparse and the config are imported at module level, so `ldm --help` stays instant; torch and the tokenizer
load in the command.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ldm.cli.common import add_command, add_progress_flag
from ldm.config import DataCfg

DESCRIPTION = """\
Encode every image of a data source once with a frozen tokenizer and store the latents (and labels) as sharded,
memory-mapped .npy files, for training a generator with data.latents=DIR.

  ldm cache-latents --tokenizer runs/my_vae --data digits --out cache/digits32 --image-size 32
  ldm cache-latents --tokenizer sd-vae-ft-ema/ --data /data/imagenet/train --out cache/in256 \\
      --image-size 256 --flip --batch 128
  accelerate launch --num_processes 8 -m ldm.cli cache-latents ...   (or: torchrun --nproc_per_node 8 -m ldm.cli ...)

KL tokenizers store the posterior mean: it is deterministic, so the cache holds what encoding the same images on
the fly returns (bit for bit when encoded in the same batches; otherwise up to the float rounding by which kernels
differ between batch sizes), and the same batch gives the same loss either way. fast-DiT / LightningDiT store one
frozen posterior sample instead, which adds a fixed noise and no augmentation. --flip also stores the latent of each
horizontally flipped image, as LightningDiT does (fast-DiT flips at random once); training then picks one of the
two per item from the item seed.

Images are prepared like training data: ADM centre crop (--crop center) or plain resize, to --image-size pixels.
Shards are written atomically and dealt to the processes of a distributed launch (CPU: gloo); a re-run of the same
command skips finished shards, so a killed run continues where it stopped. meta.json records the tokenizer
fingerprint (a generator refuses a cache from another tokenizer), the latent shape, count, dtype, flips, the data
source and its fingerprint, the image size, the per-channel latent mean/std and scalar scaling factor over all
stored latents (float64 sums, independent of the number of processes), and the bad image files skipped (with
--on-error skip the item of an unreadable file holds the next good image's latent: counted as replaced, not as an
image encoded)."""


# = ldm.data.latents.CACHE_CROPS / DTYPES, not imported because that module loads torch (a test keeps them equal)
CROPS = ("center", "resize")
DTYPES = ("float32", "float16")


def register(subparsers) -> None:
    defaults = DataCfg()
    p = add_command(subparsers, "cache-latents", cmd_cache_latents, description=DESCRIPTION,
                    help="encode a dataset once with a frozen tokenizer into a sharded latent cache")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer: ldm tokenizer run or checkpoint directory, export folder, or a diffusers "
                        "AutoencoderKL folder (config.json + weights)")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="'digits' (embedded), an image folder (class sub-folders = labels), a .zip/.tar archive, "
                        "an ADM .npz (arr_0 uint8 NHWC, arr_1 labels) or shards by a brace pattern "
                        "(shards/train-{000000..000127}.tar)")
    p.add_argument("--out", required=True, metavar="DIR", help="cache directory (created; re-running resumes)")
    p.add_argument("--image-size", type=int, default=defaults.image_size, metavar="S",
                   help="side of the square images in pixels; a multiple of the tokenizer's downsampling factor")
    p.add_argument("--crop", choices=CROPS, default="center",
                   help="center: ADM centre crop (guided-diffusion center_crop_arr); resize: plain bicubic resize")
    p.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped images")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images encoded per forward pass")
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="images per shard file")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage type of the latents (float16 halves the disk space; values are checked to fit)")
    p.add_argument("--workers", type=int, default=defaults.num_workers, metavar="N",
                   help="DataLoader worker processes decoding images")
    p.add_argument("--on-error", choices=("skip", "raise"), default=defaults.on_error,
                   help="bad image files: replace by the next good image with a warning (as in training), or stop")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the encoder's autocast precision: auto = bf16 on CUDA and on CPUs with native bf16 matmul, "
                        "fp32 elsewhere (logged with the reason); recorded in meta.json, and a cache is never "
                        "finished in another precision than it was begun in")
    add_progress_flag(p)
    register_make_shards(subparsers)


def _disk_size(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("shard_*.npy"))


def cmd_cache_latents(args: argparse.Namespace) -> int:
    """Bad arguments, data or a conflicting cache raise ValueError: the error mapper prints one line, exit 2."""
    from accelerate import PartialState

    from ldm.data.latents import build_latent_cache
    from ldm.tokenizers.export import load_tokenizer

    for name in ("batch", "shard_size", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.workers < 0:
        raise ValueError(f"--workers={args.workers} must be >= 0")
    state = PartialState(cpu=not _cuda())  # CUDA when available (one GPU per process), else CPU with gloo
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    meta = build_latent_cache(tokenizer, args.data, args.out, image_size=args.image_size, crop=args.crop,
                              flips=args.flip, batch_size=args.batch, shard_size=args.shard_size, dtype=args.dtype,
                              num_workers=args.workers, on_error=args.on_error, precision=args.precision,
                              progress=not args.no_progress)
    if state.is_main_process:
        stats = meta.latent_stats
        print(f"\nlatent cache ready in {time.perf_counter() - start:.1f} s ({state.num_processes} process(es))\n"
              f"  directory      : {args.out}  ({_disk_size(Path(args.out)) / 2**20:.1f} MiB in {meta.num_shards} "
              f"shard(s) of up to {meta.shard_size})\n"
              f"  images         : {_images(meta)} from {meta.data_source} at {meta.image_size} px ({meta.crop})"
              f"{', + horizontal flips' if meta.flips else ''}; {meta.num_classes} classes\n"
              f"{_bad_files(meta)}"
              f"  latents        : {tuple(meta.latent_shape)} {meta.dtype}, encoded in {meta.precision}\n"
              f"  tokenizer      : {meta.tokenizer_source} (fingerprint {meta.tokenizer_fingerprint})\n"
              f"  channel mean   : {_fmt(stats.mean)}\n"
              f"  channel std    : {_fmt(stats.std)}\n"
              f"  scaling factor : {stats.scaling_factor:.6f} (1 / std of all values)\n"
              f"  train with     : data.latents={args.out}")
    return 0


def _images(meta) -> str:
    """Distinct images encoded, and the items they fill when some items hold a replacement."""
    if meta.images_encoded is None:
        return f"{meta.count} items"
    return f"{meta.images_encoded} encoded" + (f" into {meta.count} items" if meta.replaced_items else "")


def _bad_files(meta, shown: int = 5) -> str:
    """The summary lines on unreadable files: how many were skipped (the first `shown` named) and items replaced."""
    if meta.bad_files is None:
        return "  bad files      : not recorded (shards written by an older ldm)\n"
    if not meta.bad_files:
        return "  bad files      : none\n"
    names = meta.bad_file_names[:shown]
    more = f", and {meta.bad_files - len(names)} more" if meta.bad_files > len(names) else ""
    return (f"  bad files      : {meta.bad_files} skipped: {', '.join(names)}{more}\n"
            f"  replaced items : {meta.replaced_items} (each holds the latent of the next good image)\n")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------------ make-shards
SHARDS_DESCRIPTION = """\
Write the images of a data source as WebDataset tar shards (uncompressed tar files of key.<ext> + key.cls + key.json
samples) for training with data.source set to the brace pattern this command prints:

  ldm make-shards /data/imagenet/train --out /data/in1k-shards --shard-size 1000
  ldm make-shards photos.tar.gz --out shards/photos --shard-size 500
  torchrun --nproc_per_node 8 -m ldm.cli make-shards /data/imagenet/train --out /data/in1k-shards

Images are copied as they are (file bytes, not decoded or re-encoded; .npz arrays and the digits become lossless
PNGs), in the source's order (a compressed tar: its own member order, read in one pass), with their class labels
(key.cls), original names (key.json) and the captions the source stores (key.txt; see --captions). Each shard's
index (.index.npz beside it) is written last and marks it finished; a re-run of the same command keeps finished
shards. Under a distributed launch shard s is written by process s mod world; the files are the same for any number
of processes. See docs/data.md."""


def register_make_shards(subparsers) -> None:
    p = add_command(subparsers, "make-shards", cmd_make_shards, description=SHARDS_DESCRIPTION,
                    help="write a dataset as WebDataset tar shards for streaming training")
    p.add_argument("source", metavar="SOURCE",
                   help="'digits', an image folder (class sub-folders = labels), a .zip/.tar/.tar.gz archive, an ADM "
                        ".npz or a shard pattern")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; re-running resumes)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (the last may hold "
                                                                             "fewer); use at least as many shards as "
                                                                             "training processes x loader workers")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, PREFIX-000001.tar, ...")
    p.add_argument("--image-size", type=int, default=DataCfg().image_size, metavar="S",
                   help="digits only: the side the embedded 8x8 digits are upsampled to")
    p.add_argument("--captions", default="auto", metavar="auto|none|FILE.jsonl",
                   help="captions to write as key.txt members: auto = those the source stores (a folder's "
                        "captions.jsonl or <image>.txt / <image>.json sidecars, the caption members of shards; none "
                        "when it stores none), none, or a captions.jsonl manifest (docs/conditioning.md)")
    add_progress_flag(p)


def cmd_make_shards(args: argparse.Namespace) -> int:
    """Bad arguments or sources raise ValueError/FileNotFoundError: one line, exit 2."""
    from ldm.data.shards import make_shards

    if args.shard_size < 1:
        raise ValueError(f"--shard-size={args.shard_size} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    record = make_shards(args.source, args.out, shard_size=args.shard_size, prefix=args.prefix,
                         image_size=args.image_size, progress=not args.no_progress, captions=args.captions)
    if record["complete"]:  # the main process
        size = sum(p.stat().st_size for p in Path(args.out).glob(f"{args.prefix}-*.tar"))
        print(f"\nshards ready in {time.perf_counter() - start:.1f} s\n"
              f"  directory  : {args.out}  ({size / 2**20:.1f} MiB in {record['num_shards']} shard(s) of up to "
              f"{record['shard_size']})\n"
              f"  images     : {record['count']} from {record['source']}; {len(record['classes'])} classes\n"
              f"  captions   : {record.get('captions') or 'none'}\n"
              f"  train with : data.source='{record['pattern']}'")
    return 0
