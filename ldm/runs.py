"""Run directories and the checkpoint format, read side: resolution, loading, strict state loading, the run logger.

    runs/<name>/config.yaml          the resolved config of the run
    runs/<name>/config_history.yaml  the config changes each resume made (step, time, checkpoint, key old -> new)
    runs/<name>/train.log            the 'ldm' logger's file (rank 0)
    runs/<name>/latest               text file: "checkpoints/step_0000100"
    runs/<name>/checkpoints/step_0000100/
        model.safetensors   the Task's full state_dict (generator/tokenizer, discriminator, projector, ...)
        ema.safetensors     EMA weights of Task.ema_module() (absent when EMA is off)
        state.pt            {format_version, step, data_position, optimizers, schedulers, scaler, rng (one entry per
                            process), config, task, mixed_precision (the autocast precision trained in: "no", "bf16"
                            or "fp16"; older checkpoints lack it), git_sha} -- plain tensors and containers
                            (weights_only=True)
        interim             empty; only in a checkpoint written off the train.ckpt_every schedule because the run
                            was stopped (preemption signal): it does not count towards train.keep_last and is
                            deleted once a later checkpoint exists
        checksums.json      {file: {"bytes": n, "sha256": hex}} of the files above, written last (checkpoints written
                            before it existed have none and are checked for completeness only)

A damaged checkpoint (truncated, zero-byte, a file missing, bytes that do not match checksums.json) is never loaded:
resuming from a run directory falls back to the newest checkpoint that verifies, with a warning naming the one
skipped; loading an explicitly named damaged checkpoint is a `CheckpointError` naming the file and what to do. A
diverged run names `last_good_checkpoint`: the newest one that verifies and whose weights are all finite.

`ldm.train.checkpoint` is the only writer; everything that reads a run (sampling, export, the pipeline, resume) reads
it through this module.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm.io import atomic_write_text, file_sha256

FORMAT_VERSION = 1
STEP_DIR = "step_{:07d}"
LOG_FORMAT = "[%(asctime)s] %(message)s"
CHECKSUMS = "checksums.json"
INTERIM = "interim"
REQUIRED_FILES = ("model.safetensors", "state.pt")
log = logging.getLogger("ldm")


class CheckpointError(ValueError):
    """A checkpoint is incomplete or damaged; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------------------ integrity
def write_checksums(ckpt_dir: Path) -> None:
    """Record size and sha256 of every file of a checkpoint folder (called by the writer before the rename)."""
    ckpt_dir = Path(ckpt_dir)
    sums = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(ckpt_dir.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    atomic_write_text(ckpt_dir / CHECKSUMS, json.dumps(sums, indent=1) + "\n")


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Raise CheckpointError naming the first missing, empty or altered file of a checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    for name in REQUIRED_FILES:
        f = ckpt_dir / name
        if not f.is_file() or f.stat().st_size == 0:
            raise CheckpointError(f"checkpoint file {f} is {'empty' if f.is_file() else 'missing'}")
    sums_file = ckpt_dir / CHECKSUMS
    if not sums_file.is_file():
        return  # written before checksums existed: completeness is all that can be checked
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint file {sums_file} is unreadable ({err})") from None
    for name, want in sums.items():
        f = ckpt_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing (listed in {CHECKSUMS})")
        if f.stat().st_size != want["bytes"] or file_sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is damaged: its size or sha256 differs from the one recorded "
                                  f"when it was written")


def _step_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True) \
        if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies, or None when the run has none.

    Normally the one `latest` points at; when that one is damaged or missing, the newest older complete checkpoint
    (train.keep_last keeps several) with a warning naming what was skipped. All damaged: CheckpointError.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    target = run_dir / pointer.read_text().strip()
    candidates = [target] + [p for p in _step_dirs(run_dir) if p.name < target.name]
    problems = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning("skipping damaged checkpoint(s): %s; using %s instead", "; ".join(problems), ckpt)
        return ckpt
    raise CheckpointError(f"{pointer} points at {target}, and no checkpoint of {run_dir} is complete "
                          f"({'; '.join(problems)}); restore the folder from a backup, or delete {pointer} and "
                          f"the checkpoints to start over")


def last_good_checkpoint(run_dir: Path, also: Path | None = None) -> Path | None:
    """The newest checkpoint of a run that verifies and whose model weights are all finite (what a diverged run can
    resume from); `also`, the checkpoint the run started from when that lies elsewhere, is tried after the run's own.
    None when there is none. Reads every candidate's weights: meant for the moment a run stops, not for each step."""
    candidates = _step_dirs(run_dir)
    if also is not None and Path(also) not in candidates:
        candidates.append(Path(also))
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
            weights = _load_tensors(ckpt / "model.safetensors", "cpu")
        except CheckpointError:
            continue
        if all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
            return ckpt
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (-> its newest complete checkpoint) or a checkpoint directory (verified)."""
    path = Path(path)
    if (path / "state.pt").exists() or (path / "model.safetensors").exists():
        verify_checkpoint(path)
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint directory (with state.pt) nor a run directory "
                                f"with a 'latest' checkpoint")
    return found


def load_checkpoint(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{model, ema (or None), state} from a checkpoint directory; torch.load with weights_only=True."""
    ckpt_dir = Path(ckpt_dir)
    verify_checkpoint(ckpt_dir)
    state_file = ckpt_dir / "state.pt"
    try:
        state = torch.load(state_file, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle/zip errors of a damaged file, or a refused (non-weights-only) pickle
        raise CheckpointError(f"checkpoint file {state_file} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); use an older checkpoint of the run "
                              f"(checkpoints/step_*) or retrain") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file}: checkpoint format {found} is not supported (this version reads "
                              f"format {FORMAT_VERSION})")
    ema_path = ckpt_dir / "ema.safetensors"
    return {"model": _load_tensors(ckpt_dir / "model.safetensors", map_location),
            "ema": _load_tensors(ema_path, map_location) if ema_path.is_file() else None,
            "state": state}


def _load_tensors(path: Path, map_location) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err}); use an older checkpoint of the run "
                              f"(checkpoints/step_*) or retrain") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that lists the missing and unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: state dict does not match the model; missing keys {result.missing_keys[:10]}"
                         f"{'...' if len(result.missing_keys) > 10 else ''}, unexpected keys "
                         f"{result.unexpected_keys[:10]}{'...' if len(result.unexpected_keys) > 10 else ''}")


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Configure the 'ldm' logger: INFO to stdout and <run_dir>/train.log on the main process, errors elsewhere."""
    logger = logging.getLogger("ldm")
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_ldm", False):
            logger.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        h._ldm = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return logger
