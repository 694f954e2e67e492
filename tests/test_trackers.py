"""train.trackers (issue #18 item 5): TensorBoard stays ldm's own writer in <run>/tb; accelerate's trackers get the
logged windows, the config of a new run and the grids; a tracker whose package is missing stops `ldm train` with one
line naming the pip command (exit 2); W&B in offline mode writes its run under <run>/wandb and a resumed run
continues the same W&B run (skipped where wandb is not installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from toy import ToyTask, toy_config

import ldm.train.logging as tracking
from ldm.config import ConfigError
from ldm.data.images import build_dataset
from ldm.train.loop import fit


def _fit(root, trackers, *overrides):
    cfg = toy_config([f"train.run_root={root}", "name=t", "train.log_every=2", *overrides])
    cfg.train.trackers = list(trackers)  # after validation: a tracker registered by the test is no config choice
    torch.manual_seed(0)
    fit(cfg, ToyTask(), build_dataset(cfg.data), progress=False)
    return cfg.run_dir


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_writes_tensorboard_to_run_tb_and_starts_no_other_tracker(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _fit(tmp_path, ["tensorboard"], "train.max_steps=4")
    rows = _jsonl(run)
    assert [r["step"] for r in rows] == [2, 4]
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["train/loss"] for r in rows}, rel=1e-6)  # TB stores float32
    # every step (TensorBoard only), and the window's mean at each logging step
    assert [e.step for e in events.Scalars("train/grad_norm")] == [1, 2, 2, 3, 4, 4]
    assert "samples" in events.Tags()["images"]
    assert not (run / tracking.IDS_FILE).exists() and not (run / "wandb").exists()


def test_no_tracker_leaves_metrics_jsonl_only(tmp_path):
    run = _fit(tmp_path, [], "train.max_steps=2")
    assert len(_jsonl(run)) == 1 and not (run / "tb").exists()


@pytest.fixture
def probe_tracker():
    """A GeneralTracker registered with accelerate under "ldm_probe" that writes every call to files in its logging
    directory (accelerate passes the Accelerator's project_dir: the run directory)."""
    from accelerate.tracking import (
        LOGGER_TYPE_TO_CLASS,
        GeneralTracker,
        register_tracker_class,
    )

    class Probe(GeneralTracker):
        name = "ldm_probe"
        requires_logging_directory = True

        def __init__(self, project, logging_dir, **kwargs):
            super().__init__()
            self.project, self.dir = project, logging_dir

        def start(self):
            self.file = open(f"{self.dir}/probe.jsonl", "a")  # noqa: SIM115 - open from start() to finish()
            self._write("start", project=self.project)

        def _write(self, kind, **data):
            self.file.write(json.dumps({"kind": kind, **data}) + "\n")
            self.file.flush()

        @property
        def tracker(self):
            return self.file

        def store_init_configuration(self, values):
            self._write("config", values=values)

        def log(self, values, step=None, **kwargs):
            self._write("log", step=step, values=values)

        def log_images(self, values, step=None, **kwargs):
            for tag, images in values.items():
                for i, image in enumerate(images):
                    Image.fromarray(image).save(f"{self.dir}/probe_{tag}_{step}_{i}.png")
                    self._write("image", step=step, tag=tag, shape=list(image.shape), dtype=str(image.dtype))

        def finish(self):
            self._write("finish")
            self.file.close()

    register_tracker_class(Probe)
    yield Probe
    LOGGER_TYPE_TO_CLASS.pop("ldm_probe", None)


def _probe(run_dir):
    return [json.loads(line) for line in (run_dir / "probe.jsonl").read_text().splitlines()]


def test_an_accelerate_tracker_gets_the_logs_config_and_grids_and_follows_a_resume(tmp_path, probe_tracker):
    run = _fit(tmp_path, ["tensorboard", "ldm_probe"], "train.max_steps=4")
    calls = _probe(run)
    assert [c["kind"] for c in calls][:2] == ["start", "config"] and calls[-1]["kind"] == "finish"
    assert calls[0]["project"] == "ldm"
    config = calls[1]["values"]
    assert config["train.max_steps"] == 4 and config["name"] == "t" and config["optim.betas"] == "[0.9, 0.999]"
    logs = [c for c in calls if c["kind"] == "log"]
    assert [{"step": c["step"], **c["values"]} for c in logs] == _jsonl(run)  # the logged windows, exactly
    images = [c for c in calls if c["kind"] == "image"]
    assert [(c["step"], c["tag"], c["dtype"]) for c in images] == [(4, "samples", "uint8")]
    grid = np.asarray(Image.open(run / "samples" / "step_0000004.png").convert("RGB"))
    sent = np.asarray(Image.open(run / "probe_samples_4_0.png"))
    assert images[0]["shape"] == list(grid.shape) and np.abs(sent.astype(int) - grid.astype(int)).max() <= 1
    assert (run / "tb").is_dir()

    # resumed with more steps (trackers may change on resume): no second config, the logs go on from step 4
    run = _fit(tmp_path, ["ldm_probe"], "train.max_steps=6")
    resumed = _probe(run)[len(calls):]
    assert [c["kind"] for c in resumed if c["kind"] != "image"] == ["start", "log", "finish"]
    assert resumed[1]["step"] == 6 and {"step": 6, **resumed[1]["values"]} == _jsonl(run)[-1]


def test_unknown_tracker_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train.trackers: 'wandbb' is not a tracker.*did you mean 'wandb'"):
        tracking.check_trackers(["tensorboard", "wandbb"])


@pytest.mark.parametrize("name, hint", [("wandb", "pip install 'ldm[wandb]'"), ("mlflow", "pip install 'ldm[mlflow]'"),
                                        ("aim", "pip install aim")])
def test_a_tracker_without_its_package_stops_ldm_train_with_one_line(tmp_path, monkeypatch, capsys, name, hint):
    from ldm.cli import main

    monkeypatch.setattr(tracking, "_installed", lambda module: False)
    rc = main(["train", f"train.run_root={tmp_path}", "name=x", f"train.trackers=[tensorboard,{name}]",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"ldm train: error: train.trackers: {name} is not installed; install it with `{hint}` or leave it "
                   f"out of train.trackers")
    assert not (tmp_path / "x").exists()  # stopped before anything was written


def _written(path, needles, timeout_s=60.0):
    """The bytes of `path` once they hold every one of `needles`: W&B's service writes its records in the background
    and finish() returns before they are on disk."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes() if path.is_file() else b""
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


@pytest.mark.slow  # about 40 s: W&B starts its service process twice
def test_wandb_offline_run_writes_its_files_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _fit(tmp_path, ["tensorboard", "wandb"], "train.max_steps=4")
    run_id = json.loads((run / tracking.IDS_FILE).read_text())["wandb"]
    [first] = run.glob(f"wandb/offline-run-*-{run_id}")
    loss = json.dumps(_jsonl(run)[-1]["train/loss"]).encode()
    # protobuf records, whose keys and JSON-encoded values are plain bytes
    data = _written(first / f"run-{run_id}.wandb", [b"train/loss", loss, b"optim.lr"])
    assert b"train/loss" in data and loss in data
    assert b"optim.lr" in data  # the config
    assert list(first.glob("files/media/images/samples_4_*.png"))  # the grid, as W&B's image
    assert (run / "tb").is_dir()

    _fit(tmp_path, ["wandb"], "train.max_steps=6")
    assert json.loads((run / tracking.IDS_FILE).read_text())["wandb"] == run_id
    runs = sorted(run.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(runs) == 2 and (runs[1] / f"run-{run_id}.wandb").is_file()  # the same W&B run, resumed
    loss = json.dumps(_jsonl(run)[-1]["train/loss"]).encode()
    assert loss in _written(runs[1] / f"run-{run_id}.wandb", [loss])
