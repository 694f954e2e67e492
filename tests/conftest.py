"""Shared test fixtures: ../shared lookup, tiny run roots, subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_file(relative: str) -> Path:
    """A file from the project's shared/ folder ($LDM_SHARED or ../shared); skip the test when it is absent."""
    root = Path(os.environ.get("LDM_SHARED", REPO.parent / "shared"))
    path = root / relative
    if not path.exists():
        pytest.skip(f"needs {relative} from the shared folder (looked at {path}; set LDM_SHARED)")
    return path


@pytest.fixture
def shared():
    return shared_file


def run_python(args: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS` in a subprocess with the repo importable; return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc
