"""The README's set-up commands are the ones CI runs, and the CLI explains itself."""

import subprocess
import sys

from conftest import REPO, run_python

sys.path.insert(0, str(REPO / ".ci"))
from readme_commands import setup_commands  # noqa: E402


def test_readme_setup_commands_are_what_ci_runs():
    install, test = setup_commands(REPO / "README.md")
    assert install == 'pip install -e ".[dev]"'
    assert test == "pytest"
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_commands.py install" in ci and "readme_commands.py test" in ci
    assert 'eval "$install_cmd"' in ci and 'eval "$test_cmd"' in ci
    readme = (REPO / "README.md").read_text()
    assert readme.index('pip install -e ".[dev]"') < readme.index("\npytest")  # install first, then test


def test_cli_help_and_bad_key():
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "train.max_steps=1000" in out.stdout and "tokenizer.eq.enabled" in out.stdout
    bad = run_python(["-m", "ldm.cli", "train", "train.max_stepz=3"], check=False)
    assert bad.returncode == 2
    assert "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_pictures_exist_and_links_resolve():
    import re

    readme = (REPO / "README.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert pictures, "the README shows the project's own pictures"
    for rel in pictures:
        assert rel.startswith("assets/") and (REPO / rel).is_file(), rel
    assert "python -m ldm.tools.make_assets" in readme  # the command that regenerates them
    for rel in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / rel).is_file(), rel
