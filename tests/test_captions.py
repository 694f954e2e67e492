"""Captions as data (ldm/data/captions.py): the digits' templated captions, sidecar files and manifests, the
per-item caption draw, the caption-embedding cache (atomic, refused for another encoder or other captions) and the
dataset wrapper."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.captions import (
    DIGIT_WORDS,
    CaptionedDataset,
    CaptionSet,
    build_caption_cache,
    caption_set_for,
    captions_from_members,
    captions_from_texts,
    digit_captions,
    digit_of_caption,
    read_caption_cache,
)
from ldm.data.images import ImageDataset
from ldm.data.sources import ArraySource, open_source
from ldm.seeding import derive_seed


class FakeEncoder:
    """A deterministic stand-in for TextEncoder: token k of a caption = (len(caption), k, ord(first char)) in 3 dims."""

    def __init__(self, fingerprint="aaaa", max_tokens=4):
        self.fingerprint, self.source, self.max_tokens = fingerprint, f"fake-{fingerprint}", max_tokens
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        tokens = torch.tensor([[[len(t), k, ord(t[0])] for k in range(self.max_tokens)] for t in texts],
                              dtype=torch.float32)  # (B, L, 3)
        mask = torch.tensor([[k < min(len(t.split()), self.max_tokens) for k in range(self.max_tokens)]
                             for t in texts])
        return tokens, mask, tokens[:, 0] * 2


# ------------------------------------------------------------------------------------------------------ digits
def test_digit_captions_name_their_digit_and_read_back():
    assert digit_captions(7)[0] == "a handwritten digit seven"
    assert "the number 7, written by hand" in digit_captions(7)
    for d in range(10):
        caps = digit_captions(d)
        assert len(caps) == len(set(caps)) == 10
        assert all(digit_of_caption(c) == d for c in caps)
    assert digit_of_caption("A Handwritten Digit SEVEN.") == 7
    assert digit_of_caption("a seven next to a 3") is None  # two different digits
    assert digit_of_caption("a cat") is None and digit_of_caption("10 cats") is None
    with pytest.raises(ValueError, match="not in 0..9"):
        digit_captions(10)


def test_digits_source_gets_ten_templated_captions_per_image():
    source = open_source("digits", 8)
    caps = caption_set_for(source)
    assert len(caps) == len(source) == 1797 and len(caps.texts) == 100
    for i in (0, 5, 1796):
        assert caps.captions_of(i) == digit_captions(int(source.labels[i]))


def test_pick_is_a_function_of_seed_and_index():
    caps = CaptionSet.from_captions([["a", "b", "c"], ["d"]], "test")
    assert caps.texts == ["a", "b", "c", "d"]
    # hand computation of the documented rule: ids[first + hash(seed, "caption", index) % count]
    assert caps.pick(0, 5, 0) == derive_seed(5, "caption", 0) % 3
    assert caps.pick(0, 5, 0) == caps.pick(0, 5, 0)
    assert {caps.pick(0, s, 0) for s in range(30)} == {0, 1, 2}  # every caption is drawn over the epochs
    assert caps.pick(1, 123, 1) == 3
    with pytest.raises(ValueError, match="image 1 has no caption"):
        CaptionSet.from_captions([["a"], []], "test")


# ------------------------------------------------------------------------------------------------------ folders
def _folder(tmp_path, n=3):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "cat" / f"{i}.png")
    return root


def test_sidecar_txt_and_json_captions(tmp_path):
    root = _folder(tmp_path)
    (root / "cat" / "0.txt").write_text("a grey square\n\n  a dark square \n")
    (root / "cat" / "1.json").write_text(json.dumps({"caption": "one"}))
    (root / "cat" / "2.json").write_text(json.dumps({"captions": ["two", "a grey square"]}))
    caps = caption_set_for(open_source(str(root)))
    assert [caps.captions_of(i) for i in range(3)] == [["a grey square", "a dark square"], ["one"],
                                                       ["two", "a grey square"]]
    assert caps.texts == ["a grey square", "a dark square", "one", "two"]  # distinct, in first-seen order
    assert captions_from_texts("x\n\n y \n") == ["x", "y"]
    # the seam for shard members: the same rule from bytes, .txt first
    assert captions_from_members(b"a\nb\n", b'{"caption": "c"}', "s:0") == ["a", "b"]
    assert captions_from_members(None, b'{"captions": ["c", "d"]}', "s:0") == ["c", "d"]
    with pytest.raises(ValueError, match=r"s:0.json: not valid JSON"):
        captions_from_members(None, b"{", "s:0")
    with pytest.raises(ValueError, match=r"s:0.txt: empty caption file"):
        captions_from_members(b"\n", None, "s:0")


def test_a_source_with_captions_method_supplies_them():
    class Captioned(ArraySource):
        def captions(self):
            return [[f"image {i}"] for i in range(len(self))]

    source = Captioned(np.zeros((3, 8, 8, 3), np.uint8), None, "x")
    assert caption_set_for(source).captions_of(2) == ["image 2"]
    with pytest.raises(ValueError, match="finds no captions for ArraySource"):
        caption_set_for(ArraySource(np.zeros((3, 8, 8, 3), np.uint8), None, "x"))


def test_missing_sidecar_names_the_file(tmp_path):
    root = _folder(tmp_path)
    (root / "cat" / "0.txt").write_text("zero")
    with pytest.raises(FileNotFoundError, match=r"no caption for .*1\.png: expected 1\.txt or 1\.json"):
        caption_set_for(open_source(str(root)))


def test_manifest_in_the_root_and_by_path(tmp_path):
    root = _folder(tmp_path)
    rows = [{"file": "cat/0.png", "caption": "zero"}, {"file": "cat/1.png", "text": "one"},
            {"file": "cat/2.png", "captions": ["two", "deux"]}, {"file": "cat/0.png", "caption": "nil"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    caps = caption_set_for(open_source(str(root)))
    assert [caps.captions_of(i) for i in range(3)] == [["zero", "nil"], ["one"], ["two", "deux"]]
    other = tmp_path / "m.jsonl"
    other.write_text(json.dumps({"file": "cat/9.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: file 'cat/9.png' is not an image"):
        caption_set_for(open_source(str(root)), str(other))
    other.write_text(json.dumps({"index": 0, "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"2 image\(s\) have no caption, e.g. 'cat/1.png'"):
        caption_set_for(open_source(str(root)), str(other))
    with pytest.raises(FileNotFoundError, match="text.captions='nope.txt'"):
        caption_set_for(open_source(str(root)), "nope.txt")


# ------------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_reuse_and_refusals(tmp_path):
    caps = CaptionSet.from_captions([["a b c", "xyz"], ["a b c"]], "test captions")
    enc = FakeEncoder()
    emb = build_caption_cache(enc, caps, tmp_path / "c", batch_size=1, progress=False)
    tokens, mask, pooled = enc.encode(caps.texts)
    assert np.array_equal(emb.tokens, tokens.numpy()) and np.array_equal(emb.mask, mask.numpy())
    assert np.array_equal(emb.pooled, pooled.numpy()) and enc.calls == 3  # two batches of 1, then the check above
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["mask.npy", "meta.json", "pooled.npy",
                                                                 "texts.json", "tokens.npy"]
    build_caption_cache(enc, caps, tmp_path / "c", progress=False)  # complete cache of the same encoder: read
    assert enc.calls == 3
    with pytest.raises(ValueError) as err:
        read_caption_cache(tmp_path / "c", expected_fingerprint="bbbb", captions=caps)
    msg = str(err.value)
    assert "encoded by text encoder aaaa (fake-aaaa)" in msg and "in use is bbbb" in msg and "text.cache" in msg
    with pytest.raises(ValueError, match="another text encoder"):
        build_caption_cache(FakeEncoder("bbbb"), caps, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="holds other captions"):
        read_caption_cache(tmp_path / "c", expected_fingerprint="aaaa",
                           captions=CaptionSet.from_captions([["q"]], "other"))
    (tmp_path / "c" / "meta.json").unlink()  # as a build killed before its last write leaves it
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        read_caption_cache(tmp_path / "c", expected_fingerprint="aaaa")


def test_float16_cache(tmp_path):
    caps = CaptionSet.from_captions([["hello"]], "t")
    emb = build_caption_cache(FakeEncoder(), caps, tmp_path / "c", dtype="float16", progress=False)
    assert emb.tokens.dtype == np.float16 and emb.rows([0])[0].dtype == torch.float32
    with pytest.raises(ValueError, match="cache_dtype='bfloat16'"):
        build_caption_cache(FakeEncoder(), caps, tmp_path / "d", dtype="bfloat16")


def test_captioned_dataset_items_carry_their_caption(tmp_path):
    source = open_source("digits", 8)
    caps = caption_set_for(source)
    emb = build_caption_cache(FakeEncoder(max_tokens=5), caps, tmp_path / "c", progress=False)
    ds = CaptionedDataset(ImageDataset(source, 8), caps, emb)
    assert len(ds) == 1797 and ds.num_classes == 10  # the wrapped dataset's attributes
    for index, seed in ((0, 3), (17, 99)):
        item = ds[(index, seed, 42)]
        cid = caps.pick(index, seed, index)
        assert int(item["caption_id"]) == cid and caps.texts[cid] in digit_captions(int(source.labels[index]))
        assert torch.equal(item["text_tokens"], torch.from_numpy(np.asarray(emb.tokens[cid])))
        assert torch.equal(item["text_mask"], torch.from_numpy(np.asarray(emb.mask[cid])))
        assert item["text_pooled"].shape == (3,) and int(item["sample_seed"]) == 42
    batched = ds.__getitems__([(0, 3), (17, 99)])  # the DataLoader's batched read captions each item the same way
    assert [int(b["caption_id"]) for b in batched] == [caps.pick(0, 3, 0), caps.pick(17, 99, 17)]
    assert torch.equal(batched[1]["text_tokens"], ds[(17, 99)]["text_tokens"])
    assert DIGIT_WORDS[int(source.labels[0])] in caps.texts[int(ds[(0, 0)]["caption_id"])] or \
        str(int(source.labels[0])) in caps.texts[int(ds[(0, 0)]["caption_id"])]
