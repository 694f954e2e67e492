"""Tokenizer benchmark: one training step (gen + disc phase: L1 + LPIPS + PatchGAN with adaptive weight + EQ-VAE) and
encode/decode throughput, for the tiny and SD-VAE f8c4 presets.

    python bench/bench_tokenizer.py                          # CPU fp32, batch 8, 64x64
    python bench/bench_tokenizer.py --compare-bf16           # + bf16 autocast vs fp32, side by side
    python bench/bench_tokenizer.py --device cuda --bf16     # GPU, bf16 autocast
    python bench/bench_tokenizer.py --presets tiny_f4 --batch 2 --size 32 --steps 1   # smallest (smoke)

Each preset runs in its own process so peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth over the
process after imports) is per preset. Side-by-side ratios in the same process: the training step with EQ-VAE vs
without (the EQ draws alternate modes, so both are averaged over the same number of steps), and our frozen `Tokenizer`
encode/decode vs diffusers' own `AutoencoderKL.encode(...).latent_dist.mean` / `.decode(...).sample` on the same
weights. LPIPS uses a random VGG backbone (same cost as the real one; values meaningless, timing only).

--compare-bf16 also times the EQ-VAE training step, encode and decode under torch.autocast(bf16) against fp32 on the
same task (weights, optimizers and batch), one fp32 and one bf16 call in turn, each precision with its own step
counter so both see the same EQ-VAE modes; the ratio is fp32 time / bf16 time (above 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"tiny_f4": "configs/tokenizer/tiny_f4.yaml", "sd_f8c4": "configs/tokenizer/sd_f8c4.yaml"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def precision(device_type: str, bf16: bool):
    """A context-manager factory: bf16 autocast on `device_type`, or a no-op (fp32)."""
    import contextlib

    import torch

    return (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def build_task(preset: str, size: int, eq: bool, device):
    """The tokenizer task of `preset` at `size` px with LPIPS (random VGG) and the discriminator on from step 0,
    on `device`, with one Adam per phase."""
    import torch

    from ldm.config import load_config
    from ldm.train.tokenizer_task import build_tokenizer_task

    cfg = load_config(REPO / PRESETS[preset], [
        # the inputs are random tensors; digits only satisfies the preset's data source (ImageNet for SD-VAE)
        "data.source=digits", f"data.image_size={size}", "data.num_workers=0", "tokenizer.perceptual_weight=1.0",
        "tokenizer.lpips_random_backbone=true", "tokenizer.disc_start=0", f"tokenizer.eq.enabled={str(eq).lower()}",
        "tokenizer.eq.scale_num_min=12", "train.run_root=/tmp/ldm_bench_runs", f"name=bench_{preset}"])
    task, _ = build_tokenizer_task(cfg)
    task.to(device)
    opts = {ph: torch.optim.Adam(ps, lr=1e-5, betas=(0.5, 0.9)) for ph, ps in task.param_groups().items()}
    return task, opts


def random_batch(batch: int, size: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    return {"image": (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device),
            "label": torch.zeros(batch, dtype=torch.long, device=device)}


def make_train_step(task, opts, batch: dict, ctx) -> Callable[[], None]:
    """One optimizer step of every phase under `ctx()`, with its own step counter (EQ-VAE draws depend on it)."""
    import torch

    state = {"step": 0}

    def step():
        torch.manual_seed(state["step"])
        for ph in task.phases:
            with ctx():
                out = task(batch, step=state["step"], phase=ph)
            out.loss.backward()
            opts[ph].step()
            opts[ph].zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def make_codec(vae, x, ctx) -> dict[str, Callable[[], None]]:
    """Encode / decode of `x` by our frozen Tokenizer and by diffusers' AutoencoderKL calls, each under `ctx()`."""
    import torch

    from ldm.tokenizers.export import Tokenizer

    tok = Tokenizer(vae)
    z = tok.encode(x)

    def run(fn):
        def call():
            with torch.no_grad(), ctx():
                fn()
        return call

    return {"encode_ours": run(lambda: tok.encode(x)), "encode_diffusers": run(lambda: vae.encode(x).latent_dist.mean),
            "decode_ours": run(lambda: tok.decode(z)), "decode_diffusers": run(lambda: vae.decode(z).sample)}


def timed_in_turn(fns: dict[str, Callable[[], None]], steps: int, sync) -> dict[str, float]:
    """Mean seconds per call of each function: one warm-up call each, then `steps` rounds calling each in turn."""
    for fn in fns.values():
        fn()
    total = dict.fromkeys(fns, 0.0)
    for _ in range(steps):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            total[k] += time.perf_counter() - t
    return {k: v / steps for k, v in total.items()}


def run_preset(name: str, args: dict, out) -> None:
    """Child process: measure `name` and put its row (or {"preset", "error"}) on the queue `out`."""
    try:
        out.put({"preset": name, **measure_preset(name, args)})
    except Exception as e:  # the parent waits on the queue: report rather than die silently
        out.put({"preset": name, "error": f"{type(e).__name__}: {e}"})
        raise


def measure_preset(name: str, args: dict) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device(args["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    main_ctx = precision(dev.type, args["bf16"])
    rss0 = _rss_mb()
    batch = random_batch(args["batch"], args["size"], dev)
    res = {}
    for eq in (True, False):
        task, opts = build_task(name, args["size"], eq, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = {"main": make_train_step(task, opts, batch, main_ctx)}
        if eq and args["compare_bf16"]:
            steps = {"fp32": make_train_step(task, opts, batch, precision(dev.type, False)),
                     "bf16": make_train_step(task, opts, batch, precision(dev.type, True))}
        t = timed_in_turn(steps, args["steps"], sync)
        res["step_s_eq" if eq else "step_s_plain"] = t.get("main", t.get("bf16" if args["bf16"] else "fp32"))
        if eq:
            res.update({f"step_s_{k}": v for k, v in t.items() if k != "main"})
            res["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                              else _rss_mb() - rss0)
            res["params_m"] = sum(p.numel() for p in task.autoencoder.parameters()) / 1e6
    vae = task.autoencoder.eval()
    n = args["batch"]
    for key, v in timed_in_turn(make_codec(vae, batch["image"], main_ctx), args["steps"], sync).items():
        res[key + "_img_s"] = n / v
    if args["compare_bf16"]:
        for prec in ("fp32", "bf16"):
            codec = make_codec(vae, batch["image"], precision(dev.type, prec == "bf16"))
            t = timed_in_turn({k: codec[k] for k in ("encode_ours", "decode_ours")}, args["steps"], sync)
            res.update({f"{k}_img_s_{prec}": n / v for k, v in t.items()})
    return res


def print_tables(rows: list[dict], a) -> None:
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
    if not a.compare_bf16:
        return
    print("\nbf16 autocast vs fp32 (same task, calls in turn; speed-up = fp32 time / bf16 time)")
    print("| preset | train step fp32 (s) | bf16 (s) | speed-up | encode img/s fp32 / bf16 | speed-up | "
          "decode img/s fp32 / bf16 | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        enc, dec = (r["encode_ours_img_s_fp32"], r["encode_ours_img_s_bf16"]), (r["decode_ours_img_s_fp32"],
                                                                                r["decode_ours_img_s_bf16"])
        print(f"| {r['preset']} | {r['step_s_fp32']:.3f} | {r['step_s_bf16']:.3f} | "
              f"{r['step_s_fp32'] / r['step_s_bf16']:.2f}x | {enc[0]:.1f} / {enc[1]:.1f} | {enc[1] / enc[0]:.2f}x | "
              f"{dec[0]:.1f} / {dec[1]:.1f} | {dec[1] / dec[0]:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or CUDA) for the main table")
    p.add_argument("--compare-bf16", action="store_true", help="also time bf16 autocast against fp32, in turn")
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
        if "error" in rows[-1]:
            raise SystemExit(f"preset {name}: {rows[-1]['error']}")
    import torch

    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {dev} | batch {a.batch} | {a.size}x{a.size} | {'bf16' if a.bf16 else 'fp32'} | "
          f"{a.steps} timed steps")
    print_tables(rows, a)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
