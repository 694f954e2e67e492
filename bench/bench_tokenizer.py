"""Tokenizer benchmark: one training step (gen + disc phase: L1 + LPIPS + PatchGAN with adaptive weight + EQ-VAE) and
encode/decode throughput, for the tiny and SD-VAE f8c4 presets.

    python bench/bench_tokenizer.py                      # CPU fp32, batch 8, 64x64
    python bench/bench_tokenizer.py --device cuda --bf16  # GPU, bf16 autocast

Each preset runs in its own process so peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth over the
process after imports) is per preset. Side-by-side ratios in the same process: the training step with EQ-VAE vs
without (the EQ draws alternate modes, so both are averaged over the same number of steps), and our frozen `Tokenizer`
encode/decode vs diffusers' own `AutoencoderKL.encode(...).latent_dist.mean` / `.decode(...).sample` on the same
weights. LPIPS uses a random VGG backbone (same cost as the real one; values meaningless, timing only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {"tiny_f4": "configs/tokenizer/tiny_f4.yaml", "sd_f8c4": "configs/tokenizer/sd_f8c4.yaml"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps: int, sync) -> float:
    fn()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def run_preset(name: str, args: dict, out) -> None:
    import torch

    from ldm.config import load_config
    from ldm.tokenizers.export import Tokenizer
    from ldm.train.tokenizer_task import build_tokenizer_task

    torch.manual_seed(0)
    dev = torch.device(args["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rss0 = _rss_mb()
    res = {}
    for eq in (True, False):
        cfg = load_config(PRESETS[name], [
            # the inputs are random tensors; digits only satisfies the preset's data source (ImageNet for SD-VAE)
            "data.source=digits", f"data.image_size={args['size']}", "tokenizer.perceptual_weight=1.0",
            "tokenizer.lpips_random_backbone=true",
            "tokenizer.disc_start=0", f"tokenizer.eq.enabled={str(eq).lower()}",
            "tokenizer.eq.scale_num_min=12", "train.run_root=/tmp/ldm_bench_runs", f"name=bench_{name}"])
        task, _ = build_tokenizer_task(cfg)
        task.to(dev)
        groups = task.param_groups()
        opts = {ph: torch.optim.Adam(ps, lr=1e-5, betas=(0.5, 0.9)) for ph, ps in groups.items()}
        g = torch.Generator().manual_seed(0)
        batch = {"image": (torch.rand(args["batch"], 3, args["size"], args["size"], generator=g) * 2 - 1).to(dev),
                 "label": torch.zeros(args["batch"], dtype=torch.long, device=dev)}
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args["bf16"] else torch.enable_grad
        state = {"step": 0}

        def step():
            torch.manual_seed(state["step"])
            for ph in task.phases:
                with ctx():
                    out_ = task(batch, step=state["step"], phase=ph)
                out_.loss.backward()
                opts[ph].step()
                opts[ph].zero_grad(set_to_none=True)
            state["step"] += 1

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["step_s_eq" if eq else "step_s_plain"] = _timed(step, args["steps"], sync)
        if eq:
            res["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                              else _rss_mb() - rss0)
            res["params_m"] = sum(p.numel() for p in task.autoencoder.parameters()) / 1e6
    vae = task.autoencoder.eval()
    tok = Tokenizer(vae)
    x = batch["image"]
    z = tok.encode(x)
    enc_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args["bf16"] else torch.no_grad

    def ours_enc():
        with enc_ctx():
            tok.encode(x)

    def ours_dec():
        with enc_ctx():
            tok.decode(z)

    def diff_enc():
        with torch.no_grad(), enc_ctx():
            vae.encode(x).latent_dist.mean

    def diff_dec():
        with torch.no_grad(), enc_ctx():
            vae.decode(z).sample

    n = args["batch"]
    for key, fn in (("encode_ours", ours_enc), ("encode_diffusers", diff_enc), ("decode_ours", ours_dec),
                    ("decode_diffusers", diff_dec)):
        res[key + "_img_s"] = n / _timed(fn, args["steps"], sync)
    out.put({"preset": name, **res})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    a = p.parse_args()
    args = vars(a)
    ctx = mp.get_context("spawn")
    rows = []
    for name in a.presets:
        q = ctx.Queue()
        proc = ctx.Process(target=run_preset, args=(name, args, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    import torch

    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {dev} | batch {a.batch} | {a.size}x{a.size} | {'bf16' if a.bf16 else 'fp32'} | "
          f"{a.steps} timed steps")
    print("| preset | params (M) | train step L1+LPIPS+GAN+EQ (s) | without EQ (s) | EQ/plain | peak mem (MB) | "
          "encode img/s (ours / diffusers) | decode img/s (ours / diffusers) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params_m']:.1f} | {r['step_s_eq']:.3f} | {r['step_s_plain']:.3f} | "
              f"{r['step_s_eq'] / r['step_s_plain']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['encode_ours_img_s']:.1f} / {r['encode_diffusers_img_s']:.1f} "
              f"({r['encode_ours_img_s'] / r['encode_diffusers_img_s']:.2f}x) | "
              f"{r['decode_ours_img_s']:.1f} / {r['decode_diffusers_img_s']:.1f} "
              f"({r['decode_ours_img_s'] / r['decode_diffusers_img_s']:.2f}x) |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
