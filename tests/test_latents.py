"""Latent cache (ldm.data.latents, `ldm cache-latents`): contents equal on-the-fly encoding, flips, statistics vs
numpy, tokenizer fingerprint refusal, resume of a deleted shard or a killed run, and 2 processes == 1 process.

The tokenizer is a tiny randomly initialised diffusers AutoencoderKL (f=2, 4 latent channels) saved with
save_pretrained; the data are the first 64 embedded digits at 16 px stored as an ADM .npz.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python

from ldm.data.embedded import digits_arrays
from ldm.data.images import ImageDataset
from ldm.data.latents import CACHE_CROPS, DTYPES, LatentCacheDataset, build_latent_cache, read_cache_meta
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.sources import open_source
from ldm.tokenizers.export import Tokenizer, load_tokenizer
from ldm.tokenizers.kl import build_autoencoder_kl

N, SIZE, SHARD, BATCH = 64, 16, 24, 16  # shards of 24, 24, 16 items; batches of 16 + 8, 16 + 8, 16


def tiny_vae(seed: int):
    torch.manual_seed(seed)
    return build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                sample_size=SIZE)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tiny_vae(0).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    images, labels = digits_arrays(SIZE)
    path = tmp_path_factory.mktemp("data") / "digits64.npz"
    np.savez(path, arr_0=images[:N], arr_1=labels[:N])
    return path


def make(tok, npz, out, **kw):
    args = dict(image_size=SIZE, flips=True, batch_size=BATCH, shard_size=SHARD, dtype="float32", progress=False)
    return build_latent_cache(tok, str(npz), out, **{**args, **kw})


@pytest.fixture(scope="module")
def cache(tok, npz, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    make(tok, npz, out)
    return out


def stored(out: Path, name: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(out.glob(f"shard_*.{name}.npy"))])


def snapshot(out: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


# ------------------------------------------------------------------------------------------------------ contents
def test_meta_records_the_contract(cache, tok, npz):
    meta = read_cache_meta(cache)
    assert (meta.count, meta.latent_shape, meta.num_shards, meta.num_classes) == (N, [4, 8, 8], 3, 10)
    assert (meta.dtype, meta.flips, meta.image_size, meta.crop, meta.shard_size) == ("float32", True, SIZE, "center",
                                                                                      SHARD)
    assert meta.tokenizer_fingerprint == tok.fingerprint and meta.tokenizer_source == str(tok.source)
    assert meta.data_source == str(npz) and meta.data_fingerprint == open_source(str(npz)).fingerprint()
    assert meta.complete and meta.latent_stats.num_images == N and meta.latent_stats.fingerprint == tok.fingerprint
    assert [len(np.load(p)) for p in sorted(cache.glob("shard_*.labels.npy"))] == [24, 24, 16]


def test_cache_equals_on_the_fly_encoding(cache, tok, npz):
    images = ImageDataset(open_source(str(npz)), SIZE, crop="center")
    # the first batch of shard 0, encoded on the fly in the same grouping: bit-identical, images and flips
    x = torch.stack([images[(i, 0)]["image"] for i in range(BATCH)])
    assert torch.equal(torch.from_numpy(stored(cache, "latents")[:BATCH]), tok.encode(x))
    assert torch.equal(torch.from_numpy(stored(cache, "flips")[:BATCH]), tok.encode(torch.flip(x, dims=[-1])))
    np.testing.assert_array_equal(stored(cache, "labels"), digits_arrays(SIZE)[1][:N])
    # a whole cache against one-image-at-a-time encoding: equal up to kernel rounding between batch sizes
    all_x = torch.stack([images[(i, 0)]["image"] for i in range(N)])
    one_by_one = torch.cat([tok.encode(all_x[i:i + 1]) for i in range(N)])
    torch.testing.assert_close(torch.from_numpy(stored(cache, "latents")), one_by_one, rtol=0, atol=1e-5)


def test_training_batches_from_cache_equal_on_the_fly_with_hflip(cache, tok, npz):
    """A training batch (random items, random flips from the item seed) read from the cache equals the same batch of
    images with data.hflip=true encoded now."""
    images = ImageDataset(open_source(str(npz)), SIZE, crop="center", hflip=True)
    ds = LatentCacheDataset(cache, expected_fingerprint=tok.fingerprint)
    keys = next(iter(ResumableBatchSampler(N, BATCH, seed=3)))
    from_cache = torch.stack([ds[k]["latent"] for k in keys])
    x = torch.stack([images[k]["image"] for k in keys])
    torch.testing.assert_close(from_cache, tok.encode(x), rtol=0, atol=1e-5)
    assert [int(ds[k]["label"]) for k in keys] == [int(images[k]["label"]) for k in keys]
    # both views occur, and they are far apart, so a wrong choice could not pass the comparison above
    plain = ImageDataset(open_source(str(npz)), SIZE, crop="center")
    unflipped = tok.encode(torch.stack([plain[k]["image"] for k in keys]))
    is_flip = (from_cache - unflipped).flatten(1).abs().amax(1) > 1e-3
    assert 0 < int(is_flip.sum()) < BATCH
    assert float((unflipped[is_flip] - from_cache[is_flip]).abs().amax()) > 1e-2
    # the same key gives the same item, and use_flips=False always gives the unflipped latent
    assert torch.equal(ds[keys[0]]["latent"], ds[keys[0]]["latent"])
    no_flip = LatentCacheDataset(cache, expected_fingerprint=None, use_flips=False)
    torch.testing.assert_close(torch.stack([no_flip[k]["latent"] for k in keys]), unflipped, rtol=0, atol=1e-5)


def test_dataset_in_a_dataloader_and_pickles_without_arrays(cache, tok):
    ds = LatentCacheDataset(cache, expected_fingerprint=tok.fingerprint)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(N, 8, seed=0))))
    assert batch["latent"].shape == (8, 4, 8, 8) and batch["latent"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and ds.num_classes == 10 and len(ds) == N
    assert len(pickle.dumps(ds)) < 20_000  # workers get the paths, not copies of memory-mapped arrays
    assert LatentCacheDataset(cache, expected_fingerprint=None, class_cond=False)[(5, 0)]["label"] == 0
    with pytest.raises(IndexError, match="64"):
        ds[(N, 0)]


def test_float16_cache_and_stats_match_numpy(tok, npz, tmp_path):
    meta = make(tok, npz, tmp_path / "h", dtype="float16")
    images = ImageDataset(open_source(str(npz)), SIZE, crop="center")
    x = torch.stack([images[(i, 0)]["image"] for i in range(BATCH)])
    np.testing.assert_array_equal(stored(tmp_path / "h", "latents")[:BATCH], tok.encode(x).numpy().astype(np.float16))
    both = np.concatenate([stored(tmp_path / "h", "latents"), stored(tmp_path / "h", "flips")]).astype(np.float64)
    stats = meta.latent_stats
    np.testing.assert_allclose(stats.mean, both.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(stats.std, both.std(axis=(0, 2, 3), ddof=1), rtol=1e-10)
    np.testing.assert_allclose(stats.scaling_factor, 1.0 / both.std(ddof=1), rtol=1e-10)
    # one shard instead of three: the same statistics (moments merge; no dependence on how work was split)
    one = make(tok, npz, tmp_path / "h1", dtype="float16", shard_size=N, batch_size=BATCH).latent_stats
    # (1e-6, not exact: shard boundaries regroup the encoder's batches, which moves float32 latents by ~1e-7 and
    # can flip a float16 rounding; the merge itself is exact and tested at 1e-10 above)
    np.testing.assert_allclose(one.mean, stats.mean, rtol=1e-6)
    np.testing.assert_allclose(one.std, stats.std, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ refusals
def test_mismatched_tokenizer_is_refused(cache, tok, npz):
    other = Tokenizer(tiny_vae(1))
    assert other.fingerprint != tok.fingerprint
    with pytest.raises(ValueError) as err:
        LatentCacheDataset(cache, expected_fingerprint=other.fingerprint)
    msg = str(err.value)
    assert tok.fingerprint in msg and other.fingerprint in msg and str(cache) in msg and "cache-latents" in msg
    with pytest.raises(ValueError, match=f"tokenizer_fingerprint: cached '{tok.fingerprint}'"):
        make(other, npz, cache)  # writing another tokenizer's latents into the same directory


def test_bad_inputs_are_named(tok, npz, tmp_path):
    with pytest.raises(ValueError, match="crop='random'"):
        make(tok, npz, tmp_path / "a", crop="random")
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        make(tok, npz, tmp_path / "a", dtype="bfloat16")
    with pytest.raises(ValueError, match="image_size=15 is not divisible .* 2"):
        make(tok, npz, tmp_path / "a", image_size=15)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LatentCacheDataset(tmp_path / "nothing", expected_fingerprint=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(tok, tmp_path / "missing.npz", tmp_path / "a")


# ------------------------------------------------------------------------------------------------------ resume
def counting(tok, monkeypatch, fail_after: int | None = None) -> list[int]:
    calls, encode = [], tok.encode

    def wrapped(images, **kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated kill")
        calls.append(images.shape[0])
        return encode(images, **kw)

    monkeypatch.setattr(tok, "encode", wrapped)
    return calls


def test_deleted_shard_is_named_and_only_it_is_rebuilt(cache, tok, npz, tmp_path, monkeypatch):
    out = tmp_path / "c"
    shutil.copytree(cache, out)
    before = snapshot(out)
    (out / "shard_00001.latents.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard 1 of 3 \(items 24..47\): shard_00001.latents.npy is missing"):
        LatentCacheDataset(out, expected_fingerprint=tok.fingerprint)
    calls = counting(tok, monkeypatch)
    make(tok, npz, out)
    assert calls == [16, 16, 8, 8]  # shard 1 only: two batches, each image + flip
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    for name, (ino, mtime, data) in after.items():
        assert data == before[name][2], name  # the re-created shard has the same bytes
        if not name.startswith("shard_00001") and name != "meta.json":
            assert (ino, mtime) == before[name][:2], f"{name} was rewritten"


def test_killed_run_continues_to_the_same_files(cache, tok, npz, tmp_path, monkeypatch):
    out = tmp_path / "k"
    counting(tok, monkeypatch, fail_after=5)  # dies inside shard 1, after shard 0 is done
    with pytest.raises(KeyboardInterrupt):
        make(tok, npz, out)
    assert list(out.glob(".shard_00001.*.tmp-*"))  # its half-written temporaries
    with pytest.raises(FileNotFoundError, match="shard 1 of 3"):
        read_cache_meta(out)
    monkeypatch.undo()
    calls = counting(tok, monkeypatch)
    make(tok, npz, out)
    assert calls == [16, 16, 8, 8, 16, 16]  # shards 1 and 2 only
    assert not list(out.glob(".*tmp*"))
    assert {k: v[2] for k, v in snapshot(out).items()} == {k: v[2] for k, v in snapshot(cache).items()}


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_help_and_choices(capsys):
    from ldm.cli import build_parser
    from ldm.cli import data as latent_commands

    assert latent_commands.CROPS == CACHE_CROPS and latent_commands.DTYPES == DTYPES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cache-latents", "--help"])
    text = capsys.readouterr().out
    for option in ("--tokenizer", "--data", "--out", "--image-size", "--crop", "--flip", "--batch", "--shard-size",
                   "--dtype", "posterior mean"):
        assert option in text


def test_cli_bad_argument_is_one_line(capsys):
    from ldm.cli import main

    assert main(["cache-latents", "--tokenizer", "x", "--data", "digits", "--out", "y", "--batch", "0"]) == 2
    assert "--batch=0 must be >= 1" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s; the default suite's two-process cache check is test_latent_cache_checks' CLI test
def test_two_processes_write_the_same_files_as_one(tok_dir, npz, tmp_path):
    args = ["cache-latents", "--tokenizer", str(tok_dir), "--data", str(npz), "--image-size", str(SIZE), "--flip",
            "--batch", str(BATCH), "--shard-size", str(SHARD), "--no-progress"]
    one = run_python(["-m", "ldm.cli", *args, "--out", str(tmp_path / "one")], timeout=300)
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm.cli", *args,
                      "--out", str(tmp_path / "two")], timeout=300)
    assert "1 process(es)" in one.stdout and "2 process(es)" in two.stdout
    assert two.stdout.count("latent cache ready") == 1  # rank 0 reports
    a, b = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 1 + 3 * 4
    for name in a:
        assert a[name][2] == b[name][2], name
