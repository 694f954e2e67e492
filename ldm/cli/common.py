"""What every `ldm` command shares: the help formatter, sub-command registration and the error mapper.

The error mapper is the one place that turns an exception into an exit status. A user error (a bad config key or
value, a missing or clashing file, an unreadable image, a diverged run, a ValueError raised by ldm's own checks, a
weights file that torch.load refuses or cannot read) prints one line `ldm <command>: error: <message>` to stderr and
exits 2; anything else is a bug and keeps its traceback. `LDM_DEBUG=1` in the environment re-raises user errors too,
to show where they came from.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable

from ldm.config import ConfigError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# what torch.load raises for a refused pickle (weights_only=True) or a truncated / empty / foreign file
_TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError)

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


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """`--no-progress`, the same on every long-running command."""
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")


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
    """Bad input, not a bug: config errors, missing / clashing files, bad images, a diverged run, ValueErrors that
    ldm's own code raised (the library's way of rejecting a value; a ValueError from inside torch is a bug), and a
    file that torch.load refuses or cannot read."""
    if isinstance(err, (ConfigError, FileNotFoundError, FileExistsError)):
        return True
    if isinstance(err, ValueError) and _raised_in_ldm(err):
        return True
    if isinstance(err, _TORCH_LOAD_ERRORS) and _torch_load_file(err) is not None:
        return True
    # imported here, on the error path only: both modules load torch, and `ldm --help` must stay instant
    from ldm.data.sources import BadImageError
    from ldm.train.checkpoint import CheckpointWriteError
    from ldm.train.loop import TrainingDiverged

    return isinstance(err, (BadImageError, TrainingDiverged, CheckpointWriteError))


def _raised_in_ldm(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_LDM_ROOT)


def one_line(err: BaseException) -> str:
    """The message on one line (the lines of a multi-line message joined by spaces)."""
    if isinstance(err, _TORCH_LOAD_ERRORS) and _torch_load_file(err) is not None:
        return _torch_load_message(err)
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _torch_load_file(err: BaseException) -> str | None:
    """The file of the torch.load call `err` was raised in (its `f` argument; "a weights file" when that was an open
    file object), or None when it did not come from torch.load."""
    found, tb = None, err.__traceback__
    while tb is not None:  # innermost torch.load frame: the loader that failed
        code = tb.tb_frame.f_code
        if code.co_name == "load" and Path(code.co_filename).parts[-2:] == ("torch", "serialization.py"):
            path = tb.tb_frame.f_locals.get("f")
            found = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "a weights file"
        tb = tb.tb_next
    return found


def _torch_load_message(err: BaseException) -> str:
    """torch's page-long refusal or reader error as one line naming the file and the fix. ldm loads every .pt/.pth
    with weights_only=True, so a file holding pickled objects (a whole nn.Module, a custom class) is refused before
    any of its code runs."""
    where = _torch_load_file(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if refused:
        return (f"{where} holds pickled Python objects ({refused.group(1)}), not only tensors, and ldm never runs "
                f"pickled code (torch.load weights_only=True): save the weights as a state dict "
                f"(torch.save(model.state_dict(), PATH)) or as .safetensors, and pass that file")
    detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(err), re.DOTALL)
    text = detail.group(1) if detail else str(err).split(". ")[0]  # torch's reader errors: the first sentence says it
    reason = " ".join(text.split()) or ("empty or truncated file" if isinstance(err, EOFError) else type(err).__name__)
    return f"{where} cannot be read as a tensor file ({reason}): pass an intact .pt/.pth state dict or .safetensors"
