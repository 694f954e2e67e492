"""The layer contract (pyproject.toml [tool.importlinter], docs/architecture.md): every import inside ldm points down.

The first test runs import-linter on the installed tree; the second plants an upward import (config -> train) in a
copy of the package and checks that the same contract reports it, so the first test cannot pass vacuously.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                              "sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, str(root / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, cwd=root, env=env, timeout=300)


def test_every_import_points_down():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    shutil.copytree(REPO / "ldm", tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "ldm" / "config" / "__init__.py"
    config.write_text(config.read_text() + "\n\ndef _upward():\n    from ldm.train import loop  # noqa: F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "ldm.config is not allowed to import ldm.train" in proc.stdout
