"""Inference precision (issue #14 item 1, the sampling and latent-cache part): sample.precision / --precision = auto
resolves like train.mixed_precision=auto (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; the CPU check is
mocked here, this CPU has no native bf16); under a bf16 CPU the sampler's network and the decoder run under bf16
autocast while the sampler's state and the FID Inception stay fp32; a sample folder and a latent cache record the
precision and are never continued in another one; fp32 caches keep their plan id."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from conftest import shared_file
from torch import nn

import ldm.eval.generator as generator_module
import ldm.precision
from ldm.config import DiffusionCfg, EvalCfg, SampleCfg
from ldm.precision import resolve_inference_precision


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the CPU capability check reports, and forget which sampling precisions were already logged."""
    monkeypatch.setattr(generator_module, "_ANNOUNCED", set())
    return lambda value: monkeypatch.setattr(ldm.precision, "cpu_has_native_bf16", lambda: value)


def _autocast_state() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_auto_resolves_like_training_and_names_the_key(native_bf16):
    native_bf16(True)
    assert resolve_inference_precision("auto", "cpu", "sample.precision") == (
        "bf16", "auto: this CPU multiplies bf16 natively (AVX512-BF16 / AMX / Arm BF16)")
    native_bf16(False)
    mode, why = resolve_inference_precision("auto", "cpu", "sample.precision")
    assert mode == "fp32" and "no native bf16" in why
    assert resolve_inference_precision("auto", "cuda", "k") == ("bf16", "auto: bf16 on CUDA")
    assert resolve_inference_precision("bf16", "cpu", "sample.precision") == ("bf16", "sample.precision=bf16")
    assert resolve_inference_precision("fp32", "cuda", "precision") == ("fp32", "precision=fp32")
    with pytest.raises(ValueError, match=r"sample.precision='fp16'; expected one of \['auto', 'fp32', 'bf16'\]"):
        resolve_inference_precision("fp16", "cpu", "sample.precision")


# ------------------------------------------------------------------------------------------------------ sampling
class ProbeNet(nn.Module):
    """A velocity network that records, per call, the autocast dtype and the dtype of its input and of its linear
    layer's output."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)
        self.calls: list[tuple] = []

    def forward(self, x, t, y):
        h = self.proj(x)
        self.calls.append((_autocast_state(), x.dtype, h.dtype))
        return 0.1 * h


class ProbeTokenizer(nn.Module):
    """decode: 1x1 conv to RGB, nearest-neighbour upsampled 4x; records the autocast dtype of each call."""

    fingerprint = "probe"

    def __init__(self, channels: int = 4):
        super().__init__()
        self.to_rgb = nn.Conv2d(channels, 3, 1)
        self.calls: list = []

    def decode(self, z):
        self.calls.append(_autocast_state())
        return nn.functional.interpolate(self.to_rgb(z), scale_factor=4).float()


def _task(num_samples: int = 4, reference: str | None = None, extractor: str = "inception"):
    from ldm.tokenizers.stats import LatentNormalizer
    from ldm.train.generator_task import GeneratorTask

    torch.manual_seed(0)
    weights = str(shared_file("weights/fid_inception_v3_tf2015.pth")) if extractor == "inception" else None
    return GeneratorTask(ProbeNet(), ProbeTokenizer(), LatentNormalizer("none", 4), diffusion=DiffusionCfg(),
                         learned_sigma=False, num_classes=0, latent_shape=(4, 4, 4), sample=SampleCfg(steps=3),
                         eval_cfg=EvalCfg(extractor=extractor, inception_weights=weights,
                                          num_samples=num_samples, batch_size=2),
                         fid_reference=reference, image_size=16)


def test_bf16_cpu_samples_the_network_and_decoder_in_bf16_and_keeps_the_state_fp32(native_bf16, caplog):
    native_bf16(True)
    task = _task(extractor="digits")
    with caplog.at_level(logging.INFO, logger="ldm"):
        images = task.generate(task.model, None, [0, 1], seed=0)
    assert images.dtype == torch.float32
    assert {c[0] for c in task.model.calls} == {torch.bfloat16}  # network under bf16 autocast
    assert {c[1] for c in task.model.calls} == {torch.float32}  # the sampler's state x_t stays fp32
    assert {c[2] for c in task.model.calls} == {torch.bfloat16}  # the conv really ran in bf16
    assert task.tokenizer.calls == [torch.bfloat16]
    assert _autocast_state() is None  # nothing leaks out of the sampler
    header = [r.getMessage() for r in caplog.records if "sampling precision" in r.getMessage()]
    expected = ("sampling precision bf16 (auto: this CPU multiplies bf16 natively (AVX512-BF16 / AMX / Arm BF16)): "
                "the generator network and the tokenizer's decoder run under bf16 autocast; the sampler's state and "
                "FID features stay fp32")
    assert header == [expected]  # once per process


def test_bf16_samples_agree_with_fp32_within_bf16_rounding(native_bf16):
    """The same per-index noise through Euler in fp32 and with a bf16 network: what autocast changes is the network's
    rounding (bf16 has an 8-bit mantissa, relative error <= 2^-8 per operation), not the integration."""
    native_bf16(False)
    task = _task(extractor="digits")
    fp32 = task.generate(task.model, None, [0, 1, 2], seed=3)
    native_bf16(True)
    bf16 = task.generate(task.model, None, [0, 1, 2], seed=3)
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().max() < 0.02 * fp32.abs().max()


def test_fp32_setting_and_cpus_without_bf16_sample_without_autocast(native_bf16):
    native_bf16(True)
    task = _task(extractor="digits")
    task.sample = SampleCfg(steps=3, precision="fp32")
    task.generate(task.model, None, [0], seed=0)
    native_bf16(False)
    task.sample = SampleCfg(steps=3)
    task.generate(task.model, None, [0], seed=0)
    assert {c[0] for c in task.model.calls} == {None} and set(task.tokenizer.calls) == {None}


@pytest.mark.parametrize("extractor", ["digits", pytest.param("inception", marks=pytest.mark.slow)])
def test_periodic_fid_generates_in_bf16_and_extracts_features_in_fp32(native_bf16, monkeypatch, tmp_path, extractor):
    """GeneratorTask.evaluate (the periodic FID): generation runs in a background thread, the feature extraction in
    the caller's; under a bf16 CPU the first is bf16, the second fp32 (parity with the ADM evaluator). The Inception
    case is slow-marked (about 20 s: loading the network); the digits extractor takes the same path."""
    from ldm.eval import evaluate

    native_bf16(True)
    seen: list = []
    build = evaluate._extractor

    def probed(*args, **kwargs):
        ext = build(*args, **kwargs)
        ext.register_forward_hook(lambda module, inputs, out: seen.append((_autocast_state(), out["features"].dtype)))
        return ext

    monkeypatch.setattr(evaluate, "_extractor", probed)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    task = _task(num_samples=2, reference=str(ref), extractor=extractor)
    result = task.evaluate(None, step=1)
    assert len(result) == 1 and np.isfinite(next(iter(result.values())))
    assert {c[0] for c in task.model.calls} == {torch.bfloat16} and set(task.tokenizer.calls) == {torch.bfloat16}
    assert seen and set(seen) == {(None, torch.float32)}


def test_sample_folder_records_its_precision_and_refuses_another(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ldm.eval.generate import SAMPLE_CONFIG, check_sample_folder, sample_identity

    gen = SimpleNamespace(checkpoint="ckpt", used_ema=True, tokenizer=SimpleNamespace(fingerprint="f"),
                          latent_shape=(4, 2, 2))

    def identity(precision):
        return sample_identity(gen, SampleCfg(), seed=0, classes=None, label_order="cycle", num=4, precision=precision)

    bf16 = identity("bf16")
    assert bf16["compute_precision"] == "bf16" and "precision" not in bf16
    (tmp_path / SAMPLE_CONFIG).write_text(OmegaConf.to_yaml({"identity": bf16}))
    check_sample_folder(tmp_path, identity("bf16"))
    with pytest.raises(FileExistsError, match="compute_precision: 'bf16' there, 'fp32' now"):
        check_sample_folder(tmp_path, identity("fp32"))
    old = identity("fp32")
    del old["compute_precision"]  # a folder written before the precision was recorded: fp32 samples
    (tmp_path / SAMPLE_CONFIG).write_text(OmegaConf.to_yaml({"identity": old}))
    check_sample_folder(tmp_path, identity("fp32"))
    with pytest.raises(FileExistsError, match="compute_precision: 'fp32' there, 'bf16' now"):
        check_sample_folder(tmp_path, identity("bf16"))


def test_sample_cli_flag_sets_sample_precision():
    from ldm.cli import build_parser

    args = build_parser().parse_args(["sample", "runs/x", "--precision", "bf16"])
    requested, given = args.key_flags.resolve(args, [], base=SampleCfg())
    assert requested.precision == "bf16" and "precision" in given
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "runs/x", "--precision", "fp16"])


# ------------------------------------------------------------------------------------------------------ latent cache
class ProbeEncoder(nn.Module):
    """The parts of ldm.tokenizers.export.Tokenizer the cache uses: a 1x1 conv + 4x4 average pool encoder that
    records its autocast dtype and returns fp32, as Tokenizer.encode does."""

    downsample, latent_channels, kind, scaling_factor = 4, 4, "kl", None
    fingerprint, source = "probe-encoder", "probe"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, 4, 1)
        self.calls: list = []

    def encode(self, x):
        self.calls.append(_autocast_state())
        return nn.functional.avg_pool2d(self.proj(x), 4).float()


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), arr_1=np.arange(6) % 2)
    return str(path)


def _cache(tokenizer, images, out, precision):
    from ldm.data.latents import build_latent_cache

    return build_latent_cache(tokenizer, images, out, image_size=8, batch_size=4, shard_size=4, progress=False,
                              num_workers=0, precision=precision)


def test_cache_encodes_in_bf16_on_a_bf16_cpu_records_it_and_is_not_continued_in_fp32(native_bf16, images,
                                                                                     tmp_path, caplog):
    from ldm.data.latents import LatentCacheDataset

    native_bf16(True)
    tok = ProbeEncoder()
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        meta = _cache(tok, images, tmp_path / "c", "auto")
    assert meta.precision == "bf16" and set(tok.calls) == {torch.bfloat16}
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["precision"] == "bf16"
    assert any("encoding precision bf16 (auto: this CPU multiplies bf16 natively" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="precision: cached 'bf16', now 'fp32'"):
        _cache(ProbeEncoder(), images, tmp_path / "c", "fp32")
    native_bf16(False)
    with pytest.raises(ValueError, match="precision: cached 'bf16', now 'fp32'"):
        _cache(ProbeEncoder(), images, tmp_path / "c", "auto")  # auto means fp32 on this CPU

    fp32_tok = ProbeEncoder()
    fp32 = _cache(fp32_tok, images, tmp_path / "f", "auto")
    assert fp32.precision == "fp32" and set(fp32_tok.calls) == {None}
    a = torch.stack([LatentCacheDataset(tmp_path / "c", expected_fingerprint=None)[(i, 0)]["latent"] for i in range(6)])
    b = torch.stack([LatentCacheDataset(tmp_path / "f", expected_fingerprint=None)[(i, 0)]["latent"] for i in range(6)])
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.02 * b.abs().max()  # bf16 rounding of the conv


def test_fp32_cache_keeps_the_plan_id_it_had_before_the_precision_was_recorded(native_bf16, images, tmp_path):
    from ldm.data.latents import PLAN_KEYS, read_cache_meta

    native_bf16(False)
    meta = _cache(ProbeEncoder(), images, tmp_path / "f", "fp32")
    data = json.loads((tmp_path / "f" / "meta.json").read_text())
    old_id = hashlib.sha256(json.dumps({k: data[k] for k in PLAN_KEYS}, sort_keys=True).encode()).hexdigest()[:16]
    assert meta.plan_id() == old_id
    del data["precision"]  # a meta.json written before the key existed reads as fp32, and its shards stay finished
    (tmp_path / "f" / "meta.json").write_text(json.dumps(data))
    assert read_cache_meta(tmp_path / "f").precision == "fp32"
