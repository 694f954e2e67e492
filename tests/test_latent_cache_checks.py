"""The latent cache's record of bad files (meta.json, the `ldm cache-latents` summary; the same for 1 or 2 processes
and after a killed run) and the generator's refusal of config keys that contradict the cache it trains from.

Data: 10 digits at 16 px as PNGs in two class folders, 2 of them corrupt: a/03.png (garbage bytes), the last item
of shard 0, and b/07.png (zero bytes), the last of shard 1, so each is replaced by the first image of the next shard.
The tokenizer is a tiny random diffusers AutoencoderKL (f=2, 4 latent channels).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python
from PIL import Image

from ldm.config import ConfigError, load_config
from ldm.data.embedded import digits_arrays
from ldm.data.latents import build_latent_cache, read_cache_meta
from ldm.tokenizers.export import load_tokenizer
from ldm.tokenizers.kl import build_autoencoder_kl
from ldm.train import generator_task

SIZE, SHARD = 16, 4  # 10 items: shards of 4, 4, 2
BAD = ["a/03.png", "b/07.png"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok")
    build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                         sample_size=SIZE).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "images"
    images = digits_arrays(SIZE)[0]
    for i in range(10):
        path = root / ("a" if i < 5 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)
    (root / BAD[0]).write_bytes(b"not a png at all")
    (root / BAD[1]).write_bytes(b"")
    return root


def make(tok_dir, folder, out, **kw):
    args = dict(image_size=SIZE, flips=False, batch_size=SHARD, shard_size=SHARD, progress=False)
    return build_latent_cache(load_tokenizer(tok_dir), str(folder), out, **{**args, **kw})


@pytest.fixture(scope="module")
def cache(tok_dir, folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    make(tok_dir, folder, out)
    return out


def cli_args(tok_dir, folder, out) -> list[str]:
    return ["cache-latents", "--tokenizer", str(tok_dir), "--data", str(folder), "--out", str(out), "--image-size",
            str(SIZE), "--batch", str(SHARD), "--shard-size", str(SHARD), "--no-progress"]


# ------------------------------------------------------------------------------------------------------ bad files
def test_meta_counts_bad_files_and_replaced_items(cache):
    meta = read_cache_meta(cache)
    assert (meta.count, meta.bad_files, meta.bad_file_names, meta.replaced_items) == (10, 2, BAD, 2)
    assert meta.images_encoded == 8
    latents = np.concatenate([np.load(p) for p in sorted(cache.glob("shard_*.latents.npy"))])
    for bad in (3, 7):  # the replaced item holds the next image's latent (encoded in another batch: rounding only)
        np.testing.assert_allclose(latents[bad], latents[bad + 1], rtol=0, atol=1e-5)
    assert np.abs(latents[2] - latents[3]).max() > 1e-3


def test_killed_run_still_counts_the_bad_file_of_a_finished_shard(cache, tok_dir, folder, tmp_path, monkeypatch):
    """The resumed process never reads a/03.png (its shard is done), yet meta.json is byte-identical."""
    from ldm.tokenizers.export import Tokenizer

    encode, calls = Tokenizer.encode, []

    def dies_after_shard_0(self, images, **kw):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return encode(self, images, **kw)

    monkeypatch.setattr(Tokenizer, "encode", dies_after_shard_0)
    with pytest.raises(KeyboardInterrupt):
        make(tok_dir, folder, tmp_path / "k")
    monkeypatch.undo()
    assert make(tok_dir, folder, tmp_path / "k").bad_file_names == BAD
    assert (tmp_path / "k" / "meta.json").read_bytes() == (cache / "meta.json").read_bytes()


def test_cli_summary_and_two_processes(cache, tok_dir, folder, tmp_path, capsys):
    """Two processes: shard 1 (b/07.png) is rank 1's, shards 0 and 2 rank 0's; rank 0's summary counts both files.
    The one-process CLI runs in this process, on one thread as each of the two (OMP_NUM_THREADS=1)."""
    from ldm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(cli_args(tok_dir, folder, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    one = capsys.readouterr().out
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm.cli",
                      *cli_args(tok_dir, folder, tmp_path / "two")], timeout=300)
    for out in (one, two.stdout):
        assert "images         : 8 encoded into 10 items from" in out
        assert "bad files      : 2 skipped: a/03.png, b/07.png\n" in out
        assert "replaced items : 2 (each holds the latent of the next good image)" in out
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # the in-process fixture may encode with another thread count than the CLI (OMP_NUM_THREADS=1): the statistics
    # then differ in the last float bits, everything else is equal
    cli_meta, fixture_meta = (json.loads((d / "meta.json").read_text()) for d in (tmp_path / "one", cache))
    cli_stats, fixture_stats = cli_meta.pop("stats"), fixture_meta.pop("stats")
    assert cli_meta == fixture_meta
    for key in ("mean", "std"):
        assert np.allclose(cli_stats[key], fixture_stats[key], rtol=1e-6, atol=1e-7)


def test_cli_summary_without_bad_files():
    from ldm.cli.data import _bad_files, _images

    meta = type("Meta", (), {"count": 5, "replaced_items": 0, "images_encoded": 5, "bad_files": 0})()
    assert (_images(meta), _bad_files(meta)) == ("5 encoded", "  bad files      : none\n")
    old = type("Meta", (), {"count": 5, "replaced_items": None, "images_encoded": None, "bad_files": None})()
    assert _images(old) == "5 items" and "not recorded" in _bad_files(old)


# ------------------------------------------------------------------------------------------------------ config keys
def gen_cfg(tmp_path, tok_dir, cache, folder, *extra):
    return load_config(None, ["name=g", f"train.run_root={tmp_path}", f"tokenizer.pretrained={tok_dir}",
                              f"data.latents={cache}", f"data.source={folder}", f"data.image_size={SIZE}",
                              "model.preset=DiT-Pico/2", "diffusion.latent_norm=none", "train.max_steps=1",
                              "train.batch_size=4", *extra])


def test_agreeing_config_builds(cache, tok_dir, folder, tmp_path):
    task, data = generator_task.build_generator_task(gen_cfg(tmp_path, tok_dir, cache, folder))
    assert task.latent_shape == (4, 8, 8) and len(data) == 10 and task.num_classes == 2
    # the same files at another path (a moved folder: same fingerprint) are the same data
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    generator_task.build_generator_task(gen_cfg(tmp_path, tok_dir, cache, moved))


CONTRADICTIONS = {
    "data.image_size=32": "data.image_size=32 but the cache holds 16 px images: set data.image_size=16",
    "tokenizer.latent_channels=8": "tokenizer.latent_channels=8 but the cache holds 4-channel latents: set "
                                   "tokenizer.latent_channels=4 or leave it out",
    "tokenizer.kind=vq": "tokenizer.kind='vq' but the cache holds latents of a kl tokenizer: set tokenizer.kind=kl "
                         "or leave it out",
    "data.crop=resize": "data.crop='resize' but the cache holds center crops: set data.crop=center or leave it out",
    "data.hflip=true": "data.hflip=True but the cache stores no flipped latents",
}


def test_each_contradicting_key_is_named(cache, tok_dir, folder, tmp_path):
    for override, line in CONTRADICTIONS.items():
        with pytest.raises(ConfigError) as err:
            generator_task.build_generator_task(gen_cfg(tmp_path, tok_dir, cache, folder, override))
        assert line in str(err.value), (override, str(err.value))
        assert len(str(err.value).splitlines()) == 2, str(err.value)  # the heading + one line for the key
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "a" / "00.png").unlink()
    with pytest.raises(ConfigError, match=f"data.source='{other}' but the cache was encoded from '{folder}' \\(not "
                                          f"the same files\\): set data.source={folder}$"):
        generator_task.build_generator_task(gen_cfg(tmp_path, tok_dir, cache, other))


def test_all_contradictions_one_line_each_before_config_yaml(cache, tok_dir, folder, tmp_path, capsys):
    from ldm.cli import main
    from ldm.train.loop import fit

    overrides = [*CONTRADICTIONS, "data.source=digits"]
    cfg = gen_cfg(tmp_path, tok_dir, cache, folder, *overrides)
    with pytest.raises(ConfigError) as err:
        fit(cfg, progress=False)
    lines = str(err.value).splitlines()
    assert lines[0] == f"data.latents={cache} contradicts the config (the cache decides these):"
    assert len(lines) == 1 + len(overrides)
    assert lines[-1].endswith(f"set data.source={folder}")  # 'digits' is the default, but not the cache's source
    assert not (tmp_path / "g" / "config.yaml").exists()
    argv = ["train", "name=g", f"train.run_root={tmp_path}", f"tokenizer.pretrained={tok_dir}",
            f"data.latents={cache}", f"data.source={folder}", "data.image_size=32", "tokenizer.kind=vq",
            "--no-progress"]
    assert main(argv) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and err_text.startswith("ldm train: error: data.latents=")
    assert "data.image_size=32 but the cache holds 16 px images: set data.image_size=16; tokenizer.kind='vq'" in err_text


def test_vq_cache_names_the_code_dim(cache, tok_dir, folder, tmp_path):
    meta = dataclasses.replace(read_cache_meta(cache), tokenizer_kind="vq", latent_shape=[6, 8, 8])
    cfg = gen_cfg(tmp_path, tok_dir, cache, folder, "tokenizer.kind=vq", "tokenizer.vq.code_dim=6")
    generator_task._refuse_contradicting_keys(cfg, meta)  # agrees (tokenizer.latent_channels is not the vq's C)
    with pytest.raises(ConfigError, match="tokenizer.vq.code_dim=8 but the cache holds 6-channel latents: set "
                                          "tokenizer.vq.code_dim=6$"):
        generator_task._refuse_contradicting_keys(dataclasses.replace(cfg, tokenizer=dataclasses.replace(
            cfg.tokenizer, vq=dataclasses.replace(cfg.tokenizer.vq, code_dim=8))), meta)
