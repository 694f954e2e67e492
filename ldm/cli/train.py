"""`ldm train`: train one model (a tokenizer or a latent generator) from YAML configs and key=value overrides."""

from __future__ import annotations

import argparse

from ldm.cli.common import add_command, add_progress_flag
from ldm.cli.keys import load_command_config, split_config_args
from ldm.config import help_lines


def register(subparsers) -> None:
    p = add_command(
        subparsers, "train", cmd_train,
        help="train a tokenizer (stage=tokenizer) or a latent generator (stage=generator) from a YAML config",
        description="Train one model from a YAML config, with key=value overrides.\n\n"
                    "  ldm train configs/tokenizer/tiny_f4.yaml train.max_steps=500 name=my_vae\n"
                    "  accelerate launch --multi_gpu --num_processes 8 train.py configs/generator/dit_s2.yaml\n\n"
                    "Outputs go to <train.run_root>/<name>/: config.yaml, checkpoints/, latest, tb/, samples/, "
                    "metrics.jsonl, train.log. Re-running the same command resumes (train.resume=auto).",
        epilog="config keys (override any of them as key=value; defaults shown):\n" + "\n".join(help_lines()))
    p.add_argument("config", nargs="*", help="YAML config file(s) (merged in order), then key=value overrides")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="resume from this run directory or checkpoint (same as train.resume=PATH)")
    add_progress_flag(p)


def cmd_train(args: argparse.Namespace) -> int:
    from ldm.config import RunConfig

    paths, overrides = split_config_args(args.config)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_command_config(paths, overrides, RunConfig)
    from ldm.train.loop import fit  # torch loads here, after the config is checked: a config error is instant

    result = fit(cfg, progress=not args.no_progress)
    status = "preempted (relaunch to resume)" if result.preempted else "finished"
    print(f"\n{cfg.stage} training {status} at step {result.step}\n"
          f"  run directory : {result.run_dir}\n"
          f"  checkpoint    : {result.last_checkpoint}\n"
          f"  samples       : {result.run_dir / 'samples'}\n"
          f"  TensorBoard   : tensorboard --logdir {result.run_dir / 'tb'}")
    return 0
