"""Data sources, decoding of awkward files, ADM preprocessing, and the resumable sampler."""

import logging
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.embedded import digits_arrays
from ldm.data.images import ImageDataset, center_crop_arr, iter_uint8_batches
from ldm.data.sampler import ResumableBatchSampler
from ldm.data.sources import BadImageError, decode_image, open_source
from ldm.seeding import derive_seed


def _rgb(seed, size=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _write_good(root):
    """Two classes of lossless PNGs; returns {relative path: array}."""
    arrays = {}
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = _rgb(hash((cls, i)) % 1000)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            arrays[f"{cls}/{i}.png"] = arr
    return arrays


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "imgs"
    good = _write_good(root)
    d = root / "dog"
    (d / "corrupt.png").write_bytes(b"this is not an image" * 10)
    png = (d / "0.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "empty.jpg").write_bytes(b"")
    Image.fromarray(_rgb(5, (9, 9))).save(d / "tiny.png")
    return root, good


def test_awkward_modes_convert_correctly(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", "a.png")
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:5] == [200, 0, 0]).all() and (out[5:] == 255).all()  # transparent -> white background

    sixteen = np.array([[0, 32768, 65535]] * 3, dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "b.png")  # saved as a 16-bit greyscale PNG
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode.startswith("I")
    out = decode_image(tmp_path / "b.png", "b.png")
    assert out[0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]  # 65535 -> 255, 32768 -> 128

    grey = np.arange(100, dtype=np.uint8).reshape(10, 10)
    Image.fromarray(grey, "L").save(tmp_path / "c.png")
    out = decode_image(tmp_path / "c.png", "c.png")
    assert (out == grey[..., None]).all()

    cmyk = Image.fromarray(_rgb(1)).convert("CMYK")
    cmyk.save(tmp_path / "d.jpg", quality=100)
    out = decode_image(tmp_path / "d.jpg", "d.jpg")
    with Image.open(tmp_path / "d.jpg") as im:
        assert im.mode == "CMYK"
        assert (out == np.asarray(im.convert("RGB"))).all()


@pytest.mark.parametrize("name, why", [("corrupt.png", "cannot decode"), ("truncated.png", "cannot decode"),
                                       ("empty.jpg", "zero-byte"), ("tiny.png", "smaller than the minimum")])
def test_bad_file_raises_with_name(bad_folder, name, why):
    root, _ = bad_folder
    with pytest.raises(BadImageError, match=rf"{name}.*{why}"):
        decode_image(root / "dog" / name, str(root / "dog" / name), min_size=10)


def test_skip_policy_counts_and_names_files(bad_folder, caplog):
    root, good = bad_folder
    src = open_source(str(root))
    ds = ImageDataset(src, 8, crop="center", on_error="skip", min_size=10)
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        items = [ds[(i, 0)] for i in range(len(ds))]
    assert len(ds.bad) == 4
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("corrupt.png", "truncated.png", "empty.jpg", "tiny.png"):
        assert name in messages
    assert "skipping bad image 4 so far" in messages
    assert all(it["image"].shape == (3, 8, 8) for it in items)


def test_raise_policy_names_file(bad_folder):
    root, _ = bad_folder
    ds = ImageDataset(open_source(str(root)), 8, on_error="raise", min_size=10)
    idx = open_source(str(root)).names.index("dog/corrupt.png")
    with pytest.raises(BadImageError, match=r"corrupt.png.*data.on_error=raise"):
        ds[(idx, 0)]


def test_class_folders_give_labels(bad_folder):
    root, good = bad_folder
    src = open_source(str(root))
    assert src.classes == ["cat", "dog"]
    for name, label in zip(src.names, src.labels):
        assert label == (0 if name.startswith("cat/") else 1)


def test_archives_and_npz_agree_with_folder(tmp_path):
    root = tmp_path / "imgs"
    good = _write_good(root)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for rel in good:
            zf.write(root / rel, rel)
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for rel in good:
            tf.add(root / rel, rel)
    folder = open_source(str(root))
    arr = np.stack([folder.read(i) for i in range(len(folder))])
    np.savez(tmp_path / "a.npz", arr_0=arr, arr_1=folder.labels)
    for spec in ("a.zip", "a.tar", "a.npz"):
        other = open_source(str(tmp_path / spec))
        assert len(other) == len(folder)
        assert other.labels.tolist() == folder.labels.tolist()
        for i in range(len(folder)):
            assert (other.read(i) == folder.read(i)).all()
            assert (other.read(i) == good[folder.names[i]]).all()


def test_missing_source_and_bad_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nothing"))
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        open_source(str(tmp_path / "x.npz"))


def test_center_crop_matches_adm_recipe():
    """Hand-worked case: 300x100 (W x H) -> 32: 100 >= 64 so BOX-halve to 150x50, then BICUBIC to 96x32, crop
    columns 32..64."""
    arr = _rgb(3, (100, 300))
    out = center_crop_arr(arr, 32)
    img = Image.fromarray(arr).resize((150, 50), resample=Image.BOX)
    ref = np.asarray(img.resize((96, 32), resample=Image.BICUBIC))[:, 32:64]
    assert out.shape == (32, 32, 3) and (out == ref).all()
    square = _rgb(4, (32, 32))
    assert (center_crop_arr(square, 32) == square).all()


def test_random_crops_many_patches_deterministic(tmp_path):
    Image.fromarray(_rgb(7, (64, 80))).save(tmp_path / "big.png")
    ds = ImageDataset(open_source(str(tmp_path)), 16, crop="random", crops_per_image=5, hflip=True)
    assert len(ds) == 5
    a = torch.stack([ds[(i, 11)]["image"] for i in range(5)])
    b = torch.stack([ds[(i, 11)]["image"] for i in range(5)])
    c = torch.stack([ds[(i, 12)]["image"] for i in range(5)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(x.flatten()[:20].tolist()) for x in a}) == 5  # five different patches
    src = Image.open(tmp_path / "big.png")
    full = torch.from_numpy(np.asarray(src)).permute(2, 0, 1).float() / 127.5 - 1
    patch = a[0]
    found = any(torch.equal(full[:, y:y + 16, x:x + 16], p) for y in range(49) for x in range(65)
                for p in (patch, patch.flip(-1)))
    assert found  # every item is an exact crop (possibly mirrored) of the photo


def test_digits_embedded():
    images, labels = digits_arrays(16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.asarray(Image.fromarray(images[0, ..., 0]).resize((8, 8), Image.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), d.images[0].ravel())[0, 1] > 0.95


def test_iter_uint8_batches_shards_cover_everything():
    images, _ = digits_arrays(8)
    seen = {}
    for rank in range(3):
        for batch, idx in iter_uint8_batches("digits", 100, size=8, rank=rank, world_size=3):
            for b, i in zip(batch, idx):
                seen[int(i)] = b
    assert sorted(seen) == list(range(len(images)))
    assert all((seen[i] == images[i]).all() for i in (0, 500, 1796))


def test_sampler_sharding_and_resume():
    n, bs = 50, 4
    one = ResumableBatchSampler(n, 2 * bs, seed=3)
    two = [ResumableBatchSampler(n, bs, seed=3, rank=r, world_size=2) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(one.batches_per_epoch * 2 + 3):  # crosses epoch boundaries
        joint = next(it2[0]) + next(it2[1])
        assert next(it1) == joint
    stream = iter(ResumableBatchSampler(n, bs, seed=3))
    full = [next(stream) for _ in range(20)]
    resumed = iter(ResumableBatchSampler(n, bs, seed=3, start=13))
    assert [next(resumed) for _ in range(7)] == full[13:]
    assert derive_seed(1, 0) != derive_seed(0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 4, seed=0)


def test_iter_uint8_batches_shards_whole_batches_and_stops_at_the_limit():
    """Global batch b holds images [b*B, (b+1)*B) and goes to rank b % world: the same batches for any world size."""
    one = [idx.tolist() for _, idx in iter_uint8_batches("digits", 10, size=8, limit=45)]
    assert one == [list(range(s, min(s + 10, 45))) for s in range(0, 45, 10)]
    for rank in range(2):
        mine = [idx.tolist() for _, idx in iter_uint8_batches("digits", 10, size=8, rank=rank, world_size=2, limit=45)]
        assert mine == one[rank::2]
    with pytest.raises(ValueError, match="on_error='ignore'"):
        next(iter_uint8_batches("digits", 10, on_error="ignore"))


def test_sampler_sample_seeds_follow_the_global_batch_and_datasets_return_them():
    """sample_seed = hash(seed, "sample", position, place in the global micro-batch): the same for a 1-process batch
    of 2B and 2 processes of B, new at every position; datasets hand it on as "sample_seed" (int64) and leave
    2-tuple keys as they were."""
    one = iter(ResumableBatchSampler(40, 8, seed=3))
    two = [iter(ResumableBatchSampler(40, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    for position in range(7):  # crosses an epoch boundary (5 batches per epoch)
        batch = next(one)
        assert [s for _, _, s in batch] == [derive_seed(3, "sample", position, j) for j in range(8)]
        assert batch == next(two[0]) + next(two[1])
    data = ImageDataset(open_source("digits", 8), 8)
    item = data[(5, 11, 2**62 + 1)]
    assert item["sample_seed"].dtype == torch.int64 and int(item["sample_seed"]) == 2**62 + 1
    assert torch.equal(item["image"], data[(5, 11)]["image"]) and "sample_seed" not in data[(5, 11)]
