"""Training-step benchmark: our DiT vs diffusers.DiTTransformer2DModel, side by side in one process.

One step = forward + MSE loss + backward + AdamW step, fp32, same depth / width / heads / patch / batch / latent
size / learned-sigma output (8 channels) / 1000 classes. Both run eager with torch SDPA attention. The two models are
timed in alternation (round-robin) after warm-up, and the median step time is reported, so load changes on a shared
machine hit both alike. Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident-set growth
of a spawned child (Linux VmHWM after resetting it through /proc/self/clear_refs) over three steps, minus its RSS
before the model was built.

    python bench/bench_dit.py                      # CPU: tiny and S/2 configs
    python bench/bench_dit.py --configs s2 --steps 10 --device cuda --dtype bf16 --compile --peak-tflops 989
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ldm.models.dit import build_dit
from ldm.models.layers import swiglu_hidden

CONFIGS = {  # name: (our preset, latent size, batch)
    "tiny": ("DiT-Ti/2", 16, 8),
    "s2": ("DiT-S/2", 32, 8),
}
LIGHTNING = dict(use_swiglu=True, use_rmsnorm=True, use_rope=True, use_qknorm=True)


def build(kind: str, preset: str, latent: int, use_compile: bool) -> torch.nn.Module:
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
        m = build_dit(preset, input_size=latent, in_channels=4, learn_sigma=True, num_classes=1000, **extra)
    # Re-draw every weight (not norm gains) from N(0, 0.02^2) in both models: with DiT's zero-init adaLN the first
    # steps have exactly-zero gradients for most weights, which is not what a training step costs later.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if use_compile:  # ours: per block (state-dict names unchanged); diffusers: the whole module
        for block in getattr(m, "blocks", []):
            block.compile()
        if kind == "diffusers":
            m.compile()
    return m


def train_flops(preset: str, latent: int, batch: int, lightning: bool) -> float:
    """Model FLOPs of one training step: 3 x the forward matmul FLOPs (2 per multiply-add), as MFU counts them.

    The forward count is twice the DiT paper's Gflops, which count multiply-adds: XL/2 at 32x32 gives 237.3 = 2 x 118.6
    and S/2 12.1 = 2 x 6.06.
    """
    net = build_dit(preset, input_size=latent)  # sizes only
    D, L = net.hidden_size, (latent // net.patch_size) ** 2
    mlp = 3 * swiglu_hidden(D, 4.0) * D if lightning else 8 * D * D  # w12 + w3, or fc1 + fc2
    per_block = L * (4 * D * D + mlp) + 2 * L * L * D  # qkv + proj + mlp, then q k^T and attn @ v
    head = L * D * (net.patch_size**2 * (4 + 8)) + 6 * D * D + 2 * D * D  # patchify + final linear + adaLN
    return 3 * 2 * batch * (net.depth * (per_block + 6 * D * D) + head)


def make_step(kind: str, model: torch.nn.Module, batch: int, latent: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    target = torch.randn(batch, 8, latent, latent, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            if kind == "diffusers":  # diffusers takes the integer DDPM step index
                out = model(x, timestep=(t * 999).long(), class_labels=y, return_dict=False)[0]
            else:
                out = model(x, t, y)
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB -> MiB


def _child_peak(kind, preset, latent, batch, steps, threads, q):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import diffusers  # noqa: F401  (import before the baseline so its own allocations do not count)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _rss_mib("VmRSS:")
    step = make_step(kind, build(kind, preset, latent, False).train(), batch, latent, "cpu", torch.float32)
    for _ in range(steps):
        step()
    q.put(_rss_mib("VmHWM:") - base)


def peak_memory_mib(kind, preset, latent, batch, device, dtype, use_compile, steps=3) -> float:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = make_step(kind, build(kind, preset, latent, use_compile).to(device).train(), batch, latent, device,
                         dtype)
        for _ in range(steps):
            step()
        return torch.cuda.max_memory_allocated() / 2**20
    ctx = mp.get_context("spawn")  # fork after OpenMP threads ran can deadlock
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(kind, preset, latent, batch, steps, torch.get_num_threads(), q))
    p.start()
    p.join()
    return q.get()


def run(config: str, steps: int, warmup: int, device: str, dtype: torch.dtype, use_compile: bool,
        peak_tflops: float | None) -> None:
    preset, latent, batch = CONFIGS[config]
    kinds = ("ours", "diffusers", "ours+lightning")
    torch.manual_seed(0)
    models = {k: build(k, preset, latent, use_compile).to(device).train() for k in kinds}
    steps_fn = {k: make_step(k, m, batch, latent, device, dtype) for k, m in models.items()}
    for k in kinds:
        for _ in range(warmup):
            steps_fn[k]()
    times = {k: [] for k in kinds}
    for _ in range(steps):
        for k in kinds:
            t0 = time.perf_counter()
            steps_fn[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}
    del models, steps_fn
    mem = {k: peak_memory_mib(k, preset, latent, batch, device, dtype, use_compile) for k in kinds}
    print(f"\n{preset} latent {latent}x{latent}x4 batch {batch} | {device} {dtype} compile={use_compile} "
          f"threads={torch.get_num_threads()} steps={steps}")
    print(f"{'model':16s} {'params (M)':>10s} {'step (ms)':>10s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak MiB':>9s} {'speed-up vs diffusers':>22s}")
    for k in kinds:
        tflops = train_flops(preset, latent, batch, k == "ours+lightning") / med[k] / 1e12
        mfu = f"{tflops / peak_tflops:6.1%}" if peak_tflops else f"{'-':>6s}"
        print(f"{k:16s} {params[k]:10.2f} {med[k] * 1e3:10.1f} {batch / med[k]:8.1f} {tflops:8.3f} {mfu} "
              f"{mem[k]:9.0f} {med['diffusers'] / med[k]:21.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (round-robin)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (ours per block)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU, e.g. 989 for an H100 SXM in bf16 (dense)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # same for both models; tiny AdamW second moments are denormal on CPU
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    for c in args.configs:
        run(c, args.steps, args.warmup, args.device, dtype, args.compile, args.peak_tflops)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
