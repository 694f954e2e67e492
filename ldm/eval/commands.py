"""`ldm eval fid|rfid|recon|stats`: the evaluation command line. `register(subparsers)` adds the `eval` command.

Every command prints a human summary (metric names carry the feature extractor: FID is Inception's, FD_<name> is any
other space) and one JSON line with all numbers; `--metrics-jsonl PATH` (or `--run DIR`, meaning DIR/metrics.jsonl)
appends the numbers as "eval/<metric>" keys. Commands run sharded under `accelerate launch` / `torchrun`; only the
main process prints and writes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

EXTRACTOR_HELP = ("feature space: inception (FID; TF-2015 weights from a local file), dinov2 (FD_dinov2; local "
                  "ViT-L/14 weights), digits (FD_digits; the committed digits classifier, offline)")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_common(p: argparse.ArgumentParser, extractor: bool = True) -> None:
    if extractor:
        p.add_argument("--extractor", default="inception", choices=["inception", "dinov2", "digits"],
                       help=EXTRACTOR_HELP)
        p.add_argument("--extractor-weights", "--inception-weights", dest="extractor_weights", metavar="PATH",
                       default=None, help="weights file of the extractor (inception: pt_inception-2015-12-05-"
                       "6726825d.pth); when omitted: $LDM_INCEPTION_WEIGHTS, then the torch hub cache")
        p.add_argument("--download-inception", action="store_true",
                       help="allow downloading pytorch-fid's Inception weights into the torch hub cache when no "
                            "local file is found (needs internet; off by default)")
        p.add_argument("--fd-method", default="eigh", choices=["eigh", "sqrtm"],
                       help="Fréchet distance: eigh (fast, exact) or sqrtm (the ADM/TTUR scipy path)")
        p.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="reference-statistics cache; when omitted: $LDM_CACHE_DIR/fid_stats, else "
                            "~/.cache/ldm/fid_stats")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch per process")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="ADM centre-crop every image to PX x PX first; when omitted, images must share one size")
    p.add_argument("--device", default=None, help="torch device; when omitted, this process's accelerate device")
    p.add_argument("--metrics-jsonl", default=None, metavar="PATH", help="append the results to this JSON-lines file")
    p.add_argument("--run", default=None, metavar="DIR", help="a run directory: append to DIR/metrics.jsonl")
    p.add_argument("--step", type=int, default=None, help="training step recorded with the results")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")


def register(subparsers):
    """Add `eval` with sub-commands fid, rfid, recon, stats to the top-level sub-parsers; returns the `eval`
    sub-parsers so other modules can add their own `ldm eval <name>` (e.g. latent_commands.register_latents)."""
    ev = subparsers.add_parser(
        "eval", formatter_class=_Formatter, help="evaluate samples (FID/sFID/IS/precision/recall) or a tokenizer "
        "(rFID/PSNR/SSIM/LPIPS)",
        description="Evaluation, compatible with the ADM evaluator (guided-diffusion evaluations/evaluator.py).\n\n"
                    "  ldm eval fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz\n"
                    "  ldm eval fid --samples runs/x/samples/ --ref digits --extractor digits\n"
                    "  ldm eval rfid --tokenizer runs/vae --data /data/imagenet/val --image-size 256\n"
                    "  ldm eval recon --recons recon/ --data originals/\n"
                    "  ldm eval stats --data /data/imagenet/train --image-size 256 --out ref.npz\n"
                    "  accelerate launch --num_processes 8 -m ldm.cli eval fid ...   (sharded)")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])

    p = sub.add_parser("fid", formatter_class=_Formatter, help="FID, sFID, IS, precision/recall of samples",
                       description="Generation metrics of SAMPLES against REF in one pass of the feature network.\n"
                                   "SAMPLES: image folder, .zip/.tar archive or ADM .npz (arr_0 uint8 NHWC).\n"
                                   "REF: the same kinds of image sets, 'digits', or a statistics .npz (mu, sigma"
                                   "[, mu_s, sigma_s]; e.g. an ADM reference batch). Statistics of reference images "
                                   "are cached on disk.")
    p.add_argument("--samples", required=True, help="generated images (folder, archive or .npz)")
    p.add_argument("--ref", required=True, help="reference images or statistics .npz")
    p.add_argument("--num-samples", type=int, default=None, help="use the first N samples; all when omitted")
    p.add_argument("--ref-num", type=int, default=None, help="use the first N reference images; all when omitted")
    p.add_argument("--metrics", default="fd,sfid,is,pr",
                   help="comma list of fd (FID / FD_<extractor>), sfid, is, pr (precision/recall, k=3)")
    _add_common(p)
    p.set_defaults(func=_user_errors(cmd_fid))

    p = sub.add_parser("rfid", formatter_class=_Formatter, help="tokenizer reconstruction: rFID, PSNR, SSIM, LPIPS",
                       description="Encode and decode DATA with a tokenizer (posterior mean; no sampling) and compare "
                                   "reconstructions with the originals: rFID = FID(reconstructions, originals), mean "
                                   "per-image PSNR / SSIM / LPIPS-VGG.")
    p.add_argument("--tokenizer", required=True, help="tokenizer run dir, checkpoint, export or diffusers VAE folder")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images; all when omitted")
    p.add_argument("--metrics", default="rfd,psnr,ssim,lpips", help="comma list of rfd, psnr, ssim, lpips")
    p.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision vgg16 weights for LPIPS; when omitted, torchvision's cache")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    _add_common(p)
    p.set_defaults(func=_user_errors(cmd_rfid))

    p = sub.add_parser("recon", formatter_class=_Formatter, help="compare saved reconstructions with originals",
                       description="Paired metrics of two image sets on disk, matched by index (sorted file names "
                                   "or array rows): rFID, mean PSNR / SSIM / LPIPS-VGG.")
    p.add_argument("--recons", required=True, help="reconstructed images (folder, archive or .npz)")
    p.add_argument("--data", required=True, help="original images, same count and order")
    p.add_argument("--num-images", type=int, default=None, help="use the first N pairs; all when omitted")
    p.add_argument("--metrics", default="rfd,psnr,ssim,lpips", help="comma list of rfd, psnr, ssim, lpips")
    p.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision vgg16 weights for LPIPS; when omitted, torchvision's cache")
    _add_common(p)
    p.set_defaults(func=_user_errors(cmd_recon))

    p = sub.add_parser("stats", formatter_class=_Formatter, help="write reference statistics (ADM-compatible .npz)",
                       description="Compute mu, sigma (and mu_s, sigma_s for Inception) of a dataset and write them "
                                   "as an ADM-layout .npz usable as --ref (features for precision/recall included).")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images; all when omitted")
    _add_common(p)
    p.set_defaults(func=_user_errors(cmd_stats))

    from ldm.eval.latent_commands import register_latents  # `ldm eval latents` (latent-space diagnostics)

    register_latents(sub)
    return sub


# ------------------------------------------------------------------------------------------------------ helpers
def _user_errors(command):
    """Bad values (ValueError: a wrong --metrics, mismatched statistics, unpaired sets) end with a one-line message."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ValueError as err:
            print(f"ldm eval {args.eval_command}: error: {err}", file=sys.stderr)
            return 2

    return run


def _metrics(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in items if m not in allowed]
    if bad or not items:
        raise ValueError(f"--metrics={text!r}: unknown {bad}; expected a comma list of {list(allowed)}")
    return items


def _build_extractor(args):
    from ldm.eval.extractors import build_extractor

    kwargs = {"download": True} if args.extractor == "inception" and args.download_inception else {}
    return build_extractor(args.extractor, args.extractor_weights, **kwargs)


def _describe(key: str, value: float) -> str:
    labels = {"fid": "FID (Inception-v3 TF-2015)", "sfid": "sFID (Inception mixed_6/conv)", "is": "IS (Inception)",
              "precision": "precision (Inception, k=3)", "recall": "recall (Inception, k=3)",
              "rfid": "rFID (Inception-v3 TF-2015)", "psnr": "PSNR [dB]", "ssim": "SSIM", "lpips": "LPIPS-VGG"}
    if key in labels:
        label = labels[key]
    else:  # fd_digits -> FD_digits, precision_digits -> precision (digits features), ...
        base, _, name = key.partition("_")
        label = {"fd": f"FD_{name}", "rfd": f"rFD_{name}", "is": f"IS_{name} ({name} classifier)"}.get(
            base, f"{base} ({name} features, k=3)")
    return f"  {label:<34s} {value:.6g}"


def _report(args, result: dict, extra: dict) -> int:
    from ldm.eval.features import dist_info

    if dist_info()[0] != 0:
        return 0
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = [_describe(k, v) for k, v in numbers.items() if not k.startswith("num_") and not k.endswith("_std")]
    if result.get("extractor") not in (None, "inception"):
        lines.append(f"  (FD_{result['extractor']} is a Fréchet distance in the {result['extractor']} feature space; "
                     f"it is not comparable with Inception FID)")
    print("\n".join(lines))
    print(json.dumps({**extra, **result}, sort_keys=True))
    target = args.metrics_jsonl or (str(Path(args.run) / "metrics.jsonl") if args.run else None)
    if target:
        from ldm.eval.evaluate import append_jsonl

        record = {f"eval/{k}": (v if math.isfinite(v) else None) for k, v in numbers.items()}
        append_jsonl(target, {**({"step": args.step} if args.step is not None else {}), **record})
    return 0


# ------------------------------------------------------------------------------------------------------ commands
def cmd_fid(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import GENERATION_METRICS, evaluate_samples

    start = time.time()
    result = evaluate_samples(args.samples, args.ref, extractor=_build_extractor(args),
                              metrics=_metrics(args.metrics, GENERATION_METRICS), batch_size=args.batch_size,
                              size=args.image_size, num_samples=args.num_samples, ref_num=args.ref_num,
                              cache_dir=args.cache_dir, use_cache=not args.no_cache, device=args.device,
                              progress=not args.no_progress, fd_method=args.fd_method)
    return _report(args, result, {"samples": args.samples, "ref": args.ref, "seconds": round(time.time() - start, 2)})


def cmd_rfid(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import RECON_METRICS, _device, evaluate_reconstruction
    from ldm.tokenizers.export import load_tokenizer

    start = time.time()
    device = _device(args.device)
    tok = load_tokenizer(args.tokenizer, use_ema=not args.no_ema, device=device)
    metrics = _metrics(args.metrics, RECON_METRICS)
    result = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), args.data,
                                     extractor=_build_extractor(args) if "rfd" in metrics else "inception",
                                     metrics=metrics, batch_size=args.batch_size, size=args.image_size,
                                     num_images=args.num_images, lpips_weights=args.lpips_weights,
                                     cache_dir=args.cache_dir, use_cache=not args.no_cache, device=device,
                                     progress=not args.no_progress, fd_method=args.fd_method)
    return _report(args, result, {"tokenizer": args.tokenizer, "data": args.data,
                                  "seconds": round(time.time() - start, 2)})


def cmd_recon(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import RECON_METRICS, evaluate_pairs

    start = time.time()
    metrics = _metrics(args.metrics, RECON_METRICS)
    result = evaluate_pairs(args.recons, args.data, extractor=_build_extractor(args) if "rfd" in metrics else
                            "inception", metrics=metrics, batch_size=args.batch_size, size=args.image_size,
                            num_images=args.num_images, lpips_weights=args.lpips_weights, cache_dir=args.cache_dir,
                            use_cache=not args.no_cache, device=args.device, progress=not args.no_progress,
                            fd_method=args.fd_method)
    return _report(args, result, {"recons": args.recons, "data": args.data, "seconds": round(time.time() - start, 2)})


def cmd_stats(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import write_reference_stats

    path = write_reference_stats(args.data, args.out, extractor=_build_extractor(args), batch_size=args.batch_size,
                                 size=args.image_size, num=args.num_images, device=args.device,
                                 progress=not args.no_progress)
    from ldm.eval.features import dist_info

    if dist_info()[0] == 0:
        print(f"wrote {path}")
    return 0
