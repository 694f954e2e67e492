"""Checkpoint integrity (ldm/runs.py): damaged checkpoints are named, never loaded, and a run falls back to the newest
complete one; the writer (ldm/train/checkpoint.py) records the checksums and names the file and the OS cause of a
failed save."""

import errno
import json
import logging
import os
import shutil

import pytest
import torch

from ldm.runs import CheckpointError, last_good_checkpoint, latest_checkpoint, load_checkpoint, resolve_checkpoint, \
    verify_checkpoint, write_checksums
from ldm.train.checkpoint import CheckpointWriteError, save_checkpoint


def _run(tmp_path, steps=(1, 2, 3), checksums=True):
    """A run with checkpoints at `steps`; checksums=False: as written before the writer recorded checksums."""
    run = tmp_path / "run"
    for s in steps:
        ckpt = save_checkpoint(run, s, model_state={"w": torch.full((64,), float(s))},
                               ema_state={"w": torch.zeros(64)}, state={"step": s}, keep_last=5)
        if checksums:
            write_checksums(ckpt)
        else:
            (ckpt / "checksums.json").unlink()
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


# ------------------------------------------------------------------------------------------------------ writer side
def test_writer_records_checksums_before_the_rename(tmp_path):
    """save_checkpoint writes checksums.json itself, so a flipped byte is caught without a separate call."""
    run = tmp_path / "run"
    for s in (1, 2):
        save_checkpoint(run, s, model_state={"w": torch.zeros(4)}, ema_state={"w": torch.ones(4)}, state={"step": s},
                        keep_last=5)
    ckpt = _ckpt(run, 2)
    assert sorted(json.loads((ckpt / "checksums.json").read_text())) == ["ema.safetensors", "model.safetensors",
                                                                        "state.pt"]
    f = ckpt / "state.pt"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="damaged"):
        verify_checkpoint(ckpt)
    assert latest_checkpoint(run) == _ckpt(run, 1)


def test_last_good_checkpoint_verifies_and_has_finite_weights(tmp_path):
    run = tmp_path / "run"
    for s, value in ((1, 1.0), (2, 2.0), (3, float("nan")), (4, 4.0)):
        save_checkpoint(run, s, model_state={"w": torch.full((8,), value)}, ema_state=None, state={"step": s},
                        keep_last=5)
    (_ckpt(run, 4) / "model.safetensors").write_bytes(b"")  # damaged
    assert last_good_checkpoint(run) == _ckpt(run, 2)
    other = _run(tmp_path / "elsewhere", steps=(7,))
    (_ckpt(run, 2) / "state.pt").unlink()
    (_ckpt(run, 1) / "state.pt").unlink()
    assert last_good_checkpoint(run) is None
    assert last_good_checkpoint(run, also=_ckpt(other, 7)) == _ckpt(other, 7)  # the checkpoint a run started from


def _failing_write(monkeypatch, err):
    import ldm.train.checkpoint as ck

    def fail(path, state, metadata=None):
        raise err

    monkeypatch.setattr(ck, "save_tensors", fail)


@pytest.mark.parametrize("code, cause, advice", [
    (errno.ENOSPC, "No space left on device", "free disk space"),
    (errno.EACCES, "Permission denied", "writable"),
])
def test_save_errors_name_the_file_and_the_os_cause(tmp_path, monkeypatch, code, cause, advice):
    run = _run(tmp_path, steps=(1,))
    _failing_write(monkeypatch, OSError(code, os.strerror(code)))
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(run, 2, model_state={"w": torch.zeros(4)}, ema_state=None, state={"step": 2}, keep_last=5)
    text = str(err.value)
    assert err.value.errno == code and "\n" not in text
    assert text.startswith(f"cannot write checkpoint file {run / 'checkpoints'}/.tmp-step_0000002")
    assert f"model.safetensors: {cause}." in text and advice in text
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]  # the half-written one removed
    assert latest_checkpoint(run) == _ckpt(run, 1)


def test_a_bare_runtime_error_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... file write failed'): the free space tells the cause."""
    import ldm.train.checkpoint as ck

    run = _run(tmp_path, steps=(1,))

    def torch_save_fails(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ck.torch, "save", torch_save_fails)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20))
    with pytest.raises(CheckpointWriteError, match=r"state.pt: no space left on device \(3.0 MiB free\)") as err:
        save_checkpoint(run, 2, model_state={"w": torch.zeros(4)}, ema_state=None, state={"step": 2}, keep_last=5)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**30))
    with pytest.raises(CheckpointWriteError, match=r"state.pt: RuntimeError: \[enforce fail"):
        save_checkpoint(run, 2, model_state={"w": torch.zeros(4)}, ema_state=None, state={"step": 2}, keep_last=5)
