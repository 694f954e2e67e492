"""`fit()`: the one training loop shared by every stage (tokenizer, generator, ...).

accelerate provides devices, DDP and mixed precision; everything else is here and identical for all stages:
gradient accumulation, clipping, lr warm-up + schedule, EMA, one optimizer per task phase, TensorBoard/metrics.jsonl,
progress bar, periodic grids and evaluation, atomic checkpoints, bit-exact resume under the resume contract (changed
settings checked, recorded and put in effect: ldm.train.checkpoint), a NaN/inf guard and preemption. The autocast
precision is ldm.precision's choice for train.mixed_precision, named with its reason in the run header.
The loop knows no stage or phase names: a `Task` (ldm.train.task) declares its phases, their parameters and
optimizer settings, and ldm.train.stages builds the task of a config's stage.

`fit` reads top to bottom in sections (set-up, the step, logging, grids and evaluation, checkpoints, the end), as
edm2's training_loop.py; the small building blocks come before it (lr schedule, optimizer, preemption flag, resume
point), and the helper of each section after it, in the order fit calls them.

Determinism (STYLE.md §5): torch's RNG is reseeded at every step from hash(seed, rank, step) (edm2's rule), the batch
order is a pure function of (seed, epoch) and the checkpoint stores how many micro-batches were consumed; so a run
resumed from step k is bit-identical to one that never stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.config import ConfigError, OptimCfg, RunConfig, TrainCfg, as_container, save_config
from ldm.data.sampler import build_batch_sampler, refuse_layout_change
from ldm.io import save_image_grid
from ldm.precision import resolve_mixed_precision
from ldm.runs import last_good_checkpoint, latest_checkpoint, load_state_strict, resolve_checkpoint, setup_logging
from ldm.seeding import derive_seed
from ldm.train.checkpoint import (CheckpointWriteError, Resume, check_task_facts, open_resume, record_changes,
                                  save_checkpoint)
from ldm.train.ema import EMA
from ldm.train.logging import MetricsWriter, accelerate_trackers, check_trackers
from ldm.train.task import Task

# logged as their value at the logging step (with the task's `instant_logs`); every other scalar is averaged over
# the steps since the previous log
_INSTANT_LOGS = ("train/lr", "train/ema_decay")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step, the loss and the last good checkpoint."""


@dataclass
class FitResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    preempted: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Run:
    """What the sections of `fit` share: accelerate's objects, the task, its optimizers and the counters."""
    cfg: RunConfig
    accelerator: Any
    model: torch.nn.Module                          # the task as accelerate prepared it (DDP on several processes)
    task: Task                                      # the task itself
    groups: dict[str, list[torch.nn.Parameter]]     # {phase: parameters}
    optimizers: dict[str, torch.optim.Optimizer]    # checkpointed
    prepared: dict[str, Any]                        # accelerate's wrappers of the optimizers, which step
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    ema: EMA | None
    precision: str = "no"                           # accelerate's mixed_precision, recorded in checkpoints
    writer: MetricsWriter | None = None
    step: int = 0
    position: int = 0                               # micro-batches consumed: the data sampler resumes here
    data_layout: dict[str, int] | None = None       # the sampler's process x stream split, where its order has one
    last_ckpt: Path | None = None
    resumed_from: Path | None = None
    nan_skips: int = 0
    compiled: list[torch.nn.Module] = field(default_factory=list)  # train.compile: compiled in place, not yet run


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


def optimizer_hyperparameters(optim: OptimCfg, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """{lr (the peak lr), betas, eps, weight_decay} from optim.* with one phase's overrides of them
    (Task.optimizer_settings, e.g. the tokenizer discriminator's lr and betas)."""
    settings = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    unknown = sorted(set(overrides or {}) - set(settings))
    if unknown:
        raise ValueError(f"optimizer settings {unknown} are not among {sorted(settings)}")
    settings.update(overrides or {})
    settings["betas"] = tuple(settings["betas"])
    return settings


def build_optimizer(params: list[torch.nn.Parameter], optim: OptimCfg,
                    overrides: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Adam/AdamW from optim.* with one phase's overrides (see optimizer_hyperparameters)."""
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(params, **optimizer_hyperparameters(optim, overrides))


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
    """Train `task` (default: the one of cfg.stage, from ldm.train.stages) on `dataset` until train.max_steps;
    returns where things are."""
    from accelerate import PartialState

    t = cfg.train
    check_trackers(t.trackers)  # a tracker's missing package stops the run before anything is written
    # -------------------------------------------------------------------- set-up: processes, resume contract, logger
    procs = PartialState(cpu=not torch.cuda.is_available())
    setup_logging(None, procs.is_main_process)  # stdout only: nothing reaches the run directory before the contract
    resume = open_resume(_resolve_resume(cfg, cfg.run_dir), cfg)  # refused config changes stop here
    mp = _numerics(t, procs.device.type, resume)
    log = setup_logging(cfg.run_dir, procs.is_main_process)
    micro_bs = _micro_batch_size(t, procs.num_processes)
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights on every process
    if task is None:
        from ldm.train.stages import build_task

        task, dataset = build_task(cfg)
    assert dataset is not None, "fit() needs a dataset when a task is given"
    if resume is not None:
        check_task_facts(resume.task, task.describe(), resume.path)
        task.resume_facts(resume.task)  # e.g. a checkpoint from before per-sample draws keeps its global-RNG draws
    run = _prepare(cfg, task, mp[0], resume, log)  # the Accelerator needs the task's phases (DDP's unused parameters)
    sampler, batches = _data(run, dataset, micro_bs)
    _start(run, log, mp, resume)

    preempted, metrics, last_batch = False, {}, None
    window = _Window(_INSTANT_LOGS + tuple(f"train/{k}" for k in run.task.instant_logs))
    bar = tqdm(total=t.max_steps, initial=run.step, disable=not (progress and procs.is_main_process),
               desc=f"train {cfg.stage}", dynamic_ncols=True)
    with _Preemption() as preemption:
        while run.step < t.max_steps:
            if t.max_epochs is not None and run.position // sampler.batches_per_epoch >= t.max_epochs:
                break
            # ------------------------------------------------------------ the step: every phase, same micro-batches
            torch.manual_seed(derive_seed(cfg.seed, "step", procs.process_index, run.step))
            micro = [{k: v.to(run.accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                     for _ in range(t.grad_accum_steps)]
            run.position += t.grad_accum_steps
            last_batch = micro[0]
            logs, bad, stop = _step(run, micro, preemption, window, log)
            preempted = preempted or stop
            if bad is not None:
                _skip_nonfinite(run, bad, log, bar)
                continue  # the step counter does not advance: the same step index is retried on the next batch
            if run.ema is not None:
                logs["train/ema_decay"] = run.ema.update(run.task.ema_module(), run.step)
            run.step += 1
            bar.update(1)
            # ------------------------------------------------------------ logging, grids, evaluation
            metrics = _log(run, window, logs, bar) or metrics
            _grids_and_evaluation(run, last_batch, log)
            # ------------------------------------------------------------ checkpoints
            if preempted:
                run.last_ckpt = _checkpoint(run, log, interim=not _scheduled_checkpoint(run.step, t))
                log.info("preemption signal received: checkpoint written at step %d; relaunch the same command "
                         "to resume", run.step)
                break
            if _scheduled_checkpoint(run.step, t):
                run.last_ckpt = _checkpoint(run, log)
    bar.close()
    # -------------------------------------------------------------------- the end: last checkpoint and grid
    if not preempted:
        if run.last_ckpt is None or not str(run.last_ckpt).endswith(f"step_{run.step:07d}"):
            run.last_ckpt = _checkpoint(run, log)
        _visualize(run, last_batch if last_batch is not None else
                   {k: v.to(run.accelerator.device) for k, v in next(batches).items()})
    run.writer.close()
    if procs.is_main_process:
        log.info("done: step %d | checkpoint %s | config %s | TensorBoard: tensorboard --logdir %s",
                 run.step, run.last_ckpt, cfg.run_dir / "config.yaml", cfg.run_dir / "tb")
    return FitResult(run_dir=cfg.run_dir, step=run.step, last_checkpoint=run.last_ckpt, preempted=preempted,
                     metrics=metrics)


# ------------------------------------------------------------------------------------------------------ set-up
def _numerics(t: TrainCfg, device_type: str, resume: Resume | None) -> tuple[str, str]:
    """(accelerate's mixed_precision, why): ldm.precision's choice for train.mixed_precision on this device, except
    that a resumed run whose setting stays "auto" keeps the precision its checkpoint was trained in (a run started
    on another machine, or before auto picked bf16 on CPUs, continues as it began). train.deterministic turns
    deterministic algorithms on and TF32 off."""
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    mode, why = resolve_mixed_precision(t.mixed_precision, device_type)
    unchanged = resume is not None and "train.mixed_precision" not in {c.key for c in resume.changes}
    if unchanged and t.mixed_precision == "auto" and resume.precision != mode:
        return resume.precision, (f"auto: kept from the checkpoint, trained in {resume.precision} (a new run here "
                                  f"would pick {mode}: {why.removeprefix('auto: ')})")
    return mode, why


def _micro_batch_size(t: TrainCfg, world: int) -> int:
    if t.batch_size % (world * t.grad_accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum_steps = "
                          f"{world} x {t.grad_accum_steps}")
    return t.batch_size // (world * t.grad_accum_steps)


def _prepare(cfg: RunConfig, task: Task, mp: str, resume: Resume | None, log: logging.Logger) -> _Run:
    """The Accelerator, one optimizer and lr schedule per phase, EMA; all restored from `resume` if given (with the
    config's optimizer settings in effect); the task's modules compiled (train.compile); the task and optimizers
    prepared by accelerate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps one AcceleratorState per process and refuses an Accelerator of another precision: a process
    # that trains twice (pipeline stages, tests), the second time resumed in its checkpoint's precision or with
    # another setting, starts that one afresh (the process group, in PartialState, stays)
    if AcceleratorState._shared_state.get("_mixed_precision", mp) != mp:
        AcceleratorState._reset_state()
    # with several phases, each backward leaves the other phases' parameters without gradients; train.trackers
    # other than tensorboard are accelerate's (started in _start, by ldm.train.logging.MetricsWriter)
    trackers = accelerate_trackers(cfg.train.trackers)
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=len(task.phases) > 1)],
        log_with=trackers or None, project_dir=str(cfg.run_dir) if trackers else None)
    t, o = cfg.train, cfg.optim
    task.to(accelerator.device)
    groups = task.param_groups()
    if tuple(groups) != tuple(task.phases):
        raise ValueError(f"Task.param_groups() keys {list(groups)} must equal Task.phases {list(task.phases)}")
    optimizers = {ph: build_optimizer(groups[ph], o, task.optimizer_settings(ph)) for ph in task.phases}
    schedulers = {ph: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, t.max_steps,
                                                                          o.min_lr_ratio))
                  for ph, opt in optimizers.items()}
    ema = EMA(task.ema_module(), t.ema_decay, t.ema_warmup_steps) if t.ema else None
    run = _Run(cfg, accelerator, model=task, task=task, groups=groups, optimizers=optimizers, prepared={},
               schedulers=schedulers, ema=ema, precision=mp)
    state = _restore(run, resume) if resume is not None else None
    if ema is not None:
        ema.model.to(accelerator.device)
    if t.compile:  # after the EMA copy, which stays eager (it only runs in sampling)
        run.compiled = _compile(task, log)
    run.model = accelerator.prepare_model(task)
    run.prepared = {ph: accelerator.prepare_optimizer(opt) for ph, opt in optimizers.items()}
    if state is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    run.task = accelerator.unwrap_model(run.model)
    return run


def _compile(task: Task, log: logging.Logger) -> list[torch.nn.Module]:
    """train.compile: the task's modules worth compiling (Task.compile_modules), compiled in place with
    torch.compile's defaults; the actual compilation happens in the first step (`_first_compiled_step`). If
    torch.compile itself fails here, the modules stay eager and one warning says why."""
    compiled: list[torch.nn.Module] = []

    def compile_fn(module: torch.nn.Module) -> None:
        try:
            module.compile()
        except Exception as err:  # whatever torch.compile raises, training works without it
            raise _CompileFailed(err) from err
        compiled.append(module)

    try:
        names = task.compile_modules(compile_fn)
    except _CompileFailed as failed:  # only torch.compile's failures: an error of the task's own code propagates
        _uncompile(compiled)
        log.warning("train.compile: torch.compile failed (%s); training continues eagerly",
                    _one_line(failed.__cause__))
        return []
    if names:
        shown = names if len(names) <= 4 else [*names[:2], "...", names[-1]]
        log.info("train.compile: %d modules compiled in place (%s); they compile in the first step",
                 len(names), ", ".join(shown))
    return compiled


class _CompileFailed(Exception):
    """torch.compile raised (its error is the __cause__)."""


def _uncompile(modules: list[torch.nn.Module]) -> None:
    """Back to eager: nn.Module.compile keeps the compiled callable in `_compiled_call_impl` (torch has no public
    way to undo it); None is what an uncompiled module holds there."""
    for module in modules:
        module._compiled_call_impl = None


def _one_line(err: BaseException, limit: int = 300) -> str:
    """"<type>: <first line of the message>" of the error's root cause (torch.compile wraps a compiler's error in
    its own, e.g. BackendCompilerFailed, raised `from None` while handling the compiler's), shortened: compiler
    errors span pages. The chain is the explicit cause, else the error being handled when this one was raised."""
    root, seen = err, {id(err)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    first = (str(root).strip().splitlines() or [""])[0]
    text = f"{type(root).__name__}: {first}" + (f" (raised as {type(err).__name__})" if root is not err else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _restore(run: _Run, resume: Resume) -> dict[str, Any]:
    """Weights, optimizers, schedules, EMA and counters from the checkpoint; returns its training state. The run
    keeps no reference to the loaded tensors afterwards (no second copy of the weights for the whole run)."""
    ckpt, path, st = resume.checkpoint, resume.path, resume.checkpoint["state"]
    resume.checkpoint = None
    load_state_strict(run.task, ckpt["model"], f"{path}/model.safetensors")
    for ph, opt in run.optimizers.items():
        opt.load_state_dict(st["optimizers"][ph])
        run.schedulers[ph].load_state_dict(st["schedulers"][ph])
        _apply_settings(opt, run.schedulers[ph], optimizer_hyperparameters(run.cfg.optim,
                                                                           run.task.optimizer_settings(ph)))
    if run.ema is not None:
        if ckpt["ema"] is None:
            raise ValueError(f"{path} has no EMA weights but train.ema=true")
        run.ema.load_state_dict(ckpt["ema"])
    run.step, run.position, run.last_ckpt = int(st["step"]), int(st["data_position"]), path
    run.data_layout = st.get("data_layout")
    run.resumed_from = path
    run.task.to(run.accelerator.device)
    return st


def _apply_settings(opt: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                    settings: dict[str, Any]) -> None:
    """Put the config's optimizer settings in effect over those a checkpoint restored: loading an optimizer state
    restores its param groups' lr / betas / eps / weight decay and the schedule's base lrs, so without this a lower
    optim.lr given on resume would change nothing. The schedule itself (warm-up, kind, max_steps) is the config's
    already (LambdaLR does not store functions); the lr at the resumed step becomes the new peak times it, i.e. what
    the new schedule gives there. With an unchanged config every value is set to what it was, bit for bit."""
    peak = settings["lr"]
    scheduler.base_lrs = [peak] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, scheduler.lr_lambdas):
        group.update(betas=settings["betas"], eps=settings["eps"], weight_decay=settings["weight_decay"],
                     initial_lr=peak, lr=peak * factor(scheduler.last_epoch))  # LambdaLR.get_lr's product
    scheduler._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reports


def _data(run: _Run, dataset: torch.utils.data.Dataset, micro_bs: int):
    """(the resumable batch sampler, an iterator of micro-batches starting at the run's data position). A shard
    source's order depends on the process and worker counts: a resumed run must have those of its checkpoint."""
    acc, cfg = run.accelerator, run.cfg
    sampler = build_batch_sampler(dataset, micro_bs, seed=cfg.seed, rank=acc.process_index,
                                  world_size=acc.num_processes, start=run.position, num_workers=cfg.data.num_workers,
                                  shuffle_buffer=cfg.data.shuffle_buffer)
    refuse_layout_change(run.data_layout, sampler.layout)
    run.data_layout = sampler.layout
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         pin_memory=acc.device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0)
    return sampler, iter(loader)


def _start(run: _Run, log: logging.Logger, mp: tuple[str, str], resume: Resume | None) -> None:
    """The run directory, the config changes of a resume (train.log and config_history.yaml), config.yaml and the
    opening log lines (main process); the metrics writer."""
    acc, cfg = run.accelerator, run.cfg
    if acc.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for ps in run.groups.values() for p in ps)
        log.info("run %s | stage %s | %d processes on %s | mixed precision %s (%s) | %.2fM trainable parameters",
                 cfg.run_dir, cfg.stage, acc.num_processes, acc.device, mp[0], mp[1], n_params / 1e6)
        if resume is not None:
            log.info("resumed from %s (step %d)", resume.path, run.step)
            record_changes(cfg.run_dir, resume, log)
        save_config(cfg, cfg.run_dir / "config.yaml")
    run.writer = MetricsWriter(cfg.run_dir, acc.is_main_process, trackers=cfg.train.trackers, accelerator=acc,
                               project=cfg.train.tracker_project, run_name=cfg.name,
                               config=as_container(cfg) if resume is None else None)


# ------------------------------------------------------------------------------------------------------ the step
def _step(run: _Run, micro: list[dict[str, torch.Tensor]], preemption: _Preemption, window: _Window,
          log: logging.Logger) -> tuple[dict[str, float], str | None, bool]:
    """`_train_step`; the first one after compiling goes through `_first_compiled_step` and is left out of the
    images/s of its logging window."""
    if not run.compiled:
        return _train_step(run, micro, preemption)
    result = _first_compiled_step(run, micro, preemption, log)
    run.compiled = []
    window.restart_clock(untimed_steps=int(result[1] is None))  # a skipped (non-finite) step is never added
    return result


def _first_compiled_step(run: _Run, micro: list[dict[str, torch.Tensor]], preemption: _Preemption,
                         log: logging.Logger) -> tuple[dict[str, float], str | None, bool]:
    """The first step with compiled modules: torch.compile compiles them here, so this step is timed on its own
    ("compile + first step", train/compile_s). If it raises (no C++ compiler, an operation the compiler does not
    support, ...), the modules go back to eager, everything the step changed (weights, buffers, gradients,
    optimizers, lr schedules, grad scaler, torch's RNG) is put back, one warning names the error and the step runs
    again eagerly: the run then trains exactly as with train.compile=false, no step lost or counted twice. An error
    of the task itself recurs in the eager step and stops the run as usual."""
    before = _StepState(run)
    start = time.perf_counter()
    try:
        result = _train_step(run, micro, preemption)
    except Exception as err:  # noqa: BLE001 - see the docstring: the eager retry re-raises what is not compiling
        _uncompile(run.compiled)
        before.restore(run)
        log.warning("train.compile: compiling failed in the first step (%s); training continues eagerly",
                    _one_line(err))
        return _train_step(run, micro, preemption)
    seconds = time.perf_counter() - start
    log.info("compile + first step: %.1f s (left out of images/s)", seconds)
    run.writer.scalars(run.step + 1, {"train/compile_s": seconds})
    return result


class _StepState:
    """What `_train_step` changes, saved before it (weights and buffers on the CPU, optimizer and schedule states,
    the grad scaler, torch's RNG), to undo a step that failed half-way. Gradients are None between steps."""

    def __init__(self, run: _Run):
        self.tensors = {n: t.detach().to("cpu", copy=True)
                        for n, t in [*run.task.named_parameters(), *run.task.named_buffers()]}
        self.optimizers = {ph: copy.deepcopy(opt.state_dict()) for ph, opt in run.optimizers.items()}
        self.schedulers = {ph: copy.deepcopy(s.state_dict()) for ph, s in run.schedulers.items()}
        scaler = run.accelerator.scaler
        self.scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    @torch.no_grad()
    def restore(self, run: _Run) -> None:
        for name, t in [*run.task.named_parameters(), *run.task.named_buffers()]:
            t.copy_(self.tensors[name])
        for p in run.task.parameters():
            p.grad = None
        for ph, opt in run.optimizers.items():
            opt.load_state_dict(self.optimizers[ph])
            run.schedulers[ph].load_state_dict(self.schedulers[ph])
        if self.scaler is not None:
            run.accelerator.scaler.load_state_dict(self.scaler)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state_all(self.rng[1])


def _train_step(run: _Run, micro: list[dict[str, torch.Tensor]],
                preemption: _Preemption) -> tuple[dict[str, float], str | None, bool]:
    """Every phase of the task in order: accumulate gradients over the micro-batches, clip, check loss and grad
    norm for non-finite values (all processes together), step the phase's optimizer and lr schedule.

    Returns the step's logs, what was non-finite (None if nothing was; the step's later phases are then skipped)
    and whether any process received a preemption signal."""
    acc, phases, clip = run.accelerator, run.task.phases, run.cfg.optim.grad_clip
    logs: dict[str, float] = {}
    stop = False
    for ph in phases:
        suffix = f"_{ph}" if len(phases) > 1 else ""
        loss_sum = _accumulate(run, ph, micro, logs)
        grad_norm = acc.clip_grad_norm_(run.groups[ph], clip if clip > 0 else float("inf"))
        flags = torch.stack([(~torch.isfinite(torch.stack([loss_sum, grad_norm.float()]))).any().float(),
                             torch.tensor(float(preemption.requested), device=loss_sum.device)])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        stop = stop or bool(flags[1] > 0)
        logs[f"train/grad_norm{suffix}"] = float(grad_norm)
        opt = run.prepared[ph]
        if bool(flags[0] > 0):
            bad_terms = [k for k, v in logs.items() if not math.isfinite(v)] or [f"train/loss ({ph})"]
            opt.zero_grad(set_to_none=True)
            bad = f"{bad_terms[0]} (phase {ph}, loss {float(loss_sum):.4g}, grad norm {float(grad_norm):.4g})"
            return logs, bad, stop
        opt.step()
        run.schedulers[ph].step()
        opt.zero_grad(set_to_none=True)
        logs[f"train/lr{suffix}"] = run.schedulers[ph].get_last_lr()[0]
    return logs, None, stop


def _accumulate(run: _Run, phase: str, micro: list[dict[str, torch.Tensor]], logs: dict[str, float]) -> torch.Tensor:
    """Forward and backward of `phase` on each micro-batch (gradients synchronised across processes on the last
    one only); adds the micro-batch mean of each task log to `logs`; returns the summed loss."""
    acc, accum = run.accelerator, run.cfg.train.grad_accum_steps
    loss_sum = 0.0
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        with (nullcontext() if sync else acc.no_sync(run.model)), acc.autocast():
            out = run.model(mb, step=run.step, phase=phase, micro=i)
        acc.backward(out.loss / accum)
        loss_sum += out.loss.detach().float()
        for k, v in out.logs.items():
            logs[f"train/{k}"] = logs.get(f"train/{k}", 0.0) + float(v) / len(micro)
    return loss_sum


def _skip_nonfinite(run: _Run, bad: str, log: logging.Logger, bar) -> None:
    """Count a non-finite step and warn; past train.max_nan_skips, stop with TrainingDiverged."""
    t = run.cfg.train
    run.nan_skips += 1
    if run.nan_skips > t.max_nan_skips:
        bar.close()
        run.writer.close()
        good = last_good_checkpoint(run.cfg.run_dir, also=run.resumed_from)
        where = good if good is not None else "none (no checkpoint verifies with finite weights)"
        how = "train.resume=auto" if good is None or good == latest_checkpoint(run.cfg.run_dir) else \
            f"train.resume={good}"
        raise TrainingDiverged(
            f"non-finite value at step {run.step}: {bad}. Stopped after {run.nan_skips} non-finite step(s) "
            f"(train.max_nan_skips={t.max_nan_skips}). Last good checkpoint: {where}. Lower the lr, "
            f"enable grad clipping or QK-norm, then resume from it with {how}")
    log.warning("skipping step %d: non-finite %s (%d/%d skips allowed)", run.step, bad, run.nan_skips,
                t.max_nan_skips)


# ------------------------------------------------------------------------------------------------------ logging
class _Window:
    """Sums of the logged scalars since the last log. Losses are logged as their mean over this window (as DiT's
    train.py does), so log_every trades resolution for noise, not for skipped information; keys starting with one
    of `instant` (settings: lr, EMA decay, what a task draws per step) are logged as they are at the logging step."""

    def __init__(self, instant: tuple[str, ...]):
        self.instant = instant
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.sums, self.untimed = time.perf_counter(), 0, {}, 0

    def restart_clock(self, untimed_steps: int) -> None:
        """Time images/s from now, leaving out the next `untimed_steps` steps added (the one that just ran)."""
        self.start, self.untimed = time.perf_counter(), self.steps + untimed_steps

    def add(self, logs: dict[str, float]) -> None:
        self.steps += 1
        for k, v in logs.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v, count + 1)

    def means(self, logs: dict[str, float]) -> dict[str, float]:
        return {k: v if k.startswith(self.instant) else self.sums[k][0] / self.sums[k][1] for k, v in logs.items()}


def _log(run: _Run, window: _Window, logs: dict[str, float], bar) -> dict[str, float] | None:
    """Grad norms to TensorBoard every step; every train.log_every steps (and at the last) the window's scalars,
    averaged over processes, with images/s and GPU memory, to TensorBoard, metrics.jsonl and the progress bar.
    Returns what was logged (None between logging steps)."""
    t, acc = run.cfg.train, run.accelerator
    run.writer.scalars(run.step, {k: v for k, v in logs.items() if k.startswith("train/grad_norm")}, jsonl=False)
    window.add(logs)
    if run.step % t.log_every and run.step != t.max_steps:
        return None
    logs = window.means(logs)
    if acc.num_processes > 1:
        keys = sorted(logs)
        vals = acc.reduce(torch.tensor([logs[k] for k in keys], device=acc.device), reduction="mean")
        logs = dict(zip(keys, vals.tolist()))
    if window.steps > window.untimed:  # none when the window holds only the compiling first step
        timed = window.steps - window.untimed
        logs["train/images_per_s"] = timed * t.batch_size / max(time.perf_counter() - window.start, 1e-9)
    if torch.cuda.is_available():
        logs["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.writer.scalars(run.step, logs)
    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items()
                     if k.startswith("train/loss") or k == "train/images_per_s"})
    window.reset()
    return logs


def _visualize(run: _Run, batch: dict[str, torch.Tensor]) -> None:
    grid = run.task.visualize(batch, run.ema.model if run.ema is not None else None)
    if grid is not None and run.accelerator.is_main_process:
        save_image_grid(grid, run.cfg.run_dir / "samples" / f"step_{run.step:07d}.png")
        run.writer.image(run.step, "samples", grid)


def _grids_and_evaluation(run: _Run, last_batch: dict[str, torch.Tensor], log: logging.Logger) -> None:
    """Every train.sample_every steps a grid of the task (samples/ and TensorBoard); every train.eval_every steps
    the task's evaluation (on every process)."""
    t = run.cfg.train
    if t.sample_every and run.step % t.sample_every == 0:
        _visualize(run, last_batch)
    if t.eval_every and run.step % t.eval_every == 0:
        val = run.task.evaluate(run.ema.model if run.ema is not None else None, run.step)
        if val:
            run.writer.scalars(run.step, val)
            log.info("step %d: %s", run.step, ", ".join(f"{k} {v:.4g}" for k, v in val.items()))


# ------------------------------------------------------------------------------------------------------ checkpoints
def _scheduled_checkpoint(step: int, t: TrainCfg) -> bool:
    """Whether `step` gets a checkpoint by the schedule: every train.ckpt_every steps and at train.max_steps."""
    return step % t.ckpt_every == 0 or step == t.max_steps


def _checkpoint(run: _Run, log: logging.Logger, interim: bool = False) -> Path:
    """Weights, EMA and the full training state (optimizers, schedules, every process's RNG, data position) at the
    current step, written atomically by the main process; `interim` for one off the schedule (save_checkpoint)."""
    from accelerate.utils import gather_object

    acc, t = run.accelerator, run.cfg.train
    state = {"step": run.step, "data_position": run.position, "config": as_container(run.cfg),
             "task": run.task.describe(), "mixed_precision": run.precision,
             "optimizers": {ph: opt.state_dict() for ph, opt in run.optimizers.items()},
             "schedulers": {ph: s.state_dict() for ph, s in run.schedulers.items()},
             "rng": gather_object([_rng_state()]) if acc.num_processes > 1 else [_rng_state()]}
    if acc.scaler is not None:
        state["scaler"] = acc.scaler.state_dict()
    if run.data_layout is not None:
        state["data_layout"] = run.data_layout
    failure: CheckpointWriteError | None = None
    if acc.is_main_process:
        try:
            path = save_checkpoint(run.cfg.run_dir, run.step, model_state=run.task.state_dict(),
                                   ema_state=run.ema.state_dict() if run.ema is not None else None, state=state,
                                   keep_last=t.keep_last, interim=interim)
            log.info("checkpoint %s", path)
        except CheckpointWriteError as err:
            failure = err
    # the barrier after the write also carries its failure, so every process stops instead of waiting for the next
    failures = gather_object([failure]) if acc.num_processes > 1 else [failure]
    if any(f is not None for f in failures):
        raise next(f for f in failures if f is not None)
    return run.cfg.run_dir / "checkpoints" / f"step_{run.step:07d}"


def describe(result: FitResult) -> dict[str, Any]:
    return {"run_dir": str(result.run_dir), "step": result.step, "checkpoint": str(result.last_checkpoint),
            "preempted": result.preempted}
