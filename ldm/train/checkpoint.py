"""Checkpoints of a training run: the writer (the only code that writes them; `ldm.runs` documents the format and
reads it) and the resume contract (which checkpoint a run continues, and whether its config may continue it).

Writing: a checkpoint is written into `checkpoints/.tmp-step_...`, every file fsynced, its `checksums.json` written
(sizes and sha256, fsynced), then the folder is renamed into place (an atomic operation on POSIX file systems) and
only then is `latest` replaced (write tmp + fsync + os.replace). A process killed at any moment leaves either the old
or the new checkpoint behind `latest`, never half of one; stale `.tmp-*` folders are removed at the next save. A
write that fails (disk full, no permission) removes its half-written folder and raises `CheckpointWriteError` naming
the file and the cause.

Resuming: `open_resume` compares the resuming run's config with the one stored in the checkpoint before anything is
written to the run directory. Changes that leave the experiment as it was (ldm.config.RESUME_MAY_CHANGE: lr schedule,
max_steps, cadences, ...) and those the user names in train.allow_changes go ahead; `record_changes` logs them and
appends them to `config_history.yaml` beside config.yaml. Any other change is a ConfigError with one
`key: old -> new` line per key. `check_task_facts` refuses a task whose recorded fingerprints (a generator's frozen
tokenizer) differ from the checkpoint's.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ldm.config import Change, ConfigError, RunConfig, format_refusal, may_change_on_resume, resume_changes
from ldm.io import atomic_write_text, fsync_path, git_sha, save_tensors
from ldm.runs import FORMAT_VERSION, INTERIM, STEP_DIR, load_checkpoint, write_checksums

HISTORY = "config_history.yaml"
# torch.save reports a full disk as a bare RuntimeError ("file write failed"): a write that failed with less than
# this left free failed for want of space
_NEARLY_FULL_BYTES = 64 * 2**20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file and the OS cause (no space left, permission).
    `errno` is the cause's (ENOSPC also when only the free space tells), None when unknown."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


# ------------------------------------------------------------------------------------------------------ writing
def save_checkpoint(run_dir: Path, step: int, *, model_state: dict, ema_state: dict | None, state: dict[str, Any],
                    keep_last: int, interim: bool = False) -> Path:
    """Write checkpoints/step_<7-digit step> atomically, point `latest` at it, then prune.

    Pruning keeps the newest `keep_last` regular checkpoints. An `interim` one (written off the schedule because the run
    was stopped) is marked with an empty `interim` file, is not counted, and is deleted once a later checkpoint is
    written: a run stopped and resumed (even several times) keeps exactly the scheduled checkpoints an uninterrupted
    run keeps, which studies that measure every scheduled checkpoint rely on."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / STEP_DIR.format(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    files = {"model.safetensors": lambda path: save_tensors(path, model_state)}
    if ema_state is not None:
        files["ema.safetensors"] = lambda path: save_tensors(path, ema_state)
    files["state.pt"] = lambda path: torch.save({"format_version": FORMAT_VERSION, "git_sha": git_sha(), **state}, path)
    if interim:
        files[INTERIM] = lambda path: path.write_bytes(b"")
    target = ckpt_root  # what is being written when an error occurs
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for name, write in files.items():
            target = tmp / name
            write(target)
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        target = tmp / "checksums.json"
        write_checksums(tmp)  # fsynced by atomic_write_text
        fsync_path(tmp)
        target = final
        if final.exists():  # re-saving the same step (e.g. preemption right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(ckpt_root)
        target = Path(run_dir) / "latest"
        atomic_write_text(target, f"checkpoints/{final.name}\n")
    except (OSError, RuntimeError, SafetensorError) as err:
        error = CheckpointWriteError(*_write_failure(target, err))
        shutil.rmtree(tmp, ignore_errors=True)  # after measuring the free space: this frees some
        raise error from err
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    regular = [p for p in steps if not (p / INTERIM).exists()]
    superseded = [p for p in steps if p not in regular and p.name < final.name]
    for old in superseded + regular[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(path: Path, err: BaseException) -> tuple[int | None, str]:
    """(errno, one line: the file, the OS cause (from errno, else the free space of its file system), what to do)."""
    code = getattr(err, "errno", None)
    if code:
        cause = os.strerror(code)
    else:
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(existing).free
        if free < _NEARLY_FULL_BYTES:
            code, cause = errno.ENOSPC, f"no space left on device ({free / 2**20:.1f} MiB free)"
        else:
            first = str(err).strip().splitlines()
            cause = f"{type(err).__name__}: {first[0] if first else ''}"
    advice = {errno.ENOSPC: "free disk space (or lower train.keep_last)",
              errno.EDQUOT: "free disk space within your quota",
              errno.EACCES: f"make {path.parent} writable", errno.EPERM: f"make {path.parent} writable",
              errno.EROFS: "write the run to a writable file system (train.run_root=...)"}.get(code, "fix the cause")
    return code, (f"cannot write checkpoint file {path}: {cause}. This checkpoint was discarded and earlier ones are "
                  f"intact; {advice}, then resume with the same command (train.resume=auto)")


# ------------------------------------------------------------------------------------------------------ resuming
@dataclass
class Resume:
    """A checkpoint a run continues, after its config passed the resume contract."""
    path: Path
    checkpoint: dict[str, Any] | None  # {model, ema, state} as ldm.runs.load_checkpoint returns it; None once restored
    changes: list[Change]              # allowed config changes; they take effect from the resumed step on
    step: int
    task: dict[str, Any]               # the checkpoint's Task.describe()
    precision: str                     # the autocast precision it was trained in ("no", "bf16", "fp16")


def open_resume(path: Path | None, cfg: RunConfig) -> Resume | None:
    """Load the checkpoint at `path` (None: a fresh run) and compare its stored config with `cfg`: a change the resume
    contract refuses is a ConfigError with one `key: old -> new` line per key and the ways forward."""
    if path is None:
        return None
    ckpt = load_checkpoint(path, map_location="cpu")
    state = ckpt["state"]
    allowed, refused = resume_changes(state["config"], cfg)
    if refused:
        raise ConfigError(format_refusal(refused, path))
    return Resume(Path(path), ckpt, allowed, step=int(state["step"]), task=state.get("task", {}),
                  precision=_trained_precision(state))


def _trained_precision(state: dict[str, Any]) -> str:
    """The autocast precision a checkpoint was trained in. Recorded since train.mixed_precision=auto picks bf16 on
    CPUs with native bf16; before, auto meant bf16 exactly when CUDA was available, which the saved RNG state still
    tells (it has a "cuda" entry then)."""
    if "mixed_precision" in state:
        return state["mixed_precision"]
    setting = state["config"]["train"].get("mixed_precision", "auto")
    if setting != "auto":
        return setting
    return "bf16" if "cuda" in state["rng"][0] else "no"


def check_task_facts(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to continue a checkpoint whose task description (Task.describe) recorded a fingerprint that the resumed
    task has with another value: a frozen part (a generator's tokenizer) is not the one it was trained with."""
    wrong = [k for k in saved if k.endswith("fingerprint") and k in now and saved[k] != now[k]]
    if not wrong:
        return
    lines = [f"the task differs from the one the checkpoint {checkpoint} was trained with:"]
    for key in wrong:
        source = key.replace("fingerprint", "source")
        where = f" ({source}: {saved[source]!r} -> {now[source]!r})" if source in saved and source in now else ""
        lines.append(f"  {key}: {saved[key]!r} -> {now[key]!r}{where}")
    lines.append("Point the config at the files the run was trained with, or start a new run with another name=...")
    raise ConfigError("\n".join(lines))


def record_changes(run_dir: Path, resume: Resume, log: logging.Logger) -> None:
    """Log the allowed config changes of a resume and append them to <run_dir>/config_history.yaml (step, time,
    checkpoint, key / old / new, and `override: true` where only train.allow_changes allowed the key)."""
    import yaml

    if not resume.changes:
        return
    step = resume.step
    entries = []
    for c in resume.changes:
        override = not may_change_on_resume(c.key)
        log.info("resume at step %d changes %s: %r -> %r%s", step, c.key, c.old, c.new,
                 " (allowed by train.allow_changes)" if override else "")
        entries.append({"key": c.key, "old": c.old, "new": c.new, **({"override": True} if override else {})})
    record = {"step": step, "time": datetime.now().astimezone().isoformat(timespec="seconds"),
              "checkpoint": str(resume.path), "changes": entries}
    history = Path(run_dir) / HISTORY
    before = history.read_text() if history.is_file() else ""
    atomic_write_text(history, before + yaml.safe_dump([record], sort_keys=False))
