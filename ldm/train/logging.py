"""Rank-0 metrics: metrics.jsonl always, plus the trackers of train.trackers (the run logger itself is
ldm.runs.setup_logging).

    tensorboard   ldm's own SummaryWriter in <run>/tb, as before trackers existed: every scalar the loop logs
                  (per-step gradient norms included) and the sample / reconstruction grids.
    wandb, mlflow accelerate's trackers (accelerate.tracking), optional extras (pip install 'ldm[wandb]' /
                  'ldm[mlflow]'): the logged windows (what metrics.jsonl gets, not the per-step gradient norms, so
                  a remote tracker sees one call per train.log_every), the resolved config once at the start of a
                  new run, and the grids where the tracker takes images (W&B does; MLflow has no image log in
                  accelerate). W&B writes under <run>/wandb (WANDB_MODE=offline works as usual); MLflow goes where
                  MLFLOW_TRACKING_URI points (mlflow's default otherwise). Each one's run id is kept in
                  <run>/trackers.json, so a resumed (e.g. requeued) run continues the same tracker run.
    others        any other tracker accelerate knows (aim, comet_ml, clearml, dvclive, ... or one registered with
                  accelerate.tracking.register_tracker_class) is started with accelerate's own defaults, its
                  logging directory being the run directory.

TensorBoard stays ldm's writer rather than accelerate's TensorBoardTracker because that one writes to
<logging_dir>/<project>, flushes after every call and stores the hyperparameters in a time-stamped sub-folder: the
files would move and every step would pay a flush. The default (tensorboard only) therefore writes exactly what it
did before, and no accelerate tracker is created.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.config import ConfigError, flatten_keys

IDS_FILE = "trackers.json"
EXTRAS = ("wandb", "mlflow")  # trackers with an extra of their own in pyproject.toml


def _builtin_trackers() -> tuple[str, ...]:
    """The trackers accelerate ships (their names are also their Python modules), "all" left out."""
    from accelerate.utils import LoggerType

    return tuple(t.value for t in LoggerType if t.value != "all")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install_hint(name: str) -> str:
    """The pip command that installs tracker `name`."""
    return f"pip install 'ldm[{name}]'" if name in EXTRAS else f"pip install {name}"


def check_trackers(names: list[str]) -> None:
    """ConfigError naming train.trackers when a name is not a tracker (with a did-you-mean) or when a tracker's
    package is missing (with the pip command); called before a run writes anything."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted({"tensorboard", *LOGGER_TYPE_TO_CLASS})
    builtin = _builtin_trackers()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"train.trackers: {name!r} is not a tracker; expected names from {known}{hint}")
        if name != "tensorboard" and name in builtin and not _installed(name):
            raise ConfigError(f"train.trackers: {name} is not installed; install it with `{install_hint(name)}` or "
                              f"leave it out of train.trackers")


def accelerate_trackers(names: list[str]) -> list[str]:
    """The trackers accelerate runs (every one but tensorboard), in order, without repeats: Accelerator(log_with=)."""
    return list(dict.fromkeys(n for n in names if n != "tensorboard"))


# what ldm sets up for the trackers it knows: where their files go, the run's name, and the run id of a resumed run
def _wandb_kwargs(run_dir: Path, run_name: str, run_id: str | None) -> dict[str, Any]:
    return {"dir": str(run_dir), "name": run_name, "id": run_id or uuid.uuid4().hex[:8], "resume": "allow"}


def _mlflow_kwargs(run_dir: Path, run_name: str, run_id: str | None) -> dict[str, Any]:
    return {"run_name": run_name, "run_id": run_id}


_INIT_KWARGS: dict[str, Callable[[Path, str, str | None], dict[str, Any]]] = {"wandb": _wandb_kwargs,
                                                                               "mlflow": _mlflow_kwargs}
_RUN_ID: dict[str, Callable[[Any], str]] = {"wandb": lambda t: t.run.id, "mlflow": lambda t: t.active_run.info.run_id}


def _tracker_config(config: dict) -> dict[str, Any]:
    """The flat str/number values trackers store: dotted keys (ldm.config.flatten_keys), lists as text."""
    return {k: str(v) if isinstance(v, list) else v for k, v in flatten_keys(config).items()}


def _grid_hwc(grid: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, the image layout trackers take."""
    return (grid.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class MetricsWriter:
    """metrics.jsonl, TensorBoard and accelerate's trackers on the main process; a no-op elsewhere.

    `trackers` are train.trackers' names; the accelerate trackers among them must have been given to `accelerator`
    as log_with (see `accelerate_trackers`). `config` (the resolved run config as a plain dict) is stored with
    them once, for a new run; a resumed run passes None (MLflow refuses to change a stored parameter)."""

    def __init__(self, run_dir: Path, enabled: bool, *, trackers: list[str] = ("tensorboard",), accelerator=None,
                 project: str = "ldm", run_name: str = "run", config: dict | None = None):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        self.trackers: list = []  # accelerate GeneralTracker objects
        if not enabled:
            return
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        names = accelerate_trackers(list(trackers))
        if names:
            self.trackers = _start_trackers(accelerator, names, run_dir, project, run_name, config)

    def scalars(self, step: int, values: dict[str, float], jsonl: bool = True) -> None:
        """TensorBoard always; with `jsonl` (a logging step, not a per-step extra) also metrics.jsonl and the
        accelerate trackers."""
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if jsonl:
            row = {k: float(v) for k, v in values.items()}
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
            for tracker in self.trackers:
                tracker.log(row, step=step)

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        """A (3, H, W) grid in [0, 1] to TensorBoard and to the trackers that take images."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_image(tag, grid.clamp(0, 1), step)
        takers = [t for t in self.trackers if hasattr(t, "log_images")]
        if takers:
            image = _grid_hwc(grid)
            for tracker in takers:
                tracker.log_images({tag: [image]}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _start_trackers(accelerator, names: list[str], run_dir: Path, project: str, run_name: str,
                    config: dict | None) -> list:
    """accelerator.init_trackers with ldm's settings for the trackers it knows and the run ids kept in
    <run>/trackers.json (a resumed run continues its tracker runs); records the ids of the runs started."""
    from ldm.io import atomic_write_text

    if accelerator is None:
        raise ValueError(f"train.trackers {names} need the Accelerator they were given to (log_with)")
    ids_file = run_dir / IDS_FILE
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    init_kwargs = {n: _INIT_KWARGS[n](run_dir, run_name, ids.get(n)) for n in names if n in _INIT_KWARGS}
    accelerator.init_trackers(project, config=_tracker_config(config) if config is not None else None, init_kwargs=init_kwargs)
    trackers = [t for t in accelerator.trackers if t.name in names]
    ids.update({t.name: _RUN_ID[t.name](t) for t in trackers if t.name in _RUN_ID})
    if ids:
        atomic_write_text(ids_file, json.dumps(ids, indent=1, sort_keys=True) + "\n")
    return trackers
