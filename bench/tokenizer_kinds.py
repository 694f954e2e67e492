"""Tokenizer kinds side by side on the digits: for each tokenizer preset, train it at one fixed step budget with the
normal training code (`ldm.train.loop.fit`, what `ldm train PRESET` runs), then measure

  params      encoder side (everything but the decoder and its input projection) and decoder side, in millions
  PSNR        of the EMA tokenizer's reconstructions (deterministic encode: posterior mean / quantised codes) of the
              first --recon-images digits, in dB (images in [0, 255] after uint8 quantisation, ldm.eval.evaluate)
  rFD_digits  Frechet distance of those reconstructions to the digits in the digits classifier's feature space
  step time   seconds per optimizer step (gen + disc phase), train.batch_size / the loop's own train/images_per_s,
              averaged over the logged windows after the first (which holds start-up)
  gFD_digits  with --gfd: a DiT (configs/generator/dit_ti2_digits.yaml) trained on each latent space for
              --generator-steps steps, one run per --seeds entry, then gFD_digits of --num-samples class-balanced EMA
              samples (the same per-index noise for every run); the table gives the mean and [min, max] over seeds

  photos      with --photos DIR: a second run of each preset, same steps and seed, on random --photo-size crops of
              every photo in DIR but the held-out one (--photo-holdout, default the first in sorted order), batch
              --photo-batch; PSNR and SSIM of the EMA tokenizer on the non-overlapping --photo-size tiles of the
              held-out photo (e.g. ../shared/images: astronaut.png held out, 64 tiles of 64 px)

and write a markdown table (--out) plus every number as JSON beside it. Presets are paths, so any kind's preset can
join (e.g. configs/tokenizer/tiny_f4.yaml tiny_vq_f4.yaml tiny_fsq_f4.yaml tiny_sigma_f4.yaml and the LiteVAE / DC-AE
ones). Each preset keeps its own architecture, losses and optimiser; only the data (digits), the step budget, the
run folder and the seed are set here, so "fixed step budget" means equal optimizer steps, not equal compute. One
more: the tokenizer's EMA decays with the TF warm-up rule over the whole budget (train.ema_warmup_steps = --steps,
min(decay, (1 + s) / (10 + s))), because the EMA is what is measured and what the generators encode with, and a
preset's decay of 0.999 from step 0 leaves 0.999^300 = 74 % of the initial weights in it after 300 steps (DC-AE,
whose BatchNorm statistics are copied from the live weights, then reconstructs the digits at 9.5 dB PSNR).

    python bench/tokenizer_kinds.py --steps 1500 --gfd --seeds 0,1,2          # the comparison (CPU: hours)
    python bench/tokenizer_kinds.py --steps 300 --photos ../shared/images     # + reconstruction of held-out photos
    python bench/tokenizer_kinds.py --smoke                                   # a few steps of everything (minutes)
    python bench/tokenizer_kinds.py --presets configs/tokenizer/tiny_f4.yaml configs/tokenizer/tiny_fsq_f4.yaml

Re-running reuses finished tokenizer and generator runs found under --run-root (the loop's skip-done resume) and each
generator's gFD_digits (gfd_digits.json in its run folder, for the same step and sample count), so a table over more
presets can be assembled from runs made by several invocations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_PRESETS = [f"configs/tokenizer/{name}.yaml" for name in ("tiny_f4", "tiny_sigma_f4", "tiny_litevae_f4",
                                                                   "tiny_vq_f4", "tiny_fsq_f4", "tiny_dc_f8")]
GENERATOR_CONFIG = REPO / "configs" / "generator" / "dit_ti2_digits.yaml"
SMOKE = {"steps": 3, "generator_steps": 2, "recon_images": 64, "num_samples": 20, "stats_images": 64,
         "batch_size": 8, "seeds": "0"}


def _sample_gfd():
    """bench/replication/run.py's `sample_gfd` (EMA samples of a generator checkpoint -> gFD_digits), loaded by path:
    bench/ is scripts, not a package."""
    spec = importlib.util.spec_from_file_location("replication_run", REPO / "bench" / "replication" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample_gfd


def parameter_counts(model) -> tuple[int, int]:
    """(encoder side, decoder side): the decoder side is `decoder` and the projection into it (`post_quant_conv`)
    where the kind has one; everything else (encoder, quant_conv, a VQ codebook) is the encoder side."""
    decoder = {id(p) for name in ("decoder", "post_quant_conv") if getattr(model, name, None) is not None
               for p in getattr(model, name).parameters()}
    params = list(model.parameters())
    dec = sum(p.numel() for p in params if id(p) in decoder)
    return sum(p.numel() for p in params) - dec, dec


def step_seconds(run_dir: Path, batch_size: int) -> float:
    """Seconds per optimizer step from the loop's train/images_per_s (logged windows after the first)."""
    rates = [r["train/images_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/images_per_s" in r]
    rates = rates[1:] or rates
    return batch_size / float(np.mean(rates)) if rates else float("nan")


def train_tokenizer(preset: Path, args, root: Path, data: list[str] | None = None, name: str | None = None):
    """Train `preset` for args.steps on the digits (or with the `data` overrides instead) as run `name` under root."""
    from ldm.config import load_config
    from ldm.tokenizers.stats import compute_tokenizer_stats
    from ldm.train.loop import fit

    overrides = [f"name={name or preset.stem}", f"train.run_root={root}", *(data or ["data.source=digits"]),
                 f"train.max_steps={args.steps}", f"train.ckpt_every={args.steps}", f"train.sample_every={args.steps}",
                 f"train.log_every={max(1, min(50, args.steps // 2))}", f"train.ema_warmup_steps={args.steps}",
                 f"seed={args.tokenizer_seed}", *args.set]
    if args.batch_size and data is None:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(preset, overrides)
    if cfg.stage != "tokenizer":
        raise ValueError(f"{preset}: stage={cfg.stage!r}, not a tokenizer preset")
    fit(cfg, progress=args.progress)
    if data is None and not (cfg.run_dir / "latent_stats.json").is_file():
        compute_tokenizer_stats(cfg.run_dir, cfg.data, num_images=args.stats_images)
    return cfg


def photo_split(photos: Path, holdout: str | None, size: int, root: Path) -> tuple[Path, Path, str]:
    """(a folder linking every photo in `photos` but the held-out one, an npz of the held-out photo's non-overlapping
    size x size tiles, its file name)."""
    from PIL import Image

    files = sorted(f for f in photos.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    names = [f.name for f in files]
    holdout = holdout or (names[0] if names else None)
    if holdout not in names or len(names) < 2:
        raise FileNotFoundError(f"--photos {str(photos)!r}: needs at least 2 photos including the held-out "
                                f"{holdout!r} (found {names})")
    train = root / "photos_train"
    train.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.name != holdout and not (train / f.name).exists():
            (train / f.name).symlink_to(f.resolve())
    img = np.asarray(Image.open(photos / holdout).convert("RGB"))  # (H, W, 3) uint8
    rows, cols = img.shape[0] // size, img.shape[1] // size
    tiles = img[:rows * size, :cols * size].reshape(rows, size, cols, size, 3).swapaxes(1, 2).reshape(-1, size, size, 3)
    held = root / f"photos_heldout_{size}.npz"
    np.savez(held, arr_0=np.ascontiguousarray(tiles))
    return train, held, holdout


def measure_photos(preset: Path, args, root: Path, split: tuple[Path, Path, str]) -> dict:
    """PSNR / SSIM on the held-out photo's tiles of `preset` trained on crops of the other photos."""
    from ldm.eval.evaluate import evaluate_reconstruction
    from ldm.tokenizers.export import load_tokenizer

    train, held, holdout = split
    data = [f"data.source={train}", f"data.image_size={args.photo_size}", "data.crop=random",
            f"data.crops_per_image={args.photo_batch}", f"train.batch_size={args.photo_batch}"]
    cfg = train_tokenizer(preset, args, root, data=data, name=f"{preset.stem}_photos")
    tok = load_tokenizer(cfg.run_dir)
    recon = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), str(held), metrics=("psnr", "ssim"),
                                    size=args.photo_size, progress=False)
    return {"psnr": recon["psnr"], "ssim": recon["ssim"], "tiles": recon["num_images"], "holdout": holdout,
            "run": str(cfg.run_dir)}


def measure_tokenizer(cfg, args, cache_dir: Path) -> dict:
    from ldm.eval.evaluate import evaluate_reconstruction
    from ldm.tokenizers.export import load_tokenizer

    tok = load_tokenizer(cfg.run_dir)
    enc, dec = parameter_counts(tok.model)
    recon = evaluate_reconstruction(lambda x: tok.decode(tok.encode(x)), "digits", extractor="digits",
                                    metrics=("rfd", "psnr"), size=cfg.data.image_size, num_images=args.recon_images,
                                    cache_dir=cache_dir, progress=False)
    return {"kind": tok.kind, "sigma_vae": bool(cfg.tokenizer.sigma_vae.enabled), "downsample": tok.downsample,
            "latent_channels": tok.latent_channels, "encoder_params": enc, "decoder_params": dec,
            "psnr": recon["psnr"], "rfd_digits": recon["rfd_digits"],
            "step_s": step_seconds(cfg.run_dir, cfg.train.batch_size), "steps": cfg.train.max_steps,
            "batch_size": cfg.train.batch_size, "run": str(cfg.run_dir)}


def measure_generators(tok_cfg, args, root: Path, cache_dir: Path) -> dict:
    """gFD_digits per seed of a DiT trained on the latents of the tokenizer run `tok_cfg.run_dir`."""
    from ldm.config import load_config
    from ldm.train.loop import TrainingDiverged, fit

    sample_gfd = _sample_gfd()
    out: dict = {"seeds": [], "gfd_digits": [], "failed": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        overrides = [f"name={tok_cfg.name}_dit_s{seed}", f"train.run_root={root}",
                     f"tokenizer.checkpoint={tok_cfg.run_dir}", f"seed={seed}",
                     f"train.max_steps={args.generator_steps}", f"train.ckpt_every={args.generator_steps}",
                     f"train.sample_every={args.generator_steps}", *args.generator_set]
        if args.batch_size:
            overrides.append(f"train.batch_size={args.batch_size}")
        cfg = load_config(GENERATOR_CONFIG, overrides)
        try:
            fit(cfg, progress=args.progress)
        except (TrainingDiverged, ValueError) as err:  # e.g. a latent channel of std 0 under latent_norm=channel
            out["failed"][seed] = str(err).splitlines()[0]
            continue
        record = cfg.run_dir / "gfd_digits.json"  # a re-run reuses the score of the same checkpoint and sample count
        done = json.loads(record.read_text()) if record.is_file() else {}
        if done.get("step") == args.generator_steps and done.get("num_samples") == args.num_samples:
            fd = done["gfd_digits"]
        else:
            ckpt = cfg.run_dir / "checkpoints" / f"step_{args.generator_steps:07d}"
            fd, _ = sample_gfd(ckpt, cfg.run_dir / "gfd_samples", {"num_samples": args.num_samples,
                                                                    "inception": "off"}, cache_dir, 0, None)
            record.write_text(json.dumps({"step": args.generator_steps, "num_samples": args.num_samples,
                                          "gfd_digits": fd}) + "\n")
        out["seeds"].append(seed)
        out["gfd_digits"].append(fd)
    return out


def markdown(rows: list[dict], args) -> str:
    gfd = any("generator" in r for r in rows)
    head = ["preset", "kind", "latent", "enc params [M]", "dec params [M]", "PSNR [dB]", "rFD_digits", "step [s]"]
    photos = any("photos" in r for r in rows)
    if photos:
        head += ["photos PSNR [dB]", "photos SSIM"]
    if gfd:
        head.append(f"gFD_digits @{args.generator_steps} (mean [min, max] over seeds)")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        kind = r["kind"] + (" (sigma-VAE)" if r["sigma_vae"] else "")
        h = r.get("image_size", 32) // r["downsample"]
        cells = [r["preset"], kind, f"{r['latent_channels']}x{h}x{h}", f"{r['encoder_params'] / 1e6:.3f}",
                 f"{r['decoder_params'] / 1e6:.3f}", f"{r['psnr']:.2f}", f"{r['rfd_digits']:.2f}", f"{r['step_s']:.3f}"]
        if photos:
            ph = r.get("photos")
            cells += [f"{ph['psnr']:.2f}", f"{ph['ssim']:.3f}"] if ph else ["-", "-"]
        if gfd:
            g = r.get("generator", {})
            vals = g.get("gfd_digits", [])
            cell = (f"{np.mean(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}] (n={len(vals)})" if vals else "-")
            if g.get("failed"):
                cell += f"; failed seeds {sorted(g['failed'])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    budget = (f"{args.steps} tokenizer steps" + (f", {args.generator_steps} DiT-Ti/2 steps, {args.num_samples} samples"
                                                 if gfd else ""))
    text = f"\n\nDigits, {budget}, reconstructions of the first {args.recon_images} digits."
    if photos:
        ph = next(r["photos"] for r in rows if "photos" in r)
        text += (f" Photos: {args.steps} steps at batch {args.photo_batch} on random {args.photo_size}-px crops of the "
                 f"other photos, scored on the {ph['tiles']} tiles of {ph['holdout']}.")
    return "\n".join(lines) + text + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="tokenizer preset YAML paths")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per tokenizer (the fixed budget)")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size for every run (default: the "
                                                                 "presets' own)")
    p.add_argument("--recon-images", type=int, default=1797, help="digits reconstructed for PSNR / rFD_digits")
    p.add_argument("--stats-images", type=int, default=1024, help="images for the latent statistics")
    p.add_argument("--tokenizer-seed", type=int, default=0, help="seed of every tokenizer run")
    p.add_argument("--gfd", action="store_true", help="also train a DiT per tokenizer and seed and report gFD_digits")
    p.add_argument("--seeds", default="0,1,2", help="generator seeds (with --gfd)")
    p.add_argument("--generator-steps", type=int, default=1200, help="DiT training steps (with --gfd)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per gFD_digits (with --gfd)")
    p.add_argument("--photos", default=None, help="a folder of photos: also train each preset on crops of all but one "
                                                  "and report PSNR / SSIM on the held-out one's tiles")
    p.add_argument("--photo-holdout", default=None, help="file name of the held-out photo (default: the first in "
                                                         "sorted order)")
    p.add_argument("--photo-size", type=int, default=64, help="crop and tile side for --photos")
    p.add_argument("--photo-batch", type=int, default=8, help="train.batch_size (and crops per photo per epoch) for "
                                                              "--photos")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every tokenizer run")
    p.add_argument("--generator-set", nargs="*", default=[], help="extra key=value overrides for every DiT run")
    p.add_argument("--run-root", default="runs/tokenizer_kinds", help="where the runs go")
    p.add_argument("--out", default=None, help="markdown table path (default: <run-root>/table.md)")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything at small sizes (checks the "
                                                         "machinery; the numbers mean nothing)")
    p.add_argument("--progress", action="store_true", help="progress bars of the training runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.generator_steps = SMOKE["steps"], SMOKE["generator_steps"]
        args.recon_images, args.num_samples = SMOKE["recon_images"], SMOKE["num_samples"]
        args.stats_images, args.batch_size, args.seeds = SMOKE["stats_images"], SMOKE["batch_size"], SMOKE["seeds"]
        args.gfd = True
    root = Path(args.run_root) / ("smoke" if args.smoke else f"steps{args.steps}")
    cache_dir = root / "stats_cache"
    split = photo_split(Path(args.photos), args.photo_holdout, args.photo_size, root) if args.photos else None
    rows = []
    for preset in args.presets:
        preset = Path(preset) if Path(preset).is_absolute() else REPO / preset
        if not preset.is_file():
            raise FileNotFoundError(f"tokenizer preset {str(preset)!r} does not exist")
        cfg = train_tokenizer(preset, args, root)
        row = {"preset": preset.stem, "image_size": cfg.data.image_size, **measure_tokenizer(cfg, args, cache_dir)}
        if split:
            row["photos"] = measure_photos(preset, args, root, split)
        if args.gfd:
            row["generator"] = measure_generators(cfg, args, root, cache_dir)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
    table = markdown(rows, args)
    out = Path(args.out) if args.out else root / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")
    print(table)
    print(f"table: {out}\nnumbers: {out.with_suffix('.json')}")
    return 0 if all(math.isfinite(r["psnr"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
