"""examples/slurm (issue #18 item 6): the sbatch scripts are valid bash, every `ldm` command in them parses with
ldm's own parser (options and config keys), the training scripts ask SLURM for the signal ldm checkpoints on, and
requeue.sh turns that signal into a checkpoint of a real (toy) run and a requeue, with the launcher ignoring it.
SLURM itself is not here: `scontrol` is a stand-in that records its arguments, and srun's forwarding of the signal
to the step's processes is SLURM's documented behaviour, not tested."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from ldm.cli import build_parser
from ldm.config import load_config
from ldm.train.loop import _Preemption

SLURM = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
TRAINING = [p for p in SCRIPTS if p.name.startswith("train_")]


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if not line.lstrip().startswith("#")]


def ldm_commands(path: Path) -> list[list[str]]:
    """The argument lists of every `-m ldm.cli ...` / `ldm ...` command in a script, up to the end of the quoted
    string or line it sits in, shell variables replaced by a placeholder ("x")."""
    commands = []
    for line in _logical_lines(path.read_text()):
        for match in re.finditer(r"(?:-m ldm\.cli|(?:^|[\s;&|(])ldm)\s+([^\"]*)", line):
            text = re.sub(r"\\?\$\{?\w+(?::-[^}]*)?\}?", "x", match.group(1))
            commands.append(shlex.split(text))
    return commands


def test_there_are_single_and_multi_node_training_scripts():
    assert {p.name for p in TRAINING} == {"train_single_node.sbatch", "train_multi_node.sbatch"}


@pytest.mark.parametrize("path", [*SCRIPTS, SLURM / "requeue.sh"], ids=lambda p: p.name)
def test_scripts_are_valid_bash(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_ldm_command_parses_with_the_cli_and_its_keys_exist(path):
    commands = ldm_commands(path)
    assert commands, f"{path.name} runs no ldm command"
    parser = build_parser()
    for args in commands:
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{path.name}: `ldm {' '.join(args)}` does not parse")
        keys = [a for a in getattr(parsed, "config", None) or [] if "=" in a]
        if args[0] == "train":
            load_config(None, keys)  # ConfigError with did-you-mean for a key the schema does not have


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_scripts_requeue_on_the_signal_ldm_checkpoints_on(path):
    text = path.read_text()
    assert signal.SIGUSR1 in _Preemption.SIGNALS
    seconds = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.MULTILINE).group(1))
    assert seconds >= 120  # time for the current step and a checkpoint
    assert re.search(r"^#SBATCH --requeue$", text, re.MULTILINE)
    assert "source examples/slurm/requeue.sh" in text and "run_requeueable srun" in text
    assert "trap '' USR1; exec torchrun" in text and "train.resume=auto" in text
    config = re.search(r"^CONFIG=\$\{CONFIG:-(\S+)\}$", text, re.MULTILINE).group(1)  # the default recipe
    [train] = ldm_commands(path)
    load_config(REPO / config, [a for a in train if "=" in a])  # exists and takes the script's overrides


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _driver(tmp_path: Path, step: str) -> Path:
    """A batch script reduced to what requeue.sh needs: source it, run one requeueable step as the sbatch scripts
    do (the launcher ignoring USR1, here `exec python` instead of `exec torchrun`)."""
    script = tmp_path / "job.sh"
    script.write_text(f"source {SLURM / 'requeue.sh'}\nrun_requeueable bash -c \"trap '' USR1; exec {step}\"\n"
                      f"echo exit=$?\n")
    return script


def test_usr1_to_the_batch_shell_checkpoints_the_run_and_requeues_the_job(tmp_path):
    env = _fake_slurm(tmp_path)
    toy = f"{sys.executable} {REPO / 'tests' / 'toy.py'} name=r train.run_root={tmp_path} train.max_steps=200 " \
          f"train.ckpt_every=1000"
    proc = subprocess.Popen(["bash", str(_driver(tmp_path, toy))], env={**env, "TOY_STEP_SLEEP": "0.1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    out, _ = proc.communicate(timeout=120)
    assert "preemption signal received" in out and "exit=0" in out, out
    step = int((tmp_path / "r" / "latest").read_text().strip().split("_")[-1])
    assert 3 <= step < 200
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_a_step_that_ends_by_itself_is_not_requeued_and_its_status_is_kept(tmp_path):
    env = _fake_slurm(tmp_path)
    for code in (0, 3):
        out = subprocess.run(["bash", str(_driver(tmp_path, f"{sys.executable} -c 'raise SystemExit({code})'"))],
                             env=env, capture_output=True, text=True, timeout=60, check=False).stdout
        assert f"exit={code}" in out
    assert not (tmp_path / "scontrol.log").exists()
