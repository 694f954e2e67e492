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


# ------------------------------------------------------------------------------------------------------ pipeline
def add_pipeline_parsers(sub) -> None:
    p = sub.add_parser(
        "pipeline", formatter_class=_Formatter,
        help="run a whole experiment: tokenizer -> latent cache -> generator -> samples -> FID",
        description="Run the stages of a pipeline config under <run_root>/<name>/, skipping stages whose outputs are "
                    "complete (training stages resume), and print a summary.\n\n"
                    "  ldm pipeline configs/quickstart.yaml generator.train.max_steps=3000 name=longer\n\n"
                    "Overrides address a stage's run config: tokenizer.train.max_steps=..., generator.model.preset=..., "
                    "or the pipeline's own keys (stages, num_samples, grid_per_class, fid_extractors, latent_flips).")
    p.add_argument("config", nargs="*", help="pipeline YAML file(s), then key=value overrides")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=cmd_pipeline)
    q = sub.add_parser(
        "quickstart", formatter_class=_Formatter,
        help="the offline demo: `ldm pipeline configs/quickstart.yaml` on the embedded digits (< 10 min on a CPU)",
        description="Train a small EQ-VAE tokenizer and a class-conditional DiT on scikit-learn's digits, sample a "
                    "10x10 grid with CFG and report the Fréchet distance. Outputs: runs/quickstart/. Same as "
                    "`python train.py` with no arguments.")
    q.add_argument("overrides", nargs="*", help="key=value overrides of configs/quickstart.yaml")
    q.add_argument("--no-progress", action="store_true", help="disable progress bars")
    q.set_defaults(func=cmd_quickstart)


def quickstart_config_path() -> str:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the quickstart needs the repository's configs/ folder "
                                f"(install with `pip install -e .` from a clone)")
    return str(path)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from ldm.config import PipelineCfg, load_config
    from ldm.pipeline import PipelineStopped, format_summary, run_pipeline

    paths, overrides = split_config_args(args.config)
    cfg = load_config(paths, overrides, schema=PipelineCfg)
    try:
        summary = run_pipeline(cfg, progress=not args.no_progress)
    except PipelineStopped as stop:  # exit 75 (EX_TEMPFAIL): stopped cleanly, nothing after it ran; re-run resumes
        print(f"ldm pipeline: {stop}")
        return 75
    print(format_summary(summary))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    args.config = [quickstart_config_path(), *args.overrides]
    return cmd_pipeline(args)


# ------------------------------------------------------------------------------------------------------ export
def add_export_parsers(sub) -> None:
    p = sub.add_parser(
        "export", formatter_class=_Formatter,
        help="export a trained tokenizer (diffusers AutoencoderKL folder / VQ folder) for inference",
        description="Write the tokenizer of a run (EMA weights by default) to DIR: for KL tokenizers a diffusers "
                    "folder that `AutoencoderKL.from_pretrained(DIR)` loads, with latent_stats.json beside it.\n\n"
                    "  ldm export runs/my_vae --to exported/my_vae")
    p.add_argument("run", help="tokenizer run directory or checkpoint directory")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.set_defaults(func=cmd_export)
    s = sub.add_parser(
        "tokenizer-stats", formatter_class=_Formatter,
        help="compute a tokenizer's per-channel latent mean/std and scaling factor and store them beside it",
        description="Encode N images of a dataset and write latent_stats.json into the tokenizer's run or export "
                    "folder; stage 2 normalises latents with these numbers.\n\n"
                    "  ldm tokenizer-stats runs/my_vae --data digits --image-size 32 --num 1024")
    s.add_argument("tokenizer", help="tokenizer run directory, export folder or diffusers AutoencoderKL folder")
    s.add_argument("--data", required=True, help="'digits', an image folder, archive or .npz")
    s.add_argument("--image-size", type=int, required=True, help="centre-crop size in pixels")
    s.add_argument("--num", type=int, default=1024, help="number of images")
    s.add_argument("--batch", type=int, default=64, help="images per encoder batch")
    s.set_defaults(func=cmd_tokenizer_stats)


def cmd_export(args: argparse.Namespace) -> int:
    from ldm.tokenizers.export import export_tokenizer

    out = export_tokenizer(args.run, args.to, use_ema=not args.no_ema)
    print(f"exported tokenizer {args.run} -> {out}\n  load it with: AutoencoderKL.from_pretrained({str(out)!r}) "
          f"or ldm.tokenizers.load_tokenizer({str(out)!r})")
    return 0


def cmd_tokenizer_stats(args: argparse.Namespace) -> int:
    from ldm.config import DataCfg
    from ldm.tokenizers.stats import compute_tokenizer_stats

    data = DataCfg(source=args.data, image_size=args.image_size, crop="center")
    stats, path = compute_tokenizer_stats(args.tokenizer, data, num_images=args.num, batch_size=args.batch)
    print(f"latent statistics over {stats.num_images} images -> {path}\n  mean {stats.mean}\n  std {stats.std}\n"
          f"  scaling factor {stats.scaling_factor:.5f}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
from ldm.data import latent_commands  # noqa: E402  (argparse only; each command imports torch when it runs)
from ldm.eval import commands as eval_commands  # noqa: E402
from ldm.eval import sample_commands  # noqa: E402

REGISTRARS: list[Callable] = [add_train_parser, sample_commands.register, eval_commands.register,
                              latent_commands.register, add_export_parsers, add_pipeline_parsers]


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
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`ldm train cfg.yaml --no-progress train.max_steps=5`)
    target = "config" if hasattr(args, "config") else "overrides" if hasattr(args, "overrides") else None
    if extra and target and all("=" in e and not e.startswith("-") for e in extra):
        setattr(args, target, [*getattr(args, target), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
