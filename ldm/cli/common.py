"""What every `ldm` command shares: the help formatter, sub-command registration and the error mapper.

The error mapper is the one place that turns an exception into an exit status. A user error (a bad config key or
value, a missing or clashing file, an unreadable image, a diverged run, a ValueError raised by ldm's own checks)
prints one line `ldm <command>: error: <message>` to stderr and exits 2; anything else is a bug and keeps its
traceback. `LDM_DEBUG=1` in the environment re-raises user errors too, to show where they came from.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from ldm.config import ConfigError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

_LDM_ROOT = Path(__file__).resolve().parent.parent


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs and shows defaults, except None / False ones (those help
    texts say where the value comes from)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_command(subparsers, name: str, run: Callable[[argparse.Namespace], int] | None, *,
                full_name: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """Add sub-command `name` with the shared formatter; `run(args)` becomes `args.func`, wrapped by the error
    mapper, so calling `args.func(args)` gives the exit status whoever parsed the arguments. Nested commands pass
    their `full_name` (`eval fid`) for the error line; `run=None` leaves `func` to the caller. `kwargs` go to
    argparse (help, description, epilog)."""
    parser = subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    if run is not None:
        parser.set_defaults(func=map_errors(full_name or name, run))
    return parser


def add_progress_flag(parser: argparse.ArgumentParser, bars: bool = True) -> None:
    """`--no-progress`, the same on every long-running command (`bars=False`: the command draws none yet, and
    accepts the flag so scripts can pass it to every command)."""
    note = "" if bars else " (accepted for uniform scripts; this command draws no progress bar)"
    parser.add_argument("--no-progress", action="store_true", help=f"disable progress bars{note}")


# ------------------------------------------------------------------------------------------------------ errors
def map_errors(command: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` with exceptions mapped to exit statuses: user errors -> one line on stderr and 2, Ctrl-C -> 130."""

    @functools.wraps(run)
    def mapped(args: argparse.Namespace) -> int:
        try:
            return int(run(args) or 0)
        except KeyboardInterrupt:
            print(f"ldm {command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if debugging() or not is_user_error(err):
                raise
            print(f"ldm {command}: error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR

    return mapped


def debugging() -> bool:
    """LDM_DEBUG set to anything but empty or 0: show tracebacks of user errors."""
    return os.environ.get("LDM_DEBUG", "") not in ("", "0")


def is_user_error(err: BaseException) -> bool:
    """Bad input, not a bug: config errors, missing / clashing files, bad images, a diverged run, and ValueErrors that
    ldm's own code raised (the library's way of rejecting a value; a ValueError from inside torch is a bug)."""
    if isinstance(err, (ConfigError, FileNotFoundError, FileExistsError)):
        return True
    if isinstance(err, ValueError) and _raised_in_ldm(err):
        return True
    # imported here, on the error path only: both modules load torch, and `ldm --help` must stay instant
    from ldm.data.sources import BadImageError
    from ldm.train.loop import TrainingDiverged

    return isinstance(err, (BadImageError, TrainingDiverged))


def _raised_in_ldm(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_LDM_ROOT)


def one_line(err: BaseException) -> str:
    """The message on one line (the lines of a multi-line message joined by spaces)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
