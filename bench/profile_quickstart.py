"""Where the quickstart's time goes: torch-profiler breakdown of each stage's step, as `ldm.train.loop.fit` runs it.

    python bench/profile_quickstart.py                         # configs/quickstart.yaml, 20 profiled steps per phase
    python bench/profile_quickstart.py --steps 4 --set generator.model.preset=DiT-Pico/2     # smoke

Profiled, each in a fresh run directory under a temporary folder (random-init weights: the cost of a step does not
depend on what the weights have learned):
  tokenizer        fit() of the quickstart's tokenizer stage before `disc_start` (autoencoder phase only) ...
  tokenizer + GAN  ... and after it (autoencoder phase with the GAN term and its adaptive weight, then the
                   discriminator phase)
  generator        fit() of the quickstart's generator stage on a latent cache of the digits (written by the pipeline's
                   latents stage from a random-init tokenizer of the quickstart's architecture)
  sampling         one batch of the sample stage's sampler (guidance doubles the batch), then its decode

Every event the profiler records at the top level of the main thread is put in one category (data loading,
forward, backward, optimizer, EMA, other torch ops); what is left of the wall time is time outside any torch op:
the Python of the loop, the task and the modules, logging and checkpoint writing (the kernel-launch overhead of a
CPU run). Warm-up steps (the first --warmup) are excluded by profiling a window of steps with a schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_loop import prepare  # the quickstart generator config + random-init latent cache

CATEGORIES = ("data", "forward", "backward", "optimizer", "ema", "other ops", "outside torch ops")


def category(name: str) -> str:
    """The category of a top-level profiler event of the main thread, by its name."""
    if name.startswith("enumerate(DataLoader)"):
        return "data"
    if name.startswith("autograd::engine") or "Backward" in name:
        return "backward"
    if name.startswith(("Optimizer.", "aten::_foreach_add")) or "clip_grad" in name:
        return "optimizer"
    if name.startswith("aten::_foreach_lerp"):
        return "ema"
    if name.startswith("aten::"):
        return "forward"
    return "other ops"


def breakdown(prof, wall: float) -> dict[str, float]:
    """Seconds per category over the profiled window: top-level events of the thread that ran the loop."""
    events = [e for e in prof.events() if e.cpu_parent is None and not e.name.startswith("ProfilerStep")]
    main = max({e.thread for e in events}, key=lambda th: sum(e.cpu_time_total for e in events if e.thread == th))
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.thread == main:
            out[category(e.name)] += e.cpu_time_total / 1e6
    out["outside torch ops"] = max(wall - sum(out.values()), 0.0)
    return dict(out)


def profile_fit(cfg, task, dataset, steps: int, warmup: int) -> tuple[dict[str, float], float]:
    """(category seconds per step, wall seconds per step) of `steps` fit steps after `warmup` unprofiled ones."""
    from ldm.train.loop import fit

    stamps: list[float] = []
    # one step more than profiled: the window closes at the start of step warmup + steps, so it holds whole steps
    # and not the run's final checkpoint and grid
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps + 1, resume="never"))
    window: dict = {}
    def on_forward(_module, _args, kwargs):  # the first phase's forward starts each step
        if kwargs.get("phase", task.phases[0]) != task.phases[0]:
            return
        stamps.append(time.perf_counter())
        if len(stamps) == warmup + 1:
            window["prof"] = profile(activities=[ProfilerActivity.CPU])
            window["prof"].__enter__()
            window["t0"] = stamps[-1]
        elif len(stamps) == warmup + steps + 1:
            window["wall"] = stamps[-1] - window["t0"]
            window["prof"].__exit__(None, None, None)

    handle = task.register_forward_pre_hook(on_forward, with_kwargs=True)
    fit(cfg, task, dataset, progress=False)
    handle.remove()
    wall = window["wall"]
    cats = breakdown(window["prof"], wall)
    return {k: v / steps for k, v in cats.items()}, wall / steps


def profile_sampling(gen_cfg, batch: int) -> tuple[dict[str, float], float]:
    """One batch of the configured sampler with guidance on a random-init generator of the run's architecture."""
    from ldm.eval.generator import sample_latents
    from ldm.train.stages import build_task

    task, _ = build_task(gen_cfg)
    model = task.ema_module().eval()
    noise = torch.randn((batch, *task.latent_shape), generator=torch.Generator().manual_seed(0))
    num_classes = task.num_classes
    y = torch.arange(batch) % max(num_classes, 1) if num_classes else None
    kw = dict(path=task.path, prediction=gen_cfg.diffusion.prediction, sample_cfg=gen_cfg.sample,
              num_classes=num_classes)
    with torch.no_grad():
        sample_latents(model, noise[:8], y[:8], **kw)  # warm-up
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample_latents(model, noise, y, **kw)
        wall = time.perf_counter() - t0
    return breakdown(prof, wall), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="profiled steps per training phase")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps before them")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of configs/quickstart.yaml")
    args = ap.parse_args()
    from ldm.config import PipelineCfg, load_config
    from ldm.pipeline import stage_configs
    from ldm.train.stages import build_task

    rows: dict[str, tuple[dict[str, float], float]] = {}
    with tempfile.TemporaryDirectory(prefix="ldm_profile_qs_") as tmp:
        pcfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run_root={tmp}", "name=prof", *args.set],
                           schema=PipelineCfg)
        tok_cfg, _ = stage_configs(pcfg)
        for label, disc_start in (("tokenizer", 10**9), ("tokenizer + GAN", 0)):
            cfg = dataclasses.replace(tok_cfg, name=f"prof_{disc_start}", tokenizer=dataclasses.replace(
                tok_cfg.tokenizer, disc_start=disc_start), train=dataclasses.replace(
                tok_cfg.train, sample_every=0, ckpt_every=10**9))
            torch.manual_seed(0)
            task, dataset = build_task(cfg)
            rows[label] = profile_fit(cfg, task, dataset, args.steps, args.warmup)
        gen_cfg = prepare(Path(tmp) / "gen", args.set, "no")
        gen_cfg = dataclasses.replace(gen_cfg, train=dataclasses.replace(gen_cfg.train, sample_every=0,
                                                                         ckpt_every=10**9))
        torch.manual_seed(0)
        task, dataset = build_task(gen_cfg)
        rows["generator"] = profile_fit(gen_cfg, task, dataset, args.steps, args.warmup)
        rows["sampling batch"] = profile_sampling(gen_cfg, gen_cfg.sample.batch_size)

    print(f"\nCPU, {torch.get_num_threads()} threads; ms per step (sampling: per batch of "
          f"{gen_cfg.sample.batch_size}, {gen_cfg.sample.sampler} {gen_cfg.sample.steps} steps, CFG "
          f"{gen_cfg.sample.cfg_scale}); share of the step in brackets")
    print("| phase | wall | " + " | ".join(CATEGORIES) + " |")
    print("|---|---:|" + "---:|" * len(CATEGORIES))
    for label, (cats, wall) in rows.items():
        cells = [f"{cats.get(c, 0.0) * 1e3:.0f} ({100 * cats.get(c, 0.0) / wall:.0f} %)" for c in CATEGORIES]
        print(f"| {label} | {wall * 1e3:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
