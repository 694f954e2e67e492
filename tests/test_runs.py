"""Checkpoint integrity (ldm/runs.py): damaged checkpoints are named, never loaded, and a run falls back to the newest
complete one."""

import logging

import pytest
import torch

from ldm.runs import CheckpointError, latest_checkpoint, load_checkpoint, resolve_checkpoint, verify_checkpoint, \
    write_checksums
from ldm.train.checkpoint import save_checkpoint


def _run(tmp_path, steps=(1, 2, 3), checksums=True):
    run = tmp_path / "run"
    for s in steps:
        ckpt = save_checkpoint(run, s, model_state={"w": torch.full((64,), float(s))},
                               ema_state={"w": torch.zeros(64)}, state={"step": s}, keep_last=5)
        if checksums:
            write_checksums(ckpt)
    return run


def _ckpt(run, step):
    return run / "checkpoints" / f"step_{step:07d}"


def test_intact_run_resolves_to_latest(tmp_path):
    run = _run(tmp_path)
    assert latest_checkpoint(run) == _ckpt(run, 3)
    assert load_checkpoint(resolve_checkpoint(run))["state"]["step"] == 3


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "delete_ema"])
def test_damaged_latest_falls_back_with_a_warning(tmp_path, caplog, monkeypatch, damage):
    run = _run(tmp_path)
    f = _ckpt(run, 3) / ("ema.safetensors" if damage == "delete_ema" else "model.safetensors")
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        f.write_bytes(b"")
    elif damage == "flip":  # same size, one byte of a weight changed: only the checksum sees it
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    monkeypatch.setattr(logging.getLogger("ldm"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert latest_checkpoint(run) == _ckpt(run, 2)
    assert str(f) in caplog.text and "step_0000002" in caplog.text
    with pytest.raises(CheckpointError, match=str(f)):
        load_checkpoint(_ckpt(run, 3))


def test_checkpoints_without_checksums_are_checked_for_completeness(tmp_path):
    run = _run(tmp_path, checksums=False)
    verify_checkpoint(_ckpt(run, 3))
    (_ckpt(run, 3) / "state.pt").write_bytes(b"")
    assert latest_checkpoint(run) == _ckpt(run, 2)
    (_ckpt(run, 2) / "state.pt").write_bytes(b"not a zip file")  # complete but unreadable: named on load
    with pytest.raises(CheckpointError, match="state.pt cannot be read"):
        load_checkpoint(_ckpt(run, 2))


def test_all_damaged_is_one_clear_error(tmp_path):
    run = _run(tmp_path, steps=(1, 2))
    for s in (1, 2):
        (_ckpt(run, s) / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint of .* is complete"):
        latest_checkpoint(run)
