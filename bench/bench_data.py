"""Data-loading throughput and start-up: ldm's shard reader and folder reader vs torchvision's ImageFolder, side by
side in one run, each with 1 and 2 DataLoader workers.

    python bench/bench_data.py --data-dir /tmp/bench20k                  # 20,000 files (made on the first run)
    python bench/bench_data.py --smoke --data-dir /tmp/bench_smoke       # 200 files, 2 timed batches

The data: `--num-files` small images (default 20,000; 80% JPEG quality 90, 20% PNG; sides 64-96 px, smooth colour
gradients plus noise) in `--classes` class folders, written under --data-dir/folder on the first run, and the same
images as WebDataset shards of `--shard-size` written by ldm's own `make_shards` under --data-dir/shards. All three
pipelines produce the same thing: (B, 3, S, S) float32 batches in [-1, 1] of centre crops (side --size) with labels,
in a shuffled order:

  ldm shards   ImageDataset over the shard pattern, ShardBatchSampler (each worker reads its own shards through a
               shuffle buffer of 1000), ADM centre crop (box-halving + bicubic), per-item seeds
  ldm folder   ImageDataset over the folder (file list from its manifest), ResumableBatchSampler (a permutation
               of all files), the same crop
  torchvision  ImageFolder + DataLoader(shuffle=True, drop_last=True), Resize(S, bicubic) + CenterCrop(S) +
               ToTensor + Normalize(0.5, 0.5)

Throughput: images/s over `--batches` batches of `--batch` after `--warmup` batches (so worker start-up is left
out); per worker = images/s / workers. Start-up: seconds to open the dataset (list the files, or load the shard
indices) and seconds from nothing to the first batch with one worker (open + DataLoader + worker start + the first
batch). ldm's folder start-up is measured twice: without a manifest (one scan, which then writes it) and with it.
Pages are warm for everyone (the files were just written or read). Each measurement is repeated `--rounds` times,
the pipelines' order reversed every other round, and the tables give medians; on a shared machine, compare ratios
rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------------ the data
def make_folder(root: Path, num_files: int, classes: int, seed: int = 0) -> None:
    """`num_files` small images in `classes` class folders (skipped when the folder already holds them all)."""
    from PIL import Image
    from tqdm.auto import tqdm

    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == str(num_files):
        return
    rng = np.random.default_rng(seed)
    for k in tqdm(range(num_files), desc="writing images", unit="img"):
        c = k % classes
        h, w = (int(v) for v in rng.integers(64, 97, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        img = (base + 60 * np.sin(xx[..., None] / (5 + c % 7)) + 40 * np.cos(yy[..., None] / (3 + k % 5))
               + rng.normal(0, 12, (h, w, 3)))
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        if k % 5:
            img.save(folder / f"{k:06d}.jpg", quality=90)
        else:
            img.save(folder / f"{k:06d}.png")
    done.write_text(f"{num_files}\n")


def make_shard_set(folder: Path, out: Path, shard_size: int) -> str:
    from ldm.data.shards import make_shards

    return make_shards(str(folder), out, shard_size=shard_size, progress=True)["pattern"]


# ------------------------------------------------------------------------------------------------------ pipelines
def open_ldm(spec: str, size: int):
    from ldm.data.images import ImageDataset
    from ldm.data.sources import open_source

    return ImageDataset(open_source(spec), size, crop="center")


def ldm_loader(dataset, batch: int, workers: int):
    from ldm.data.sampler import build_batch_sampler

    sampler = build_batch_sampler(dataset, batch, seed=0, rank=0, world_size=1, start=0, num_workers=workers,
                                  shuffle_buffer=1000)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)


def open_torchvision(root: str, size: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])
    return datasets.ImageFolder(root, transform=tf)


def torchvision_loader(dataset, batch: int, workers: int):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                       generator=g)


PIPELINES = {  # name -> (open(spec, size) -> dataset, loader(dataset, batch, workers), which spec it reads)
    "ldm shards": (open_ldm, ldm_loader, "shards"),
    "ldm folder": (open_ldm, ldm_loader, "folder"),
    "torchvision ImageFolder": (open_torchvision, torchvision_loader, "folder"),
}


def _images(batch) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch[0]


def throughput(name: str, spec: str, size: int, batch: int, workers: int, batches: int, warmup: int) -> float:
    """Images/s of `batches` batches after `warmup` (decoded, cropped, batched)."""
    open_fn, loader_fn, _ = PIPELINES[name]
    it = iter(loader_fn(open_fn(spec, size), batch, workers))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        x = _images(next(it))
        assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
        n += x.shape[0]
    seconds = time.perf_counter() - start
    del it
    return n / seconds


def startup(name: str, spec: str, size: int, batch: int) -> tuple[float, float]:
    """(seconds to open the dataset, seconds to the first batch with one worker); modules imported beforehand."""
    import torchvision.datasets  # noqa: F401  (import time is not start-up time)

    import ldm.data.images
    import ldm.data.shards  # noqa: F401

    open_fn, loader_fn, _ = PIPELINES[name]
    start = time.perf_counter()
    dataset = open_fn(spec, size)
    opened = time.perf_counter() - start
    next(iter(loader_fn(dataset, batch, 1)))
    return opened, time.perf_counter() - start


def drop_manifest(folder: Path) -> None:
    from ldm.data.manifest import MANIFEST_SUFFIX, _cached_path

    for path in (folder.parent / f".{folder.name}{MANIFEST_SUFFIX}", _cached_path(folder.absolute())):
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, type=Path, help="where the images and shards are (made if absent)")
    ap.add_argument("--num-files", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32, help="crop side in pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start-up)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="repetitions (medians reported), order alternating")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="200 files, shards of 50, 2 timed batches of 16")
    args = ap.parse_args()
    if args.smoke:
        args.num_files, args.classes, args.shard_size, args.batch, args.batches, args.warmup = 200, 4, 50, 16, 2, 1
        args.rounds = 1
    torch.set_num_threads(1)
    folder = args.data_dir / "folder"
    make_folder(folder, args.num_files, args.classes)
    pattern = make_shard_set(folder, args.data_dir / "shards", args.shard_size)
    specs = {"folder": str(folder), "shards": pattern}

    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "throughput": {}, "startup": {}, "rounds": []}
    time.sleep(2.5)  # the folders were just written: out of the manifest's racy window, so the scan is cached
    for r in range(args.rounds):
        order = list(PIPELINES) if r % 2 == 0 else list(reversed(PIPELINES))
        one = {"startup": {}, "throughput": {}}
        for name in order:
            spec = specs[PIPELINES[name][2]]
            if name == "ldm folder":
                drop_manifest(folder)
                one["startup"]["ldm folder (no manifest: scan)"] = startup(name, spec, args.size, args.batch)
                name = "ldm folder (manifest)"
            one["startup"][name] = startup(name.split(" (")[0], spec, args.size, args.batch)
        for workers in args.workers:
            for name in order:
                rate = throughput(name, specs[PIPELINES[name][2]], args.size, args.batch, workers, args.batches,
                                  args.warmup)
                one["throughput"][f"{name} | {workers}"] = rate
                print(f"round {r}: {name:24s} workers {workers}: {rate:8.0f} img/s", flush=True)
        results["rounds"].append(one)
    for part in ("startup", "throughput"):
        for key in results["rounds"][0][part]:
            values = [one[part][key] for one in results["rounds"]]
            results[part][key] = (tuple(statistics.median(v[k] for v in values) for k in range(2))
                                  if part == "startup" else statistics.median(values))

    n = args.num_files
    print(f"\n{n} files ({args.num_files // args.shard_size} shards of {args.shard_size}), crop {args.size} px, "
          f"batch {args.batch}, {args.batches} timed batches, medians of {args.rounds} round(s)\n")
    print("| pipeline | workers | images/s | per worker | vs torchvision |\n|---|---|---|---|---|")
    for workers in args.workers:
        ref = results["throughput"][f"torchvision ImageFolder | {workers}"]
        for name in PIPELINES:
            rate = results["throughput"][f"{name} | {workers}"]
            print(f"| {name} | {workers} | {rate:.0f} | {rate / workers:.0f} | {rate / ref:.2f}x |")
    print(f"\n| start-up on {n} files | open (s) | first batch, 1 worker (s) |\n|---|---|---|")
    for name in ("ldm shards", "ldm folder (no manifest: scan)", "ldm folder (manifest)", "torchvision ImageFolder"):
        opened, first = results["startup"][name]
        print(f"| {name} | {opened:.3f} | {first:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
