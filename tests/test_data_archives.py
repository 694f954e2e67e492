"""Archives read as their extracted folder (wrapper folder and macOS junk ignored), EXIF orientation, skip counts."""

import io
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.images import ImageDataset, SkipCounts, center_crop_arr, to_tensor
from ldm.data.sources import class_paths, decode_image, open_source


def _rgb(seed, size=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _write_tree(root):
    """cat/ and dog/ of lossless PNGs under `root`; returns {path relative to root: array}."""
    arrays = {}
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arrays[f"{cls}/{i}.png"] = _rgb(10 * c + i)
            Image.fromarray(arrays[f"{cls}/{i}.png"]).save(root / cls / f"{i}.png")
    return arrays


def _add_mac_junk(root, wrapper):
    """What macOS leaves beside a folder it copies or zips: .DS_Store, ._* AppleDouble forks (not images, but named
    like them) and a __MACOSX/ mirror of those forks."""
    (root / wrapper / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (root / wrapper / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / "__MACOSX" / wrapper / "dog").mkdir(parents=True)
    (root / "__MACOSX" / wrapper / "dog" / "._1.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))


def _zip(folder, out, *, with_dirs=False):
    """Zip every file under `folder` (member names relative to it); with_dirs adds directory entries as Finder does."""
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() or with_dirs:
                zf.write(p, str(p.relative_to(folder)))
    return out


@pytest.fixture
def layouts(tmp_path):
    """The same two-class tree as: a folder, a folder wrapping it (plus macOS junk), zips with and without the
    wrapper, a .tar.gz with the wrapper and a `tar -C dir -cf x.tar .` style tar (./ member names)."""
    plain = tmp_path / "plain"
    arrays = _write_tree(plain)
    wrapped = tmp_path / "wrapped"
    _write_tree(wrapped / "animals")
    _add_mac_junk(wrapped, "animals")
    with tarfile.open(tmp_path / "wrapped.tar.gz", "w:gz") as tf:
        tf.add(wrapped, ".")  # the folder itself (wrapper and junk inside), as ./animals/cat/0.png
    with tarfile.open(tmp_path / "plain.tar", "w") as tf:
        tf.add(plain / "cat", "cat")
        tf.add(plain / "dog", "dog")
    specs = {"plain": plain, "wrapped": wrapped, "wrapped/animals": wrapped / "animals",
             "plain.zip": _zip(plain, tmp_path / "plain.zip"),
             "wrapped.zip": _zip(wrapped, tmp_path / "wrapped.zip", with_dirs=True),
             "wrapped.tar.gz": tmp_path / "wrapped.tar.gz", "plain.tar": tmp_path / "plain.tar"}
    return arrays, specs


def test_every_layout_reads_like_the_plain_folder(layouts):
    arrays, specs = layouts
    reference = open_source(str(specs["plain"]))
    assert reference.classes == ["cat", "dog"] and reference.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for spec, path in specs.items():
        compressed = spec.endswith(".tar.gz")  # random reads refused (ldm make-shards): read once in archive order
        src = open_source(str(path), random_access=not compressed)
        assert len(src) == len(reference), spec  # the junk is not counted as images
        assert src.classes == reference.classes, spec
        assert src.labels.tolist() == reference.labels.tolist(), spec
        in_order = {i: data for i, data, _ in src.iter_raw(src.storage_order())} if compressed else {}
        for i, name in enumerate(reference.names):
            assert ((decode_image(in_order[i], name) if compressed else src.read(i)) == arrays[name]).all(), spec
        if compressed:
            with pytest.raises(ValueError, match="ldm make-shards"):
                open_source(str(path))
            continue
        ds = ImageDataset(src, 8, on_error="skip")
        [ds[(i, 0)] for i in range(len(ds))]
        assert ds.skip_counts() == SkipCounts(bad=0, replaced=0), spec


def test_wrapper_rules():
    """Strip a folder only while it wraps everything and something lies below a sub-folder of it."""
    assert class_paths(["animals/cat/1.jpg", "animals/dog/2.jpg"]) == [["cat", "1.jpg"], ["dog", "2.jpg"]]
    assert class_paths(["a/b/cat/1.jpg", "a/b/dog/x/2.jpg"]) == [["cat", "1.jpg"], ["dog", "x", "2.jpg"]]
    assert class_paths(["./cat/1.jpg", "./dog/2.jpg"]) == [["cat", "1.jpg"], ["dog", "2.jpg"]]
    assert class_paths(["cat/1.jpg", "cat/2.jpg"]) == [["cat", "1.jpg"], ["cat", "2.jpg"]]  # one class, kept
    assert class_paths(["cat/1.jpg", "dog/x/2.jpg"]) == [["cat", "1.jpg"], ["dog", "x", "2.jpg"]]  # two classes
    # an image directly in the wrapper: flat once stripped, exactly as when pointing at animals/
    assert class_paths(["animals/cat/1.jpg", "animals/2.jpg"]) == [["cat", "1.jpg"], ["2.jpg"]]


def test_single_class_folder_and_flat_folder(tmp_path):
    _write_tree(tmp_path / "two")
    assert open_source(str(tmp_path / "two" / "cat")).labels is None  # images directly in the root: unconditional
    only_cat = tmp_path / "only_cat"
    (only_cat / "cat").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_rgb(i)).save(only_cat / "cat" / f"{i}.png")
    for src in (open_source(str(only_cat)), open_source(str(_zip(only_cat, tmp_path / "cat.zip")))):
        assert src.classes == ["cat"] and src.labels.tolist() == [0, 0]  # a folder of images stays a class


def _exif_jpeg(arr, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


# EXIF 2.3 Table 4: how the stored pixels must be turned for display, written with numpy (independent of PIL)
DISPLAY = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, k=-1),
           8: lambda a: np.rot90(a, k=1)}


@pytest.mark.parametrize("orientation", sorted(DISPLAY))
def test_exif_orientation_is_applied_before_cropping(tmp_path, orientation):
    stored = _rgb(7, (24, 40))  # landscape pixels, as a camera held upright stores a portrait photo
    data = _exif_jpeg(stored, orientation)
    with Image.open(io.BytesIO(data)) as im:  # the JPEG's own pixels, no orientation applied
        assert im.getexif()[0x0112] == orientation
        pixels = np.asarray(im.convert("RGB"))
    expected = np.ascontiguousarray(DISPLAY[orientation](pixels))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.writestr("p.jpg", data)
    assert (decode_image(data, "p.jpg") == expected).all()
    for spec in ("photos", "photos.zip"):
        src = open_source(str(tmp_path / spec))
        assert (src.read(0) == expected).all(), spec
        item = ImageDataset(src, 16, crop="center")[(0, 0)]["image"]
        assert torch.equal(item, to_tensor(center_crop_arr(expected, 16))), spec


@pytest.fixture
def two_bad(tmp_path):
    root = tmp_path / "imgs"
    _write_tree(root)
    (root / "cat" / "1b.png").write_bytes(b"not an image" * 8)  # sorts between cat/1.png and cat/2.png
    (root / "dog" / "empty.png").write_bytes(b"")
    return root


def test_skip_counts_bad_files_and_replaced_items(two_bad):
    src = open_source(str(two_bad))
    ds = ImageDataset(src, 8, on_error="skip")
    assert ds.skip_counts() == SkipCounts(0, 0)  # read time, not a scan
    for _ in range(2):  # a second pass finds nothing new
        [ds[(i, 0)] for i in range(len(ds))]
        assert ds.skip_counts() == SkipCounts(bad=2, replaced=2)
    assert ds.bad_names() == ["cat/1b.png", "dog/empty.png"]
    assert sorted(ds.bad) == [src.names.index("cat/1b.png"), src.names.index("dog/empty.png")]

    crops = ImageDataset(src, 8, crop="random", crops_per_image=3, on_error="skip")
    [crops[(i, 0)] for i in range(len(crops))]
    assert crops.skip_counts() == SkipCounts(bad=2, replaced=6)  # every crop of a bad image is replaced


def test_skip_counts_include_dataloader_workers(two_bad):
    ds = ImageDataset(open_source(str(two_bad)), 8, on_error="skip")
    keys = [[(i, 0) for i in range(b, min(b + 3, len(ds)))] for b in range(0, len(ds), 3)]
    batches = list(torch.utils.data.DataLoader(ds, batch_sampler=keys, num_workers=2))
    assert sum(len(b["label"]) for b in batches) == len(ds)
    assert ds.skip_counts() == SkipCounts(bad=2, replaced=2)
    assert ds.bad_names() == ["cat/1b.png", "dog/empty.png"]
