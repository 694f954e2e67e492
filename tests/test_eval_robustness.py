"""Evaluation on awkward inputs: too few images for the feature dimension or for IS, unreadable sample files."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.cli import eval as commands
from ldm.encoders.digits import digits_split
from ldm.eval.evaluate import evaluate_reconstruction, evaluate_samples
from ldm.eval.extractors import build_extractor

CPU = {"use_cache": False, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """360 held-out digits (32 px RGB) as samples and 400 training digits as reference, ADM-style .npz files."""
    root = tmp_path_factory.mktemp("digits")
    tr_x, _, te_x, _ = digits_split()
    np.savez(root / "test.npz", arr_0=te_x)
    np.savez(root / "train.npz", arr_0=tr_x[:400])
    return str(root / "test.npz"), str(root / "train.npz")


@pytest.fixture(scope="module")
def digits():
    return build_extractor("digits")


def png_folder(path, images, corrupt: int | None = None):
    """A sample folder (000000.png, ...); image `corrupt` is cut to half its bytes, as by a kill mid-write."""
    path.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:06d}.png")
    if corrupt is not None:
        file = path / f"{corrupt:06d}.png"
        file.write_bytes(file.read_bytes()[:60])
    return str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm")
    commands.register(p.add_subparsers(dest="command"))
    return p


def test_fewer_images_than_dimensions_are_flagged_with_the_numbers(digits_npz, digits, caplog):
    test, train = digits_npz
    with caplog.at_level(logging.WARNING, logger="ldm.eval.evaluate"):
        res = evaluate_samples(test, train, extractor=digits, metrics=("fd",), num_samples=20, ref_num=30, **CPU)
    assert res["num_samples"] == 20 and res["num_ref"] == 30 and np.isfinite(res["fd_digits"])
    assert res["warnings"] == [
        "FD_digits from 20 samples in a 64-d feature space: the covariance is rank-deficient (rank <= 19) and the "
        "value is biased upward; use more than 64 samples",
        "FD_digits from 30 reference images in a 64-d feature space: the covariance is rank-deficient (rank <= 29) "
        "and the value is biased upward; use more than 64 reference images"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == res["warnings"]
    enough = evaluate_samples(test, train, extractor=digits, metrics=("fd",), num_samples=100, ref_num=100, **CPU)
    assert "warnings" not in enough


def test_reconstructions_get_the_same_check(digits_npz, digits):
    test, _ = digits_npz
    res = evaluate_reconstruction(lambda x: x, test, extractor=digits, metrics=("rfd",), num_images=30, **CPU)
    assert abs(res["rfd_digits"]) < 1e-6
    assert [w.split(" in a ")[0] for w in res["warnings"]] == ["rFD_digits from 30 reconstructions",
                                                              "rFD_digits from 30 original images"]


def test_too_few_images_skip_is_and_pr_but_not_the_rest(digits_npz, digits):
    test, train = digits_npz
    res = evaluate_samples(test, train, extractor=digits, num_samples=5, ref_num=100, **CPU)
    assert "is_digits" not in res and np.isfinite(res["fd_digits"]) and "precision_digits" in res
    assert ("Inception Score (is_digits) skipped: 5 samples are fewer than its 10 splits; use at least 10 samples"
            in res["warnings"])
    three = evaluate_samples(test, train, extractor=digits, metrics=("fd", "pr"), num_samples=3, ref_num=100, **CPU)
    assert "precision_digits" not in three and np.isfinite(three["fd_digits"])
    assert any(w.startswith("precision/recall skipped: 3 samples and 100 reference images") for w in three["warnings"])


def test_cli_fid_with_few_samples_reports_instead_of_aborting(digits_npz, capsys):
    test, train = digits_npz
    args = parser().parse_args(["eval", "fid", "--samples", test, "--ref", train, "--extractor", "digits",
                                "--num-samples", "8", "--no-cache", "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_samples"] == 8 and "fd_digits" in printed and "is_digits" not in printed
    assert any("skipped: 8 samples are fewer than its 10 splits" in w for w in printed["warnings"])
    assert any(w.startswith("FD_digits from 8 samples in a 64-d") for w in printed["warnings"])


def test_a_corrupt_sample_png_is_named_not_skipped(digits_npz, digits, tmp_path, capsys):
    test, train = digits_npz
    images = np.load(test)["arr_0"][:12]
    samples = png_folder(tmp_path / "samples", images, corrupt=7)
    with pytest.raises(ValueError, match=r"000007\.png.*delete that file and re-run `ldm sample`"):
        evaluate_samples(samples, train, extractor=digits, metrics=("fd",), **CPU)
    args = parser().parse_args(["eval", "fid", "--samples", samples, "--ref", train, "--extractor", "digits",
                                "--metrics", "fd", "--no-cache", "--no-progress", "--device", "cpu"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "000007.png" in err and "ldm sample" in err and "Traceback" not in err
    # reference images keep the data's skip policy: the bad file is left out with a warning
    ref = png_folder(tmp_path / "ref", images, corrupt=3)
    res = evaluate_samples(test, ref, extractor=digits, metrics=("fd",), num_samples=12, **CPU)
    assert res["num_ref"] == 11


def test_a_damaged_npz_is_named(digits_npz, digits, tmp_path):
    test, train = digits_npz
    data = open(test, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz' is not a readable \.npz file"):
        evaluate_samples(str(tmp_path / "cut.npz"), train, extractor=digits, metrics=("fd",), **CPU)
