"""train.mixed_precision=auto (issue #14 item 1): bf16 on CUDA and on CPUs that multiply bf16 natively, fp32 elsewhere,
said in the run header; a resumed run keeps the precision its checkpoint was trained in; bf16 on CPU trains a tiny
tokenizer and a tiny generator end to end."""

import json
import math

import pytest
import torch
from toy import ToyTask, toy_config

import ldm.precision
from ldm.config import load_config
from ldm.data.images import build_dataset
from ldm.precision import resolve_mixed_precision
from ldm.runs import load_checkpoint
from ldm.train.checkpoint import _trained_precision
from ldm.train.loop import fit


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the CPU capability check reports: native_bf16(True) / native_bf16(False)."""
    return lambda value: monkeypatch.setattr(ldm.precision, "cpu_has_native_bf16", lambda: value)


def test_auto_follows_the_cpu_capability(native_bf16):
    native_bf16(True)
    mode, why = resolve_mixed_precision("auto", "cpu")
    assert mode == "bf16" and "natively" in why
    native_bf16(False)
    mode, why = resolve_mixed_precision("auto", "cpu")
    assert mode == "no" and "no native bf16" in why
    assert resolve_mixed_precision("auto", "cuda")[0] == "bf16"
    assert resolve_mixed_precision("auto", "mps")[0] == "no"
    for setting in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(setting, "cpu") == (setting, f"train.mixed_precision={setting}")


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", {"avx2", "avx512f"}, False),
    ("x86_64", {"avx512f", "avx512_bf16"}, True),
    ("x86_64", {"amx_tile", "amx_bf16"}, True),
    ("aarch64", {"asimd", "bf16"}, True),
    ("aarch64", {"asimd"}, False),
])
def test_capability_check_reads_cpu_flags_where_torch_says_no(monkeypatch, machine, flags, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(ldm.precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(ldm.precision, "_cpuinfo_flags", lambda: set(flags))
    ldm.precision.cpu_has_native_bf16.cache_clear()
    try:
        assert ldm.precision.cpu_has_native_bf16() is expected
    finally:
        ldm.precision.cpu_has_native_bf16.cache_clear()


class _AutocastProbe(ToyTask):
    """Records the autocast dtype each forward runs under (None: no autocast)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, batch, *, step, phase, micro=0):
        self.seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().forward(batch, step=step, phase=phase, micro=micro)


def _toy_fit(root, *overrides):
    cfg = toy_config([f"train.run_root={root}", "name=p", "train.mixed_precision=auto", *overrides])  # toy: fp32
    task = _AutocastProbe()
    fit(cfg, task, build_dataset(cfg.data), progress=False)
    return task.seen, (root / "p" / "train.log").read_text().splitlines()


def test_auto_trains_in_bf16_on_a_bf16_cpu_and_says_why(tmp_path, native_bf16):
    native_bf16(True)
    seen, log = _toy_fit(tmp_path, "train.max_steps=2")
    assert seen == {torch.bfloat16}
    assert any("mixed precision bf16 (auto: this CPU multiplies bf16 natively" in line for line in log)
    assert load_checkpoint(tmp_path / "p" / "checkpoints" / "step_0000002")["state"]["mixed_precision"] == "bf16"


def test_auto_falls_back_to_fp32_and_says_so(tmp_path, native_bf16):
    native_bf16(False)
    seen, log = _toy_fit(tmp_path, "train.max_steps=1")
    assert seen == {None}
    assert any("mixed precision no (auto: fp32, this CPU has no native bf16 matmul" in line for line in log)


def test_resumed_auto_run_keeps_its_checkpoint_precision(tmp_path, native_bf16):
    native_bf16(False)
    _toy_fit(tmp_path, "train.max_steps=1")
    native_bf16(True)  # e.g. the run moved to a machine with AMX: it goes on in fp32, as it began
    seen, log = _toy_fit(tmp_path, "train.max_steps=2")
    assert seen == {None}
    assert any("mixed precision no (auto: kept from the checkpoint, trained in no" in line for line in log)
    state = load_checkpoint(tmp_path / "p" / "checkpoints" / "step_0000002")["state"]
    assert state["mixed_precision"] == "no"


def test_precision_of_checkpoints_that_did_not_record_it():
    """Before the record, auto meant bf16 exactly when CUDA was available (the RNG state then has a "cuda" entry)."""
    def old(setting, rng):
        return {"config": {"train": {"mixed_precision": setting}}, "rng": [rng]}

    assert _trained_precision(old("auto", {"torch": 0})) == "no"
    assert _trained_precision(old("auto", {"torch": 0, "cuda": 0})) == "bf16"
    assert _trained_precision(old("fp16", {"torch": 0})) == "fp16"
    assert _trained_precision({**old("auto", {"torch": 0}), "mixed_precision": "bf16"}) == "bf16"


TINY_TOKENIZER = ["stage=tokenizer", "data.image_size=16", "data.class_cond=false", "tokenizer.perceptual_weight=0",
                  "tokenizer.block_out_channels=[16,16]", "tokenizer.layers_per_block=1", "tokenizer.norm_num_groups=8",
                  "tokenizer.mid_block_attention=false", "tokenizer.disc_layers=1", "tokenizer.disc_start=0",
                  "train.batch_size=4", "train.log_every=1", "train.max_steps=3"]
TINY_GENERATOR = ["stage=generator", "data.image_size=16", "model.preset=DiT-Pico/2", "train.batch_size=8",
                  "train.log_every=1", "train.max_steps=3", "tokenizer.stats_num_images=32", "sample.steps=2"]


def _finite_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rows for k, v in r.items() if k.startswith("train/loss")]
    return len(losses) > 0 and all(math.isfinite(v) for v in losses)


def test_bf16_on_cpu_trains_a_tiny_tokenizer_and_generator(tmp_path, native_bf16):
    native_bf16(True)
    tok = load_config(None, [*TINY_TOKENIZER, "name=tok", f"train.run_root={tmp_path}"])
    fit(tok, progress=False)
    gen = load_config(None, [*TINY_GENERATOR, "name=gen", f"train.run_root={tmp_path}",
                             f"tokenizer.checkpoint={tok.run_dir}"])
    fit(gen, progress=False)
    for run in (tok.run_dir, gen.run_dir):
        assert "mixed precision bf16 (auto" in (run / "train.log").read_text()
        assert _finite_losses(run)
        state = load_checkpoint(run / "checkpoints" / "step_0000003")
        assert state["state"]["mixed_precision"] == "bf16"
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
