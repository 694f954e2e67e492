"""bench/tokenizer_kinds.py: the held-out photo split and a smoke run of the whole comparison."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("tokenizer_kinds", REPO / "bench" / "tokenizer_kinds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photos(folder: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for name, (h, w) in sizes.items()}
    for name, img in images.items():
        Image.fromarray(img).save(folder / name)
    return images


def test_the_photo_split_holds_out_one_photo_as_row_major_tiles(tmp_path):
    images = _photos(tmp_path / "photos", {"a.png": (40, 70), "b.png": (32, 32), "c.png": (16, 48)})
    bench = _bench()
    train, held, holdout = bench.photo_split(tmp_path / "photos", None, 16, tmp_path / "root")
    assert holdout == "a.png" and sorted(p.name for p in train.iterdir()) == ["b.png", "c.png"]
    tiles = np.load(held)["arr_0"]
    a = images["a.png"]
    # 40 x 70 -> 2 rows x 4 columns of 16-px tiles, the remainder dropped; tile 5 is row 1, column 1
    assert tiles.shape == (8, 16, 16, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[5], a[16:32, 16:32])
    np.testing.assert_array_equal(tiles[3], a[0:16, 48:64])
    _, _, other = bench.photo_split(tmp_path / "photos", "c.png", 16, tmp_path / "root2")
    assert other == "c.png"
    with pytest.raises(FileNotFoundError, match="needs at least 2 photos including the held-out 'z.png'"):
        bench.photo_split(tmp_path / "photos", "z.png", 16, tmp_path / "root3")


@pytest.mark.slow
def test_the_kinds_benchmark_smoke_run_writes_its_table(tmp_path):
    """--smoke on the FSQ preset alone, with the photo pass (~2 min on 2 CPU cores, mostly start-up)."""
    from conftest import run_python

    _photos(tmp_path / "photos", {"a.png": (64, 128), "b.png": (80, 80)})
    proc = run_python(["bench/tokenizer_kinds.py", "--smoke", "--presets", "configs/tokenizer/tiny_fsq_f4.yaml",
                       "--run-root", str(tmp_path), "--photos", str(tmp_path / "photos")], timeout=600)
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert "| tiny_fsq_f4 | fsq | 4x8x8 |" in table and table in proc.stdout
    assert "scored on the 2 tiles of a.png" in table
    row = json.loads((tmp_path / "smoke" / "table.json").read_text())["rows"][0]
    assert row["encoder_params"] > 0 and row["decoder_params"] > 0 and row["generator"]["gfd_digits"]
    assert row["photos"]["tiles"] == 2 and 0 < row["photos"]["psnr"] < 60
    record = json.loads((tmp_path / "smoke" / "tiny_fsq_f4_dit_s0" / "gfd_digits.json").read_text())
    assert record == {"step": 2, "num_samples": 20, "gfd_digits": row["generator"]["gfd_digits"][0]}
