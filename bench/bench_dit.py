"""Training-step benchmark: our DiT vs diffusers.DiTTransformer2DModel, side by side in one process.

One step = forward + MSE loss + backward + AdamW step, same depth / width / heads / patch / batch / latent size /
learned-sigma output (8 channels) / 1000 classes. Both run eager with torch SDPA attention unless --compile. The
models are timed in alternation (round-robin) after warm-up, and the median step time is reported, so load changes on
a shared machine hit all of them alike. bf16 runs the step under torch.autocast (CPU or CUDA) with fp32 weights and
AdamW state, as accelerate's mixed_precision=bf16 does. Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU
the peak resident-set growth of a spawned child (Linux VmHWM after resetting it through /proc/self/clear_refs) over
three steps, minus its RSS before the model was built.

    python bench/bench_dit.py                      # CPU: tiny and S/2 configs, fp32, three models
    python bench/bench_dit.py --side-by-side       # equal settings (both fp32) and each at its defaults (ours bf16)
    python bench/bench_dit.py --configs s2 --steps 10 --device cuda --dtype bf16 --compile --peak-tflops 989

--side-by-side times ours fp32, diffusers fp32 and (if it differs) ours at its default precision in one round-robin
and prints two comparisons: equal settings (ours fp32 vs diffusers fp32) and each at its default settings: ours as
ldm trains it (--ours-default auto: bf16 autocast on CUDA and on CPUs with native bf16 kernels, the choice of
train.mixed_precision=auto; fp32 elsewhere, where bf16 matmuls are emulated and ~10-90x slower) vs diffusers'
DiTTransformer2DModel as its training scripts run by default (accelerate mixed_precision "no" = fp32).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm.models.dit import build_dit
from ldm.models.layers import swiglu_hidden

CONFIGS = {  # name: (our preset, latent size, batch)
    "pico": ("DiT-Pico/2", 8, 4),
    "tiny": ("DiT-Ti/2", 16, 8),
    "s2": ("DiT-S/2", 32, 8),
}
KINDS = ("ours", "diffusers", "ours+lightning")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LIGHTNING = dict(use_swiglu=True, use_rmsnorm=True, use_rope=True, use_qknorm=True)


def native_bf16(device: str) -> bool:
    """Whether bf16 autocast runs on native kernels: CUDA, or a CPU with AVX-512 BF16 / AMX (oneDNN's own check)."""
    if torch.device(device).type == "cuda":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build(kind: str, preset: str, latent: int, compile_backend: str | None = None,
          attn_backend: str = "sdpa") -> torch.nn.Module:
    """One of KINDS at the sizes of our `preset`; compile_backend (e.g. "inductor") compiles it, None runs eager."""
    if kind == "diffusers":
        from diffusers import DiTTransformer2DModel

        ours = build_dit(preset, input_size=latent)
        m = DiTTransformer2DModel(
            num_attention_heads=ours.num_heads, attention_head_dim=ours.hidden_size // ours.num_heads, in_channels=4,
            out_channels=8, num_layers=ours.depth, sample_size=latent, patch_size=ours.patch_size,
            num_embeds_ada_norm=1000,
        )
    else:
        extra = LIGHTNING if kind == "ours+lightning" else {}
        m = build_dit(preset, input_size=latent, in_channels=4, learn_sigma=True, num_classes=1000,
                      attn_backend=attn_backend, **extra)
    # Re-draw every weight (not norm gains) from N(0, 0.02^2) in both models: with DiT's zero-init adaLN the first
    # steps have exactly-zero gradients for most weights, which is not what a training step costs later.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if compile_backend:  # ours: per block (state-dict names unchanged, as DiT(use_compile=True)); diffusers: whole
        for block in getattr(m, "blocks", []):
            block.compile(backend=compile_backend)
        if kind == "diffusers":
            m.compile(backend=compile_backend)
    return m


def train_flops(preset: str, latent: int, batch: int, lightning: bool) -> float:
    """Model FLOPs of one training step: 3 x the forward matmul FLOPs (2 per multiply-add), as MFU counts them.

    Per block, with D the width and L = (latent / patch)^2 tokens: L (4 D^2 + mlp) multiply-adds for qkv + proj + MLP
    (mlp = 8 D^2, or 3 x SwiGLU hidden x D), 2 L^2 D for q k^T and attn @ v, and 6 D^2 for the adaLN modulation; plus
    the patch embedding, the final linear and adaLN once. The forward count is twice the DiT paper's Gflops, which
    count multiply-adds: XL/2 at 32x32 gives 237.3 = 2 x 118.6 and S/2 12.1 = 2 x 6.06.
    """
    net = build_dit(preset, input_size=latent)  # sizes only
    D, L = net.hidden_size, (latent // net.patch_size) ** 2
    mlp = 3 * swiglu_hidden(D, 4.0) * D if lightning else 8 * D * D  # w12 + w3, or fc1 + fc2
    per_block = L * (4 * D * D + mlp) + 2 * L * L * D  # qkv + proj + mlp, then q k^T and attn @ v
    head = L * D * (net.patch_size**2 * (4 + 8)) + 6 * D * D + 2 * D * D  # patchify + final linear + adaLN
    return 3 * 2 * batch * (net.depth * (per_block + 6 * D * D) + head)


def make_step(kind: str, model: torch.nn.Module, batch: int, latent: int, device: str,
              dtype: torch.dtype) -> Callable[[], None]:
    """One training step of `model` on fixed random inputs; autocast to `dtype` unless it is fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    target = torch.randn(batch, 8, latent, latent, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
            if kind == "diffusers":  # diffusers takes the integer DDPM step index
                out = model(x, timestep=(t * 999).long(), class_labels=y, return_dict=False)[0]
            else:
                out = model(x, t, y)
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()

    return step


def time_round_robin(steps_fn: dict[str, Callable[[], None]], steps: int, warmup: int,
                     budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds of each timed call, calling the functions in turn (round-robin) `steps` times after `warmup` calls
    each; with budget_s, stops early (after at least one timed round) once the timed rounds took that long."""
    for fn in steps_fn.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps_fn}
    start = time.perf_counter()
    for _ in range(steps):
        for k, fn in steps_fn.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return times


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB -> MiB


def _child_peak(kind, preset, latent, batch, dtype, steps, threads, q):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import diffusers  # noqa: F401  (import before the baseline so its own allocations do not count)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _rss_mib("VmRSS:")
    step = make_step(kind, build(kind, preset, latent).train(), batch, latent, "cpu", dtype)
    for _ in range(steps):
        step()
    q.put(_rss_mib("VmHWM:") - base)


def peak_memory_mib(kind, preset, latent, batch, device, dtype, compile_backend, steps=3) -> float:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = make_step(kind, build(kind, preset, latent, compile_backend).to(device).train(), batch, latent,
                         device, dtype)
        for _ in range(steps):
            step()
        return torch.cuda.max_memory_allocated() / 2**20
    ctx = mp.get_context("spawn")  # fork after OpenMP threads ran can deadlock
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(kind, preset, latent, batch, dtype, steps, torch.get_num_threads(), q))
    p.start()
    p.join()
    return q.get()


def measure(config: str, variants: list[tuple[str, str]], steps: int, warmup: int, device: str,
            compile_backend: str | None, memory: bool = True) -> dict[tuple[str, str], dict[str, float]]:
    """{(kind, dtype name): {"step_s": median, "params_m", "peak_mib"}} for each variant, timed round-robin."""
    preset, latent, batch = CONFIGS[config]
    torch.manual_seed(0)
    models = {v: build(v[0], preset, latent, compile_backend).to(device).train() for v in variants}
    steps_fn = {v: make_step(v[0], m, batch, latent, device, DTYPES[v[1]]) for v, m in models.items()}
    times = time_round_robin(steps_fn, steps, warmup)
    res = {v: {"step_s": statistics.median(times[v]), "params_m": sum(p.numel() for p in m.parameters()) / 1e6}
           for v, m in models.items()}
    del models, steps_fn
    for v in variants:
        res[v]["peak_mib"] = (peak_memory_mib(v[0], preset, latent, batch, device, DTYPES[v[1]], compile_backend)
                              if memory else float("nan"))
    return res


def print_table(config: str, res: dict, device: str, compile_backend: str | None, steps: int,
                peak_tflops: float | None) -> None:
    """One row per variant, with the speed-up over diffusers at the same dtype (or at fp32)."""
    preset, latent, batch = CONFIGS[config]
    print(f"\n{preset} latent {latent}x{latent}x4 batch {batch} | {device} compile={compile_backend or 'no'} "
          f"threads={torch.get_num_threads()} steps={steps}")
    print(f"{'model':16s} {'dtype':5s} {'params (M)':>10s} {'step (ms)':>10s} {'img/s':>8s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'peak MiB':>9s} {'speed-up vs diffusers':>22s}")
    for (kind, dt), r in res.items():
        base = res.get(("diffusers", dt), res.get(("diffusers", "fp32")))
        tflops = train_flops(preset, latent, batch, kind == "ours+lightning") / r["step_s"] / 1e12
        mfu = f"{tflops / peak_tflops:6.1%}" if peak_tflops else f"{'-':>6s}"
        print(f"{kind:16s} {dt:5s} {r['params_m']:10.2f} {r['step_s'] * 1e3:10.1f} {batch / r['step_s']:8.1f} "
              f"{tflops:8.3f} {mfu} {r['peak_mib']:9.0f} {base['step_s'] / r['step_s']:21.2f}x")


def print_side_by_side(res: dict, ours_default: str) -> None:
    """The two comparisons of --side-by-side: speed (diffusers' step time / ours) and memory (ours / diffusers)."""
    d = res[("diffusers", "fp32")]
    print(f"{'comparison':44s} {'ours':>13s} {'diffusers':>13s} {'speed ours/diffusers':>21s} "
          f"{'memory ours/diffusers':>22s}")
    for label, ours in (("equal settings (fp32 vs fp32)", ("ours", "fp32")),
                        (f"default settings (ours {ours_default} vs diffusers fp32)", ("ours", ours_default))):
        o = res[ours]
        print(f"{label:44s} {o['step_s'] * 1e3:10.1f} ms {d['step_s'] * 1e3:10.1f} ms "
              f"{d['step_s'] / o['step_s']:20.2f}x {o['peak_mib'] / d['peak_mib']:21.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "s2"], choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (round-robin)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16: torch.autocast on CPU or CUDA")
    ap.add_argument("--side-by-side", action="store_true",
                    help="ours fp32, diffusers fp32, ours at its default: equal and default settings (not --dtype)")
    ap.add_argument("--ours-default", default="auto", choices=["auto", *DTYPES],
                    help="our default precision for --side-by-side; auto: bf16 where native_bf16(), else fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models (ours per block)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU, e.g. 989 for an H100 SXM in bf16 (dense)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # same for all models; tiny AdamW second moments are denormal on CPU
    ours_default = args.ours_default
    if ours_default == "auto":
        ours_default = "bf16" if native_bf16(args.device) else "fp32"
    variants = (list(dict.fromkeys([("ours", "fp32"), ("diffusers", "fp32"), ("ours", ours_default)]))
                if args.side_by_side else [(k, args.dtype) for k in KINDS])
    backend = "inductor" if args.compile else None
    for c in args.configs:
        res = measure(c, variants, args.steps, args.warmup, args.device, backend, memory=not args.no_memory)
        print_table(c, res, args.device, backend, args.steps, args.peak_tflops)
        if args.side_by_side:
            print_side_by_side(res, ours_default)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
