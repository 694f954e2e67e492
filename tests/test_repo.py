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


# ------------------------------------------------------------------------------------------------------ errors, keys
def test_user_error_shows_traceback_only_with_ldm_debug():
    bad = ["-m", "ldm.cli", "train", "train.max_stepz=3"]
    plain = run_python(bad, check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]  # one line
    assert plain.stderr.startswith("ldm train: error: unknown config key 'train.max_stepz'")
    debug = run_python(bad, env={"LDM_DEBUG": "1"}, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_value_errors_of_ldm_are_user_errors_others_are_bugs():
    from ldm.cli.common import is_user_error
    from ldm.cli.eval import _metrics

    try:
        _metrics("fd,kid", ("fd",))
    except ValueError as err:
        assert is_user_error(err)  # raised by ldm's own check: one line, exit 2
    try:
        int("not a number")
    except ValueError as err:
        assert not is_user_error(err)  # raised outside ldm: a bug, keeps its traceback


def _sample_cfg(argv):
    from ldm.cli import build_parser
    from ldm.cli.keys import split_config_args
    from ldm.config import SampleCfg

    args = build_parser().parse_args(["sample", *argv])
    return args.key_flags.resolve(args, split_config_args(args.config)[1], base=SampleCfg())


def test_sample_flags_are_aliases_of_sample_keys():
    flags = _sample_cfg(["RUN", "--sampler", "heun", "--steps", "8", "--cfg", "2", "--interval", "0,0.7", "-n", "6",
                         "--seed", "3", "--batch", "4", "--no-ema", "--time-grid", "shifted", "--shift", "1.5"])
    keys = _sample_cfg(["RUN", "sample.sampler=heun", "sample.steps=8", "sample.cfg_scale=2.0",
                        "sample.interval=[0.0,0.7]", "sample.num=6", "sample.seed=3", "sample.batch_size=4",
                        "sample.use_ema=false", "sample.time_grid=shifted", "sample.shift=1.5"])
    assert flags == keys and flags[0].interval == [0.0, 0.7] and flags[0].cfg_scale == 2.0
    out = run_python(["-m", "ldm.cli", "sample", "--help"]).stdout
    assert "[sample.steps]" in out and "[sample.use_ema=false]" in out  # --help says which flag is which key ...
    table = [line.strip() for line in out.splitlines() if line.startswith("  sample.")]
    assert any(line.startswith("sample.steps=") and line.endswith("[--steps]") for line in table)  # ... both ways
    assert any(line.startswith("sample.cfg_scale=") and line.endswith("[--cfg]") for line in table)


def test_sample_key_typos_and_clashes_fail_before_loading(capsys):
    from ldm.cli import main

    assert main(["sample", "no/such/run", "sample.stepz=4"]) == 2
    assert main(["sample", "no/such/run", "train.max_steps=4"]) == 2
    assert main(["sample", "no/such/run", "--steps", "4", "sample.steps=5"]) == 2
    assert main(["sample", "no/such/run", "sample.sampler=heunn"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "did you mean 'sample.steps'" in err[0] and "'train.max_steps' is not read by this command" in err[1]
    assert "sample.steps is given twice: as --steps and as 'sample.steps=5'" in err[2]
    assert "did you mean 'heun'" in err[3] and all(line.startswith("ldm sample: error: ") for line in err)


def test_sample_keys_sample_what_the_flags_sampled(tmp_path, monkeypatch, capsys):
    """tests/test_legacy_run.py samples this run with --num 6 --cfg 2.0 --sampler heun --steps 4; the same keys as
    key=value give the same bytes."""
    import hashlib
    import json
    import shutil

    import numpy as np

    from ldm.cli import main

    fixture = REPO / "tests" / "fixtures" / "legacy_run"
    expected = json.loads((fixture / "expected.json").read_text())
    shutil.copytree(fixture, tmp_path / "legacy_run")
    monkeypatch.chdir(tmp_path / "legacy_run")
    assert main(["sample", "gen", "sample.num=6", "sample.cfg_scale=2.0", "sample.sampler=heun", "sample.steps=4",
                 "--npz", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")
    assert hashlib.sha256(arr["arr_0"].tobytes()).hexdigest() == expected["samples_npz_arr0_sha256"]
    # the flags describe the same samples: the folder's identity matches, so nothing is redone
    capsys.readouterr()
    assert main(["sample", "gen", "--num", "6", "--cfg", "2.0", "--sampler", "heun", "--steps", "4", "--npz",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "sampled 0 new images (6 already there)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ README commands
def _subcommands(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _readme_ldm_commands() -> list[str]:
    """Every `ldm ...` command the README quotes: in backticks and on the lines of its code blocks."""
    import re

    readme = (REPO / "README.md").read_text()
    block_lines = [line.split("#")[0].strip() for block in re.findall(r"```[^\n]*\n(.*?)```", readme, re.DOTALL)
                   for line in block.splitlines()]
    quoted = re.findall(r"`(ldm [^`]+)`", readme) + [line for line in block_lines if line.startswith("ldm ")]
    return [re.sub(r"\[[^\]]*\]", "", cmd).replace("…", "").strip() for cmd in quoted]


def test_readme_command_lines_name_real_commands_and_options():
    """Each quoted command exists; each --option it uses is one of that command's options; a command quoted with
    arguments gives every required option (`ldm eval recon` takes --recons)."""
    import shlex

    from ldm.cli import build_parser

    commands = [c for c in _readme_ldm_commands() if "<" not in c and "..." not in c]  # `ldm <command>: error: ...`
    assert len(commands) >= 12, commands
    for cmd in commands:
        parser, rest = build_parser(), shlex.split(cmd)[1:]
        depth = 0
        while rest and rest[0] in _subcommands(parser):
            parser, depth = _subcommands(parser)[rest.pop(0)], depth + 1
        assert depth and not _subcommands(parser), f"README: {cmd!r} does not name a complete ldm command"
        options = {s for a in parser._actions for s in a.option_strings}
        used = [t.split("=", 1)[0] for t in rest if t.startswith("-")]
        assert set(used) <= options, f"README: {cmd!r} uses {sorted(set(used) - options)}; `--help` lists {options}"
        if rest:
            required = [a.option_strings for a in parser._actions if a.required and a.option_strings]
            missing = [flags[0] for flags in required if not set(flags) & set(used)]
            assert not missing, f"README: {cmd!r} lacks the required {missing}"


def test_every_long_command_takes_no_progress():
    from ldm.cli import build_parser

    parser = build_parser()
    long_running = {"train": (), "sample": (), "cache-latents": (), "tokenizer-stats": (), "pipeline": (),
                    "quickstart": (), "eval": ("fid", "rfid", "recon", "stats", "latents")}
    for name, subs in long_running.items():
        for sub in [_subcommands(parser)[name]] if not subs else [_subcommands(_subcommands(parser)[name])[s]
                                                                 for s in subs]:
            assert "--no-progress" in {s for a in sub._actions for s in a.option_strings}, sub.prog
