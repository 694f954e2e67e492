"""`ldm sample` / load_generator on a joint run (stage end_to_end, REPA-E): its own generator with the latent batch
norm, decoded by its own tuned tokenizer, EMA weights by default.

The reference is the in-run sampling path (EndToEndTask.sampler, what the training grids use) rebuilt by hand from the
checkpoint's state dicts: a fresh task gets model.safetensors, a copy of its LatentGenerator gets ema.safetensors, so
nothing of the loader under test (ldm.eval.generator._load_joint_generator) takes part.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_end_to_end import _cfg, _fit

from ldm.eval.generate import png_path, to_uint8
from ldm.eval.generator import load_generator

SEED, INDICES = 3, [0, 1, 2, 3]


@pytest.fixture(autouse=True)
def _unbind_cli_logging():
    """`ldm sample` points the 'ldm' logger at the current (captured) stdout; unbind it when the test ends."""
    yield
    logger = logging.getLogger("ldm")
    for handler in [h for h in logger.handlers if getattr(h, "_ldm", False)]:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """A tiny joint run with its checkpoint at step 2; EMA decay 0.5 so the EMA and live weights differ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("joint_sample")
    _fit(root, "j", "train.max_steps=2", "train.ckpt_every=2", "train.ema_decay=0.5")
    yield root
    torch.set_num_threads(threads)


def _in_run(root, tmp_path, *, ema: bool):
    """Images in [-1, 1] of INDICES by the in-run path (EndToEndTask.sampler) from the step-2 checkpoint."""
    from safetensors.torch import load_file

    from ldm.train.end_to_end_task import build_end_to_end_task

    ckpt = root / "j" / "checkpoints" / "step_0000002"
    cfg = _cfg(tmp_path, "rebuilt")
    task, _ = build_end_to_end_task(cfg)
    task.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    generator = task.generator
    if ema:
        generator = copy.deepcopy(task.generator)
        generator.load_state_dict(load_file(str(ckpt / "ema.safetensors")), strict=True)
    labels = torch.tensor(INDICES) % 10
    sample_cfg = dataclasses.replace(cfg.sample, precision="fp32")
    return task.sampler(generator).generate(labels, INDICES, SEED, sample_cfg=sample_cfg)


def test_loaded_joint_generator_samples_as_the_in_run_path(joint, tmp_path):
    from safetensors.torch import load_file

    ckpt = joint / "j" / "checkpoints" / "step_0000002"
    labels = torch.tensor(INDICES) % 10
    for use_ema in (True, False):
        reference = _in_run(joint, tmp_path / str(use_ema), ema=use_ema)
        gen = load_generator(joint / "j", use_ema=use_ema)
        assert gen.used_ema is use_ema and gen.checkpoint == ckpt and gen.num_classes == 10
        # de-normalisation: running mean and sqrt(running var) of that batch norm, read from the files by hand
        state = load_file(str(ckpt / ("ema.safetensors" if use_ema else "model.safetensors")))
        prefix = "bn." if use_ema else "generator.bn."
        torch.testing.assert_close(gen.normalizer.mean.flatten(), state[prefix + "running_mean"], rtol=0, atol=0)
        torch.testing.assert_close(gen.normalizer.std.flatten(), state[prefix + "running_var"].sqrt(), rtol=0, atol=0)
        images = gen.generate(labels, INDICES, SEED, sample_cfg=dataclasses.replace(gen.cfg.sample, precision="fp32"))
        torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-5)
        assert images.std() > 0.01  # decoded images, not a constant
    ema_mean = load_file(str(ckpt / "ema.safetensors"))["bn.running_mean"]
    live_mean = load_file(str(ckpt / "model.safetensors"))["generator.bn.running_mean"]
    assert not torch.equal(ema_mean, live_mean)  # the two cases above are different numbers


def test_ldm_sample_cli_on_a_joint_run_writes_the_in_run_images(joint, tmp_path, capsys):
    from ldm.cli import main

    reference = _in_run(joint, tmp_path / "ref", ema=True)
    out = tmp_path / "samples"
    assert main(["sample", str(joint / "j"), "--num", str(len(INDICES)), "--seed", str(SEED), "--batch", "4",
                 "--precision", "fp32", "--out", str(out), "--no-progress"]) == 0
    assert "EMA weights" in capsys.readouterr().out
    expected = to_uint8(reference)  # labels cycle 0, 1, 2, 3 as in _in_run
    for i in INDICES:
        got = np.asarray(Image.open(png_path(out, i)).convert("RGB"))
        assert np.abs(got.astype(int) - expected[i].astype(int)).max() <= 1, f"image {i} differs"


def test_tokenizer_option_takes_the_export_and_refuses_another(joint, tmp_path, capsys):
    from ldm.cli import main
    from ldm.tokenizers.export import export_tokenizer
    from ldm.tokenizers.kl import build_autoencoder_kl

    export = export_tokenizer(joint / "j", tmp_path / "export")
    labels = torch.tensor(INDICES) % 10
    own = load_generator(joint / "j")
    via_export = load_generator(joint / "j", tokenizer=str(export))
    sample_cfg = dataclasses.replace(own.cfg.sample, precision="fp32")
    torch.testing.assert_close(via_export.generate(labels, INDICES, SEED, sample_cfg=sample_cfg),
                               own.generate(labels, INDICES, SEED, sample_cfg=sample_cfg), rtol=1e-6, atol=1e-6)
    other = tmp_path / "other_vae"
    build_autoencoder_kl(latent_channels=4, block_out_channels=[16, 16], layers_per_block=1, norm_num_groups=8,
                         mid_block_attention=False).save_pretrained(other)
    with pytest.raises(ValueError, match=r"is not the tokenizer joint run .* tuned"):
        load_generator(joint / "j", tokenizer=str(other))
    out = tmp_path / "bad"
    assert main(["sample", str(joint / "j"), "--tokenizer", str(other), "-n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not the tokenizer joint run" in err and "Traceback" not in err and not out.exists()


def test_a_joint_run_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from ldm.cli import main
    from ldm.config import save_config

    cfg = _cfg(tmp_path, "fresh")
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")  # what a joint run holds before its first checkpoint
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        load_generator(cfg.run_dir)
    out = tmp_path / "out"
    assert main(["sample", str(cfg.run_dir), "-n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no checkpoint yet" in err[0] and "train.ckpt_every" in err[0]
    assert not out.exists() and sorted(p.name for p in cfg.run_dir.iterdir()) == ["config.yaml"]
