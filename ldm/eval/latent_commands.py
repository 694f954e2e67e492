"""`ldm eval latents`: diagnostics of a tokenizer's latent space (ldm.eval.latents). `register_latents(sub)` adds it
to the `eval` sub-commands. Only argparse is imported at module level so `ldm --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
import time

DESCRIPTION = """\
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


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"scales {values} must lie in (0, 1)")
    return values


def register_latents(eval_subparsers) -> None:
    """Add `latents` to the sub-parsers of `ldm eval`."""
    p = eval_subparsers.add_parser("latents", formatter_class=_Formatter, help="latent-space diagnostics of a "
                                   "tokenizer (channel stats, equivariance, spectrum, KL / codebook, alignment)",
                                   description=DESCRIPTION)
    p.add_argument("--tokenizer", required=True, help="tokenizer run dir, checkpoint, export or diffusers VAE folder")
    p.add_argument("--data", required=True, help="images (folder, archive, .npz or 'digits')")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for latent_diagnostics.json / .png")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="ADM centre-crop every image to PX x PX; when omitted, images must share one size")
    p.add_argument("--num-images", type=int, default=512, help="use the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="frozen encoder for the alignment metrics: 'digits' (the committed digits classifier's conv "
                        "features) or a name of ldm.encoders.ENCODERS (e.g. dinov2_vitb14; local weights needed); "
                        "when omitted, alignment is skipped")
    p.add_argument("--encoder-weights", default=None, metavar="PATH", help="weights file of --encoder")
    p.add_argument("--scales", type=_floats, default=[0.5, 0.75], help="comma list of down-scaling factors")
    p.add_argument("--hf-cutoff", type=float, default=0.5, help="high-frequency cutoff as a fraction of Nyquist")
    p.add_argument("--topk", type=int, default=10, help="neighbours for CKNNA")
    p.add_argument("--max-tokens", type=int, default=2048, help="latent positions used for the alignment metrics")
    p.add_argument("--seed", type=int, default=0, help="seed of the alignment subsample")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    p.set_defaults(func=cmd_latents)


def cmd_latents(args: argparse.Namespace) -> int:
    import torch

    from ldm.encoders import build_encoder
    from ldm.eval.latents import diagnose_tokenizer
    from ldm.tokenizers.export import load_tokenizer

    start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.num_images < 2:
            raise ValueError(f"--num-images={args.num_images}; expected at least 2")
        tok = load_tokenizer(args.tokenizer, use_ema=not args.no_ema, device=device)
        encoder = build_encoder(args.encoder, args.encoder_weights).to(device) if args.encoder else None
        res = diagnose_tokenizer(tok, args.data, image_size=args.image_size, num_images=args.num_images,
                                 batch_size=args.batch_size, encoder=encoder, encoder_name=args.encoder or "",
                                 scales=args.scales, hf_cutoff=args.hf_cutoff, topk=args.topk,
                                 max_tokens=args.max_tokens, seed=args.seed, device=device, out_dir=args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"ldm eval latents: error: {err}", file=sys.stderr)
        return 2
    print(format_diagnostics(res))
    print(json.dumps({"seconds": round(time.time() - start, 2), **summary_numbers(res)}, sort_keys=True))
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
