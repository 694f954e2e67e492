"""ldm's training loop (`ldm.train.loop.fit`) vs a bare PyTorch loop of the same model, side by side in one process.

    python bench/bench_loop.py                          # quickstart generator, 200 timed steps each, 2 rounds
    python bench/bench_loop.py --steps 2 --warmup 1 --rounds 1 --set generator.model.preset=DiT-Pico/2   # smoke

Both loops train the quickstart's generator stage (configs/quickstart.yaml: class-conditional DiT-Ti/2, flow
matching, batch 128, AdamW, grad clip 1.0, EMA 0.995) on a latent cache of the 1,797 digits, encoded by a randomly
initialised tokenizer of the quickstart's architecture (its latent statistics computed as the pipeline does), so
nothing needs training first. Both compute the loss with the same `GeneratorTask.forward` on the same model, from the
same initial weights, so the ratio is the cost of the loop itself:

  ldm   fit(cfg, task, dataset) with the quickstart's cadence (log_every 50, ckpt_every 400, sample_every 400):
        accelerate's wrapping, the resumable batch sampler, per-step reseeding, the non-finite guard, the lr schedule,
        EMA, window-averaged logging to TensorBoard + metrics.jsonl, and checkpoints when due.
  bare  what one writes by hand: a DataLoader(shuffle=True, drop_last=True) over the same dataset, forward, backward,
        clip_grad_norm_(1.0), AdamW step, the same lr warm-up + cosine schedule (a LambdaLR of fit's lr_lambda: the
        lr changes the weights, and with them how many denormals the CPU meets), EMA by one torch._foreach_lerp_.

Timing: a forward pre-hook on the task stamps the start of every step; steps/s counts the `--steps` steps after
`--warmup` ones (start of step w to start of step w + steps, so each timed step's logging and EMA are inside the
window; the set-up before the first step and the final checkpoint and sample grid after the last are outside it and
reported separately as the whole call's seconds). With --steps below ckpt_every no periodic checkpoint falls inside
the window (the quickstart writes one every 400 steps; its cost is the whole call's end minus the bare loop's).
Rounds alternate the order (fit, bare, bare, fit, ...) and the table reports medians; the ratio is ldm / bare.

Per-sample draws: fit's batch sampler gives every sample a seed, from which the generator task draws its time, noise
and label dropout (one torch.Generator per sample, so results do not depend on batch split or process count); a
bare loop draws them for the whole batch from torch's RNG. That cost is part of training with ldm and is in the
default ratio; --same-draws feeds the bare loop from ldm's batch sampler too, so the ratio is the loop alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepare(root: Path, overrides: list[str], mixed_precision: str):
    """The quickstart's generator RunConfig under `root`, with a random-init tokenizer (+ latent statistics) and its
    latent cache written where the pipeline would put them."""
    from ldm.config import PipelineCfg, load_config
    from ldm.pipeline import run_latents, stage_configs
    from ldm.tokenizers.export import build_tokenizer
    from ldm.tokenizers.stats import compute_tokenizer_stats

    pcfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run_root={root}", "name=bench", *overrides],
                       schema=PipelineCfg)
    tok_cfg, gen_cfg = stage_configs(pcfg)
    torch.manual_seed(0)
    build_tokenizer(tok_cfg.tokenizer, tok_cfg.data.image_size).save_pretrained(tok_cfg.run_dir)
    compute_tokenizer_stats(tok_cfg.run_dir, tok_cfg.data, num_images=tok_cfg.tokenizer.stats_num_images)
    run_latents(pcfg, gen_cfg, progress=False)
    return dataclasses.replace(gen_cfg, train=dataclasses.replace(gen_cfg.train, resume="never",
                                                                  mixed_precision=mixed_precision))


def build(cfg):
    """(task, dataset, step-start stamps): the generator task from the same seed every time, with a pre-hook that
    appends perf_counter() at every forward call (one per step: one phase, no accumulation)."""
    from ldm.train.stages import build_task

    torch.manual_seed(0)
    task, dataset = build_task(cfg)
    stamps: list[float] = []
    task.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    return task, dataset, stamps


def run_fit(cfg, name: str, total_steps: int) -> tuple[list[float], float]:
    """(step-start stamps, seconds of the whole fit call) for `total_steps` steps of fit in a fresh run dir."""
    from ldm.train.loop import fit

    cfg = dataclasses.replace(cfg, name=name, train=dataclasses.replace(cfg.train, max_steps=total_steps))
    task, dataset, stamps = build(cfg)
    start = time.perf_counter()
    fit(cfg, task, dataset, progress=False)
    return stamps, time.perf_counter() - start


def run_bare(cfg, total_steps: int, same_draws: bool = False) -> tuple[list[float], float]:
    """(step-start stamps, seconds of the whole call) for `total_steps` steps of the bare loop; same_draws: its
    batches come from ldm's ResumableBatchSampler, whose per-sample seeds make the task draw t, noise and label
    dropout per sample as under fit, instead of a shuffling DataLoader (the task then draws from torch's RNG)."""
    task, dataset, stamps = build(cfg)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    o, t = cfg.optim, cfg.train
    task.to(device)
    params = task.param_groups()["model"]
    from ldm.train.loop import lr_lambda

    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, total_steps, o.min_lr_ratio))
    ema = copy.deepcopy(task.ema_module()).requires_grad_(False)
    ema_params, live = list(ema.parameters()), [p.detach() for p in task.ema_module().parameters()]
    if same_draws:
        from ldm.data.sampler import ResumableBatchSampler

        sampler = ResumableBatchSampler(len(dataset), t.batch_size, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    step = 0
    while step < total_steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = task(batch, step=step, phase="model").loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            torch._foreach_lerp_(ema_params, live, 1.0 - t.ema_decay)
            step += 1
            if step == total_steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stamps, time.perf_counter() - start


def steps_per_s(stamps: list[float], warmup: int, steps: int) -> float:
    return steps / (stamps[warmup + steps] - stamps[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per loop and round")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (fit, bare) in alternating order")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                    help="train.mixed_precision for fit; the bare loop autocasts to bf16 alike")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--same-draws", action="store_true",
                    help="the bare loop reads ldm's batch sampler, so the task's per-sample draws cost the same in "
                         "both and the ratio is the loop alone")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of configs/quickstart.yaml, e.g. generator.model.preset=DiT-Pico/2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.warmup + args.steps + 1  # the stamp of step warmup + steps closes the window
    results = {"ldm fit": [], "bare loop": []}
    with tempfile.TemporaryDirectory(prefix="ldm_bench_loop_") as tmp:
        cfg = prepare(Path(tmp), args.set, args.mixed_precision)
        for r in range(args.rounds):
            order = ("ldm fit", "bare loop") if r % 2 == 0 else ("bare loop", "ldm fit")
            for name in order:
                stamps, wall = (run_fit(cfg, f"fit_{r}", total) if name == "ldm fit" else run_bare(cfg, total, args.same_draws))
                results[name].append((steps_per_s(stamps, args.warmup, args.steps), wall))
    t = cfg.train
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{cfg.model.preset} batch {t.batch_size} | mixed precision {t.mixed_precision} | {dev} | "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} round(s) | log_every {t.log_every}, "
          f"ckpt_every {t.ckpt_every}, sample_every {t.sample_every} | bare loop data: "
          f"{'ldm batch sampler (same draws)' if args.same_draws else 'shuffling DataLoader'}")
    print(f"{'loop':10s} {'steps/s (median)':>16s} {'img/s':>8s} {'per round':>24s} {'whole call (s)':>15s}")
    med = {}
    for name, rows in results.items():
        med[name] = statistics.median(r[0] for r in rows)
        per_round = " ".join(f"{r[0]:.2f}" for r in rows)
        walls = " ".join(f"{r[1]:.1f}" for r in rows)
        print(f"{name:10s} {med[name]:16.3f} {med[name] * t.batch_size:8.1f} {per_round:>24s} {walls:>15s}")
    print(f"ldm fit / bare loop: {med['ldm fit'] / med['bare loop']:.3f}x")


if __name__ == "__main__":
    main()
