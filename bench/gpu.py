"""One-GPU benchmark: every speed number of ldm on one device, written to one JSON file in under 8 minutes.

    bash bench/gpu.sh [OUT.json]                        # = python bench/gpu.py --out OUT.json (default bench_gpu.json)
    python bench/gpu.py --smoke --out /tmp/smoke.json      # CPU, tiny sizes, seconds: checks that nothing crashes

Sections (JSON "sections", in this order; all with random weights, nothing is downloaded):
  device                  GPU name, memory, torch / CUDA versions, whether xformers is installed
  dit_train_eager         DiT-XL/2 training step (256 px = 32x32x4 latents, batch 64, bf16 autocast, AdamW): ours vs
                          diffusers' DiTTransformer2DModel at equal sizes, timed round-robin: ms/step, img/s, TFLOP/s,
                          MFU, peak memory, and ours / diffusers ratios
  attention               the same step of our DiT with each attention backend (sdpa, xformers, math)
  tokenizer_train         SD-VAE-shaped tokenizer step (configs/tokenizer/sd_f8c4.yaml: L1 + LPIPS (random VGG) +
                          PatchGAN + EQ-VAE, generator and discriminator phases), 256 px, batch 8, bf16 vs fp32
  inception               FID Inception-v3 feature extraction img/s (256 px uint8 in, TF resize to 299): ours vs
                          torch-fidelity vs torchmetrics, same random weights file
  sampling                Heun, 50 steps (99 NFE), CFG 1.5 (cond + uncond in one batch), DiT-XL/2 bf16 autocast,
                          batch 256 latents (decoding not included): img/s
  dit_compiled_ours       the dit_train_eager step of ours with torch.compile (per block, as DiT(use_compile=True))
  dit_compiled_diffusers  ... and of diffusers' model compiled whole
Every variant records its peak memory (torch.cuda.max_memory_allocated during its warm-up minus what was allocated
before it was built: weights, gradients, AdamW state and activations).

MFU = model FLOPs per second / --peak-tflops (default 989: H100 / H200 SXM dense bf16). DiT model FLOPs per training
step = 3 x forward (backward = 2 x forward), forward = 2 x multiply-adds = 2 B (depth (L (4 D^2 + 8 D^2) + 2 L^2 D +
6 D^2) + head), L = (32 / 2)^2 = 256 tokens, D = 1152, depth 28: 237.3 GFLOPs per image forward (DiT paper: 118.6
Gflops counted as multiply-adds); bench/bench_dit.py train_flops() has the exact formula.

Robustness: every section runs in its own forked process with a hard time limit (its budget, capped by what is left
of --budget-s, default 440 s) and a soft one inside (timing loops stop early and report what they measured); an
exception or a timeout is recorded as the section's "error" string and the next section runs. The JSON is rewritten
after every section, so a run that is killed still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() must not initialise CUDA before fork
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # after the environment variable above


@dataclass
class Sizes:
    """What each section runs at."""
    dit_preset: str = "DiT-XL/2"
    latent: int = 32
    dit_batch: int = 64
    warmup: int = 3
    steps: int = 20
    compile_backend: str | None = "inductor"  # None: the dit_compiled_* sections run eager
    tok_preset: str = "sd_f8c4"
    tok_size: int = 256
    tok_batch: int = 8
    inception_size: int = 256
    inception_n: int = 1000
    inception_batch: int = 250
    sample_batch: int = 256
    sample_steps: int = 50
    cfg_scale: float = 1.5


# --smoke: seconds on a CPU; no compilation (dynamo alone takes ~20 s there), no warm-up, one timed call each
SMOKE = Sizes(dit_preset="DiT-Pico/2", latent=8, dit_batch=2, warmup=0, steps=1, compile_backend=None,
              tok_preset="tiny_f4", tok_size=32, tok_batch=1, inception_size=32, inception_n=1, inception_batch=1,
              sample_batch=2, sample_steps=2)


@dataclass
class Params:
    sizes: Sizes
    device: str
    peak_tflops: float


# ------------------------------------------------------------------------------------------------------ helpers
def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory_start(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _memory_peak_mib(device: str, start: int) -> float | None:
    """Peak allocation since _memory_start above what was allocated then (None on CPU)."""
    return (torch.cuda.max_memory_allocated() - start) / 2**20 if device == "cuda" else None


def timed_variants(builders: dict[str, Callable[[], Callable[[], None]]], p: Params,
                   budget_s: float) -> dict[str, dict]:
    """Build each variant (a builder returns its step function), warm it up alone (its peak memory, and compile
    time if any, fall in that window), then time all round-robin for up to sizes.steps rounds or `budget_s`.
    A variant whose build or warm-up raises gets {"error": ...}; the others go on."""
    from bench_dit import time_round_robin

    res, steps = {}, {}
    for name, builder in builders.items():
        try:
            start = _memory_start(p.device)
            t0 = time.perf_counter()
            step = builder()
            for _ in range(p.sizes.warmup):
                step()
            _sync(p.device)
            res[name] = {"build_and_warmup_s": time.perf_counter() - t0,
                         "peak_mib": _memory_peak_mib(p.device, start)}
            steps[name] = step
        except Exception as e:  # e.g. xformers not installed, compile failure, out of memory
            res[name] = {"error": _error(e)}
    if steps:
        for name, t in time_round_robin(steps, p.sizes.steps, 0, budget_s=budget_s).items():
            res[name].update({"step_s": statistics.median(t), "timed_steps": len(t)})
    return res


def _dit_rows(res: dict[str, dict], p: Params) -> dict[str, dict]:
    """img/s, TFLOP/s and MFU of every DiT training variant that ran."""
    from bench_dit import train_flops

    s = p.sizes
    flops = train_flops(s.dit_preset, s.latent, s.dit_batch, lightning=False)
    for r in res.values():
        if "step_s" in r:
            r["img_s"] = s.dit_batch / r["step_s"]
            r["tflops"] = flops / r["step_s"] / 1e12
            r["mfu"] = r["tflops"] / p.peak_tflops
    return res


def _dit_builder(kind: str, p: Params, compile_backend: str | None = None, attn: str = "sdpa"):
    from bench_dit import build, make_step

    s = p.sizes

    def builder():
        torch.manual_seed(0)
        model = build(kind, s.dit_preset, s.latent, compile_backend, attn).to(p.device).train()
        return make_step(kind, model, s.dit_batch, s.latent, p.device, torch.bfloat16)

    return builder


def _ratio(res: dict, a: str, b: str, key: str) -> float | None:
    return res[a][key] / res[b][key] if key in res.get(a, {}) and key in res.get(b, {}) and res[b][key] else None


def _config(p: Params, *keys: str) -> dict:
    """The sizes a section ran at, for its JSON entry."""
    return {k: getattr(p.sizes, k) for k in keys} | {"device": p.device}


# ------------------------------------------------------------------------------------------------------ sections
def section_device(p: Params, budget_s: float) -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "peak_tflops": p.peak_tflops}
    if p.device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(name=prop.name, memory_gib=prop.total_memory / 2**30, capability=f"{prop.major}.{prop.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(name="cpu", threads=torch.get_num_threads(), capability=torch.backends.cpu.get_cpu_capability())
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None
    return info


def section_dit_train_eager(p: Params, budget_s: float) -> dict:
    res = _dit_rows(timed_variants({k: _dit_builder(k, p) for k in ("ours", "diffusers")}, p, budget_s), p)
    return {"config": _config(p, "dit_preset", "latent", "dit_batch") | {"dtype": "bf16 autocast", "compile": False},
            "results": res, "speed_ours_over_diffusers": _ratio(res, "ours", "diffusers", "img_s"),
            "memory_ours_over_diffusers": _ratio(res, "ours", "diffusers", "peak_mib")}


def section_attention(p: Params, budget_s: float) -> dict:
    from ldm.models.layers import ATTENTION_BACKENDS

    builders = {b: _dit_builder("ours", p, attn=b) for b in sorted(ATTENTION_BACKENDS)}
    return {"config": _config(p, "dit_preset", "latent", "dit_batch") | {"dtype": "bf16 autocast"},
            "results": _dit_rows(timed_variants(builders, p, budget_s), p)}


def _compiled(kind: str, p: Params, budget_s: float) -> dict:
    res = _dit_rows(timed_variants({kind: _dit_builder(kind, p, p.sizes.compile_backend)}, p, budget_s), p)
    return {"config": _config(p, "dit_preset", "latent", "dit_batch", "compile_backend") | {"dtype": "bf16 autocast"},
            "results": res}


def section_dit_compiled_ours(p: Params, budget_s: float) -> dict:
    return _compiled("ours", p, budget_s)


def section_dit_compiled_diffusers(p: Params, budget_s: float) -> dict:
    return _compiled("diffusers", p, budget_s)


def section_tokenizer_train(p: Params, budget_s: float) -> dict:
    import bench_tokenizer as bt

    s = p.sizes
    batch = bt.random_batch(s.tok_batch, s.tok_size, p.device)

    def builder(bf16: bool):
        def build():
            torch.manual_seed(0)
            task, opts = bt.build_task(s.tok_preset, s.tok_size, eq=True, device=p.device)
            return bt.make_train_step(task, opts, batch, bt.precision(torch.device(p.device).type, bf16))
        return build

    res = timed_variants({"bf16": builder(True), "fp32": builder(False)}, p, budget_s)
    for r in res.values():
        if "step_s" in r:
            r["img_s"] = s.tok_batch / r["step_s"]
    return {"config": _config(p, "tok_preset", "tok_size", "tok_batch") | {"eq_vae": True, "lpips": "random VGG16"},
            "results": res, "speed_bf16_over_fp32": _ratio(res, "bf16", "fp32", "img_s")}


def section_inception(p: Params, budget_s: float) -> dict:
    import bench_eval

    from ldm.eval.inception import FIDInceptionV3

    s = p.sizes
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.inception_n, 3, s.inception_size, s.inception_size), dtype=torch.uint8,
                           generator=g)
    with tempfile.TemporaryDirectory() as tmp:  # one random weights file that every implementation loads
        weights = Path(tmp) / "random_inception.pth"
        torch.save(FIDInceptionV3().state_dict(), weights)
        names = {"ours": "ours", "torch-fidelity": "torch-fidelity 0.4",
                 "torchmetrics": "torchmetrics (antialias=False)"}
        fns = bench_eval.extractors(str(weights), torch.device(p.device), tuple(names.values()))

    def builder(fn):
        def build():
            @torch.inference_mode()
            def one_pass():
                for i in range(0, len(images), s.inception_batch):
                    fn(images[i:i + s.inception_batch].to(p.device))
                _sync(p.device)
            return one_pass
        return build

    passes = Params(replace(s, warmup=min(s.warmup, 1), steps=min(s.steps, 3)), p.device, p.peak_tflops)
    res = timed_variants({k: builder(fns[v]) for k, v in names.items()}, passes, budget_s)
    for r in res.values():
        if "step_s" in r:
            r["img_s"] = s.inception_n / r["step_s"]
    return {"config": _config(p, "inception_size", "inception_n", "inception_batch"),
            "results": res, "speed_ours_over_torch_fidelity": _ratio(res, "ours", "torch-fidelity", "img_s")}


def section_sampling(p: Params, budget_s: float) -> dict:
    from bench_dit import build

    from ldm.diffusion.guidance import classifier_free_guidance
    from ldm.diffusion.paths import get_path
    from ldm.diffusion.samplers import make_denoiser, sample_heun, time_grid

    s = p.sizes
    start = _memory_start(p.device)
    model = build("ours", s.dit_preset, s.latent).to(p.device).eval()
    y = torch.arange(s.sample_batch, device=p.device) % 1000
    guided = classifier_free_guidance(lambda x, t, yy: model(x, t, yy), y, num_classes=1000, scale=s.cfg_scale,
                                      learned_sigma=True)
    path = get_path("linear")
    den = make_denoiser(guided, path=path, prediction="velocity", learned_sigma=True, step_aware=True)
    x_T = torch.randn(s.sample_batch, 4, s.latent, s.latent, generator=torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(torch.device(p.device).type, dtype=torch.bfloat16):
            sample_heun(den, x_T.to(p.device), time_grid(steps), path=path)
        _sync(p.device)
        return time.perf_counter() - t0

    run(2)  # warm-up: kernels, cuBLAS workspaces
    calls.clear()
    seconds = run(s.sample_steps)
    return {"config": _config(p, "dit_preset", "latent", "sample_batch", "sample_steps", "cfg_scale")
            | {"sampler": "heun", "dtype": "bf16 autocast", "nfe": len(calls), "decode": False},
            "results": {"ours": {"seconds": seconds, "img_s": s.sample_batch / seconds,
                                 "peak_mib": _memory_peak_mib(p.device, start)}}}


SECTIONS: dict[str, tuple[Callable[[Params, float], dict], float]] = {  # name: (function, hard limit in seconds)
    "device": (section_device, 30),
    "dit_train_eager": (section_dit_train_eager, 70),
    "attention": (section_attention, 60),
    "tokenizer_train": (section_tokenizer_train, 60),
    "inception": (section_inception, 45),
    "sampling": (section_sampling, 90),
    "dit_compiled_ours": (section_dit_compiled_ours, 120),
    "dit_compiled_diffusers": (section_dit_compiled_diffusers, 150),
}


# ------------------------------------------------------------------------------------------------------ runner
def _child(name: str, p: Params, limit_s: float, q) -> None:
    fn = SECTIONS[name][0]
    try:
        q.put(fn(p, budget_s=0.5 * limit_s))  # the other half covers building, warm-up and compilation
    except BaseException as e:
        q.put({"error": _error(e), "traceback": traceback.format_exc(limit=-3)})


def preload() -> None:
    """Import what the sections import, once, before forking them (each child would spend seconds on it)."""
    import importlib

    for module in ("diffusers", "bench_dit", "bench_tokenizer", "bench_eval", "ldm.train.tokenizer_task",
                   "torch_fidelity.feature_extractor_inceptionv3", "torchmetrics.image.fid", "ldm.diffusion.samplers"):
        try:
            importlib.import_module(module)
        except Exception:  # the section that needs it reports the error
            pass


def run_section(name: str, p: Params, limit_s: float, method: str) -> dict:
    """The section's result in a child process started by `method` (fork / spawn), or {"error": ...} on an
    exception, a crash or after limit_s."""
    ctx = mp.get_context(method)
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, p, limit_s, q), daemon=True)
    start = time.perf_counter()
    proc.start()
    result = None
    while result is None:
        try:
            result = q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive() and q.empty():
                result = {"error": f"the section's process died (exit code {proc.exitcode})"}
            elif time.perf_counter() - start > limit_s:
                proc.kill()
                result = {"error": f"timed out after {limit_s:.0f} s"}
    proc.join(timeout=10)
    return {**result, "seconds": time.perf_counter() - start}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_gpu.json", help="the JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds): checks the script runs")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100/H200 bf16 dense)")
    ap.add_argument("--budget-s", type=float, default=440.0, help="total seconds for all sections")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_flush_denormal(True)  # random weights give tiny activations; denormals crawl on CPU
    p = Params(sizes, device, args.peak_tflops)
    out = Path(args.out)
    data = {"meta": {"smoke": args.smoke, "device": device, "peak_tflops": args.peak_tflops, "sizes": asdict(sizes),
                     "budget_s": args.budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, "sections": {}}
    start = time.perf_counter()
    preload()
    # fork: the parent has imported everything but run nothing, so children start at once; spawn if an import
    # initialised CUDA after all, or if the device section fails forked (a forked child cannot use CUDA then)
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    for name in args.sections:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 5:
            data["sections"][name] = {"error": f"skipped: the {args.budget_s:.0f} s budget is spent"}
        else:
            data["sections"][name] = run_section(name, p, min(SECTIONS[name][1], left), method)
        if name == "device" and "error" in data["sections"][name] and method == "fork":
            method = "spawn"
            data["sections"][name] = run_section(name, p, min(SECTIONS[name][1], left), method)
        data["meta"]["start_method"] = method
        print(f"{name}: {json.dumps(data['sections'][name])[:300]}", flush=True)
        data["meta"]["total_s"] = time.perf_counter() - start
        write_json(out, data)
    print(f"wrote {out} ({data['meta']['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
