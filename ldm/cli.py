"""The `ldm` command line: `ldm train|sample|eval|cache-latents|export|...`.

Each sub-command is a small function that parses, loads the config, builds and calls into the library; heavy imports
happen inside the functions so `ldm --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ldm.config import ConfigError, help_lines


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _config_epilog() -> str:
    return ("config keys (override any of them as key=value; defaults shown):\n" + "\n".join(help_lines()))


# ------------------------------------------------------------------------------------------------------ train
def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="train a tokenizer (stage=tokenizer) or a latent generator (stage=generator) from a YAML config",
        description="Train one model from a YAML config, with key=value overrides.\n\n"
                    "  ldm train configs/tokenizer/tiny_f4.yaml train.max_steps=500 name=my_vae\n"
                    "  accelerate launch --multi_gpu --num_processes 8 train.py configs/generator/dit_s2.yaml\n\n"
                    "Outputs go to <train.run_root>/<name>/: config.yaml, checkpoints/, latest, tb/, samples/, "
                    "metrics.jsonl, train.log. Re-running the same command resumes (train.resume=auto).",
        epilog=_config_epilog())
    p.add_argument("config", nargs="*", help="YAML config file(s) (merged in order), then key=value overrides")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="resume from this run directory or checkpoint (same as train.resume=PATH)")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.set_defaults(func=cmd_train)


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate YAML paths from key=value overrides."""
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return paths, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from ldm.config import load_config
    from ldm.train.loop import fit

    paths, overrides = split_config_args(args.config)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(paths, overrides)
    result = fit(cfg, progress=not args.no_progress)
    status = "preempted (relaunch to resume)" if result.preempted else "finished"
    print(f"\n{cfg.stage} training {status} at step {result.step}\n"
          f"  run directory : {result.run_dir}\n"
          f"  checkpoint    : {result.last_checkpoint}\n"
          f"  samples       : {result.run_dir / 'samples'}\n"
          f"  TensorBoard   : tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
REGISTRARS: list[Callable] = [add_train_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", formatter_class=_Formatter,
        description="ldm: latent diffusion framework. Train tokenizers and latent generators, sample, evaluate.\n"
                    "Run `ldm COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # named, user-facing failures (bad data, divergence) print without a traceback
        from ldm.data.images import BadImageError
        from ldm.train.loop import TrainingDiverged

        if isinstance(err, (BadImageError, TrainingDiverged)):
            print(f"ldm {args.command}: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
