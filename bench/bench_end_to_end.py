"""Step time and memory of REPA-E's joint step against the two separate stages it replaces, side by side in one
process on the same networks, batch and weights.

    python bench/bench_end_to_end.py                    # preset "tiny" (32 px, f4 KL tokenizer, DiT-Pico/2)
    python bench/bench_end_to_end.py --preset small     # 128 px, an SD-VAE-shaped f8 tokenizer at half width, DiT-S/2
    python bench/bench_end_to_end.py --smoke            # 2 timed steps: checks that every variant runs

Variants, each trained by a bare AdamW loop (one optimizer per phase, gradients clipped to norm 1) on one fixed batch:

  tokenizer   stage tokenizer (ldm/train/tokenizer_task.py): the autoencoder's step + the discriminator's
  generator   stage generator (ldm/train/generator_task.py) with REPA on a frozen copy of the tokenizer (latents
              encoded on the fly, as REPA needs the images)
  separate    tokenizer + generator: one step of each stage
  joint       stage end_to_end (ldm/train/end_to_end_task.py): tokenizer (+ alignment through the frozen generator),
              discriminator, generator on the detached latents

The alignment encoder is the shipped digits trunk (offline) and LPIPS is off in every variant (its VGG16 is not
shipped; it would add the same cost to tokenizer, separate and joint). Reported: the median seconds per step over
--steps timed steps (after --warmup) and its ratio to `separate`, and memory: on CUDA the peak allocated during the
timed steps; on CPU the largest number of bytes autograd saves for one backward pass in a step (saved_tensors_hooks:
the activation memory of the heaviest phase; weights and optimizer states are the same networks in every variant).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESETS = {
    # name: tokenizer architecture, image size, DiT preset, REPA block, batch
    "tiny": {"vae": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
             "image": 32, "dit": "DiT-Pico/2", "depth": 1, "batch": 8},
    "small": {"vae": {"block_out_channels": [64, 128, 128, 128], "layers_per_block": 2, "norm_num_groups": 32},
              "image": 128, "dit": "DiT-S/2", "depth": 4, "batch": 16},
}


def build(preset: dict):
    """The three tasks around the same initial weights: {name: (task, phases)}."""
    from ldm.config import DiffusionCfg, EvalCfg, SampleCfg, TokenizerCfg
    from ldm.config.schema import E2eCfg
    from ldm.diffusion.repa import build_projector
    from ldm.encoders import build_encoder
    from ldm.models import build_generator_model
    from ldm.models.latent_bn import LatentBatchNorm
    from ldm.tokenizers.discriminator import NLayerDiscriminator
    from ldm.tokenizers.export import Tokenizer
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.tokenizers.stats import LatentNormalizer
    from ldm.train.end_to_end_task import EndToEndTask, LatentGenerator
    from ldm.train.generator_task import GeneratorTask
    from ldm.train.tokenizer_task import TokenizerTask

    torch.manual_seed(0)
    tok_cfg = TokenizerCfg(perceptual_weight=0.0, disc_weight=0.1, disc_adaptive=False, disc_start=0, disc_layers=2)
    d = DiffusionCfg(repa=True, repa_encoder="digits", repa_depth=preset["depth"], repa_proj_dim=256)
    vae = build_autoencoder_kl(latent_channels=4, mid_block_attention=False, **preset["vae"])
    f = 2 ** (len(preset["vae"]["block_out_channels"]) - 1)
    latent = (4, preset["image"] // f, preset["image"] // f)
    from ldm.config import ModelCfg

    net = build_generator_model(ModelCfg(preset=preset["dit"]), latent_channels=4, latent_size=latent[1],
                                num_classes=10, repa_depth=d.repa_depth)
    encoder = build_encoder("digits")
    projector = build_projector(net.hidden_size, encoder.feature_dim, hidden_dim=d.repa_proj_dim)
    disc = NLayerDiscriminator(layers=tok_cfg.disc_layers)
    tokenizer = TokenizerTask(tok_cfg, autoencoder=copy.deepcopy(vae), discriminator=copy.deepcopy(disc), lpips=None)
    generator = GeneratorTask(copy.deepcopy(net), Tokenizer(copy.deepcopy(vae)), LatentNormalizer("channel", 4),
                              diffusion=d, learned_sigma=False, num_classes=10, latent_shape=latent,
                              sample=SampleCfg(), eval_cfg=EvalCfg(), fid_reference=None, image_size=preset["image"],
                              projector=copy.deepcopy(projector), encoder=encoder)
    joint = EndToEndTask(autoencoder=copy.deepcopy(vae), discriminator=copy.deepcopy(disc),
                         generator=LatentGenerator(copy.deepcopy(net), LatentBatchNorm(4)),
                         projector=copy.deepcopy(projector), encoder=encoder, lpips=None, tokenizer_cfg=tok_cfg,
                         e2e=E2eCfg(), diffusion=d, num_classes=10, latent_shape=latent)
    return {"tokenizer": [tokenizer], "generator": [generator], "separate": [tokenizer, generator], "joint": [joint]}


def optimizers(tasks) -> dict:
    opts = {}
    for task in tasks:
        for phase, params in task.param_groups().items():
            opts[(id(task), phase)] = torch.optim.AdamW(params, lr=1e-4)
    return opts


def one_step(tasks, opts, batch, step: int) -> int:
    """Every phase of every task; returns the most bytes saved for one backward pass."""
    peak = 0
    for task in tasks:
        for phase, params in task.param_groups().items():
            saved = [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = task(batch, step=step, phase=phase, micro=0)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt = opts[(id(task), phase)]
            opt.step()
            opt.zero_grad(set_to_none=True)
            peak = max(peak, saved[0])
    return peak


def run(preset_name: str, steps: int, warmup: int) -> list[dict]:
    preset = PRESETS[preset_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = build(preset)
    for tasks in variants.values():
        for task in tasks:
            task.to(device)
    g = torch.Generator().manual_seed(0)
    n, s = preset["batch"], preset["image"]
    batch = {"image": (torch.rand(n, 3, s, s, generator=g) * 2 - 1).to(device),
             "label": (torch.arange(n) % 10).to(device), "sample_seed": torch.arange(n, dtype=torch.int64)}
    rows = []
    for name, tasks in variants.items():
        opts = optimizers(tasks)
        for i in range(warmup):
            one_step(tasks, opts, batch, i)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times, peak = [], 0
        for i in range(steps):
            start = time.perf_counter()
            peak = max(peak, one_step(tasks, opts, batch, warmup + i))
            times.append(time.perf_counter() - start)
        mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak
        rows.append({"variant": name, "s_per_step": statistics.median(times), "memory_mb": mem / 2**20})
    base = next(r for r in rows if r["variant"] == "separate")
    for r in rows:
        r["vs_separate"] = r["s_per_step"] / base["s_per_step"]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="network and image sizes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--smoke", action="store_true", help="2 timed steps, 1 warm-up: checks that every variant runs")
    args = p.parse_args(argv)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(args.preset, steps, warmup)
    what = "peak allocated" if device == "cuda" else "autograd-saved bytes, heaviest phase"
    print(f"preset {args.preset} on {device} ({torch.get_num_threads()} threads), median of {steps} steps; memory = "
          f"{what}\n")
    print("| variant | s / step | vs separate | memory (MB) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['s_per_step']:.3f} | {r['vs_separate']:.2f} | {r['memory_mb']:.1f} |")


if __name__ == "__main__":
    main()
