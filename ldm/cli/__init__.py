"""The `ldm` command line: `ldm train|sample|eval|cache-latents|export|tokenizer-stats|pipeline|quickstart`.

The only argparse in ldm. One module per command family (train, sample, eval, data, tokenizer, pipeline); each
command parses, loads its config and calls into the library, importing torch only when it runs, so `ldm --help` is
instant. common.py holds the one help formatter and the one error mapper (a user error is one line on stderr and
exit status 2; LDM_DEBUG=1 shows its traceback); keys.py the key=value overrides and the short flags aliasing them.
"""

from __future__ import annotations

import argparse

from ldm.cli import data, eval, pipeline, sample, tokenizer, train
from ldm.cli.common import EXIT_USER_ERROR, HelpFormatter
from ldm.cli.pipeline import quickstart_config_path

COMMAND_FAMILIES = (train, sample, eval, data, tokenizer, pipeline)  # each has register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", formatter_class=HelpFormatter,
        description="ldm: latent diffusion framework. Train tokenizers and latent generators, sample, evaluate.\n"
                    "Run `ldm COMMAND --help` for the options of each command. Set LDM_DEBUG=1 to see the traceback "
                    "behind an error message.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in COMMAND_FAMILIES:
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 done, 2 user error, 75 pipeline stopped, 130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`ldm train cfg.yaml --no-progress train.max_steps=5`)
    if extra and hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
        args.config = [*args.config, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    return args.func(args)


__all__ = ["main", "build_parser", "quickstart_config_path"]
