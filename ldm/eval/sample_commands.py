"""`ldm sample`: images from a trained generator as PNGs named by index, a grid and an ADM-layout .npz.

`register(subparsers)` adds the command; the work is ldm.eval.generate.write_samples. Options override the run's
`sample:` config section. Runs sharded under `torchrun` / `accelerate launch` (one disjoint index range per process)
and resumes by skipping indices whose PNG exists. Bad input ends with one line naming the option and what is
allowed; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# the names of ldm.diffusion.samplers.SAMPLERS, kept here so `ldm --help` does not import torch
# (tests/test_sample.py checks that the two agree)
SAMPLER_NAMES = ("ddim", "ddpm", "dopri5", "dpm_solver++", "euler", "euler_maruyama", "heun")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None / False ones (those help texts say where the value comes from)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pair of numbers like 0,0.7") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(values)} numbers; expected two: lo,hi")
    return values


def register(subparsers) -> None:
    """Add `sample` to the top-level sub-parsers."""
    p = subparsers.add_parser(
        "sample", formatter_class=_Formatter,
        help="sample a trained generator: PNGs by index, a grid, an ADM .npz (sharded, resumable)",
        description="Sample images from a generator run (EMA weights by default).\n\n"
                    "  ldm sample runs/dit_s2 --num 64 --grid --out samples/look\n"
                    "  ldm sample runs/dit_s2 --num 50000 --cfg 1.5 --interval 0,0.7 --npz --out samples/fid50k\n"
                    "  torchrun --nproc_per_node 8 sample.py runs/dit_s2 -n 50000 --npz --out samples/fid50k\n"
                    "  accelerate launch --num_processes 8 sample.py runs/dit_s2 -n 50000 ...   (same, via accelerate)\n"
                    "  ldm sample --official dit --weights DiT-XL-2-256x256.pt --tokenizer sd-vae-ft-ema --cfg 1.5 \\\n"
                    "      --cfg-channels first3 -n 50000 --npz --out samples/dit_xl   (released weights)\n\n"
                    "Writes OUT/000000.png ... (image i from noise seeded by hash(seed, i): the same for any --batch and\n"
                    "process count, bit for bit on one device type and thread count), OUT/sample_config.yaml\n"
                    "(checkpoint, EMA, seed, sampler: everything that decides the images), and with --grid / --npz\n"
                    "OUT/grid.png and OUT/samples.npz (arr_0 uint8 NHWC, arr_1 int64 labels: the input of the ADM\n"
                    "evaluator and `ldm eval fid`). Re-running the same command resumes: indices whose PNG exists are\n"
                    "skipped. A folder holding samples of another configuration is refused. Options left out take\n"
                    "the run's `sample:` config values.\n\n"
                    "Time runs from t=1 (noise) to t=0 (data); --interval is given in that time.",
        epilog="labels: sample i gets classes[i mod K] (cycle), classes[hash(seed, i) mod K] (random), or blocks of\n"
               "ceil(num/K) consecutive samples per class (grid: one class per grid row).")
    p.add_argument("source", metavar="RUN_OR_CKPT", nargs="?", default=None,
                   help="generator run directory (uses its latest checkpoint) or a checkpoint directory; "
                        "left out with --official")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: RUN/samples/<checkpoint>-<sampler><steps>-cfg<w>-seed<s>)")
    p.add_argument("--num", "-n", "--num-samples", dest="num", type=int, default=None,
                   help="number of images (default: the run's sample.num); under torchrun write -n or --num-samples "
                        "(torchrun takes --num for its own --numa-binding)")
    p.add_argument("--classes", default="all", help="class ids to sample: 'all', a list '0,1,2' or a range '0-9'")
    p.add_argument("--label-order", default="cycle", choices=["cycle", "random", "grid"],
                   help="how sample indices map to classes (see below)")
    p.add_argument("--seed", type=int, default=None, help="global seed (default: the run's sample.seed)")
    g = p.add_argument_group("sampler (default: the run's sample.* values)")
    g.add_argument("--sampler", default=None, metavar="NAME", help=f"one of {', '.join(SAMPLER_NAMES)}")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (ddpm: respaced steps of the T of training)")
    g.add_argument("--cfg", dest="cfg_scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale w (1 = off); needs a class-conditional model")
    g.add_argument("--interval", type=_floats, default=None, metavar="LO,HI",
                   help="guide only for t in [LO, HI] (t=0 data, t=1 noise); e.g. 0,0.7 is REPA's guidance-high 0.7")
    g.add_argument("--cfg-channels", default=None, choices=["all", "first3"],
                   help="guide every channel, or only channels 0-2 as DiT/SiT/LightningDiT do (to reproduce them)")
    g.add_argument("--time-grid", default=None, choices=["uniform", "karras", "shifted"], help="time grid kind")
    g.add_argument("--shift", type=float, default=None, help="time shift of --time-grid shifted (1 = none)")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    o = p.add_argument_group("output and speed")
    o.add_argument("--batch", type=int, default=None, help="images per forward per process (default: sample.batch_size)")
    o.add_argument("--decode-batch", type=int, default=8, help="latents per tokenizer decode call")
    o.add_argument("--grid", action="store_true", help="also write OUT/grid.png of the first --grid-size images")
    o.add_argument("--grid-size", type=int, default=64, help="images in the grid")
    o.add_argument("--npz", action="store_true", help="also write OUT/samples.npz (ADM layout) from all PNGs")
    o.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    o.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer to decode with (default: the one recorded in the run; its fingerprint must match)")
    o.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    f = p.add_argument_group("official weights (instead of RUN_OR_CKPT)")
    f.add_argument("--official", default=None, choices=["dit", "sit", "lightningdit"],
                   help="sample a released DiT / SiT / LightningDiT checkpoint (with --weights and --tokenizer); "
                        "defaults follow its own sample script: dit ddpm 250, sit euler_maruyama 250, lightningdit "
                        "euler 250 (add --cfg-channels first3 to reproduce their guidance)")
    f.add_argument("--weights", default=None, metavar="FILE", help="the official .pt / .safetensors file")
    p.set_defaults(func=cmd_sample)


def default_out(checkpoint: Path, sample_cfg) -> Path:
    """RUN/samples/<step dir>-<sampler><steps>-cfg<w>-seed<s> for a checkpoint RUN/checkpoints/<step dir>;
    samples/<file stem>-... in the current folder for an official weights file."""
    checkpoint = Path(checkpoint)
    s = sample_cfg
    tail = f"{s.sampler}{s.steps}-cfg{s.cfg_scale:g}-seed{s.seed}"
    if checkpoint.is_file():
        return Path("samples") / f"{checkpoint.stem}-{tail}"
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / "samples" / f"{checkpoint.name}-{tail}"


def _load(args: argparse.Namespace, device):
    """The generator: a run / checkpoint directory, or official weights with --official."""
    if args.official is None:
        if args.source is None or args.weights is not None:
            raise ValueError("give a generator run directory (RUN_OR_CKPT), or --official KIND --weights FILE "
                             "--tokenizer FOLDER for released weights")
        from ldm.train.generator_task import load_generator

        return load_generator(args.source, use_ema=not args.no_ema, device=device, tokenizer=args.tokenizer)
    if args.source is not None or args.weights is None:
        raise ValueError(f"--official {args.official} takes --weights FILE (and --tokenizer FOLDER) instead of "
                         f"RUN_OR_CKPT")
    if args.no_ema:
        raise ValueError("--no-ema does not apply to --official weights (released files hold EMA weights only)")
    from ldm.eval.generate import load_official_generator

    return load_official_generator(args.official, args.weights, tokenizer=args.tokenizer, device=device)


def cmd_sample(args: argparse.Namespace) -> int:
    try:
        return _sample(args)
    except (ValueError, FileExistsError) as err:  # bad input: one line, no traceback (nothing was written)
        print(f"ldm sample: error: {err}", file=sys.stderr)
        return 2


def _sample(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from ldm.eval.generate import write_samples
    from ldm.runs import setup_logging

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    setup_logging(None, accelerator.is_main_process)
    gen = _load(args, accelerator.device)
    options = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale, "interval": args.interval,
               "cfg_channels": args.cfg_channels, "time_grid": args.time_grid, "shift": args.shift, "eta": args.eta,
               "seed": args.seed}
    sample_cfg = dataclasses.replace(gen.cfg.sample, **{k: v for k, v in options.items() if v is not None})
    out = Path(args.out) if args.out else default_out(gen.checkpoint, sample_cfg)
    result = write_samples(gen, out, num=args.num or sample_cfg.num, classes=args.classes,
                           label_order=args.label_order, sample_cfg=sample_cfg, batch_size=args.batch,
                           decode_batch=args.decode_batch, grid=args.grid, grid_size=args.grid_size, npz=args.npz,
                           progress=not args.no_progress)
    if accelerator.is_main_process:
        n = result["num"]
        rate = (f"{result['images_per_s']:.2f} images/s on {result['processes']} process(es)"
                if result["images_per_s"] else "nothing to do")
        lines = [f"\nsampled {result['written']} new images ({result['skipped']} already there) in "
                 f"{result['seconds']:.1f} s: {rate}",
                 f"  images : {out}/{0:06d}.png .. {n - 1:06d}.png ({n}, {'EMA' if gen.used_ema else 'raw'} weights "
                 f"of {gen.checkpoint})"]
        if result["grid"]:
            lines.append(f"  grid   : {result['grid']}")
        if result["npz"]:
            lines.append(f"  npz    : {result['npz']}  (ldm eval fid --samples {result['npz']} --ref ...)")
        lines.append(f"  config : {result['config']}")
        print("\n".join(lines))
    return 0
