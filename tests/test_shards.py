"""WebDataset tar shards (ldm.data.shards, ShardBatchSampler in ldm.data.sampler, `ldm make-shards`): brace patterns,
the shuffle buffer against a hand-worked example, every sample exactly once per epoch with 2 processes x 2 loader
workers (each worker reading its own shards), resume, make-shards -> shards equal to the folder, foreign
(webdataset-written) shards, bad members, the compressed-tar refusal, the latent cache from shards, and bit-exact
training resume through the loop (subprocesses of tests/toy.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.images import ImageDataset
from ldm.data.sampler import (
    ShardBatchSampler,
    build_batch_sampler,
    shuffle_buffer_order,
    split_key,
)
from ldm.data.shards import (
    ShardSource,
    expand_braces,
    make_shards,
    read_index,
    scan_shard,
)
from ldm.data.sources import BadImageError, open_source
from ldm.seeding import derive_seed

CLASSES, PER_CLASS, SHARD = ("cat", "dog"), 12, 3  # 24 images in 8 shards of 3


def _rgb(seed, size):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of 12 images each, PNG and JPEG, of different sizes (all >= 8 px)."""
    root = tmp_path_factory.mktemp("data") / "animals"
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = Image.fromarray(_rgb(100 * c + i, (10 + i % 5, 12 + i % 3)))
            img.save(root / cls / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> dict:
    return make_shards(str(folder), tmp_path_factory.mktemp("shards"), shard_size=SHARD, progress=False)


# ------------------------------------------------------------------------------------------------------ patterns
def test_brace_patterns():
    assert expand_braces("s/train-{000..003}.tar") == [f"s/train-00{k}.tar" for k in range(4)]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("x-{5..2}.tar")


def test_shuffle_buffer_by_hand():
    """n = 5, buffer 2, slot draws [1, 0, 1], final permutation [1, 0]: buffer [0, 1]; 2 arrives -> emit slot 1 (1),
    buffer [0, 2]; 3 -> emit slot 0 (0), [3, 2]; 4 -> emit slot 1 (2), [3, 4]; the rest permuted [1, 0] -> 4, 3."""

    class Draws:
        def integers(self, low, high, size):
            assert (low, high, size) == (0, 2, 3)
            return np.array([1, 0, 1])

        def permutation(self, n):
            assert n == 2
            return np.array([1, 0])

    assert shuffle_buffer_order(5, 2, Draws()).tolist() == [1, 0, 2, 4, 3]
    assert shuffle_buffer_order(5, 1, None).tolist() == [0, 1, 2, 3, 4]  # buffer 1 (or 0): input order
    order = shuffle_buffer_order(1000, 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    # an item leaves at most buffer - 1 places before it arrived: a reader only moves forward through a window
    assert (order - np.arange(1000)).max() <= 49 and order[:950].max() <= 949 + 49


# ------------------------------------------------------------------------------------------------------ the sampler
def _stream_items(sampler: ShardBatchSampler, batches: int) -> list[list[int]]:
    it = iter(sampler)
    return [[i for i, _, _ in next(it)] for _ in range(batches)]


def test_two_processes_two_workers_read_every_sample_once_per_epoch():
    ranges = [(3 * s, 3 * s + 3) for s in range(8)]  # 8 shards of 3: each of the 4 streams gets 2 shards an epoch
    per_epoch = 2  # batches of 3 per stream and epoch
    seen = {0: [], 1: []}
    for rank in range(2):
        sampler = ShardBatchSampler(ranges, 3, seed=5, rank=rank, world_size=2, num_workers=2, buffer_size=4)
        batches = _stream_items(sampler, 2 * 2 * per_epoch)  # 2 streams x 2 epochs
        for p, items in enumerate(batches):
            stream, epoch = p % 2, p // 2 // per_epoch
            seen[epoch].append((rank, stream, items))
    for epoch in (0, 1):
        items = [i for _, _, b in seen[epoch] for i in b]
        assert sorted(items) == list(range(24)), epoch  # exactly once
        shards_of = {}
        for rank, stream, b in seen[epoch]:
            shards_of.setdefault((rank, stream), set()).update(i // 3 for i in b)
        sets = list(shards_of.values())
        assert all(len(s) == 2 for s in sets) and len(set().union(*sets)) == 8  # disjoint shard sets
    assert seen[0] != seen[1]  # another shard deal and buffer order in the next epoch


def test_sampler_resumes_at_any_position():
    ranges = [(0, 5), (5, 12), (12, 16), (16, 23), (23, 30)]  # uneven shards: streams cross epochs apart
    full = list(iter_batches(ShardBatchSampler(ranges, 4, seed=1, num_workers=2, buffer_size=3), 30))
    for start in (1, 2, 7, 13):
        resumed = list(iter_batches(ShardBatchSampler(ranges, 4, seed=1, num_workers=2, buffer_size=3,
                                                      start=start), 30 - start))
        assert resumed == full[start:], start
    # sample seeds as ResumableBatchSampler makes them: hash(seed, "sample", position, rank * batch + j)
    assert [s for _, _, s in full[7]] == [derive_seed(1, "sample", 7, j) for j in range(4)]


def iter_batches(sampler, n):
    it = iter(sampler)
    for _ in range(n):
        yield next(it)


def test_fewer_shards_than_streams_is_refused():
    with pytest.raises(ValueError, match="fewer than processes x loader workers = 2 x 4"):
        ShardBatchSampler([(0, 4), (4, 8), (8, 12)], 2, seed=0, world_size=2, num_workers=4)


# ------------------------------------------------------------------------------------------------------ make-shards
def test_make_shards_equals_the_folder(folder, shards):
    src, sh = open_source(str(folder)), open_source(shards["pattern"])
    assert isinstance(sh, ShardSource) and len(sh) == len(src) == 24 and len(sh.shard_ranges) == 8
    assert sh.classes == src.classes == list(CLASSES) and sh.labels.tolist() == src.labels.tolist()
    for i in range(len(src)):
        assert (sh.read(i) == src.read(i)).all(), src.names[i]
    a = ImageDataset(src, 8, crop="random", hflip=True)
    b = ImageDataset(sh, 8, crop="random", hflip=True)
    for key in [(i, 7, 11) for i in range(24)]:
        x, y = a[key], b[key]
        assert torch.equal(x["image"], y["image"]) and x["label"] == y["label"] and x["sample_seed"] == 11
    # the samples: key.<ext> with the file's own bytes, key.cls, key.json with the original name
    first = Path(shards["pattern"].replace("{000000..000007}", "000000"))
    with tarfile.open(first) as tf:
        names = tf.getnames()
        assert names[:3] == ["000000.jpg", "000000.cls", "000000.json"]
        assert tf.extractfile("000000.jpg").read() == (folder / "cat" / "00.jpg").read_bytes()
        assert json.loads(tf.extractfile("000000.json").read()) == {"name": "cat/00.jpg", "label": 0, "class": "cat"}
    record = json.loads((first.parent / "make-shards.json").read_text())
    assert record["complete"] and record["count"] == 24 and record["num_shards"] == 8


def test_make_shards_rerun_keeps_finished_shards(folder, tmp_path):
    out = tmp_path / "s"
    make_shards(str(folder), out, shard_size=10, progress=False)
    first = out / "shard-000001.tar"
    before = (first.stat().st_ino, first.read_bytes())
    (out / "shard-000002.tar.index.npz").unlink()  # as if killed before shard 2's marker
    make_shards(str(folder), out, shard_size=10, progress=False)
    assert (first.stat().st_ino, first.read_bytes()) == before and read_index(out / "shard-000002.tar") is not None
    with pytest.raises(ValueError, match="another source or shard size"):
        make_shards(str(folder), out, shard_size=5, progress=False)


def test_compressed_tar_is_refused_and_converted_by_make_shards(folder, tmp_path):
    gz = tmp_path / "animals.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(folder, "animals")
    with pytest.raises(ValueError, match="ldm make-shards"):
        open_source(str(gz))
    archive = open_source(str(gz), random_access=False)
    with pytest.raises(ValueError, match="ldm make-shards"):
        archive.read(0)
    record = make_shards(str(gz), tmp_path / "out", shard_size=5, progress=False)
    sh, src = open_source(record["pattern"]), open_source(str(folder))
    # written in the archive's member order (tarfile.add sorts names, so here the folder's order too)
    assert sh.labels.tolist() == src.labels.tolist() and sh.classes == src.classes
    for i in range(len(src)):
        assert (sh.read(i) == src.read(i)).all()


def test_npz_shards_are_lossless(tmp_path):
    """Arrays (here one grey channel, as ArraySource allows) become PNG members that decode to the source's RGB."""
    images = np.random.default_rng(3).integers(0, 256, (7, 10, 9, 1), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", arr_0=images, arr_1=np.arange(7) % 3)
    record = make_shards(str(tmp_path / "g.npz"), tmp_path / "s", shard_size=4, progress=False)
    sh = open_source(record["pattern"])
    assert len(sh) == 7 and sh.labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and sh.classes == ["0", "1", "2"]
    for i in range(7):
        assert (sh.read(i) == np.repeat(images[i], 3, axis=-1)).all()


# ------------------------------------------------------------------------------------------------------ reading
def _write_foreign_shard(path: Path, samples: list[tuple[str, bytes | None, dict]]) -> None:
    """A shard as webdataset's TarWriter writes it: key.ext members with plain tar metadata."""
    with tarfile.open(path, "w") as tf:
        for key, image, meta in samples:
            members = [(f"{key}.png", image)] if image is not None else []
            for name, data in [*members, (f"{key}.json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_foreign_shards_and_bad_members(tmp_path, monkeypatch):
    good = [_rgb(k, (9, 11)) for k in range(5)]
    _write_foreign_shard(tmp_path / "w-0.tar", [("a/x0", _png(good[0]), {"label": 1, "class": "b"}),
                                                ("a/x1", b"not a png", {"label": 0, "class": "a"}),
                                                ("meta", None, {"note": "no image: not a sample"})])
    _write_foreign_shard(tmp_path / "w-1.tar", [(f"k{k}", _png(good[k]), {"label": k % 2}) for k in (2, 3, 4)])
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    src = open_source(str(tmp_path / "w-{0,1}.tar"))
    assert src.names == ["w-0.tar:a/x0.png", "w-0.tar:a/x1.png", "w-1.tar:k2.png", "w-1.tar:k3.png",
                         "w-1.tar:k4.png"]
    assert src.labels.tolist() == [1, 0, 0, 1, 0] and src.classes == ["a", "b"] and src.shard_ranges == [(0, 2), (2, 5)]
    assert (tmp_path / "w-0.tar.index.npz").is_file()  # indexed once, beside the shard
    ds = ImageDataset(src, 8, on_error="skip")
    item = ds[(1, 0)]  # the bad member is skipped: the next good image takes its place
    assert torch.equal(item["image"], ds[(2, 0)]["image"]) and ds.bad_names() == ["w-0.tar:a/x1.png"]
    with pytest.raises(BadImageError, match=r"w-0.tar:a/x1.png"):
        ImageDataset(src, 8, on_error="raise")[(1, 0)]
    # a changed shard is indexed again
    _write_foreign_shard(tmp_path / "w-1.tar", [("k9", _png(good[4]), {"label": 1})])
    assert open_source(str(tmp_path / "w-{0,1}.tar")).labels.tolist() == [1, 0, 1]
    with pytest.raises(FileNotFoundError, match="1 of 2 shards do not exist"):
        open_source(str(tmp_path / "w-{1..2}.tar"))


def test_read_only_shards_keep_their_index_in_the_cache_dir(shards, tmp_path, monkeypatch):
    import ldm.data.shards as mod

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    shard = Path(expand_braces(shards["pattern"])[0])
    blocker = tmp_path / "blocker"  # a file where the folder would be: writing beside the shard fails (even as root)
    blocker.write_text("")
    cached = mod._index_paths(shard)[1]
    assert cached.is_relative_to(tmp_path / "cache")
    monkeypatch.setattr(mod, "_index_paths", lambda p: [blocker / "x.index.npz", cached])
    assert mod.write_index(scan_shard(shard), shard) == cached
    assert read_index(shard) is not None and cached.is_file()


# ------------------------------------------------------------------------------------------------------ loaders
class _Tagged(ImageDataset):
    """Items tagged with the index and the DataLoader worker that read them."""

    def __getitem__(self, key):
        item = super().__getitem__(key)
        info = torch.utils.data.get_worker_info()
        return {**item, "index": torch.tensor(split_key(key)[0]), "worker": torch.tensor(info.id if info else -1)}


def test_dataloader_workers_read_their_own_shards(shards):
    source = open_source(shards["pattern"])
    ds = _Tagged(source, 8)
    per_epoch, reads = 2, []  # 2 ranks x 2 workers over 8 shards of 3: 2 batches of 3 per worker and epoch
    for rank in range(2):
        sampler = build_batch_sampler(ds, 3, seed=9, rank=rank, world_size=2, start=0, num_workers=2, shuffle_buffer=4)
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2))
        for p in range(2 * per_epoch * 2):
            batch = next(loader)
            assert len(set(batch["worker"].tolist())) == 1
            assert batch["sample_seed"].tolist() == [derive_seed(9, "sample", p, rank * 3 + j) for j in range(3)]
            reads.append((p // (2 * per_epoch), rank, int(batch["worker"][0]), batch["index"].tolist()))
    for epoch in (0, 1):
        items = [i for e, _, _, b in reads if e == epoch for i in b]
        assert sorted(items) == list(range(24))
        owners = {}
        for e, rank, worker, b in reads:
            if e == epoch:
                for i in b:
                    owners.setdefault(source.locate(i)[0], set()).add((rank, worker))
        assert all(len(o) == 1 for o in owners.values())  # one reader per shard and epoch


def test_latent_cache_from_shards_equals_the_npz(tmp_path):
    from test_latents import tiny_vae

    from ldm.data.embedded import digits_arrays
    from ldm.data.latents import build_latent_cache
    from ldm.tokenizers.export import load_tokenizer

    images, labels = digits_arrays(16)
    npz = tmp_path / "d.npz"
    np.savez(npz, arr_0=images[:40], arr_1=labels[:40])
    tiny_vae(0).save_pretrained(str(tmp_path / "tok"), safe_serialization=True)
    tok = load_tokenizer(tmp_path / "tok")
    pattern = make_shards(str(npz), tmp_path / "s", shard_size=16, progress=False)["pattern"]
    args = {"image_size": 16, "batch_size": 8, "shard_size": 20, "progress": False}
    a = build_latent_cache(tok, str(npz), tmp_path / "c1", **args)
    b = build_latent_cache(tok, pattern, tmp_path / "c2", **args)
    assert (a.count, a.num_classes) == (b.count, b.num_classes) == (40, 10)
    for name in ("latents", "labels"):
        for s in range(2):
            x, y = (np.load(c / f"shard_{s:05d}.{name}.npy") for c in (tmp_path / "c1", tmp_path / "c2"))
            assert np.array_equal(x, y), name


# ------------------------------------------------------------------------------------------------------ training
def _fit_toy(root, shards, name, *extra):
    """tests/toy.py's task trained in this process by fit() on the shards, 2 loader workers."""
    from toy import ToyTask, toy_config

    from ldm.data.images import build_dataset
    from ldm.train.loop import fit

    cfg = toy_config([f"name={name}", f"train.run_root={root}", f"data.source={shards['pattern']}",
                      "data.num_workers=2", "data.shuffle_buffer=4", "train.grad_accum_steps=2", "train.keep_last=10",
                      "train.ckpt_every=100", *extra])
    torch.manual_seed(0)
    return fit(cfg, ToyTask(), build_dataset(cfg.data), progress=False)


def test_training_on_shards_resumes_bit_exactly(shards, tmp_path):
    """6 steps in one go == 3 steps, stop, resume to 6 (weights, EMA, data position); another worker count: refused."""
    from ldm.config import ConfigError
    from ldm.runs import load_checkpoint

    _fit_toy(tmp_path, shards, "straight", "train.max_steps=6")
    _fit_toy(tmp_path, shards, "stopped", "train.max_steps=3")
    _fit_toy(tmp_path, shards, "stopped", "train.max_steps=6")
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "step_0000006") for n in ("straight", "stopped"))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert b["state"]["data_layout"] == {"processes": 1, "workers": 2} and b["state"]["data_position"] == 12
    with pytest.raises(ConfigError, match=r"as 1 process\(es\) x 2 loader stream.* as 1 x 1.*data.num_workers"):
        _fit_toy(tmp_path, shards, "stopped", "train.max_steps=8", "data.num_workers=0")


# ------------------------------------------------------------------------------------------------------ 2 processes
def distributed_worker(folder: str, out: str) -> None:
    """Under torch.distributed.run: make-shards with 2 processes, then each process reads 2 epochs through a
    DataLoader with 2 workers; rank 0 writes what every (rank, worker) read to OUT/reads.json."""
    import torch.distributed as dist

    record = make_shards(folder, Path(out) / "shards", shard_size=SHARD, progress=False)  # initialises gloo
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = _Tagged(open_source(record["pattern"]), 8)
    sampler = build_batch_sampler(ds, 3, seed=9, rank=rank, world_size=world, start=0, num_workers=2, shuffle_buffer=4)
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2))
    mine = [(p, rank, batch["worker"].tolist(), batch["index"].tolist()) for p, batch in zip(range(8), loader)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (Path(out) / "reads.json").write_text(json.dumps([r for part in gathered for r in part]))


@pytest.mark.slow  # about 25 s: two interpreters importing torch, each with two loader workers
def test_two_real_processes_write_the_same_shards_and_read_each_sample_once(folder, shards, tmp_path):
    from conftest import run_python

    run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(folder), str(tmp_path)],
               timeout=300)
    one = sorted(Path(shards["pattern"]).parent.glob("shard-*.tar"))
    two = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 8
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))  # 1 and 2 writers: the same files
    source = open_source(shards["pattern"])
    reads = json.loads((tmp_path / "reads.json").read_text())
    for epoch in (0, 1):  # 4 streams x 2 batches of 3 per epoch: positions 4 * epoch .. 4 * epoch + 3 of each rank
        batches = [r for r in reads if r[0] // 4 == epoch]
        assert sorted(i for *_, idx in batches for i in idx) == list(range(24))
        owners = {}
        for _, rank, workers, idx in batches:
            assert len(set(workers)) == 1
            for i in idx:
                owners.setdefault(source.locate(i)[0], set()).add((rank, workers[0]))
        assert len(owners) == 8 and all(len(o) == 1 for o in owners.values())


@pytest.mark.slow  # about 30 s: imports torchvision, writes 200 images, starts 9 loaders
def test_bench_data_smoke(tmp_path):
    from conftest import run_python

    args = ["bench/bench_data.py", "--smoke", "--data-dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    out = run_python(args, timeout=300)
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["throughput"]) == 6 and all(v > 0 for v in result["throughput"].values())
    assert "| ldm shards | 1 |" in out.stdout and "torchvision ImageFolder" in result["startup"]


if __name__ == "__main__":
    import sys

    distributed_worker(*sys.argv[1:3])
