"""`ldm eval fid|rfid|recon|stats|latents|prompts`: the evaluation commands.

Every command prints a human summary (metric names carry the feature extractor: FID is Inception's, FD_<name> is any
other space) and one JSON line with all numbers; `--metrics-jsonl PATH` (or `--run DIR`, meaning DIR/metrics.jsonl)
appends the numbers as "eval/<metric>" keys. Commands run sharded under `accelerate launch` / `torchrun`; only the
main process prints and writes. The `eval:` config keys are accepted as eval.<key>=value, as in `ldm train`; the
short flags --extractor, --batch-size, ... are their aliases.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ldm import names
from ldm.cli.common import add_command, add_progress_flag, one_line
from ldm.cli.keys import KeyFlags
from ldm.config import ConfigError, EvalCfg

EXTRACTOR_HELP = ("feature space: inception (FID; TF-2015 weights from a local file), dinov2 (FD_dinov2; local "
                  "ViT-L/14 weights), digits (FD_digits; the committed digits classifier, offline)")
KEYS_HEADER = "config keys (set any as eval.<key>=value; [--flag] is its short alias; defaults shown):"
EXTRACTOR_KEYS = ("extractor", "inception_weights", "batch_size")  # the eval.* keys every feature-space command reads

DESCRIPTION = """\
Evaluation, compatible with the ADM evaluator (guided-diffusion evaluations/evaluator.py).

  ldm eval fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
  ldm eval fid --samples runs/x/samples/ --ref digits --extractor digits
  ldm eval fid --samples runs/x/samples/ eval.reference=digits eval.extractor=digits eval.batch_size=32
  ldm eval rfid --tokenizer runs/vae --data /data/imagenet/val --image-size 256
  ldm eval recon --recons recon/ --data originals/
  ldm eval stats --data /data/imagenet/train --image-size 256 --out ref.npz
  ldm eval latents --tokenizer runs/vae --data digits --out diag/
  ldm eval prompts --samples runs/t2i/samples/prompted --clip /weights/clip-vit-large-patch14
  accelerate launch --num_processes 8 -m ldm.cli eval fid ...   (sharded)"""

LATENTS_DESCRIPTION = """\
Diagnose the latent space of a tokenizer on a set of images and write latent_diagnostics.json and
latent_diagnostics.png to --out:

  per-channel mean / std and their spread;
  equivariance under the EQ-VAE transforms (90/180/270 deg rotations, down-scaling by --scales):
    decoder ratio RMS(D(tau(E(x))) - tau(x)) / RMS(D(E(x)) - x), decoder MSE, latent error
    ||E(tau(x)) - tau(E(x))|| / ||tau(E(x))||;
  radially averaged power spectrum of latents and images, high-frequency share above --hf-cutoff x Nyquist;
  KL tokenizers: KL to N(0, I) and posterior variance per channel; VQ: codebook usage and perplexity;
  with --encoder: linear CKA and CKNNA between latent positions and the encoder's patch features.

  ldm eval latents --tokenizer runs/quickstart/tokenizer --data digits --out diag/ --encoder digits
  ldm eval latents --tokenizer sd-vae-ft-ema/ --data /data/val --image-size 256 --encoder dinov2_vitb14 \\
      --encoder-weights dinov2_vitb14_pretrain.pth --out diag/

Definitions and sources: docs/evaluation.md, section "Latent diagnostics"."""


# ------------------------------------------------------------------------------------------------------ parsers
def register(subparsers):
    """Add `eval` with its sub-commands to the top-level sub-parsers; returns the `eval` sub-parsers."""
    ev = add_command(subparsers, "eval", None, description=DESCRIPTION,
                     help="evaluate samples (FID/sFID/IS/precision/recall) or a tokenizer (rFID/PSNR/SSIM/LPIPS)")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])
    _register_fid(sub)
    _register_reconstruction(sub)
    _register_stats(sub)
    _register_latents(sub)
    _register_prompts(sub)
    return sub


def _eval_command(sub, name: str, run, fields: tuple[str, ...], **kwargs) -> tuple[argparse.ArgumentParser, KeyFlags]:
    p = add_command(sub, name, run, full_name=f"eval {name}", **kwargs)
    keys = KeyFlags("eval", EvalCfg, fields)
    p.add_argument("config", nargs="*", metavar="key=value", help="eval.<key>=value overrides (keys below)")
    p.set_defaults(key_flags=keys)
    return p, keys


def _add_common(p: argparse.ArgumentParser, keys: KeyFlags, extractor: bool = True) -> None:
    if extractor:
        keys.add(p, "--extractor", field="extractor", choices=list(names.EXTRACTOR_NAMES), help=EXTRACTOR_HELP)
        keys.add(p, "--extractor-weights", "--inception-weights", dest="extractor_weights", field="inception_weights",
                 metavar="PATH", help="weights file of the extractor (inception: pt_inception-2015-12-05-6726825d.pth; "
                 "the key is named for the default extractor); when omitted: $LDM_INCEPTION_WEIGHTS, then the torch "
                 "hub cache")
        p.add_argument("--download-inception", action="store_true",
                       help="allow downloading pytorch-fid's Inception weights into the torch hub cache when no "
                            "local file is found (needs internet; off by default)")
        p.add_argument("--fd-method", default="eigh", choices=["eigh", "sqrtm"],
                       help="Fréchet distance: eigh (fast, exact) or sqrtm (the ADM/TTUR scipy path)")
        p.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="reference-statistics cache; when omitted: $LDM_CACHE_DIR/fid_stats, else "
                            "~/.cache/ldm/fid_stats")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    keys.add(p, "--batch-size", field="batch_size", type=int, help="images per batch per process")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="ADM centre-crop every image to PX x PX first; when omitted, images must share one size")
    p.add_argument("--device", default=None, help="torch device; when omitted, this process's accelerate device")
    p.add_argument("--metrics-jsonl", default=None, metavar="PATH", help="append the results to this JSON-lines file")
    p.add_argument("--run", default=None, metavar="DIR", help="a run directory: append to DIR/metrics.jsonl")
    p.add_argument("--step", type=int, default=None, help="training step recorded with the results")
    add_progress_flag(p)
    p.epilog = keys.epilog(KEYS_HEADER)


def _register_fid(sub) -> None:
    p, keys = _eval_command(
        sub, "fid", cmd_fid, (*EXTRACTOR_KEYS, "num_samples", "reference"),
        help="FID, sFID, IS, precision/recall of samples",
        description="Generation metrics of SAMPLES against REF in one pass of the feature network.\n"
                    "SAMPLES: image folder, .zip/.tar archive or ADM .npz (arr_0 uint8 NHWC).\n"
                    "REF: the same kinds of image sets, 'digits', or a statistics .npz (mu, sigma[, mu_s, sigma_s]; "
                    "e.g. an ADM reference batch). Statistics of reference images are cached on disk.")
    p.add_argument("--samples", required=True, help="generated images (folder, archive or .npz)")
    keys.add(p, "--ref", field="reference", help="reference images or statistics .npz (required, as flag or key)")
    keys.add(p, "--num-samples", field="num_samples", type=int,
             help="use the first N samples; all when neither the flag nor the key is given")
    p.add_argument("--ref-num", type=int, default=None, help="use the first N reference images; all when omitted")
    p.add_argument("--metrics", default="fd,sfid,is,pr",
                   help="comma list of fd (FID / FD_<extractor>), sfid, is, pr (precision/recall, k=3)")
    _add_common(p, keys)
    p.epilog += "\n(eval fid uses all samples unless --num-samples / eval.num_samples is given)"


def _register_reconstruction(sub) -> None:
    p, keys = _eval_command(
        sub, "rfid", cmd_rfid, EXTRACTOR_KEYS, help="tokenizer reconstruction: rFID, PSNR, SSIM, LPIPS",
        description="Encode and decode DATA with a tokenizer (posterior mean; no sampling) and compare "
                    "reconstructions with the originals: rFID = FID(reconstructions, originals), mean per-image "
                    "PSNR / SSIM / LPIPS-VGG.")
    p.add_argument("--tokenizer", required=True, help="tokenizer run dir, checkpoint, export or diffusers VAE folder")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    _add_paired(p)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    _add_common(p, keys)

    p, keys = _eval_command(
        sub, "recon", cmd_recon, EXTRACTOR_KEYS, help="compare saved reconstructions with originals",
        description="Paired metrics of two image sets on disk, matched by index (sorted file names or array "
                    "rows): rFID, mean PSNR / SSIM / LPIPS-VGG.")
    p.add_argument("--recons", required=True, help="reconstructed images (folder, archive or .npz)")
    p.add_argument("--data", required=True, help="original images, same count and order")
    _add_paired(p)
    _add_common(p, keys)


def _add_paired(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-images", type=int, default=None, help="use the first N images; all when omitted")
    p.add_argument("--metrics", default="rfd,psnr,ssim,lpips",
                   help="comma list of rfd, psnr, ssim, lpips; rfd needs the extractor's weights (inception: a local "
                        "file; digits: none) and lpips torchvision's VGG16 weights: without them the command stops "
                        "at once and says which to leave out (psnr,ssim need nothing)")
    p.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision vgg16 weights for LPIPS; when omitted, torchvision's cache")


def _register_stats(sub) -> None:
    p, keys = _eval_command(
        sub, "stats", cmd_stats, EXTRACTOR_KEYS, help="write reference statistics (ADM-compatible .npz)",
        description="Compute mu, sigma (and mu_s, sigma_s for Inception) of a dataset and write them as an "
                    "ADM-layout .npz usable as --ref (features for precision/recall included).")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images; all when omitted")
    _add_common(p, keys)


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"scales {values} must lie in (0, 1)")
    return values


def _register_latents(sub) -> None:
    p, keys = _eval_command(sub, "latents", cmd_latents, ("batch_size",), description=LATENTS_DESCRIPTION,
                            help="latent-space diagnostics of a tokenizer (channel stats, equivariance, spectrum, "
                                 "KL / codebook, alignment)")
    p.add_argument("--tokenizer", required=True, help="tokenizer run dir, checkpoint, export or diffusers VAE folder")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for latent_diagnostics.json / .png")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="ADM centre-crop every image to PX x PX; when omitted, images must share one size")
    p.add_argument("--num-images", type=int, default=512, help="use the first N images")
    keys.add(p, "--batch-size", field="batch_size", type=int, help="images per batch")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="frozen encoder for the alignment metrics: 'digits' (the committed digits classifier's conv "
                        "features) or a name of ldm.encoders.ENCODERS (e.g. dinov2_vitb14; local weights needed); "
                        "when omitted, alignment is skipped")
    p.add_argument("--encoder-weights", default=None, metavar="PATH", help="weights file of --encoder")
    p.add_argument("--scales", type=_scales, default=[0.5, 0.75], help="comma list of down-scaling factors")
    p.add_argument("--hf-cutoff", type=float, default=0.5, help="high-frequency cutoff as a fraction of Nyquist")
    p.add_argument("--topk", type=int, default=10, help="neighbours for CKNNA")
    p.add_argument("--max-tokens", type=int, default=2048, help="latent positions used for the alignment metrics")
    p.add_argument("--seed", type=int, default=0, help="seed of the alignment subsample")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    add_progress_flag(p)
    p.epilog = keys.epilog(KEYS_HEADER)


PROMPTS_DESCRIPTION = """\
Score a prompted sample folder (written by `ldm sample RUN --prompt ... / --prompts FILE`: NNNNNN.png
with its prompt in NNNNNN.txt) and write the numbers to a JSON file:

  digits   the shipped digits classifier's accuracy against the digit each prompt names ("a handwritten
           digit seven", "the number 7, ..."; prompts naming no digit are left out; chance 10 %); offline
  clip     CLIPScore (Hessel et al. 2021) as torchmetrics computes it, max(100 x mean cosine, 0), with
           CLIP weights from a local folder (--clip; nothing is downloaded)

  ldm eval prompts --samples runs/t2i/samples/prompted
  ldm eval prompts --samples out/ --clip /weights/clip-vit-large-patch14 --out scores.json

Runs in one process (the folder is read whole); definitions: docs/conditioning.md, "Evaluation"."""


def _register_prompts(sub) -> None:
    p, keys = _eval_command(sub, "prompts", cmd_prompts, ("batch_size",), description=PROMPTS_DESCRIPTION,
                            help="score prompted samples: digits-classifier accuracy, CLIPScore")
    p.add_argument("--samples", required=True, metavar="DIR",
                   help="the sample folder of `ldm sample --prompt / --prompts` (NNNNNN.png + NNNNNN.txt)")
    p.add_argument("--metrics", default=None, metavar="LIST",
                   help="comma list of digits, clip; when omitted: digits if a prompt names a digit, clip if --clip "
                        "is given")
    p.add_argument("--clip", default=None, metavar="DIR",
                   help="local CLIP folder (config.json, weights, processor files) for CLIPScore; never downloaded")
    p.add_argument("--digits-weights", default=None, metavar="PATH",
                   help="digits classifier weights (default: the shipped ldm/assets/digits_classifier.safetensors)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON file of the scores (default: "
                                                               "SAMPLES/prompt_scores.json)")
    keys.add(p, "--batch-size", field="batch_size", type=int, help="images per classifier / CLIP batch")
    p.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    add_progress_flag(p)
    p.epilog = keys.epilog(KEYS_HEADER)


# ------------------------------------------------------------------------------------------------------ helpers
def _metrics(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in items if m not in allowed]
    if bad or not items:
        raise ValueError(f"--metrics={text!r}: unknown {bad}; expected a comma list of {list(allowed)}")
    return items


def _paired_metrics(args: argparse.Namespace, ev: EvalCfg) -> tuple[list[str], object]:
    """(--metrics of `eval rfid` / `eval recon`, the extractor rfd uses), after checking, before any work, that the
    weights every metric needs are on this machine: nothing is downloaded, and a missing file stops the command with
    one line naming each metric that needs one, where it looked, and the --metrics list without it."""
    from ldm.eval.evaluate import RECON_METRICS

    metrics = _metrics(args.metrics, RECON_METRICS)
    missing: dict[str, str] = {}
    extractor = "inception"  # not used when rfd is left out
    if "rfd" in metrics:
        try:
            extractor = _build_extractor(args, ev)
        except FileNotFoundError as err:
            missing["rfd"] = f"{one_line(err)} (--extractor digits needs no download)"
    if "lpips" in metrics:
        from ldm.tokenizers.losses import VGG16_FILE, vgg16_cache_path

        path = Path(args.lpips_weights) if args.lpips_weights else vgg16_cache_path()
        if not path.is_file():
            missing["lpips"] = (f"LPIPS-VGG needs torchvision's VGG16 weights {VGG16_FILE}: not found at {path} "
                                f"(--lpips-weights, else torchvision's cache); get it from "
                                f"https://download.pytorch.org/models/{VGG16_FILE} and pass --lpips-weights PATH")
    if missing:
        keep = ",".join(m for m in metrics if m not in missing)
        drop = f"run without {'them' if len(missing) > 1 else 'it'}: --metrics {keep}" if keep else "give the weights"
        verb = "need weights that are" if len(missing) > 1 else "needs weights that are"
        raise FileNotFoundError(f"--metrics {','.join(metrics)}: {' and '.join(missing)} {verb} not on this machine; "
                                f"{drop}. " + " | ".join(f"{m}: {why}" for m, why in missing.items()))
    return metrics, extractor


def _build_extractor(args: argparse.Namespace, ev: EvalCfg):
    from ldm.eval.extractors import build_extractor

    kwargs = {"download": True} if ev.extractor == "inception" and args.download_inception else {}
    return build_extractor(ev.extractor, ev.inception_weights, **kwargs)


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

    ev, given = args.key_flags.resolve(args, args.config, base=EvalCfg())
    if ev.reference is None:
        raise ConfigError("no reference: give --ref (eval.reference) images or a statistics .npz")
    start = time.time()
    result = evaluate_samples(args.samples, ev.reference, extractor=_build_extractor(args, ev),
                              metrics=_metrics(args.metrics, GENERATION_METRICS), batch_size=ev.batch_size,
                              size=args.image_size, num_samples=ev.num_samples if "num_samples" in given else None,
                              ref_num=args.ref_num, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                              device=args.device, progress=not args.no_progress, fd_method=args.fd_method)
    return _report(args, result, {"samples": args.samples, "ref": ev.reference,
                                  "seconds": round(time.time() - start, 2)})


def cmd_rfid(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import _device, evaluate_reconstruction
    from ldm.tokenizers.export import load_tokenizer

    ev, _ = args.key_flags.resolve(args, args.config, base=EvalCfg())
    start = time.time()
    metrics, extractor = _paired_metrics(args, ev)
    device = _device(args.device)
    tok = load_tokenizer(args.tokenizer, use_ema=not args.no_ema, device=device)
    result = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), args.data, extractor=extractor,
                                     metrics=metrics, batch_size=ev.batch_size, size=args.image_size,
                                     num_images=args.num_images, lpips_weights=args.lpips_weights,
                                     cache_dir=args.cache_dir, use_cache=not args.no_cache, device=device,
                                     progress=not args.no_progress, fd_method=args.fd_method)
    return _report(args, result, {"tokenizer": args.tokenizer, "data": args.data,
                                  "seconds": round(time.time() - start, 2)})


def cmd_recon(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import evaluate_pairs

    ev, _ = args.key_flags.resolve(args, args.config, base=EvalCfg())
    start = time.time()
    metrics, extractor = _paired_metrics(args, ev)
    result = evaluate_pairs(args.recons, args.data, extractor=extractor, metrics=metrics, batch_size=ev.batch_size,
                            size=args.image_size, num_images=args.num_images, lpips_weights=args.lpips_weights,
                            cache_dir=args.cache_dir, use_cache=not args.no_cache, device=args.device,
                            progress=not args.no_progress, fd_method=args.fd_method)
    return _report(args, result, {"recons": args.recons, "data": args.data, "seconds": round(time.time() - start, 2)})


def cmd_stats(args: argparse.Namespace) -> int:
    from ldm.eval.evaluate import write_reference_stats
    from ldm.eval.features import dist_info

    ev, _ = args.key_flags.resolve(args, args.config, base=EvalCfg())
    path = write_reference_stats(args.data, args.out, extractor=_build_extractor(args, ev), batch_size=ev.batch_size,
                                 size=args.image_size, num=args.num_images, device=args.device,
                                 progress=not args.no_progress)
    if dist_info()[0] == 0:
        print(f"wrote {path}")
    return 0


def cmd_latents(args: argparse.Namespace) -> int:
    import torch

    from ldm.encoders import build_encoder
    from ldm.eval.latents import diagnose_tokenizer
    from ldm.tokenizers.export import load_tokenizer

    ev, _ = args.key_flags.resolve(args, args.config, base=EvalCfg())
    start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.num_images < 2:
        raise ValueError(f"--num-images={args.num_images}; expected at least 2")
    tok = load_tokenizer(args.tokenizer, use_ema=not args.no_ema, device=device)
    encoder = build_encoder(args.encoder, args.encoder_weights).to(device) if args.encoder else None
    res = diagnose_tokenizer(tok, args.data, image_size=args.image_size, num_images=args.num_images,
                             batch_size=ev.batch_size, encoder=encoder, encoder_name=args.encoder or "",
                             scales=args.scales, hf_cutoff=args.hf_cutoff, topk=args.topk,
                             max_tokens=args.max_tokens, seed=args.seed, device=device, out_dir=args.out,
                             progress=not args.no_progress)
    print(format_diagnostics(res))
    print(json.dumps({"seconds": round(time.time() - start, 2), **summary_numbers(res)}, sort_keys=True))
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    import torch

    from ldm.eval.prompts import score_prompted_samples
    from ldm.io import atomic_write_text

    ev, _ = args.key_flags.resolve(args, args.config, base=EvalCfg())
    start = time.time()
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scores = score_prompted_samples(args.samples, metrics=metrics, clip=args.clip, digits_weights=args.digits_weights,
                                    batch_size=ev.batch_size, device=device, progress=not args.no_progress)
    result = {"samples": args.samples, **({"clip": args.clip} if "clip_score" in scores else {}), **scores,
              "seconds": round(time.time() - start, 2)}
    out = Path(args.out) if args.out else Path(args.samples) / "prompt_scores.json"
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = []
    if "digits_accuracy" in scores:
        lines.append(f"  digits accuracy (classifier vs prompted digit) {scores['digits_accuracy']:.4f}  "
                     f"({scores['digits_num']} samples naming a digit; chance 0.1)")
    if "clip_score" in scores:
        lines.append(f"  CLIPScore (torchmetrics, weight 100)           {scores['clip_score']:.4f}  "
                     f"({scores['clip_num']} samples, CLIP {args.clip})")
    print("\n".join(lines))
    print(f"prompt scores of {args.samples} written to {out}")
    return 0


def summary_numbers(res: dict) -> dict:
    """The headline numbers of a diagnostics result, flat."""
    eq, sp = res["equivariance"], res["spectrum"]
    out = {"recon_rmse": eq["recon_rmse"], "latent_std_ratio": res["channels"]["std_ratio"],
           "hf_share_latent": sp["latent"]["hf_share"], "hf_share_image_at_latent": sp["image_at_latent"]["hf_share"],
           "hf_share_image": sp["image"]["hf_share"]}
    for group in ("rotation", "scale"):
        if f"{group}_mean" in eq:
            out[f"{group}_decoder_ratio"] = eq[f"{group}_mean"]["decoder_ratio"]
            out[f"{group}_latent_error"] = eq[f"{group}_mean"]["latent_error"]
    if "posterior" in res:
        out["kl_per_image"] = res["posterior"]["kl_per_image"]
    if "codebook" in res:
        out["codebook_usage"], out["codebook_perplexity"] = res["codebook"]["usage"], res["codebook"]["perplexity"]
    for key in ("linear_cka", "cknna"):
        if key in res["alignment"]:
            out[key] = res["alignment"][key]
    return out


def format_diagnostics(res: dict) -> str:
    tok, data = res["tokenizer"], res["data"]
    lines = [f"latent diagnostics of {tok['source'] or 'tokenizer'} ({tok['kind']}, f={tok['downsample']}, latents "
             f"{tuple(tok['latent_shape'])}) on {data['num_images']} images of {data['source']}"]
    ch = res["channels"]
    lines.append("  channel mean  " + " ".join(f"{v:+.3f}" for v in ch["mean"]))
    lines.append("  channel std   " + " ".join(f"{v:.3f}" for v in ch["std"]) + f"   (max/min {ch['std_ratio']:.2f})")
    for name, t in res["equivariance"]["transforms"].items():
        lines.append(f"  {name:<10} decoder ratio {t['decoder_ratio']:.3f}  decoder MSE {t['decoder_mse']:.4f}  "
                     f"latent error {t['latent_error']:.3f}")
    sp = res["spectrum"]
    lines.append(f"  HF share (> {sp['cutoff']:g} Nyquist): latent {sp['latent']['hf_share']:.3f}, image@latent "
                 f"{sp['image_at_latent']['hf_share']:.3f}, image {sp['image']['hf_share']:.3f}")
    if "posterior" in res:
        lines.append("  KL/element    " + " ".join(f"{v:.3f}" for v in res["posterior"]["kl_per_element"]) +
                     f"   (per image {res['posterior']['kl_per_image']:.1f} nats)")
    if "codebook" in res:
        cb = res["codebook"]
        lines.append(f"  codebook      {cb['codes_used']}/{cb['codebook_size']} codes used, perplexity "
                     f"{cb['perplexity']:.1f}")
    al = res["alignment"]
    lines.append(f"  alignment     {al['encoder']}: linear CKA {al['linear_cka']:.3f}, CKNNA {al['cknna']:.3f} "
                 f"(k={al['topk']}, {al['num_tokens']} positions)" if "cknna" in al else f"  alignment     "
                 f"skipped: {al['skipped']}")
    return "\n".join(lines)
