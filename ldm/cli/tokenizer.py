"""`ldm export` and `ldm tokenizer-stats`: a trained tokenizer or generator made ready for inference (diffusers
folders, optionally pushed to the Hugging Face Hub) and a tokenizer's statistics for stage 2."""

from __future__ import annotations

import argparse

from ldm.cli.common import add_command, add_progress_flag


def register(subparsers) -> None:
    p = add_command(
        subparsers, "export", cmd_export,
        help="export a trained tokenizer or generator as a diffusers folder (optionally to the Hugging Face Hub)",
        description="Write the model of a run (EMA weights by default) to DIR.\n"
                    "  tokenizer run: a diffusers folder that `AutoencoderKL.from_pretrained(DIR)` loads (VQ: "
                    "vq_model.safetensors), with latent_stats.json beside it.\n"
                    "  generator run (or --official weights): a diffusers pipeline folder with the tokenizer as its "
                    "VAE: `DiTPipeline` for eps-prediction DDPM DiTs, else ldm's `LdmLatentPipeline`; load with "
                    "`import ldm.eval.export_pipeline` then `DiffusionPipeline.from_pretrained(DIR)` (docs/export.md)."
                    "\n\n"
                    "  ldm export runs/my_vae --to exported/my_vae\n"
                    "  ldm export runs/my_dit --to exported/my_dit --push-to-hub me/my-dit\n"
                    "  ldm export DiT-XL-2-256x256.pt --official dit --tokenizer sd-vae-ft-ema --to exported/dit_xl\n"
                    "RUN, --tokenizer and official weights may be hf://org/name[@rev][/path] Hub references.")
    p.add_argument("run", metavar="RUN", help="run directory or checkpoint directory (tokenizer or generator); with "
                                              "--official, the official weights file")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--pipeline", default="auto", choices=["auto", "dit", "ldm"],
                   help="generators: auto = DiTPipeline where it can run the model (eps DiT on a DDPM path, <= 1000 "
                        "classes, scalar latent scale), else LdmLatentPipeline; dit / ldm insist")
    p.add_argument("--official", default=None, choices=["dit", "sit", "lightningdit"],
                   help="RUN is a released DiT / SiT / LightningDiT weights file (needs --tokenizer)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="generators: the tokenizer to use as the VAE (default: the run's; its fingerprint must match)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="also upload DIR to this Hugging Face model repository (created if missing; needs a login "
                        "or HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")
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
    from ldm.eval.export_generator import (
        export_generator,
        is_generator_source,
        push_export,
    )

    if args.official is not None or is_generator_source(args.run):
        done = export_generator(args.run, args.to, use_ema=not args.no_ema, pipeline=args.pipeline,
                                official=args.official, tokenizer=args.tokenizer)
        out = done.folder
        print(f"exported generator {args.run} -> {out} ({done.pipeline_class}, {done.scheduler_class})\n  load it "
              f"with: import ldm.eval.export_pipeline; {done.pipeline_class}.from_pretrained({str(out)!r})")
    else:
        out = _export_tokenizer(args)
    if args.push_to_hub:
        url = push_export(out, args.push_to_hub, private=args.private)
        print(f"pushed {out} -> https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


def _export_tokenizer(args: argparse.Namespace):
    from ldm.eval.export_generator import CARD_FILE, tokenizer_card
    from ldm.io import atomic_write_text
    from ldm.tokenizers.export import export_tokenizer

    if args.pipeline != "auto" or args.tokenizer is not None:
        raise ValueError(f"{args.run} is a tokenizer; --pipeline and --tokenizer apply to generator exports")
    out = export_tokenizer(args.run, args.to, use_ema=not args.no_ema)
    atomic_write_text(out / CARD_FILE, tokenizer_card(args.run, out))
    print(f"exported tokenizer {args.run} -> {out}\n  load it with: AutoencoderKL.from_pretrained({str(out)!r}) "
          f"or ldm.tokenizers.load_tokenizer({str(out)!r})")
    return out


def cmd_tokenizer_stats(args: argparse.Namespace) -> int:
    from ldm.config import DataCfg
    from ldm.tokenizers.stats import compute_tokenizer_stats

    data = DataCfg(source=args.data, image_size=args.image_size, crop="center")
    stats, path = compute_tokenizer_stats(args.tokenizer, data, num_images=args.num, batch_size=args.batch,
                                          progress=not args.no_progress)
    print(f"latent statistics over {stats.num_images} images -> {path}\n  mean {stats.mean}\n  std {stats.std}\n"
          f"  scaling factor {stats.scaling_factor:.5f}")
    return 0
