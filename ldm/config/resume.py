"""The resume contract's pure part: which config changes a resumed run may make, and the refusal message."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ldm.config.loading import as_container
from ldm.config.schema import RunConfig

# ----------------------------------------------------------------------------------------------------------- resume
# The keys a resumed run may change, each with why it leaves the experiment as it was: they say how long to train, how
# fast to step from here on, what to write along the way and where, never what is trained on which data with which
# objective. Every other difference (architecture, objective, data and its preprocessing, tokenizer, latent shape,
# seed, batch size and accumulation, optimizer kind and moments, EMA, precision) is refused unless the user names the
# key in train.allow_changes. Paths are refused too where nothing checks that the moved file holds the same thing
# (data.source, data.latents, tokenizer.pretrained, the frozen networks' weight files); tokenizer.checkpoint may move
# because the tokenizer's fingerprint, recorded in every generator checkpoint, is what has to match. Keys are fnmatch
# patterns ("eval.*").
_CADENCE = "how often the loop logs, saves, draws grids or evaluates: outputs along the way, not the weights"
_LR_SCHEDULE = "the lr schedule from the resumed step on: extending or cooling down a run is ordinary run control"
RESUME_MAY_CHANGE: dict[str, str] = {
    "name": "names the run directory: a renamed run, or a new run started from another's checkpoint "
            "(train.resume=<path>)",
    "train.run_root": "where run directories live: a moved run trains the same",
    "train.resume": "how the checkpoint is found, not what is trained",
    "train.allow_changes": "this override list itself",
    "train.max_steps": "where training stops (and where cosine / linear lr decay ends)",
    "train.max_epochs": "a stopping rule",
    "train.log_every": _CADENCE,
    "train.ckpt_every": _CADENCE,
    "train.keep_last": "how many old checkpoints stay on disk",
    "train.sample_every": _CADENCE,
    "train.eval_every": _CADENCE,
    "train.max_nan_skips": "how many bad steps are tolerated, not what a good step does",
    "train.deterministic": "kernel choice for tests and bisection: the same maths (float rounding may differ)",
    "train.compile": "speed only: the same maths (compiled kernels round floats differently)",
    "train.trackers": "where metrics are sent (TensorBoard, W&B, MLflow), not what is trained",
    "train.tracker_project": "which W&B project / MLflow experiment the metrics go to",
    "optim.lr": _LR_SCHEDULE,
    "optim.warmup_steps": _LR_SCHEDULE,
    "optim.schedule": _LR_SCHEDULE,
    "optim.min_lr_ratio": _LR_SCHEDULE,
    "optim.disc_lr": _LR_SCHEDULE,
    "e2e.tokenizer_lr": _LR_SCHEDULE,
    "e2e.disc_lr": _LR_SCHEDULE,
    "optim.grad_clip": "a limit on the update size, commonly tightened when a run spikes",
    "data.num_workers": "loader processes: every item is a function of (index, seed), so the batches stay the same "
                        "(shards excepted: their checkpoint records the worker count and the loop refuses another)",
    "data.on_error": "the policy for unreadable files: skip continues past a file that stopped the run",
    "model.grad_checkpointing": "memory traded for compute: the same gradients",
    "diffusion.lpl.grad_checkpointing": "memory traded for compute in the decoder: the same gradients",
    "diffusion.pixel_loss.grad_checkpointing": "memory traded for compute in the decoder: the same gradients",
    "text.batch_size": "captions per text-encoder call: the same embeddings (float rounding may differ)",
    "model.attention": "the attention kernel: the same maths (float rounding may differ)",
    "tokenizer.checkpoint": "where a generator's frozen tokenizer is read from: a moved folder holds the same "
                            "tokenizer when its fingerprint matches the one recorded in the checkpoint",
    "eval.*": "periodic evaluation only reads the weights",
    "sample.*": "sampling settings shape grids, periodic FID and later sampling, never a training step",
}


class Change(NamedTuple):
    """A config key whose value differs between a checkpoint's config (`old`) and the resuming run's (`new`)."""

    key: str
    old: Any
    new: Any


def may_change_on_resume(key: str, allow_changes: Sequence[str] = ()) -> bool:
    """True when a RESUME_MAY_CHANGE pattern or one of `allow_changes` (train.allow_changes) matches `key`."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in (*RESUME_MAY_CHANGE, *allow_changes))


def _plain(value: Any) -> Any:
    """Tuples as lists, at any depth, so sequences compare by value whatever container held them."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def flatten_keys(node: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists are values, compared whole."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def resume_changes(saved: Mapping, cfg: RunConfig) -> tuple[list[Change], list[Change]]:
    """(allowed, refused): the keys, in schema order, whose values differ between `saved`, the plain config stored in
    the checkpoint being resumed, and `cfg`, the resuming run's. A change is allowed when RESUME_MAY_CHANGE or
    cfg.train.allow_changes matches its key. A key missing from `saved` (added to the schema after the checkpoint was
    written) compares as its schema default, so old checkpoints resume unchanged; a saved key the schema no longer
    has is ignored."""
    refuse_joint_stage_change(saved, cfg)
    new = flatten_keys(as_container(cfg))
    old = {**flatten_keys(as_container(type(cfg)())), **flatten_keys(saved)}
    allowed: list[Change] = []
    refused: list[Change] = []
    for key, value in new.items():
        if old[key] != value:
            target = allowed if may_change_on_resume(key, cfg.train.allow_changes) else refused
            target.append(Change(key, old[key], value))
    return allowed, refused


# a joint run's checkpoint holds three models and their optimizers: no other stage continues it, nor it another's
# (train.allow_changes cannot override this; the tuned tokenizer starts a generator run through its export)
JOINT_STAGES = ("end_to_end",)


def refuse_joint_stage_change(saved: Mapping, cfg: RunConfig) -> None:
    """ConfigError (one line) when a checkpoint of a joint stage is resumed as another stage, or the reverse."""
    from ldm.config.schema import ConfigError

    before = saved.get("stage", "generator")
    if before != cfg.stage and (before in JOINT_STAGES or cfg.stage in JOINT_STAGES):
        fix = (f"resume it with stage={before}, or train a {cfg.stage} from its tokenizer (`ldm export <run> --to "
               f"<folder>`, then tokenizer.checkpoint=<folder>) under another name=..." if before in JOINT_STAGES
               else f"resume it with stage={before}, or start the {cfg.stage} run under another name=... "
                    f"(tokenizer.pretrained=<the tokenizer run or export> initialises its tokenizer)")
        raise ConfigError(f"stage={cfg.stage} but the checkpoint being resumed is a stage={before} run: {fix}")


def format_refusal(refused: Sequence[Change], checkpoint: str | Path | None = None) -> str:
    """The error for refused resume changes: one `key: old -> new` line per key, then the two ways forward."""
    where = f" {checkpoint}" if checkpoint is not None else ""
    keys = ",".join(change.key for change in refused)
    head = f"these settings differ from those of the checkpoint{where} and would change the experiment it continues:"
    lines = [f"  {change.key}: {change.old!r} -> {change.new!r}" for change in refused]
    tail = (f"Start a new run with another name=..., or continue this one with the new values by naming the keys: "
            f"train.allow_changes=[{keys}] (the override is recorded with the run).")
    return "\n".join([head, *lines, tail])
