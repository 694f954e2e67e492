"""`ldm export` and `ldm tokenizer-stats`: a trained tokenizer made ready for inference and for stage 2."""

from __future__ import annotations

import argparse

from ldm.cli.common import add_command, add_progress_flag


def register(subparsers) -> None:
    p = add_command(
        subparsers, "export", cmd_export,
        help="export a trained tokenizer (diffusers AutoencoderKL folder / VQ folder) for inference",
        description="Write the tokenizer of a run (EMA weights by default) to DIR: for KL tokenizers a diffusers "
                    "folder that `AutoencoderKL.from_pretrained(DIR)` loads, with latent_stats.json beside it.\n\n"
                    "  ldm export runs/my_vae --to exported/my_vae")
    p.add_argument("run", help="tokenizer run directory or checkpoint directory")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    s = add_command(
        subparsers, "tokenizer-stats", cmd_tokenizer_stats,
        help="compute a tokenizer's per-channel latent mean/std and scaling factor and store them beside it",
        description="Encode N images of a dataset and write latent_stats.json into the tokenizer's run or export "
                    "folder; stage 2 normalises latents with these numbers.\n\n"
                    "  ldm tokenizer-stats runs/my_vae --data digits --image-size 32 --num 1024")
    s.add_argument("tokenizer", help="tokenizer run directory, export folder or diffusers AutoencoderKL folder")
    s.add_argument("--data", required=True, help="'digits', an image folder, archive or .npz")
    s.add_argument("--image-size", type=int, required=True, help="centre-crop size in pixels")
    s.add_argument("--num", type=int, default=1024, help="number of images")
    s.add_argument("--batch", type=int, default=64, help="images per encoder batch")
    add_progress_flag(s)


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
    stats, path = compute_tokenizer_stats(args.tokenizer, data, num_images=args.num, batch_size=args.batch,
                                          progress=not args.no_progress)
    print(f"latent statistics over {stats.num_images} images -> {path}\n  mean {stats.mean}\n  std {stats.std}\n"
          f"  scaling factor {stats.scaling_factor:.5f}")
    return 0
