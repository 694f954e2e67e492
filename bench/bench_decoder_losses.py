"""The cost of the objectives through the frozen decoder: a generator training step plain, with the latent perceptual
loss (LPL) and with the pixel-space loss, side by side in one process on the same network, batch and weights.

    python bench/bench_decoder_losses.py                    # preset "small" (an SD-VAE-shaped f8 decoder at half width)
    python bench/bench_decoder_losses.py --preset sdvae     # SD-VAE's decoder, 256 px, DiT-B/2 (a GPU's job)
    python bench/bench_decoder_losses.py --smoke            # tiny sizes, 2 timed steps: checks that every variant runs

Each variant is a GeneratorTask (ldm/train/generator_task.py) around the same randomly initialised DiT and tokenizer
(an AutoencoderKL of the preset's architecture; the cost does not depend on the weights), trained by a bare AdamW
loop on one fixed batch (latents, labels and images), so the differences are the terms alone:

  plain          the diffusion loss (flow matching, velocity)
  lpl            + LPL on every decoder feature block (mid + all up blocks, the default), outlier mask on
  lpl_ckpt       the same with diffusion.lpl.grad_checkpointing (each decoder block recomputed in the backward pass)
  lpl_2          + LPL on blocks 0-1 only: the decoder stops after its first up block
  pixel          + the pixel loss (a full decode of the estimate, image target)
  pixel_ckpt     the same with diffusion.pixel_loss.grad_checkpointing

--snr-min 0 (the default here) sends every sample through the decoder: the worst case. With the paper's SNR gate
(diffusion.lpl.snr_min = 3) only the samples at high SNR are decoded (on the linear path with uniform t, SNR >= 3
is t <= 0.37), so the LPL's average cost is that fraction of the table's.

Reported per variant: the median seconds per step over --steps timed steps (after --warmup), its ratio to plain, and
memory: on CUDA the peak allocated during the timed steps (torch.cuda.max_memory_allocated); on CPU the bytes of the
tensors autograd saves for the backward pass in one step (saved_tensors_hooks; the activation memory a step holds
at its peak, weights and optimizer state aside, which are the same for every variant).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESETS = {
    # name: tokenizer architecture, image size, DiT preset, batch
    "tiny": {"vae": {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8},
             "image": 32, "dit": "DiT-Pico/2", "batch": 8},
    "small": {"vae": {"block_out_channels": [64, 128, 128, 128], "layers_per_block": 2, "norm_num_groups": 32},
              "image": 128, "dit": "DiT-S/2", "batch": 16},
    "sdvae": {"vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32},
              "image": 256, "dit": "DiT-B/2", "batch": 32},
}
VARIANTS = {
    "plain": [],
    "lpl": ["diffusion.lpl.enabled=true"],
    "lpl_ckpt": ["diffusion.lpl.enabled=true", "diffusion.lpl.grad_checkpointing=true"],
    "lpl_2": ["diffusion.lpl.enabled=true", "diffusion.lpl.blocks=[0,1]"],
    "pixel": ["diffusion.pixel_loss.enabled=true"],
    "pixel_ckpt": ["diffusion.pixel_loss.enabled=true", "diffusion.pixel_loss.grad_checkpointing=true"],
}


def build_task(preset: dict, overrides: list[str], device: torch.device):
    from ldm.config import load_config
    from ldm.models import build_generator_model
    from ldm.tokenizers.export import Tokenizer
    from ldm.tokenizers.kl import build_autoencoder_kl
    from ldm.tokenizers.stats import LatentNormalizer
    from ldm.train.generator_task import GeneratorTask

    cfg = load_config(None, [f"model.preset={preset['dit']}", f"data.image_size={preset['image']}", *overrides])
    torch.manual_seed(0)
    vae = build_autoencoder_kl(latent_channels=4, sample_size=preset["image"], **preset["vae"])
    tok = Tokenizer(vae, scaling_factor=1.0, source="bench")
    side = preset["image"] // tok.downsample
    torch.manual_seed(1)
    model = build_generator_model(cfg.model, latent_channels=4, latent_size=side, num_classes=10)
    task = GeneratorTask(model, tok, LatentNormalizer("none", 4), diffusion=cfg.diffusion, learned_sigma=False,
                         num_classes=10, latent_shape=(4, side, side), sample=cfg.sample, eval_cfg=cfg.eval,
                         fid_reference=None, image_size=preset["image"])
    return task.to(device), side


def batch_for(preset: dict, side: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    b, size = preset["batch"], preset["image"]
    return {"latent": torch.randn(b, 4, side, side, generator=g).to(device),
            "label": torch.randint(0, 10, (b,), generator=g).to(device),
            "image": (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device)}


def saved_bytes(task, batch) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task(batch, step=0, phase="model").loss
    loss.backward()
    task.zero_grad(set_to_none=True)
    return sum(seen.values())


def time_variant(name: str, args, preset: dict, device: torch.device) -> dict:
    overrides = [*VARIANTS[name], f"diffusion.lpl.snr_min={args.snr_min}"]
    task, side = build_task(preset, overrides, device)
    batch = batch_for(preset, side, device)
    opt = torch.optim.AdamW(task.param_groups()["model"], lr=1e-4)
    times = []
    cuda = device.type == "cuda"
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
            if i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = task(batch, step=i, phase="model").loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else saved_bytes(task, batch) / 2**20
    del task, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"s_per_step": statistics.median(times), "mem_mb": mem}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="sizes (see PRESETS)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants to run (plain always runs, as the reference)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--snr-min", type=float, default=0.0,
                   help="diffusion.lpl.snr_min (0 = every sample through the decoder, the worst case)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--smoke", action="store_true", help="preset tiny, 1 warm-up and 2 timed steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.steps, args.warmup = "tiny", 2, 1
    preset, device = PRESETS[args.preset], torch.device(args.device)
    names = ["plain", *[v for v in args.variants if v != "plain"]]
    rows = {}
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="variants", disable=args.smoke):
        rows[name] = time_variant(name, args, preset, device)
    mem_label = "peak CUDA memory (MB)" if device.type == "cuda" else "saved activations (MB)"
    base = rows["plain"]
    print(f"\npreset {args.preset} ({preset['dit']}, {preset['image']} px, batch {preset['batch']}, decoder "
          f"{preset['vae']['block_out_channels']}), device {device}, median of {args.steps} steps, "
          f"snr_min {args.snr_min}\n")
    print(f"| variant | s / step | x plain | {mem_label} | x plain |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['s_per_step']:.4f} | {r['s_per_step'] / base['s_per_step']:.2f} | {r['mem_mb']:.1f} | "
              f"{r['mem_mb'] / base['mem_mb']:.2f} |")
    print(f"\ndone: {len(rows)} variants timed (command: python bench/bench_decoder_losses.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])})")


if __name__ == "__main__":
    main()
