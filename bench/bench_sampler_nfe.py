"""NFE each sampler needs to reach a fixed FD on a trained generator (by default the quickstart's digits DiT).

    python bench/bench_sampler_nfe.py runs/quickstart/generator [--num 1000] [--nfe 4,6,8,12,16,24,32]
        [--samplers euler,heun,dpm_solver++,euler_maruyama] [--ref-nfe 127] [--tol 0.10] [--threads 0]

Every (sampler, NFE budget) draws the SAME samples: per-index noise from hash(seed, i) and cycled class labels, the
run's guidance (sample.cfg_scale, interval) and time grid, exactly as `ldm sample` makes them (generate_batch).
Quality is the Fréchet distance in the feature space of ldm's digits classifier (FD_digits, the quickstart's offline
metric) between the samples and the digits dataset at the run's image size.

NFE counts network evaluations per sample (a CFG step is one batched forward of cond + uncond, as in DiT/SiT), and
is measured with a forward hook: steps = NFE for euler / ddim / dpm_solver++ (multistep, 2M) / euler_maruyama,
steps = (NFE + 1) / 2 for heun (Karras Alg. 1: 2 NFE per step, 1 on the last step to t = 0).

Target: FD_target = (1 + tol) * FD of heun at --ref-nfe (a converged reference). "NFE needed" is the smallest budget in
--nfe whose FD <= FD_target (">max" when none is). FD from 1,000 samples has a sampling error of its own, but all
rows share the noise and labels, so the comparison between samplers is paired.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from ldm.eval.evaluate import evaluate_batches, metric_key, reference_stats
from ldm.eval.extractors import build_extractor
from ldm.eval.generate import generate_batch, labels_for, parse_classes
from ldm.eval.generator import load_generator


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def run_sampler(gen, sample_cfg, num: int, batch: int, classes, seed: int) -> tuple[list, float, float]:
    """(batches of (uint8 NHWC, indices), NFE per sample, seconds)."""
    calls = []
    hook = gen.model.register_forward_hook(lambda *a: calls.append(1))
    out, t0 = [], time.perf_counter()
    try:
        for s in range(0, num, batch):
            idx = list(range(s, min(num, s + batch)))
            labels = labels_for(idx, classes, seed=seed)
            out.append((generate_batch(gen, idx, labels, sample_cfg=sample_cfg, seed=seed, batch_size=batch,
                                       decode_batch=batch), np.asarray(idx)))
    finally:
        hook.remove()
    return out, len(calls) / len(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="generator run directory (class-conditional digits model)")
    ap.add_argument("--num", type=int, default=1000, help="samples per (sampler, NFE)")
    ap.add_argument("--nfe", default="4,6,8,12,16,24,32", help="NFE budgets")
    ap.add_argument("--samplers", default="euler,heun,dpm_solver++,euler_maruyama")
    ap.add_argument("--ref-nfe", type=int, default=127, help="NFE of the heun reference run")
    ap.add_argument("--tol", type=float, default=0.10, help="target = (1 + tol) * reference FD")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = load_generator(args.run)
    base = gen.cfg.sample
    size = gen.cfg.data.image_size
    classes = parse_classes("all", gen.num_classes)
    ext = build_extractor("digits")
    ref = reference_stats(gen.cfg.data.source, ext, size=size, progress=False)
    key = metric_key(ext, "fd")

    def fd_of(sampler: str, nfe: int) -> tuple[float, float, float]:
        cfg = dataclasses.replace(base, sampler=sampler, steps=steps_for(sampler, nfe))
        batches, measured, seconds = run_sampler(gen, cfg, args.num, args.batch, classes, args.seed)
        fd = evaluate_batches(iter(batches), ref, extractor=ext, metrics=("fd",), progress=False)[key]
        return fd, measured, seconds

    print(f"run {args.run} | {gen.checkpoint} | cfg {base.cfg_scale} interval {list(base.interval)} | time grid "
          f"{base.time_grid} | {args.num} samples, seed {args.seed} | torch threads {torch.get_num_threads()}")
    ref_fd, ref_nfe, ref_s = fd_of("heun", args.ref_nfe)
    target = (1 + args.tol) * ref_fd
    print(f"reference: heun at {ref_nfe:.0f} NFE: {key} = {ref_fd:.3f} ({ref_s:.0f} s); target {key} <= "
          f"{target:.3f}\n")

    budgets = [int(v) for v in args.nfe.split(",")]
    table: dict[str, list[tuple[float, float]]] = {}
    for sampler in args.samplers.split(","):
        table[sampler] = []
        for nfe in budgets:
            fd, measured, seconds = fd_of(sampler, nfe)
            table[sampler].append((fd, measured))
            print(f"  {sampler:15s} NFE {measured:5.1f}: {key} {fd:8.3f}  ({seconds:.1f} s)", flush=True)

    print(f"\n| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + f" | NFE to reach {key} <= {target:.2f} |")
    print("|---|" + "---|" * (len(budgets) + 1))
    for sampler, row in table.items():
        needed = next((m for fd, m in row if fd <= target), None)
        cells = " | ".join(f"{fd:.2f}" + ("" if abs(m - n) < 0.5 else f" ({m:.0f})") for (fd, m), n in zip(row, budgets))
        print(f"| {sampler} | {cells} | {f'{needed:.0f}' if needed is not None else f'>{max(budgets)}'} |")


if __name__ == "__main__":
    main()
