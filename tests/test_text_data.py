"""Text conditioning data beyond captions in folders: precomputed embeddings as data (ldm/data/embeddings.py,
text.embeddings) and captions carried through tar shards (`ldm make-shards` writes them as key.txt members, ShardSource
reads them back, the caption cache and training take them, and the captioned dataset streams the shards)."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.captions import (
    CaptionedDataset,
    build_caption_cache,
    caption_set_for,
    read_caption_cache,
    stored_captions,
)
from ldm.data.embeddings import load_embeddings
from ldm.data.images import ImageDataset
from ldm.data.sampler import ShardBatchSampler, build_batch_sampler
from ldm.data.shards import INDEX_SUFFIX, ShardSource, make_shards
from ldm.data.sources import ArraySource, open_source

sys.path.insert(0, str(Path(__file__).parent))


class FakeEncoder:
    """Deterministic stand-in for a TextEncoder: token k of caption c = (len(c), k, sum of its code points)."""

    fingerprint, source = "fake", "fake"

    def encode(self, texts):
        tokens = torch.tensor([[[len(t), k, sum(map(ord, t))] for k in range(3)] for t in texts], dtype=torch.float32)
        return tokens, torch.ones(len(texts), 3, dtype=torch.bool), tokens[:, 0]


def _image_folder(root: Path, n_per_class: int = 3, size: int = 8) -> Path:
    """cat/0.png, cat/1.png, ..., dog/... with distinct grey levels."""
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            grey = np.full((size, size, 3), 20 * (c * n_per_class + i), np.uint8)
            Image.fromarray(grey).save(root / name / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------------ embeddings
def test_sidecar_token_embeddings_are_padded_masked_and_pooled(tmp_path):
    """Per-token (L_i, D) sidecars of different lengths: zero-padded to the longest, masked, pooled = the mean of the
    real tokens (computed here with plain loops), one caption id per image in source order."""
    root = _image_folder(tmp_path / "f", n_per_class=2)
    rng = np.random.default_rng(0)
    lengths = {"cat/0": 2, "cat/1": 3, "dog/0": 1, "dog/1": 3}
    arrays = {k: rng.normal(size=(n, 4)).astype(np.float32) for k, n in lengths.items()}
    for k, a in arrays.items():
        np.save(root / f"{k}.npy", a)
    pre = load_embeddings(open_source(str(root)), "sidecar", max_tokens=5)
    e = pre.embeddings
    assert e.tokens.shape == (4, 3, 4) and pre.max_tokens == 3 and pre.token_dim == 4 and pre.pooled_dim == 4
    assert pre.captions.texts == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert [pre.captions.pick(i, 7, i) for i in range(4)] == [0, 1, 2, 3]
    for i, key in enumerate(lengths):
        n = lengths[key]
        assert np.array_equal(e.tokens[i, :n], arrays[key]) and not e.tokens[i, n:].any()
        assert e.mask[i].tolist() == [True] * n + [False] * (3 - n)
        by_hand = [sum(float(arrays[key][r, d]) for r in range(n)) / n for d in range(4)]
        assert np.allclose(e.pooled[i], by_hand, atol=1e-6)
    again = load_embeddings(open_source(str(root)), "sidecar", max_tokens=5)
    assert again.fingerprint == pre.fingerprint
    arrays["dog/0"][0, 0] += 1.0
    np.save(root / "dog/0.npy", arrays["dog/0"])
    assert load_embeddings(open_source(str(root)), "sidecar", max_tokens=5).fingerprint != pre.fingerprint
    with pytest.raises(ValueError, match=r"3 tokens, more than text.max_tokens=2; set text.max_tokens=3"):
        load_embeddings(open_source(str(root)), "sidecar", max_tokens=2)


def test_pooled_sidecars_and_pixart_npz(tmp_path):
    """(D,) sidecars become one token that is also the pooled embedding; PixArt-alpha's .npz (caption_feature (1, L,
    D), attention_mask (1, L) as 0/1) reads as tokens + mask, with an explicit 'pooled' kept as given."""
    root = _image_folder(tmp_path / "p", n_per_class=1)
    vectors = {"cat/0": np.array([1.0, 2.0, 3.0], np.float16), "dog/0": np.array([-1.0, 0.5, 0.0], np.float16)}
    for k, v in vectors.items():
        np.save(root / f"{k}.npy", v)
    e = load_embeddings(open_source(str(root)), "sidecar", max_tokens=77).embeddings
    assert e.tokens.shape == (2, 1, 3) and e.mask.tolist() == [[True], [True]]
    assert np.array_equal(e.tokens[:, 0], np.stack(list(vectors.values()))) and np.array_equal(e.pooled, e.tokens[:, 0])

    pix = _image_folder(tmp_path / "x", n_per_class=1)
    feature = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    for i, k in enumerate(("cat/0", "dog/0")):
        np.savez(pix / f"{k}.npz", caption_feature=feature[i][None], attention_mask=np.array([[1, 1, i, 0]]),
                 pooled=np.full(5, float(i), np.float32))
    e = load_embeddings(open_source(str(pix)), "sidecar", max_tokens=4).embeddings
    assert e.tokens.shape == (2, 4, 3) and np.array_equal(e.tokens, feature)
    assert e.mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert e.pooled.tolist() == [[0.0] * 5, [1.0] * 5]
    assert CaptionedDataset(ImageDataset(open_source(str(pix)), 8), *_pre(pix))[(1, 0)]["text_pooled"].tolist() == \
        [1.0] * 5


def _pre(root):
    pre = load_embeddings(open_source(str(root)), "sidecar", max_tokens=4)
    return pre.captions, pre.embeddings


def test_stacked_arrays_in_source_order(tmp_path):
    """One (N, L, D) .npy (memory-mapped), one (N, D) .npy and one .npz with tokens / mask / pooled: row i is image i
    of the source, and a dataset item carries its own row."""
    source = ArraySource(np.zeros((5, 8, 8, 3), np.uint8), None, "five")
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(5, 2, 3)).astype(np.float32)
    np.save(tmp_path / "t.npy", tokens)
    pre = load_embeddings(source, str(tmp_path / "t.npy"), max_tokens=8)
    assert isinstance(pre.embeddings.tokens, np.memmap) and np.array_equal(pre.embeddings.tokens, tokens)
    assert np.allclose(pre.embeddings.pooled, (tokens[:, 0] + tokens[:, 1]) / 2, atol=1e-6)
    np.save(tmp_path / "p.npy", tokens[:, 0])
    pooled = load_embeddings(source, str(tmp_path / "p.npy"), max_tokens=8).embeddings
    assert pooled.tokens.shape == (5, 1, 3) and np.array_equal(pooled.pooled, tokens[:, 0])
    mask = np.array([[1, 0]] * 5, bool)
    np.savez(tmp_path / "s.npz", tokens=tokens, mask=mask, pooled=np.eye(5, dtype=np.float32))
    pre = load_embeddings(source, str(tmp_path / "s.npz"), max_tokens=8)
    ds = CaptionedDataset(ImageDataset(source, 8), pre.captions, pre.embeddings)
    item = ds[(3, 11)]
    assert int(item["caption_id"]) == 3 and torch.equal(item["text_tokens"], torch.from_numpy(tokens[3]))
    assert item["text_mask"].tolist() == [True, False] and item["text_pooled"].tolist() == np.eye(5)[3].tolist()


@pytest.mark.parametrize("case, message", [
    ("missing", r"no embedding for .*dog/0\.png: expected 0\.npy or 0\.npz beside it"),
    ("int", r"cat/0\.npy: tokens has dtype int64, not a float type; save it as float32"),
    ("nan", r"dog/0\.npy: tokens holds NaN or infinite values"),
    ("width", r"dog/0\.npy: token width 5, but .*cat/0\.npy has 4; every image's embedding must come from the same"),
    ("kinds", r"dog/0\.npy: a pooled \(D,\) embedding only, but .*cat/0\.npy holds per-token"),
    ("pooled", r"dog/0\.npz: no 'pooled' array, unlike .*cat/0\.npz; give it for every image or for none"),
    ("mask", r"dog/0\.npz: the mask of row 0 marks no real token"),
    ("shape", r"dog/0\.npy: tokens has shape \(2, 2, 4\); expected \(L, D\) per-token or \(D,\) pooled"),
    ("junk", r"dog/0\.npy: not a readable .npy / .npz array file"),
])
def test_bad_sidecars_are_one_line_naming_the_file(tmp_path, case, message):
    root = _image_folder(tmp_path / case, n_per_class=1)
    good = np.ones((2, 4), np.float32)
    if case in ("pooled", "mask"):
        np.savez(root / "cat/0.npz", tokens=good, pooled=np.ones(4, np.float32))
        bad = {"pooled": {"tokens": good},
               "mask": {"tokens": good, "mask": np.zeros(2, bool), "pooled": np.ones(4, np.float32)}}[case]
        np.savez(root / "dog/0.npz", **bad)
    else:
        np.save(root / "cat/0.npy", good.astype(np.int64) if case == "int" else good)
        bad = {"missing": None, "int": good, "nan": np.full((2, 4), np.nan, np.float32),
               "width": np.ones((2, 5), np.float32), "kinds": np.ones(4, np.float32),
               "shape": np.ones((2, 2, 4), np.float32), "junk": None}[case]
        if bad is not None:
            np.save(root / "dog/0.npy", bad)
        if case == "junk":
            (root / "dog/0.npy").write_bytes(b"not numpy")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        load_embeddings(open_source(str(root)), "sidecar", max_tokens=8)
    assert "\n" not in str(err.value)


def test_bad_specs_and_stacked_row_counts(tmp_path):
    source = ArraySource(np.zeros((3, 8, 8, 3), np.uint8), None, "three")
    np.save(tmp_path / "four.npy", np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"four\.npy: 4 rows for the 3 images of the data source; row i must be"):
        load_embeddings(source, str(tmp_path / "four.npy"), max_tokens=8)
    with pytest.raises(FileNotFoundError, match=r"text.embeddings=.*nope\.npy.*: no such file"):
        load_embeddings(source, str(tmp_path / "nope.npy"), max_tokens=8)
    with pytest.raises(ValueError, match=r"text.embeddings='emb.txt': expected 'sidecar'"):
        load_embeddings(source, "emb.txt", max_tokens=8)
    with pytest.raises(ValueError, match=r"text.embeddings=sidecar reads .* a ArraySource has no such files"):
        load_embeddings(source, "sidecar", max_tokens=8)
    np.save(tmp_path / "nan.npy", np.array([[0.0], [np.inf], [1.0]], np.float32))
    with pytest.raises(ValueError, match=r"nan\.npy: pooled holds NaN or infinite values \(first in row 1\)"):
        load_embeddings(source, str(tmp_path / "nan.npy"), max_tokens=8)


# ------------------------------------------------------------------------------------------------------ shards
def _captioned_folder(root: Path) -> Path:
    """A folder with every sidecar kind: .txt with two lines, .json "caption", .json "captions" with a caption that
    holds a line separator (not writable as one .txt line), duplicates across images."""
    _image_folder(root)
    (root / "cat/0.txt").write_text("a cat\nthe first cat\n")
    (root / "cat/1.json").write_text(json.dumps({"caption": "a cat"}))
    (root / "cat/2.json").write_text(json.dumps({"captions": ["a cat", "two\u2028lines"]}))
    for i in range(3):
        (root / f"dog/{i}.txt").write_text(f"dog number {i}\n")
    return root


def test_make_shards_carries_folder_captions_into_the_caption_cache(tmp_path):
    """folder with sidecars -> `ldm make-shards` -> the shards' caption set is the folder's (texts, order, ids), and
    so is the caption-embedding cache: the folder's cache is accepted for the shards and equals one built from them."""
    from ldm.cli import main

    folder = _captioned_folder(tmp_path / "f")
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "s"), "--shard-size", "4", "--no-progress"]) == 0
    record = json.loads((tmp_path / "s" / "make-shards.json").read_text())
    shards = ShardSource(record["pattern"])
    with tarfile.open(shards.shards[0]) as tf:
        names = tf.getnames()
        assert names[:4] == ["000000.png", "000000.cls", "000000.txt", "000000.json"]
        assert tf.extractfile("000000.txt").read() == b"a cat\nthe first cat\n"
        assert "000002.txt" not in names  # the line-separator caption went into key.json
        assert json.loads(tf.extractfile("000002.json").read())["captions"] == ["a cat", "two\u2028lines"]
    a, b = caption_set_for(open_source(str(folder))), caption_set_for(shards)
    assert a.texts == b.texts and np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ids, b.ids)
    assert b.captions_of(2) == ["a cat", "two\u2028lines"] and b.captions_of(0) == ["a cat", "the first cat"]
    from_folder = build_caption_cache(FakeEncoder(), a, tmp_path / "c1", progress=False)
    from_shards = build_caption_cache(FakeEncoder(), b, tmp_path / "c2", progress=False)
    for name in ("tokens", "mask", "pooled"):
        assert np.array_equal(getattr(from_folder, name), getattr(from_shards, name))
    read_caption_cache(tmp_path / "c1", expected_fingerprint="fake", captions=b)  # the same texts: accepted

    # --captions none: no caption members, and the shards then have none to give
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "n"), "--captions", "none", "--no-progress"]) == 0
    bare = ShardSource(json.loads((tmp_path / "n" / "make-shards.json").read_text())["pattern"])
    assert bare.captions() is None and stored_captions(bare) is None
    with pytest.raises(ValueError, match="stores no captions"):
        caption_set_for(bare)
    # other captions into the same folder are another plan: refused
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"index": i, "caption": f"image {i}"}) + "\n" for i in range(6)))
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "n"), "--captions", str(manifest)]) == 2
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "m"), "--captions", str(manifest),
                 "--no-progress"]) == 0
    m = ShardSource(json.loads((tmp_path / "m" / "make-shards.json").read_text())["pattern"])
    assert [c[0] for c in m.captions()] == [f"image {i}" for i in range(6)]


def test_old_indices_are_rescanned_and_partial_captions_refused(tmp_path):
    folder = _captioned_folder(tmp_path / "f")
    record = make_shards(str(folder), tmp_path / "s", shard_size=3, progress=False)
    shard = Path(record["pattern"].replace("{000000..000001}", "000000"))
    index = Path(str(shard) + INDEX_SUFFIX)
    with np.load(index) as d:  # as an older ldm wrote it: no caption locations
        old = {k: d[k] for k in d.files if k != "captions"}
    np.savez(index, **old)
    assert ShardSource(record["pattern"]).captions()[0] == ["a cat", "the first cat"]
    with np.load(index) as d:
        assert "captions" in d.files and str(d["plan_id"]) == record["plan_id"]  # rewritten, still finished
    written = shard.stat().st_mtime_ns
    again = make_shards(str(folder), tmp_path / "s", shard_size=3, progress=False)
    assert again["complete"] and shard.stat().st_mtime_ns == written  # kept, not rewritten

    # hand-made shards whose second sample has no caption, or no label
    png = (folder / "cat/0.png").read_bytes()
    _tar(tmp_path / "part.tar", ("a.png", png), ("a.txt", b"one\n"), ("b.png", png), ("b.json", b'{"name": "b"}'))
    with pytest.raises(ValueError, match=r"part\.tar:b\.png has no caption .* while other samples .* have one"):
        ShardSource(str(tmp_path / "part.tar")).captions()
    _tar(tmp_path / "label.tar", ("a.png", png), ("a.cls", b"1\n"), ("b.png", png))
    with pytest.raises(ValueError, match=r"label\.tar:b\.png has no class label"):  # names the sample
        ShardSource(str(tmp_path / "label.tar"))


def _tar(path: Path, *members: tuple[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_captioned_shards_stream_through_the_shard_sampler(tmp_path, monkeypatch):
    """The caption wrapper forwards shard_ranges (so training gets ShardBatchSampler) and reads each batch through
    the wrapped dataset's __getitems__ (members in file order), captioning every item as __getitem__ does."""
    folder = _captioned_folder(tmp_path / "f")
    record = make_shards(str(folder), tmp_path / "s", shard_size=2, progress=False)
    source = ShardSource(record["pattern"])
    base = ImageDataset(source, 8)
    captions = caption_set_for(source)
    ds = CaptionedDataset(base, captions, build_caption_cache(FakeEncoder(), captions, tmp_path / "c", progress=False))
    assert ds.shard_ranges == [(0, 2), (2, 4), (4, 6)]
    sampler = build_batch_sampler(ds, 2, seed=0, rank=0, world_size=1, start=0, num_workers=0, shuffle_buffer=4)
    assert isinstance(sampler, ShardBatchSampler)
    reads = []
    monkeypatch.setattr(ImageDataset, "__getitems__", lambda self, keys: reads.append(list(keys)) or
                        [self[k] for k in keys])
    batch = next(iter(sampler))
    items = ds.__getitems__(batch)
    assert reads == [batch]
    for key, item in zip(batch, items):
        alone = ds[key]
        assert int(item["caption_id"]) == int(alone["caption_id"]) == captions.pick(key[0], key[1], key[0])
        assert torch.equal(item["text_tokens"], alone["text_tokens"]) and torch.equal(item["image"], alone["image"])


# ------------------------------------------------------------------------------------------------------ training
COMMON = ["stage=generator", "model.preset=DiT-Pico/2", "data.image_size=16", "tokenizer.stats_num_images=16",
          "train.batch_size=4", "train.log_every=1", "train.mixed_precision=no", "sample.steps=2",
          "train.ema_decay=0.9", "train.sample_every=0"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1,
                         norm_num_groups=8).save_pretrained(path)
    return path


def _fit(root: Path, vae: Path, *extra):
    from ldm.config import load_config
    from ldm.train.loop import fit

    return fit(load_config(None, [*COMMON, f"tokenizer.pretrained={vae}", f"train.run_root={root}", *extra]),
               progress=False)


def _checkpoint(run: Path, step: int) -> dict:
    from ldm.runs import load_checkpoint

    return load_checkpoint(run / "checkpoints" / f"step_{step:07d}")


def test_training_on_captioned_shards_streams(vae, tmp_path):
    """A text model trains on shards made from a captioned folder: the captions reach the cache (the folder's texts),
    and the run read the shards through ShardBatchSampler (its checkpoint records the shard layout)."""
    pytest.importorskip("transformers")
    from tiny_text import save_tiny_encoder

    folder = _captioned_folder(tmp_path / "f")
    record = make_shards(str(folder), tmp_path / "s", shard_size=2, progress=False)
    clip = save_tiny_encoder(tmp_path / "clip", "clip")
    _fit(tmp_path, vae, "name=shards", "train.max_steps=2", f"data.source={record['pattern']}", f"text.encoder={clip}",
         "text.max_tokens=8", f"text.cache={tmp_path / 'cache'}")
    texts = json.loads((tmp_path / "cache" / "texts.json").read_text())
    assert texts == caption_set_for(open_source(str(folder))).texts
    state = _checkpoint(tmp_path / "shards", 2)["state"]
    assert state["data_layout"] == {"processes": 1, "workers": 1} and state["task"]["text"]["caption_tokens"] == 8


def test_training_on_precomputed_embeddings(vae, tmp_path, capsys):
    """A text model trains on a stacked (N, D) .npy without a text encoder: 2 + 2 steps resumed equal 4 straight, the
    checkpoint records the embeddings' identity, encoder keys beside text.embeddings are refused, and text prompts
    on such a run are refused in one line (it has no text encoder: --prompt-embeddings, tests/test_prompt_embeddings.py)."""
    from safetensors.torch import load_file

    from ldm.cli import main
    from ldm.config import ConfigError

    source = open_source("digits", 16)
    onehot = np.eye(10, dtype=np.float32)[source.labels] * 2 - 1  # (N, 10): the label as a pooled embedding
    np.save(tmp_path / "emb.npy", onehot)
    keys = ["data.source=digits", f"text.embeddings={tmp_path / 'emb.npy'}"]
    _fit(tmp_path, vae, "name=straight", "train.max_steps=4", *keys)
    _fit(tmp_path, vae, "name=split", "train.max_steps=2", *keys)
    _fit(tmp_path, vae, "name=split", "train.max_steps=4", *keys)
    a = load_file(str(tmp_path / "straight/checkpoints/step_0000004/model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step_0000004/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = _checkpoint(tmp_path / "straight", 4)["state"]["task"]["text"]
    assert text["precomputed"] and text["caption_dim"] == 10 and text["caption_tokens"] == 1
    assert text["encoder_fingerprint"] == load_embeddings(source, str(tmp_path / "emb.npy"), max_tokens=77).fingerprint
    with pytest.raises(ConfigError, match=r"text.encoder='x' would not be used: leave it out"):
        _fit(tmp_path, vae, "name=bad", "train.max_steps=1", *keys, "text.encoder=x")
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "straight"), "--prompt", "x", "-n", "1", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on precomputed embeddings" in err and "--prompt-embeddings" in err and "Traceback" not in err
