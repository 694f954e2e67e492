"""Evaluation drivers end to end: metric naming, reference-statistics cache, identity rFID, paired sets, the CLI."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from conftest import shared_file

from ldm.cli import eval as commands
from ldm.encoders.digits import digits_split
from ldm.eval.evaluate import (
    evaluate_pairs,
    evaluate_reconstruction,
    evaluate_samples,
    reference_stats,
    stats_cache_path,
    write_reference_stats,
)
from ldm.eval.extractors import build_extractor
from ldm.eval.fid import GaussianStats, save_stats


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """The 360 held-out digits (32 px RGB) and the first 400 training digits, as ADM-style .npz files."""
    root = tmp_path_factory.mktemp("digits")
    tr_x, _, te_x, te_y = digits_split()
    np.savez(root / "test.npz", arr_0=te_x, arr_1=te_y)
    np.savez(root / "train.npz", arr_0=tr_x[:400])
    return root / "test.npz", root / "train.npz"


@pytest.fixture(scope="module")
def digits():
    return build_extractor("digits")


class Counter:
    """Counts extractor forward calls (a feature pass) through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_generation_metrics_are_named_after_the_extractor(digits_npz, digits, tmp_path):
    test, train = digits_npz
    res = evaluate_samples(str(test), str(train), extractor=digits, cache_dir=tmp_path, progress=False,
                           device="cpu")
    assert res["extractor"] == "digits" and res["num_samples"] == 360 and res["num_ref"] == 400
    assert {"fd_digits", "is_digits", "precision_digits", "recall_digits"} <= set(res)
    assert not {"fid", "sfid", "is", "precision"} & set(res)  # never mistaken for Inception metrics
    assert 0 < res["fd_digits"] < 5 and res["precision_digits"] > 0.8 and res["is_digits"] > 7
    same = evaluate_samples(str(test), str(test), extractor=digits, cache_dir=tmp_path, progress=False,
                            device="cpu", num_samples=100, ref_num=100)
    assert same["num_samples"] == same["num_ref"] == 100
    assert abs(same["fd_digits"]) < 1e-6 and same["precision_digits"] == same["recall_digits"] == 1.0


def test_reference_cache_hit_and_invalidation(digits_npz, digits, tmp_path):
    _, train = digits_npz
    data = tmp_path / "ref.npz"
    images = np.load(train)["arr_0"][:64].copy()
    np.savez(data, arr_0=images)
    count = Counter(digits)
    first = reference_stats(str(data), digits, batch_size=16, cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert count.calls == 4 and stats_cache_path(str(data), digits, None, None, tmp_path / "c").is_file()
    second = reference_stats(str(data), digits, batch_size=16, cache_dir=tmp_path / "c", progress=False,
                             device="cpu")
    assert count.calls == 4  # read from the cache: no feature pass
    np.testing.assert_array_equal(first["stats"].sigma, second["stats"].sigma)
    images[0] = 255 - images[0]  # the dataset changes: the cache entry no longer applies
    np.savez(data, arr_0=images)
    os.utime(data, ns=(1, 1))  # even with an old modification time, the content hash differs
    third = reference_stats(str(data), digits, batch_size=16, cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert count.calls == 8 and not np.array_equal(first["stats"].mu, third["stats"].mu)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2


def test_statistics_files_as_reference(digits_npz, digits, tmp_path):
    test, train = digits_npz
    out = write_reference_stats(str(train), tmp_path / "ref.npz", extractor=digits, progress=False, device="cpu")
    by_file = evaluate_samples(str(test), str(out), extractor=digits, use_cache=False, progress=False, device="cpu")
    by_images = evaluate_samples(str(test), str(train), extractor=digits, use_cache=False, progress=False,
                                 device="cpu")
    assert by_file == by_images
    # ADM statistics (no extractor record) are Inception pool_3 statistics: refused for another feature space
    save_stats(tmp_path / "adm.npz", GaussianStats(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="cannot be compared with extractor 'digits'"):
        evaluate_samples(str(test), str(tmp_path / "adm.npz"), extractor=digits, progress=False, device="cpu")


def test_identity_reconstruction_digits(digits_npz, digits, tmp_path):
    from ldm.tokenizers.losses import build_lpips

    test, _ = digits_npz
    lp = build_lpips(random_backbone=True)
    res = evaluate_reconstruction(lambda x: x, str(test), extractor=digits, cache_dir=tmp_path, progress=False,
                                  device="cpu", lpips_model=lp, num_images=60)
    assert res["num_images"] == 60 and abs(res["rfd_digits"]) <= 1e-6
    assert res["psnr"] == float("inf") and res["ssim"] == pytest.approx(1.0) and res["lpips"] == 0.0
    blurred = evaluate_reconstruction(lambda x: torch.nn.functional.avg_pool2d(x, 3, 1, 1), str(test),
                                      extractor=digits, cache_dir=tmp_path, progress=False, device="cpu",
                                      metrics=("rfd", "psnr", "ssim"), num_images=60)
    assert blurred["rfd_digits"] > 0.1 and 10 < blurred["psnr"] < 40 and blurred["ssim"] < 0.99


def test_identity_rfid_inception_is_zero(tmp_path):
    weights = shared_file("weights/fid_inception_v3_tf2015.pth")
    rng = np.random.default_rng(0)
    from PIL import Image

    photo = np.asarray(Image.open(shared_file("images/astronaut.png")).convert("RGB"))
    crops = [photo[y:y + 48, x:x + 48] for y, x in rng.integers(0, 512 - 48, size=(4, 2))]
    np.savez(tmp_path / "crops.npz", arr_0=np.stack(crops))
    ext = build_extractor("inception", str(weights))
    res = evaluate_reconstruction(lambda x: x, str(tmp_path / "crops.npz"), extractor=ext, metrics=("rfd",),
                                  use_cache=False, progress=False, device="cpu")
    assert res["extractor"] == "inception" and abs(res["rfid"]) <= 1e-6


def test_saved_reconstructions_pair_by_index(digits_npz, tmp_path):
    test, _ = digits_npz
    images = np.load(test)["arr_0"][:50]
    noisy = np.clip(images.astype(int) + 8, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "rec.npz", arr_0=noisy)
    np.savez(tmp_path / "orig.npz", arr_0=images)
    res = evaluate_pairs(str(tmp_path / "rec.npz"), str(tmp_path / "orig.npz"), metrics=("psnr", "ssim"),
                         batch_size=16, progress=False, device="cpu")
    mse = ((noisy.astype(np.float64) - images) ** 2).reshape(50, -1).mean(1)
    assert res["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), rel=1e-9)
    np.savez(tmp_path / "short.npz", arr_0=noisy[:40])
    with pytest.raises(ValueError, match="do not pair up"):
        evaluate_pairs(str(tmp_path / "short.npz"), str(tmp_path / "orig.npz"), metrics=("psnr",), progress=False,
                       device="cpu")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm")
    commands.register(p.add_subparsers(dest="command"))
    return p


def test_cli_fid_prints_named_numbers_and_appends_jsonl(digits_npz, tmp_path, capsys):
    test, train = digits_npz
    jsonl = tmp_path / "run" / "metrics.jsonl"
    args = parser().parse_args(["eval", "fid", "--samples", str(test), "--ref", str(train), "--extractor", "digits",
                                "--metrics", "fd,pr", "--cache-dir", str(tmp_path / "c"), "--no-progress",
                                "--run", str(tmp_path / "run"), "--step", "7", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "FD_digits" in out and "not comparable with Inception FID" in out
    printed = json.loads(out.strip().splitlines()[-1])
    line = json.loads(jsonl.read_text())
    assert line["step"] == 7 and line["eval/fd_digits"] == pytest.approx(printed["fd_digits"])
    assert "eval/fid" not in line and printed["samples"] == str(test)


def test_cli_errors_and_help(digits_npz, capsys):
    test, _ = digits_npz
    args = parser().parse_args(["eval", "fid", "--samples", str(test), "--ref", "digits", "--extractor", "digits",
                                "--metrics", "fd,kid", "--device", "cpu"])
    assert args.func(args) == 2
    assert "unknown ['kid']" in capsys.readouterr().err
    for sub in ("fid", "rfid", "recon", "stats"):
        with pytest.raises(SystemExit) as done:
            parser().parse_args(["eval", sub, "--help"])
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--download-inception" in text and "--tokenizer" in text and "--recons" in text


def test_cli_rfid_runs_a_tokenizer(digits_npz, tmp_path, capsys):
    from ldm.tokenizers.kl import build_autoencoder_kl

    torch.manual_seed(0)
    vae = build_autoencoder_kl(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                               mid_block_attention=False, sample_size=32)
    vae.save_pretrained(str(tmp_path / "vae"))
    test, _ = digits_npz
    args = parser().parse_args(["eval", "rfid", "--tokenizer", str(tmp_path / "vae"), "--data", str(test),
                                "--extractor", "digits", "--metrics", "rfd,psnr,ssim", "--num-images", "24",
                                "--batch-size", "8", "--no-cache", "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # an untrained VAE reconstructs badly: a large rFD and a low PSNR, all finite
    assert printed["num_images"] == 24 and printed["rfd_digits"] > 1.0 and 0 < printed["psnr"] < 25


def test_cli_eval_keys_are_the_flags(digits_npz, capsys):
    from ldm.config import EvalCfg

    test, train = digits_npz
    common = ["eval", "fid", "--samples", str(test), "--metrics", "fd", "--device", "cpu", "--no-progress",
              "--no-cache"]
    flags = parser().parse_args([*common, "--ref", str(train), "--extractor", "digits", "--batch-size", "32",
                                 "--num-samples", "40"])
    keys = parser().parse_args([*common, f"eval.reference={train}", "eval.extractor=digits", "eval.batch_size=32",
                                "eval.num_samples=40"])
    resolved = [a.key_flags.resolve(a, a.config, base=EvalCfg()) for a in (flags, keys)]
    assert resolved[0] == resolved[1] and resolved[0][0].batch_size == 32 and resolved[0][0].extractor == "digits"
    assert flags.func(flags) == 0 and keys.func(keys) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert first["fd_digits"] == second["fd_digits"] and first["num_samples"] == second["num_samples"] == 40
    bad = parser().parse_args([*common, "--ref", "digits", "eval.extractr=digits"])
    assert bad.func(bad) == 2
    assert "did you mean 'eval.extractor'" in capsys.readouterr().err
    noref = parser().parse_args([*common, "--extractor", "digits"])
    assert noref.func(noref) == 2
    assert "--ref (eval.reference)" in capsys.readouterr().err
