"""Images/s of ldm's samplers at ~50 NFE vs the matching diffusers scheduler loop, same network, same process, CPU.

    python bench/bench_samplers.py [--models null,tiny,S/2] [--batch null=8,tiny=8,S/2=2] [--repeats 3] [--threads 1]
    python bench/bench_samplers.py --compare-bf16 --models tiny,S/2      # bf16 autocast vs fp32, ldm samplers only

The network is diffusers' DiTTransformer2DModel (no learned sigma, no CFG), built at random init:
  null  no network at all (output = 0.1 x): the samplers' own cost per step, 8x8x4 latents
  tiny  2 layers x 64 wide (2 heads), 8x8x4 latents, patch 2 (16 tokens)
  S/2   12 layers x 384 wide (6 heads), 16x16x4 latents, patch 2 (64 tokens) — DiT-S/2 on 128 px images
Both loops call the same net the same number of times, so the ratio measures the sampler's own cost per step
(ldm: path coefficients + prediction conversion in make_denoiser; diffusers: scheduler.step bookkeeping).

Pairs (ldm sampler / diffusers scheduler), ldm time t = (i + 1) / 1000 for DDPM index i:
  ddpm            sample_ddpm, fixed_small          / DDPMScheduler            50 steps = 50 NFE
  ddim            sample_ddim, eta 0                / DDIMScheduler            50 steps = 50 NFE
  dpm_solver++    sample_dpm_solver_pp, order 2     / DPMSolverMultistepScheduler (2M, dpmsolver++) 50 NFE
  heun            sample_heun, 25 steps             / HeunDiscreteScheduler, 25 steps  (49 NFE each)
  euler (flow)    sample_euler on "linear"          / FlowMatchEulerDiscreteScheduler  50 NFE
  euler_maruyama  sample_euler_maruyama (SiT grid)  / (no diffusers peer)      50 NFE
Timings alternate ldm / diffusers runs and report the median of --repeats runs. --compare-bf16 times each ldm
sampler under torch.autocast("cpu", bfloat16) against fp32 instead, alternating, and reports how far the bf16 samples
land from the fp32 ones. One thread by default: on a shared
CPU, torch's multi-threaded kernels slow down by 10-100x under contention and make the numbers meaningless.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ldm.diffusion.paths import get_path
from ldm.diffusion.samplers import SAMPLERS, make_denoiser, time_grid

MODELS = {
    "null": dict(sample_size=8),
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, sample_size=8, norm_num_groups=32),
    "S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, sample_size=16, norm_num_groups=32),
}
NFE = 50


class NullNet(torch.nn.Module):
    """Stands in for the network so that only the sampler loops are timed."""

    def forward(self, x, timestep=None, class_labels=None):
        return Transformer2DModelOutput(sample=0.1 * x)


def build_net(name: str) -> torch.nn.Module:
    if name == "null":
        return NullNet()
    torch.manual_seed(0)
    net = DiTTransformer2DModel(in_channels=4, out_channels=4, patch_size=2, num_embeds_ada_norm=1000, **MODELS[name])
    return net.eval()


def diffusers_loop(net, scheduler, x, y, steps: int, generator=None):
    scheduler.set_timesteps(steps)
    for timestep in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        out = net(inp, timestep=timestep.expand(x.shape[0]), class_labels=y).sample
        kw = {"generator": generator} if isinstance(scheduler, DDPMScheduler) else {}
        x = scheduler.step(out, timestep, x, **kw).prev_sample
    return x


def ldm_run(net, sampler: str, x, y, ts, path, prediction: str, generator=None, **kw):
    if path.name.startswith("ddpm"):
        model_fn = lambda xx, t: net(xx, timestep=path.model_time(t).to(xx.dtype), class_labels=y).sample
    else:  # flow: the network's timestep input is 1000 t, as FlowMatchEulerDiscreteScheduler feeds it
        model_fn = lambda xx, t: net(xx, timestep=1000 * t, class_labels=y).sample
    den = make_denoiser(model_fn, path=path, prediction=prediction)
    return SAMPLERS[sampler](den, x, ts, path=path, generator=generator, **kw)


def times_from(scheduler, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    return torch.tensor([(int(t) + 1) / 1000 for t in scheduler.timesteps] + [0.0], dtype=torch.float64)


def pairs():
    """(label, ldm sampler, path, prediction, ldm steps, ldm kwargs, diffusers scheduler or None, diffusers steps)."""
    ddpm = dict(num_train_timesteps=1000, beta_schedule="linear")
    return [
        ("ddpm", "ddpm", "ddpm_linear", "eps", NFE, {}, DDPMScheduler(**ddpm, clip_sample=False), NFE),
        ("ddim", "ddim", "ddpm_linear", "eps", NFE, {"eta": 0.0}, DDIMScheduler(**ddpm, clip_sample=False), NFE),
        ("dpm_solver++ 2M", "dpm_solver++", "ddpm_linear", "eps", NFE, {"order": 2},
         DPMSolverMultistepScheduler(**ddpm, solver_order=2, algorithm_type="dpmsolver++"), NFE),
        ("heun (49 NFE)", "heun", "ddpm_linear", "eps", 25, {}, HeunDiscreteScheduler(**ddpm), 25),
        ("euler (flow)", "euler", "linear", "velocity", NFE, {}, FlowMatchEulerDiscreteScheduler(), NFE),
        ("euler_maruyama", "euler_maruyama", "linear", "velocity", NFE, {}, None, 0),
    ]


def ldm_times(label, path, steps, scheduler):
    if label == "euler_maruyama":  # SiT/REPA: linspace(1, 0.04, K) then the mean step to 0
        return time_grid(steps, "sde")
    if path.name == "linear":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if label.startswith("heun"):  # Heun's grid in t: the scheduler's first-stage timesteps, then 0
        scheduler.set_timesteps(steps)
        first = scheduler.timesteps[::2]
        return torch.tensor([(float(t) + 1) / 1000 for t in first] + [0.0], dtype=torch.float64)
    return times_from(scheduler, steps)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare_diffusers(name: str, net, x_T, y, repeats: int) -> None:
    """One table row per sampler pair: ldm img/s, diffusers img/s and their ratio (null: ms per NFE)."""
    batch = x_T.shape[0]
    for label, sampler, pname, prediction, steps, kw, sched, d_steps in pairs():
        path = get_path(pname)
        ts = ldm_times(label, path, steps, sched)
        nfe = []
        hook = net.register_forward_hook(lambda *a, **k: nfe.append(1))
        ldm_run(net, sampler, x_T, y, ts, path, prediction, generator=torch.Generator().manual_seed(2), **kw)
        hook.remove()
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(timed(lambda: ldm_run(net, sampler, x_T, y, ts, path, prediction,
                                              generator=torch.Generator().manual_seed(2), **kw)))
            if sched is not None:
                theirs.append(timed(lambda: diffusers_loop(net, sched, x_T, y, d_steps,
                                                           generator=torch.Generator().manual_seed(2))))
        ips = batch / statistics.median(ours)
        if name == "null":  # report the sampler's own milliseconds per step
            ms = 1e3 * statistics.median(ours) / len(nfe)
            dms = 1e3 * statistics.median(theirs) / len(nfe) if sched is not None else float("nan")
            print(f"| null | {batch} | {label} | {len(nfe)} | {ms:.3f} ms/NFE | {dms:.3f} ms/NFE | "
                  f"{dms / ms:.2f} |", flush=True)
        elif sched is None:
            print(f"| {name} | {batch} | {label} | {len(nfe)} | {ips:.2f} | - | - |", flush=True)
        else:
            dips = batch / statistics.median(theirs)
            print(f"| {name} | {batch} | {label} | {len(nfe)} | {ips:.2f} | {dips:.2f} | {ips / dips:.2f} |",
                  flush=True)


def compare_bf16(name: str, net, x_T, y, repeats: int) -> None:
    """One table row per ldm sampler: img/s in fp32 and with the whole sampler under torch.autocast(bf16) (the
    network's matmuls in bf16, the sampler's updates in fp32 as autocast leaves them), their ratio, and how far the
    bf16 samples land from the fp32 ones (max |difference| / std of the fp32 samples)."""
    batch = x_T.shape[0]
    for label, sampler, pname, prediction, steps, kw, sched, _ in pairs():
        path = get_path(pname)
        ts = ldm_times(label, path, steps, sched)
        runs = {}
        for prec in ("fp32", "bf16"):
            def run(prec=prec, sampler=sampler, ts=ts, path=path, prediction=prediction, kw=kw):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    return ldm_run(net, sampler, x_T, y, ts, path, prediction,
                                   generator=torch.Generator().manual_seed(2), **kw)
            runs[prec] = run
        out = {prec: run().float() for prec, run in runs.items()}  # also the warm-up
        times = {prec: [] for prec in runs}
        for _ in range(repeats):
            for prec, run in runs.items():
                times[prec].append(timed(run))
        ips = {prec: batch / statistics.median(v) for prec, v in times.items()}
        dev = float((out["bf16"] - out["fp32"]).abs().max() / out["fp32"].std())
        print(f"| {name} | {batch} | {label} | {ips['fp32']:.2f} | {ips['bf16']:.2f} | {ips['bf16'] / ips['fp32']:.2f} "
              f"| {dev:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="null,tiny,S/2", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--batch", default="null=8,tiny=8,S/2=2", help="per-model batch sizes, name=B comma list")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--compare-bf16", action="store_true",
                    help="instead of diffusers: each ldm sampler under bf16 autocast vs fp32 (null is skipped)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(","))}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}", flush=True)
    if args.compare_bf16:
        print("| model | batch | sampler | fp32 img/s | bf16 img/s | bf16 / fp32 | max abs diff / std |")
        print("|---|---|---|---|---|---|---|", flush=True)
    else:
        print("| model | batch | sampler | NFE | ldm img/s | diffusers img/s | ldm / diffusers |")
        print("|---|---|---|---|---|---|---|", flush=True)
    for name in args.models.split(","):
        if args.compare_bf16 and name == "null":
            continue
        batch = batches[name]
        net = build_net(name)
        size = MODELS[name]["sample_size"]
        x_T = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(1))
        y = torch.arange(batch) % 1000
        with torch.no_grad():
            (compare_bf16 if args.compare_bf16 else compare_diffusers)(name, net, x_T, y, args.repeats)


if __name__ == "__main__":
    main()
