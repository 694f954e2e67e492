"""The stage table: the run config's `stage` -> the builder of that stage's Task and training dataset.

`ldm.train.loop.fit` builds its task here when it is given none; it knows no stage names itself. A new stage (e.g. a
joint tokenizer + generator stage) is a Task module with a `build_<stage>_task(cfg) -> (task, dataset)` and one line
below, plus its name in the config's stage choices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.config import ConfigError, RunConfig
from ldm.train.end_to_end_task import build_end_to_end_task
from ldm.train.generator_task import build_generator_task
from ldm.train.task import Task
from ldm.train.tokenizer_task import build_tokenizer_task

STAGES: dict[str, Callable[[RunConfig], tuple[Task, torch.utils.data.Dataset]]] = {
    "tokenizer": build_tokenizer_task,
    "generator": build_generator_task,
    "end_to_end": build_end_to_end_task,
}


def build_task(cfg: RunConfig) -> tuple[Task, torch.utils.data.Dataset]:
    """The Task and dataset of `cfg.stage`."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r}; expected one of {sorted(STAGES)}")
    return STAGES[cfg.stage](cfg)
