"""The resume contract wired into `fit()` (issue #13 item 1): allowed config changes take effect (the lr of the
optimizer's param groups and the schedule's base lrs included) and are recorded in train.log and config_history.yaml;
refused ones stop the run before anything is written to the run directory; a task whose recorded fingerprint changed
is refused. The pure part (which keys may change) is tests/test_config_resume.py."""

import json
import math

import pytest
import torch
import yaml
from toy import ToyTask, toy_config

from ldm.config import ConfigError
from ldm.data.images import build_dataset
from ldm.runs import load_checkpoint
from ldm.train.loop import TrainingDiverged, fit


def _fit(root, *overrides, task=None):
    cfg = toy_config([f"train.run_root={root}", "name=r", *overrides])
    torch.manual_seed(0)
    return fit(cfg, task if task is not None else ToyTask(), build_dataset(cfg.data), progress=False)


def _metrics(root):
    return [json.loads(line) for line in (root / "r" / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run_dir):
    """Every file of a run directory with its bytes (TensorBoard event files are left out: one per fit)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "tb" not in p.parts}


def test_diverge_lower_lr_resume_trains_on_at_the_new_lr(tmp_path):
    _fit(tmp_path, "train.max_steps=4")
    good = tmp_path / "r" / "checkpoints" / "step_0000004"
    with pytest.raises(TrainingDiverged, match=f"Last good checkpoint: {good}"):
        _fit(tmp_path, "train.max_steps=8", "optim.lr=1e30")  # weights of ~1e30 overflow the next forward
    result = _fit(tmp_path, "train.max_steps=8", "optim.lr=1e-3")
    assert result.step == 8
    resumed = _metrics(tmp_path)[-4:]  # metrics.jsonl also holds the diverged attempt's rows
    assert [r["step"] for r in resumed] == [5, 6, 7, 8] and all(math.isfinite(r["train/loss"]) for r in resumed)
    assert all(r["train/lr"] == 1e-3 for r in resumed)
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000008")["state"]
    group = state["optimizers"]["model"]["param_groups"][0]
    assert group["lr"] == 1e-3 and group["initial_lr"] == 1e-3
    assert state["schedulers"]["model"]["base_lrs"] == [1e-3]
    history = yaml.safe_load((tmp_path / "r" / "config_history.yaml").read_text())
    assert [h["step"] for h in history] == [4, 4]  # the diverged attempt and the one that went on
    assert [c for c in history[1]["changes"] if c["key"] == "optim.lr"] == [{"key": "optim.lr", "old": 0.01,
                                                                             "new": 0.001}]
    assert history[1]["checkpoint"] == str(good) and "time" in history[1]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "resume at step 4 changes optim.lr: 0.01 -> 0.001" in log


def test_new_schedule_gives_the_lr_at_the_resumed_step(tmp_path):
    """Resumed at step 4 with a cosine schedule over 10 steps and warm-up 2: the lr of each later step is the new
    peak times the new schedule at that step, as in a run that had this schedule from the start."""
    from ldm.train.loop import lr_lambda

    _fit(tmp_path, "train.max_steps=4")
    _fit(tmp_path, "train.max_steps=10", "optim.lr=2e-3", "optim.schedule=cosine", "optim.warmup_steps=2",
         "optim.min_lr_ratio=0.1")
    f = lr_lambda("cosine", warmup_steps=2, max_steps=10, min_ratio=0.1)
    logged = {r["step"]: r["train/lr"] for r in _metrics(tmp_path) if r["step"] > 4}
    assert logged == pytest.approx({s: 2e-3 * f(s) for s in range(5, 11)}, rel=1e-12)


class _PhaseLr(ToyTask):
    """A task whose phase overrides optim.lr (as the tokenizer's disc_lr does)."""

    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def optimizer_settings(self, phase):
        return {"lr": self.lr, "betas": (0.8, 0.99)}


def test_phase_overrides_take_effect_on_resume(tmp_path):
    _fit(tmp_path, "train.max_steps=2", task=_PhaseLr(5e-3))
    _fit(tmp_path, "train.max_steps=3", task=_PhaseLr(7e-4))
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000003")["state"]
    group = state["optimizers"]["model"]["param_groups"][0]
    assert (group["lr"], group["initial_lr"], group["betas"]) == (7e-4, 7e-4, (0.8, 0.99))
    assert state["schedulers"]["model"]["base_lrs"] == [7e-4]


def test_refused_change_stops_before_anything_is_written(tmp_path):
    _fit(tmp_path, "train.max_steps=2")
    run_dir = tmp_path / "r"
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        _fit(tmp_path, "train.max_steps=4", "seed=1", "train.batch_size=16", "optim.lr=1e-3")
    lines = str(err.value).splitlines()
    assert str(run_dir / "checkpoints" / "step_0000002") in lines[0]
    assert lines[1:3] == ["  seed: 0 -> 1", "  train.batch_size: 8 -> 16"]  # the allowed lr change is not listed
    assert "train.allow_changes=[seed,train.batch_size]" in lines[3]
    assert _snapshot(run_dir) == before  # config.yaml, train.log, history: untouched


def test_named_override_is_allowed_and_recorded(tmp_path):
    _fit(tmp_path, "train.max_steps=2")
    _fit(tmp_path, "train.max_steps=3", "seed=1", "train.allow_changes=[seed]")
    history = yaml.safe_load((tmp_path / "r" / "config_history.yaml").read_text())
    changes = {c["key"]: c for c in history[0]["changes"]}
    assert changes["seed"] == {"key": "seed", "old": 0, "new": 1, "override": True}
    assert "override" not in changes["train.max_steps"]
    assert "changes seed: 0 -> 1 (allowed by train.allow_changes)" in (tmp_path / "r" / "train.log").read_text()
    assert "seed: 1" in (tmp_path / "r" / "config.yaml").read_text()


def test_unchanged_resume_records_no_history(tmp_path):
    _fit(tmp_path, "train.max_steps=2")
    _fit(tmp_path, "train.max_steps=2")
    assert not (tmp_path / "r" / "config_history.yaml").exists()


class _Fingerprinted(ToyTask):
    def __init__(self, fingerprint):
        super().__init__()
        self.fingerprint = fingerprint

    def describe(self):
        return {"tokenizer_source": f"tok_{self.fingerprint}", "tokenizer_fingerprint": self.fingerprint}


def test_a_changed_tokenizer_fingerprint_is_refused(tmp_path):
    _fit(tmp_path, "train.max_steps=2", task=_Fingerprinted("aaaa"))
    config = (tmp_path / "r" / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as err:
        _fit(tmp_path, "train.max_steps=3", task=_Fingerprinted("bbbb"))
    text = str(err.value)
    assert "  tokenizer_fingerprint: 'aaaa' -> 'bbbb' (tokenizer_source: 'tok_aaaa' -> 'tok_bbbb')" in text.splitlines()
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config
    assert not (tmp_path / "r" / "checkpoints" / "step_0000003").exists()
    assert _fit(tmp_path, "train.max_steps=3", task=_Fingerprinted("aaaa")).step == 3
