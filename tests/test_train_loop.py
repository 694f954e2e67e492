"""The shared training loop: bit-exact resume after SIGKILL (mid-run and mid-checkpoint), preemption, NaN guard,
2-process DDP, EMA and lr schedule. Subprocesses run tests/toy.py, a tiny Task trained through `fit()`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

from ldm.runs import load_checkpoint
from ldm.train.checkpoint import save_checkpoint
from ldm.train.ema import EMA, ema_decay_at
from ldm.train.loop import build_optimizer, lr_lambda

TOY = str(REPO / "tests" / "toy.py")
COMMON = ["train.max_steps=12", "train.grad_accum_steps=2", "train.keep_last=10"]


def _args(root, name, *extra):
    return [TOY, f"name={name}", f"train.run_root={root}", *COMMON, *extra]


def _final(root, name, step=12):
    return load_checkpoint(Path(root) / name / "checkpoints" / f"step_{step:07d}")


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    oa, ob = a["state"]["optimizers"]["model"], b["state"]["optimizers"]["model"]
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(v, ob["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert a["state"]["data_position"] == b["state"]["data_position"]


def _popen(args, env=None):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    run_python(_args(root, "s", "train.ckpt_every=1000"))
    return _final(root, "s")


def test_resume_after_sigkill_is_bit_exact(tmp_path, straight):
    args = _args(tmp_path, "k", "train.ckpt_every=3")
    proc = _popen(args, env={"TOY_STEP_SLEEP": "0.2"})
    latest = tmp_path / "k" / "latest"
    _wait_for(lambda: latest.exists() and "step_0000006" in latest.read_text(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = run_python(args)
    assert "resumed from" in out.stdout
    _assert_same_state(_final(tmp_path, "k"), straight)


KILL_IN_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import ldm.train.checkpoint as ck
calls = {{"n": 0}}
original = ck.save_tensors
def dying_save(path, state, metadata=None):
    calls["n"] += 1
    if calls["n"] == 3:  # second checkpoint: model.safetensors written, killed before ema.safetensors
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, state, metadata)
ck.save_tensors = dying_save
import toy
toy.main(sys.argv[1:])
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, straight):
    args = _args(tmp_path, "w", "train.ckpt_every=3")
    script = tmp_path / "die.py"
    script.write_text(KILL_IN_SAVE.format(tests=str(REPO / "tests")))
    proc = run_python([str(script), *args[1:]], check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "w" / "checkpoints"
    assert (tmp_path / "w" / "latest").read_text().strip() == "checkpoints/step_0000003"
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # the half-written one, never promoted
    assert not (ckpts / "step_0000006").exists()
    run_python(args)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    _assert_same_state(_final(tmp_path, "w"), straight)


def test_sigterm_preemption_checkpoints_and_resumes_exactly(tmp_path, straight):
    args = _args(tmp_path, "p", "train.ckpt_every=1000")
    proc = _popen(args, env={"TOY_STEP_SLEEP": "0.2"})
    metrics = tmp_path / "p" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preemption signal received" in out
    pointer = (tmp_path / "p" / "latest").read_text().strip()
    reached = int(pointer.split("_")[-1])
    assert 3 <= reached < 12
    ck = load_checkpoint(tmp_path / "p" / pointer)
    assert ck["state"]["step"] == reached and ck["state"]["data_position"] == 2 * reached
    assert (tmp_path / "p" / pointer / "interim").is_file()  # off the ckpt_every schedule
    run_python(args)
    _assert_same_state(_final(tmp_path, "p"), straight)
    # the interim checkpoint is gone once the end one exists: the run keeps what an uninterrupted one keeps
    assert [p.name for p in (tmp_path / "p" / "checkpoints").iterdir()] == ["step_0000012"]


def test_nan_guard_stops_with_step_loss_and_checkpoint(tmp_path):
    args = [TOY, "name=n", f"train.run_root={tmp_path}", "train.max_steps=12", "train.ckpt_every=3",
            "toy.nan_at_step=5"]
    proc = run_python(args, check=False)
    assert proc.returncode != 0
    ckpt = tmp_path / "n" / "checkpoints" / "step_0000003"
    assert "non-finite value at step 5: train/loss" in proc.stderr
    assert f"Last good checkpoint: {ckpt}" in proc.stderr
    assert (tmp_path / "n" / "latest").read_text().strip() == "checkpoints/step_0000003"
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # with one skip allowed the same run finishes, skipping that batch
    ok = run_python([*args[:2], f"train.run_root={tmp_path / 'skip'}", *args[3:], "train.max_nan_skips=1"])
    assert "skipping step 5: non-finite" in ok.stdout
    assert (tmp_path / "skip" / "n" / "checkpoints" / "step_0000012").is_dir()


def test_two_processes_match_each_other_and_one_process(tmp_path):
    common = ["train.max_steps=6", "train.batch_size=8", "toy.noise=0", "train.ckpt_every=1000"]
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {"TOY_DUMP_DIR": str(dump)}
    two = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", TOY, "name=two",
                      f"train.run_root={tmp_path}", *common], env=env, timeout=300)
    assert "2 processes" in two.stdout
    ranks = [[json.loads(l) for l in (dump / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert [r["step"] for r in ranks[0]] == list(range(6))
    assert ranks[0] == ranks[1]  # identical weights on both ranks entering every step
    run_python([TOY, "name=one", f"train.run_root={tmp_path}", *common])
    a, b = _final(tmp_path, "two", 6), _final(tmp_path, "one", 6)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1  # only rank 0 wrote


def test_lr_schedule_values():
    f = lr_lambda("cosine", warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    g = lr_lambda("linear", warmup_steps=0, max_steps=10, min_ratio=0.0)
    assert g(5) == pytest.approx(0.5) and lr_lambda("constant", 0, 10, 0.0)(7) == 1.0


def test_build_optimizer_applies_a_phase_overrides():
    from ldm.config import OptimCfg

    params = [torch.nn.Parameter(torch.zeros(2))]
    group = build_optimizer(params, OptimCfg(lr=1e-3), {"lr": 2e-4, "betas": [0.5, 0.9]}).param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.9)
    group = build_optimizer(params, OptimCfg(lr=1e-3)).param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(params, OptimCfg(), {"momentum": 0.9})


def test_ema_update_by_hand():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(net, decay=0.9, warmup_steps=0)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(net, step=0)
    assert torch.allclose(ema.model.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2]]))
    assert ema_decay_at(0, 0.9999, 100) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, 100) == pytest.approx(91 / 100)
    assert ema_decay_at(100, 0.9999, 100) == 0.9999


def test_checkpoint_keep_last_and_latest(tmp_path):
    state = {"w": torch.arange(4.0)}
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, model_state=state, ema_state=None, state={"step": s}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_0000004"
    ck = load_checkpoint(tmp_path / "checkpoints" / "step_0000004")
    assert torch.equal(ck["model"]["w"], state["w"]) and ck["ema"] is None


def test_interim_checkpoints_do_not_count_and_go_once_superseded(tmp_path):
    """A preemption checkpoint (interim) is kept besides the newest keep_last regular ones, is never what pushes a
    scheduled one out, and is deleted by the next save; the scheduled ones then are those of an uninterrupted run."""
    def save(s, interim=False):
        save_checkpoint(tmp_path, s, model_state={"w": torch.zeros(2)}, ema_state=None, state={"step": s}, keep_last=3,
                        interim=interim)
        return sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir())

    assert save(10) == [10] and save(20) == [10, 20]
    assert save(26, interim=True) == [10, 20, 26]
    assert save(29, interim=True) == [10, 20, 29]  # a second stop before the next scheduled save
    assert save(30) == [10, 20, 30]
    assert save(40) == [20, 30, 40]
    assert save(47, interim=True) == [20, 30, 40, 47]  # not counted: the scheduled three stay
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_0000047"
    assert save(50) == [30, 40, 50]


def test_logged_losses_are_window_means_and_settings_are_instant(tmp_path):
    """log_every=3 over 7 steps: each metrics.jsonl row holds the mean of the per-step values since the previous row
    (a logged scalar equal to the 0-based step index makes the means 1, 4 and 6), while the learning rate is the
    scheduler's value at the logging step, i.e. the lr of the next step (warm-up factor (s + 1) / 10 after s steps:
    4/10, 7/10, 8/10 of optim.lr), as before the window averaging."""
    from toy import ToyTask, toy_config

    from ldm.data.images import build_dataset
    from ldm.train.loop import fit

    class StepLogging(ToyTask):
        def forward(self, batch, *, step, phase, micro=0):
            out = super().forward(batch, step=step, phase=phase, micro=micro)
            return type(out)(out.loss, {**out.logs, "step_index": float(step)})

    cfg = toy_config([f"train.run_root={tmp_path}", "name=w", "train.max_steps=7", "train.log_every=3",
                      "optim.lr=1e-2", "optim.warmup_steps=10", "train.ckpt_every=1000"])
    torch.manual_seed(0)
    fit(cfg, StepLogging(), build_dataset(cfg.data), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/step_index" in r]
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert [r["train/step_index"] for r in rows] == [1.0, 4.0, 6.0]
    assert [r["train/lr"] for r in rows] == pytest.approx([4e-3, 7e-3, 8e-3])


def test_a_failed_checkpoint_write_stops_the_run_naming_file_and_cause(tmp_path, monkeypatch):
    """A full disk while saving: fit stops with the file and 'No space left on device', no half checkpoint left."""
    import errno

    from toy import ToyTask, toy_config

    import ldm.train.checkpoint as ck
    from ldm.data.images import build_dataset
    from ldm.train.checkpoint import CheckpointWriteError
    from ldm.train.loop import fit

    def full_disk(path, state, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_tensors", full_disk)
    cfg = toy_config([f"train.run_root={tmp_path}", "name=f", "train.max_steps=2"])
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint file .*/\.tmp-step_0000002-\d+/model"
                                                   r"\.safetensors: No space left on device"):
        fit(cfg, ToyTask(), build_dataset(cfg.data), progress=False)
    assert list((tmp_path / "f" / "checkpoints").iterdir()) == []
    assert not (tmp_path / "f" / "latest").exists()
