"""`ldm pipeline` and `ldm quickstart`: every stage of an experiment from one pipeline config, skipping done stages."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli.common import add_command, add_progress_flag
from ldm.cli.keys import load_command_config, split_config_args

EXIT_STOPPED = 75  # EX_TEMPFAIL: a stage was preempted and stopped cleanly; re-running resumes


def register(subparsers) -> None:
    p = add_command(
        subparsers, "pipeline", cmd_pipeline,
        help="run a whole experiment: tokenizer -> latent cache -> generator -> samples -> FID",
        description="Run the stages of a pipeline config under <run_root>/<name>/, skipping stages whose outputs are "
                    "complete (training stages resume), and print a summary.\n\n"
                    "  ldm pipeline configs/quickstart.yaml generator.train.max_steps=3000 name=longer\n\n"
                    "Overrides address a stage's run config: tokenizer.train.max_steps=..., "
                    "generator.model.preset=..., or the pipeline's own keys (stages, num_samples, grid_per_class, "
                    "fid_extractors, latent_flips).\n"
                    f"A preempted training stage stops the pipeline with exit status {EXIT_STOPPED}; re-run to resume.")
    p.add_argument("config", nargs="*", help="pipeline YAML file(s), then key=value overrides")
    add_progress_flag(p)
    q = add_command(
        subparsers, "quickstart", cmd_quickstart,
        help="the offline demo: `ldm pipeline configs/quickstart.yaml` on the embedded digits (< 5 min on a 2-core CPU)",
        description="Train a small EQ-VAE tokenizer and a class-conditional DiT on scikit-learn's digits, sample a "
                    "10x10 grid with CFG and report the Fréchet distance. Outputs: runs/quickstart/. Same as "
                    "`python train.py` with no arguments.")
    q.add_argument("config", nargs="*", metavar="key=value", help="overrides of configs/quickstart.yaml")
    add_progress_flag(q)


def quickstart_config_path() -> str:
    path = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the quickstart needs the repository's configs/ folder "
                                f"(install with `pip install -e .` from a clone)")
    return str(path)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from ldm.config import PipelineCfg

    paths, overrides = split_config_args(args.config)
    cfg = load_command_config(paths, overrides, PipelineCfg)
    from ldm.pipeline import PipelineStopped, format_summary, run_pipeline  # torch loads after the config check

    try:
        summary = run_pipeline(cfg, progress=not args.no_progress)
    except PipelineStopped as stop:  # not an error: nothing after the stopped stage ran, and a re-run resumes
        print(f"ldm pipeline: {stop}")
        return EXIT_STOPPED
    print(format_summary(summary))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    return cmd_pipeline(argparse.Namespace(**{**vars(args), "config": [quickstart_config_path(), *args.config]}))
