"""The committed digits classifier: loads, classifies held-out digits, and is reproduced by its training script."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.encoders.digits import (
    DEFAULT_WEIGHTS,
    DigitsClassifier,
    digits_split,
    load_digits_classifier,
    preprocess_digits,
)
from ldm.eval.extractors import build_extractor

HELDOUT_ACCURACY = 0.98  # the committed weights reach 0.9944 on the 360 held-out digits


def test_committed_weights_classify_heldout_digits():
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 400_000
    model = load_digits_classifier()
    _, _, te_x, te_y = digits_split()
    assert len(te_y) == 360 and np.bincount(te_y).min() >= 35  # stratified 20 % split
    with torch.inference_mode():
        pred = model(preprocess_digits(torch.from_numpy(te_x).permute(0, 3, 1, 2))).argmax(1).numpy()
    assert (pred == te_y).mean() >= HELDOUT_ACCURACY


def test_training_and_heldout_images_do_not_overlap():
    tr_x, _, te_x, _ = digits_split()
    train = {im.tobytes() for im in tr_x}
    # the sklearn set has a few exact duplicate images; at most those may appear on both sides
    assert sum(im.tobytes() in train for im in te_x) <= 3


def test_preprocessing_accepts_grey_rgb_and_other_sizes():
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    grey = rgb.float().mean(1, keepdim=True).round().to(torch.uint8)
    assert preprocess_digits(rgb).shape == (2, 1, 32, 32)
    assert (preprocess_digits(grey) - preprocess_digits(grey.expand(-1, 3, -1, -1))).abs().max() == 0
    with pytest.raises(ValueError, match="uint8 images"):
        preprocess_digits(rgb.float())


def test_extractor_names_its_metric():
    ext = build_extractor("digits")
    assert ext.name == "digits" and ext.metric_name == "FD_digits" and ext.outputs == ("features", "logits")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        out = ext(x, outputs=("features", "logits"))
    assert out["features"].shape == (3, 64) and out["logits"].shape == (3, 10)
    assert "digits|" in ext.cache_key() and "weights=" in ext.cache_key()
    with pytest.raises(ValueError, match="provides"):
        ext(x, outputs=("spatial",))


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m ldm.tools.train_digits_classifier"):
        load_digits_classifier(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="extractor='fancy'"):
        build_extractor("fancy")


def test_architecture_is_small():
    assert sum(p.numel() for p in DigitsClassifier().parameters()) < 60_000


@pytest.mark.slow
def test_training_script_reproduces_the_committed_file(tmp_path):
    from conftest import run_python

    out = tmp_path / "digits.safetensors"
    run_python(["-m", "ldm.tools.train_digits_classifier", "--out", str(out)], timeout=600)
    assert out.read_bytes() == DEFAULT_WEIGHTS.read_bytes()
