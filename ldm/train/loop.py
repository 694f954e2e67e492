"""`fit()`: the one training loop shared by the tokenizer and the generator stage.

accelerate provides devices, DDP and mixed precision; everything else is here and identical for both stages:
gradient accumulation, clipping, lr warm-up + schedule, EMA, one optimizer per task phase, TensorBoard/metrics.jsonl,
progress bar, periodic grids and evaluation, atomic checkpoints, bit-exact resume, a NaN/inf guard and preemption.

Determinism (STYLE.md §5): torch's RNG is reseeded at every step from hash(seed, rank, step) (edm2's rule), the batch
order is a pure function of (seed, epoch) and the checkpoint stores how many micro-batches were consumed; so a run
resumed from step k is bit-identical to one that never stopped.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm.config import ConfigError, RunConfig, as_container, save_config
from ldm.data.sampler import ResumableBatchSampler
from ldm.io import save_image_grid
from ldm.runs import latest_checkpoint, load_checkpoint, load_state_strict, resolve_checkpoint, setup_logging
from ldm.seeding import derive_seed
from ldm.train.checkpoint import save_checkpoint
from ldm.train.ema import EMA
from ldm.train.logging import MetricsWriter
from ldm.train.task import Task

# logged as their value at the logging step; every other scalar is averaged over the steps since the previous log
_INSTANT_LOGS = ("train/lr", "train/ema_decay", "train/eq_mode")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step, the loss and the last good checkpoint."""


@dataclass
class FitResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    preempted: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ helpers
def lr_lambda(schedule: str, warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr: linear warm-up from 0 over `warmup_steps`, then constant / cosine / linear decay
    to `min_ratio` at `max_steps`."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - min_ratio) * progress

    return f


def build_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, phase: str) -> torch.optim.Optimizer:
    """Adam/AdamW from optim.*; the tokenizer's "disc" phase uses optim.disc_lr / optim.disc_betas."""
    o = cfg.optim
    lr = (o.disc_lr or o.lr) if phase == "disc" else o.lr
    betas = tuple(o.disc_betas if phase == "disc" else o.betas)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay)


def build_task(cfg: RunConfig) -> tuple[Task, torch.utils.data.Dataset]:
    """The stage's Task and dataset, from an explicit table (no string imports)."""
    if cfg.stage == "tokenizer":
        from ldm.train.tokenizer_task import build_tokenizer_task as build
    else:
        from ldm.train.generator_task import build_generator_task as build
    return build(cfg)


class _Preemption:
    """Turns SIGTERM / SIGUSR1 (SLURM, spot instances) into a flag read at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _resolve_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    mode = cfg.train.resume
    if mode == "auto":
        return latest_checkpoint(run_dir)
    if mode == "never":
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"run directory {run_dir} already holds checkpoints and train.resume=never; choose "
                              f"another name=..., delete the folder, or set train.resume=auto to continue it")
        return None
    return resolve_checkpoint(mode)


# ------------------------------------------------------------------------------------------------------ the loop
def fit(cfg: RunConfig, task: Task | None = None, dataset: torch.utils.data.Dataset | None = None,
        *, progress: bool = True) -> FitResult:
    """Train `task` (default: built from cfg.stage) on `dataset` until train.max_steps; returns where things are."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    t = cfg.train
    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    phases_hint = task.phases if task is not None else (("gen", "disc") if cfg.stage == "tokenizer" else ("model",))
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=len(phases_hint) > 1)])
    rank, world = accelerator.process_index, accelerator.num_processes
    run_dir = cfg.run_dir
    log = setup_logging(run_dir, accelerator.is_main_process)
    resume_from = _resolve_resume(cfg, run_dir)

    if t.batch_size % (world * t.grad_accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum_steps = "
                          f"{world} x {t.grad_accum_steps}")
    micro_bs = t.batch_size // (world * t.grad_accum_steps)

    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights on every process
    if task is None:
        task, dataset = build_task(cfg)
    assert dataset is not None, "fit() needs a dataset when a task is given"
    task.to(accelerator.device)
    groups = task.param_groups()
    if tuple(groups) != tuple(task.phases):
        raise ValueError(f"Task.param_groups() keys {list(groups)} must equal Task.phases {list(task.phases)}")
    optimizers = {ph: build_optimizer(groups[ph], cfg, ph) for ph in task.phases}
    schedulers = {ph: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps,
                                                                          t.max_steps, cfg.optim.min_lr_ratio))
                  for ph, opt in optimizers.items()}
    ema = EMA(task.ema_module(), t.ema_decay, t.ema_warmup_steps) if t.ema else None
    n_params = sum(p.numel() for ps in groups.values() for p in ps)

    step, position, last_ckpt = 0, 0, None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, map_location="cpu")
        load_state_strict(task, ckpt["model"], f"{resume_from}/model.safetensors")
        st = ckpt["state"]
        for ph, opt in optimizers.items():
            opt.load_state_dict(st["optimizers"][ph])
            schedulers[ph].load_state_dict(st["schedulers"][ph])
        if ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"{resume_from} has no EMA weights but train.ema=true")
            ema.load_state_dict(ckpt["ema"])
        step, position, last_ckpt = int(st["step"]), int(st["data_position"]), resume_from
        task.to(accelerator.device)
    if ema is not None:
        ema.model.to(accelerator.device)

    model = accelerator.prepare_model(task)
    prepared = {ph: accelerator.prepare_optimizer(opt) for ph, opt in optimizers.items()}
    if resume_from is not None and accelerator.scaler is not None and "scaler" in ckpt["state"]:
        accelerator.scaler.load_state_dict(ckpt["state"]["scaler"])

    sampler = ResumableBatchSampler(len(dataset), micro_bs, seed=cfg.seed, rank=rank, world_size=world,
                                    start=position)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("run %s | stage %s | %d processes on %s | mixed precision %s | %.2fM trainable parameters",
                 run_dir, cfg.stage, world, accelerator.device, mp, n_params / 1e6)
        if resume_from is not None:
            log.info("resumed from %s (step %d)", resume_from, step)
    writer = MetricsWriter(run_dir, accelerator.is_main_process)
    unwrapped: Task = accelerator.unwrap_model(model)

    def checkpoint() -> Path:
        state = {"step": step, "data_position": position, "config": as_container(cfg), "task": unwrapped.describe(),
                 "optimizers": {ph: opt.state_dict() for ph, opt in optimizers.items()},
                 "schedulers": {ph: s.state_dict() for ph, s in schedulers.items()},
                 "rng": gather_object([_rng_state()]) if world > 1 else [_rng_state()]}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(run_dir, step, model_state=unwrapped.state_dict(),
                                   ema_state=ema.state_dict() if ema is not None else None, state=state,
                                   keep_last=t.keep_last)
            log.info("checkpoint %s", path)
        accelerator.wait_for_everyone()
        return run_dir / "checkpoints" / f"step_{step:07d}"

    def visualize(batch) -> None:
        grid = unwrapped.visualize(batch, ema.model if ema is not None else None)
        if grid is not None and accelerator.is_main_process:
            save_image_grid(grid, run_dir / "samples" / f"step_{step:07d}.png")
            writer.image(step, "samples", grid)

    nan_skips, preempted, metrics, last_batch = 0, False, {}, None
    bar = tqdm(total=t.max_steps, initial=step, disable=not (progress and accelerator.is_main_process),
               desc=f"train {cfg.stage}", dynamic_ncols=True)
    window_start, window_steps, window_sums = time.perf_counter(), 0, {}
    with _Preemption() as preemption:
        while step < t.max_steps:
            if t.max_epochs is not None and position // sampler.batches_per_epoch >= t.max_epochs:
                break
            torch.manual_seed(derive_seed(cfg.seed, "step", rank, step))
            micro = []
            for _ in range(t.grad_accum_steps):
                batch = next(batches)
                micro.append({k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()})
            position += t.grad_accum_steps
            last_batch = micro[0]

            logs: dict[str, float] = {}
            bad: str | None = None
            for ph in task.phases:
                opt = prepared[ph]
                loss_sum = 0.0
                for i, mb in enumerate(micro):
                    sync = i == len(micro) - 1
                    with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                        out = model(mb, step=step, phase=ph, micro=i)
                    accelerator.backward(out.loss / t.grad_accum_steps)
                    loss_sum += out.loss.detach().float()
                    for k, v in out.logs.items():
                        logs[f"train/{k}"] = logs.get(f"train/{k}", 0.0) + float(v) / len(micro)
                max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(groups[ph], max_norm)
                flags = torch.stack([(~torch.isfinite(torch.stack([loss_sum, grad_norm.float()]))).any().float(),
                                     torch.tensor(float(preemption.requested), device=loss_sum.device)])
                if world > 1:
                    flags = accelerator.reduce(flags, reduction="sum")
                nonfinite, stop = bool(flags[0] > 0), bool(flags[1] > 0)
                preempted = preempted or stop
                logs[f"train/grad_norm_{ph}" if len(task.phases) > 1 else "train/grad_norm"] = float(grad_norm)
                if nonfinite:
                    bad_terms = [k for k, v in logs.items() if not math.isfinite(v)] or [f"train/loss ({ph})"]
                    bad = f"{bad_terms[0]} (phase {ph}, loss {float(loss_sum):.4g}, grad norm {float(grad_norm):.4g})"
                    opt.zero_grad(set_to_none=True)
                    break
                opt.step()
                schedulers[ph].step()
                opt.zero_grad(set_to_none=True)
                logs[f"train/lr_{ph}" if len(task.phases) > 1 else "train/lr"] = schedulers[ph].get_last_lr()[0]

            if bad is not None:
                nan_skips += 1
                where = last_ckpt if last_ckpt is not None else "none (no checkpoint was written yet)"
                if nan_skips > t.max_nan_skips:
                    bar.close()
                    writer.close()
                    raise TrainingDiverged(
                        f"non-finite value at step {step}: {bad}. Stopped after {nan_skips} non-finite step(s) "
                        f"(train.max_nan_skips={t.max_nan_skips}). Last good checkpoint: {where}. Lower the lr, "
                        f"enable grad clipping or QK-norm, then resume from it with train.resume=auto")
                log.warning("skipping step %d: non-finite %s (%d/%d skips allowed)", step, bad, nan_skips,
                            t.max_nan_skips)
                continue  # the step counter does not advance: the same step index is retried on the next batch

            if ema is not None:
                logs["train/ema_decay"] = ema.update(unwrapped.ema_module(), step)
            step += 1
            window_steps += 1
            bar.update(1)
            writer.scalars(step, {k: v for k, v in logs.items() if k.startswith("train/grad_norm")}, jsonl=False)
            for k, v in logs.items():
                total, count = window_sums.get(k, (0.0, 0))
                window_sums[k] = (total + v, count + 1)
            if step % t.log_every == 0 or step == t.max_steps:
                # Losses are logged as their mean over the steps since the last log (as DiT's train.py does), so
                # log_every trades resolution for noise, not for skipped information; settings (lr, EMA decay, the
                # EQ-VAE mode drawn) are logged as they are at this step.
                logs = {k: v if k.startswith(_INSTANT_LOGS) else window_sums[k][0] / window_sums[k][1]
                        for k, v in logs.items()}
                window_sums = {}
                if world > 1:
                    keys = sorted(logs)
                    vals = accelerator.reduce(torch.tensor([logs[k] for k in keys], device=accelerator.device),
                                              reduction="mean")
                    logs = dict(zip(keys, vals.tolist()))
                elapsed = time.perf_counter() - window_start
                logs["train/images_per_s"] = window_steps * t.batch_size / max(elapsed, 1e-9)
                if torch.cuda.is_available():
                    logs["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                writer.scalars(step, logs)
                metrics = logs
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items()
                                 if k.startswith("train/loss") or k == "train/images_per_s"})
                window_start, window_steps = time.perf_counter(), 0
            if t.sample_every and step % t.sample_every == 0:
                visualize(last_batch)
            if t.eval_every and step % t.eval_every == 0:
                val = unwrapped.evaluate(ema.model if ema is not None else None, step)
                if val:
                    writer.scalars(step, val)
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
            if preempted:
                last_ckpt = checkpoint()
                log.info("preemption signal received: checkpoint written at step %d; relaunch the same command "
                         "to resume", step)
                break
            if step % t.ckpt_every == 0 or step == t.max_steps:
                last_ckpt = checkpoint()
    bar.close()
    if not preempted:
        if last_ckpt is None or not str(last_ckpt).endswith(f"step_{step:07d}"):
            last_ckpt = checkpoint()
        visualize(last_batch if last_batch is not None else
                  {k: v.to(accelerator.device) for k, v in next(batches).items()})
    writer.close()
    if accelerator.is_main_process:
        log.info("done: step %d | checkpoint %s | config %s | TensorBoard: tensorboard --logdir %s",
                 step, last_ckpt, run_dir / "config.yaml", run_dir / "tb")
    return FitResult(run_dir=run_dir, step=step, last_checkpoint=last_ckpt, preempted=preempted, metrics=metrics)


def describe(result: FitResult) -> dict[str, Any]:
    return {"run_dir": str(result.run_dir), "step": result.step, "checkpoint": str(result.last_checkpoint),
            "preempted": result.preempted}
