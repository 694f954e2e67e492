"""`ldm sample`: images from a trained generator as PNGs named by index, a grid and an ADM-layout .npz.

The work is ldm.eval.generate.write_samples. The run's `sample:` config section gives the defaults; `sample.<key>=value`
overrides (as for `ldm train`) and the short flags (`--steps`, `--cfg`, ...: aliases of the same keys) change them.
Runs sharded under `torchrun` / `accelerate launch` (one disjoint index range per process) and resumes by skipping
indices whose PNG exists. Bad input ends with one line naming the option or key and what is allowed; nothing is
written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ldm import names
from ldm.cli.common import add_command, add_progress_flag
from ldm.cli.keys import KeyFlags, split_config_args
from ldm.config import SampleCfg

SAMPLER_NAMES = tuple(sorted(names.SAMPLER_NAMES))  # the choices of sample.sampler, sorted for the help text

DESCRIPTION = """\
Sample images from a generator run (EMA weights by default), or from the generator of a joint
(stage end_to_end, REPA-E) run, decoded by that run's own tuned tokenizer.

  ldm sample runs/dit_s2 --num 64 --grid --out samples/look
  ldm sample runs/dit_s2 --num 50000 --cfg 1.5 --interval 0,0.7 --npz --out samples/fid50k
  ldm sample runs/dit_s2 sample.sampler=heun sample.steps=8 sample.cfg_scale=2.0   (the same keys as key=value)
  ldm sample runs/t2i --prompt "a handwritten digit seven" --prompts prompts.txt --cfg 4 -n 40 --grid
  ldm sample runs/emb --prompt-embeddings prompts.npy --cfg 4 -n 40 --grid   (a run on text.embeddings)
  torchrun --nproc_per_node 8 sample.py runs/dit_s2 -n 50000 --npz --out samples/fid50k
  accelerate launch --num_processes 8 sample.py runs/dit_s2 -n 50000 ...   (same, via accelerate)
  ldm sample --official dit --weights DiT-XL-2-256x256.pt --tokenizer sd-vae-ft-ema --cfg 1.5 \\
      --cfg-channels first3 -n 50000 --npz --out samples/dit_xl   (released weights)

Writes OUT/000000.png ... (image i from noise seeded by hash(seed, i): the same for any --batch and
process count, bit for bit on one device type and thread count), OUT/sample_config.yaml
(checkpoint, EMA, seed, sampler: everything that decides the images), and with --grid / --npz
OUT/grid.png and OUT/samples.npz (arr_0 uint8 NHWC, arr_1 int64 labels: the input of the ADM
evaluator and `ldm eval fid`). Re-running the same command resumes: indices whose PNG exists are
skipped. A folder holding samples of another configuration is refused. Keys left out (as flags or
key=value) take the run's `sample:` config values.

Time runs from t=1 (noise) to t=0 (data); --interval is given in that time."""

LABELS = """\
labels: sample i gets classes[i mod K] (cycle), classes[hash(seed, i) mod K] (random), or blocks of
ceil(num/K) consecutive samples per class (grid: one class per grid row). Text models: the K prompts
of --prompt / --prompts take the place of the classes (--cfg guides towards each prompt against the
null caption); without prompts they sample unconditionally. Runs trained on precomputed embeddings
(text.embeddings) take the K rows of --prompt-embeddings instead, each written beside its PNG as
"embedding:FILE#row".

config keys (set any as sample.<key>=value; [--flag] is its short alias; the defaults below are the schema's,
a run's own `sample:` values take their place):"""


def _interval(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pair of numbers like 0,0.7") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(values)} numbers; expected two: lo,hi")
    return values


def register(subparsers) -> None:
    p = add_command(subparsers, "sample", cmd_sample, description=DESCRIPTION,
                    help="sample a trained generator: PNGs by index, a grid, an ADM .npz (sharded, resumable)")
    p.add_argument("config", metavar="RUN_OR_CKPT", nargs="*",
                   help="generator or end_to_end run directory (uses its latest checkpoint) or a checkpoint "
                        "directory (left out with --official), then sample.<key>=value overrides")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: RUN/samples/<checkpoint>-<sampler><steps>-cfg<w>-seed<s>)")
    k = KeyFlags("sample", SampleCfg)
    k.add(p, "--num", "-n", "--num-samples", dest="num", field="num", type=int,
          help="number of images; under torchrun write -n or --num-samples (torchrun takes --num for its own "
               "--numa-binding)")
    p.add_argument("--classes", default="all", help="class ids to sample: 'all', a list '0,1,2' or a range '0-9'")
    p.add_argument("--label-order", default="cycle", choices=["cycle", "random", "grid"],
                   help="how sample indices map to classes (or prompts; see below)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text models: a prompt (repeat for several); they take the place of classes, and each PNG "
                        "gets its prompt beside it as NNNNNN.txt, the grid its grid.txt")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text models: a file of prompts, one per non-empty line (added after any --prompt)")
    p.add_argument("--prompt-embeddings", default=None, metavar="FILE",
                   help="models trained on precomputed embeddings (text.embeddings): a .npy / .npz with one "
                        "embedding per prompt, in the stacked formats text.embeddings takes ((N, D) pooled, (N, L, D) "
                        "per-token, .npz tokens / mask / pooled or PixArt's caption_feature / attention_mask); the "
                        "rows take the place of classes, each PNG gets 'embedding:FILE#row' beside it")
    k.add(p, "--seed", field="seed", type=int, help="global seed")
    g = p.add_argument_group("sampler (default: the run's sample.* values)")
    k.add(g, "--sampler", field="sampler", metavar="NAME", help=f"one of {', '.join(SAMPLER_NAMES)}")
    k.add(g, "--steps", field="steps", type=int, help="sampling steps (ddpm: respaced steps of the T of training)")
    k.add(g, "--cfg", dest="cfg_scale", field="cfg_scale", type=float, metavar="W",
          help="classifier-free guidance scale w (1 = off); needs a class-conditional model")
    k.add(g, "--interval", field="interval", type=_interval, metavar="LO,HI",
          help="guide only for t in [LO, HI] (t=0 data, t=1 noise); e.g. 0,0.7 is REPA's guidance-high 0.7")
    k.add(g, "--cfg-channels", field="cfg_channels", choices=["all", "first3"],
          help="guide every channel, or only channels 0-2 as DiT/SiT/LightningDiT do (to reproduce them)")
    k.add(g, "--time-grid", field="time_grid", choices=["uniform", "karras", "shifted"], help="time grid kind")
    k.add(g, "--shift", field="shift", type=float, help="time shift of --time-grid shifted (1 = none)")
    k.add(g, "--eta", field="eta", type=float, help="DDIM eta (0 = deterministic)")
    o = p.add_argument_group("output and speed")
    k.add(o, "--batch", field="batch_size", type=int, help="images per forward per process")
    k.add(o, "--precision", field="precision", choices=["auto", "fp32", "bf16"],
          help="network and decoder precision: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    o.add_argument("--decode-batch", type=int, default=8, help="latents per tokenizer decode call")
    o.add_argument("--grid", action="store_true", help="also write OUT/grid.png of the first --grid-size images")
    o.add_argument("--grid-size", type=int, default=64, help="images in the grid")
    o.add_argument("--npz", action="store_true", help="also write OUT/samples.npz (ADM layout) from all PNGs")
    k.add(o, "--no-ema", dest="use_ema", field="use_ema", action="store_false",
          help="use the raw weights instead of the EMA weights (default: EMA, whatever the run's sample.use_ema)")
    o.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer to decode with (default: the one recorded in the run; its fingerprint must match)")
    add_progress_flag(o)
    f = p.add_argument_group("official weights (instead of RUN_OR_CKPT)")
    f.add_argument("--official", default=None, choices=["dit", "sit", "lightningdit"],
                   help="sample a released DiT / SiT / LightningDiT checkpoint (with --weights and --tokenizer); "
                        "defaults follow its own sample script: dit ddpm 250, sit euler_maruyama 250, lightningdit "
                        "euler 250 (add --cfg-channels first3 to reproduce their guidance)")
    f.add_argument("--weights", default=None, metavar="FILE", help="the official .pt / .safetensors file")
    p.epilog = k.epilog(LABELS)
    p.set_defaults(key_flags=k)


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


def _load(args: argparse.Namespace, source: str | None, use_ema: bool, device):
    """The generator: a run / checkpoint directory, or official weights with --official."""
    from ldm.eval.generator import load_generator, load_official_generator

    if args.official is None:
        if source is None or args.weights is not None:
            raise ValueError("give a generator run directory (RUN_OR_CKPT), or --official KIND --weights FILE "
                             "--tokenizer FOLDER for released weights")
        return load_generator(source, use_ema=use_ema, device=device, tokenizer=args.tokenizer)
    if source is not None or args.weights is None:
        raise ValueError(f"--official {args.official} takes --weights FILE (and --tokenizer FOLDER) instead of "
                         f"RUN_OR_CKPT")
    if not use_ema:
        raise ValueError("--no-ema (sample.use_ema=false) does not apply to --official weights (released files hold "
                         "EMA weights only)")
    return load_official_generator(args.official, args.weights, tokenizer=args.tokenizer, device=device)


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt values, then the lines of --prompts FILE; None when neither is given."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: the file holds no prompt (one per non-empty line)")
    return prompts or None


def cmd_sample(args: argparse.Namespace) -> int:
    paths, overrides = split_config_args(args.config)
    if len(paths) > 1:
        raise ValueError(f"give one generator run or checkpoint directory; got {paths} (overrides are key=value)")
    # checked before anything loads (torch included): a typo fails at once; the values replace the run's own below
    requested, given = args.key_flags.resolve(args, overrides, base=SampleCfg())
    import torch
    from accelerate import Accelerator

    from ldm.eval.generate import write_samples
    from ldm.runs import setup_logging

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    setup_logging(None, accelerator.is_main_process)
    gen = _load(args, paths[0] if paths else None, requested.use_ema if "use_ema" in given else True,
                accelerator.device)
    sample_cfg = dataclasses.replace(gen.cfg.sample, **{key: getattr(requested, key) for key in given})
    out = Path(args.out) if args.out else default_out(gen.checkpoint, sample_cfg)
    result = write_samples(gen, out, num=sample_cfg.num, classes=args.classes, label_order=args.label_order,
                           sample_cfg=sample_cfg, batch_size=sample_cfg.batch_size, decode_batch=args.decode_batch,
                           grid=args.grid, grid_size=args.grid_size, npz=args.npz, progress=not args.no_progress,
                           prompts=_prompts(args), prompt_embeddings=args.prompt_embeddings)
    if accelerator.is_main_process:
        print(_summary(result, out, gen))
    return 0


def _summary(result: dict, out: Path, gen) -> str:
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
    return "\n".join(lines)
