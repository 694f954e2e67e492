"""`ldm pipeline CONFIG`: a whole experiment in one command, resumable stage by stage.

    tokenizer  train the tokenizer (ldm train, stage=tokenizer), then store its latent statistics beside it; or,
               with tokenizer.stage=end_to_end, REPA-E's joint run (statistics: its generator's latent batch norm)
    latents    encode the generator's dataset once into the latent cache
    generator  train the generator on the cache (ldm train, stage=generator)
    sample     a class-conditional grid (grid_per_class x classes) and `num_samples` images as an ADM .npz
    eval       Fréchet distances of the samples to the data in each configured feature space

Everything lives under <run_root>/<name>/. A stage whose outputs are complete and valid is skipped (the training
stages resume from their last checkpoint when they are not), so re-running the command continues where it stopped.
The summary (summary.json and the printed table) says where everything is and what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ldm.config import PipelineCfg, RunConfig, as_container, save_config
from ldm.io import atomic_write_text
from ldm.runs import latest_checkpoint

log = logging.getLogger("ldm.pipeline")


def stage_configs(cfg: PipelineCfg) -> tuple[RunConfig, RunConfig]:
    """The two training runs, placed under the pipeline directory and wired to each other."""
    root = str(cfg.run_dir)
    # tokenizer.stage=end_to_end: REPA-E's joint run takes the tokenizer stage's place; the later stages read its
    # tuned tokenizer (ldm.tokenizers.export loads a joint run's tokenizer and latent statistics)
    stage = "end_to_end" if cfg.tokenizer.stage == "end_to_end" else "tokenizer"
    tok = dataclasses.replace(cfg.tokenizer, name="tokenizer", stage=stage,
                              train=dataclasses.replace(cfg.tokenizer.train, run_root=root))
    gen = dataclasses.replace(
        cfg.generator, name="generator", stage="generator",
        train=dataclasses.replace(cfg.generator.train, run_root=root),
        # the latent-shape keys follow the tokenizer stage, so the generator's check against the cache agrees
        tokenizer=dataclasses.replace(cfg.generator.tokenizer, checkpoint=str(cfg.run_dir / "tokenizer"),
                                      kind=tok.tokenizer.kind, latent_channels=tok.tokenizer.latent_channels,
                                      vq=dataclasses.replace(cfg.generator.tokenizer.vq,
                                                             code_dim=tok.tokenizer.vq.code_dim)),
        data=dataclasses.replace(cfg.generator.data, latents=str(cfg.run_dir / "latents")))
    return tok, gen


class PipelineStopped(RuntimeError):
    """A training stage was preempted (SIGTERM/SIGUSR1): later stages must not run on a half-trained model."""


def _fit_stage(cfg: RunConfig, progress: bool) -> None:
    from ldm.train.loop import fit

    result = fit(cfg, progress=progress)
    if result.preempted:
        raise PipelineStopped(f"stage {cfg.name} was preempted at step {result.step} (checkpoint "
                              f"{result.last_checkpoint}); re-run the same command to resume")


def _finished(run_dir: Path, max_steps: int) -> bool:
    try:
        ckpt = latest_checkpoint(run_dir)
    except FileNotFoundError:
        return False
    return ckpt is not None and int(ckpt.name.split("_")[-1]) >= max_steps


# ------------------------------------------------------------------------------------------------------ stages
def run_tokenizer(cfg: PipelineCfg, tok_cfg: RunConfig, progress: bool) -> dict:
    from ldm.tokenizers.export import load_tokenizer
    from ldm.tokenizers.stats import STATS_FILE, compute_tokenizer_stats, load_latent_stats

    run_dir = tok_cfg.run_dir
    skipped = _finished(run_dir, tok_cfg.train.max_steps)
    if not skipped:
        _fit_stage(tok_cfg, progress)
    stats_file = run_dir / STATS_FILE
    if tok_cfg.stage == "end_to_end":  # REPA-E: the statistics are the generator's latent batch norm's
        stats, stats_file = load_tokenizer(run_dir).stats, latest_checkpoint(run_dir)
    else:
        fingerprint = load_tokenizer(run_dir).fingerprint
        if not (stats_file.is_file() and load_latent_stats(stats_file).fingerprint == fingerprint):
            compute_tokenizer_stats(run_dir, tok_cfg.data, num_images=tok_cfg.tokenizer.stats_num_images)
        stats = load_latent_stats(stats_file)
    metrics = _last_metrics(run_dir)
    return {"skipped": skipped, "run_dir": str(run_dir), "latent_stats": str(stats_file),
            "latent_mean": [round(v, 4) for v in stats.mean], "latent_std": [round(v, 4) for v in stats.std],
            **{k: v for k, v in metrics.items() if k.startswith("train/loss")}}


def run_latents(cfg: PipelineCfg, gen_cfg: RunConfig, progress: bool) -> dict:
    from ldm.data.latents import build_latent_cache, read_cache_meta
    from ldm.tokenizers.export import load_tokenizer

    tokenizer = load_tokenizer(gen_cfg.tokenizer.checkpoint)
    out = Path(gen_cfg.data.latents)
    build_latent_cache(tokenizer, gen_cfg.data, out, flips=cfg.latent_flips, progress=progress)
    meta = read_cache_meta(out)
    return {"cache": str(out), "count": meta.count, "latent_shape": list(meta.latent_shape)}


def run_generator(cfg: PipelineCfg, gen_cfg: RunConfig, progress: bool) -> dict:
    skipped = _finished(gen_cfg.run_dir, gen_cfg.train.max_steps)
    if not skipped:
        _fit_stage(gen_cfg, progress)
    metrics = _last_metrics(gen_cfg.run_dir)
    return {"skipped": skipped, "run_dir": str(gen_cfg.run_dir),
            **{k: v for k, v in metrics.items() if k.startswith("train/loss") or k == "train/mse"}}


def run_sample(cfg: PipelineCfg, gen_cfg: RunConfig, progress: bool) -> dict:
    from ldm.eval.generate import write_samples
    from ldm.eval.generator import load_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = load_generator(gen_cfg.run_dir, device=device)
    out = cfg.run_dir / "samples"
    classes = list(range(gen.num_classes)) if gen.num_classes else None
    n_grid = cfg.grid_per_class * max(1, gen.num_classes)
    grid = write_samples(gen, out / "grid", num=n_grid, classes=classes, label_order="grid", grid=True,
                         grid_size=n_grid, npz=False, seed=gen.cfg.sample.seed, progress=progress)
    fid_set = write_samples(gen, out / "fid", num=cfg.num_samples, classes=classes, grid=False, npz=True,
                            seed=gen.cfg.sample.seed + 1, progress=progress)
    return {"grid": str(grid["grid"]), "npz": str(fid_set["npz"]), "num": cfg.num_samples,
            "images_per_s": fid_set.get("images_per_s")}


def run_eval(cfg: PipelineCfg, gen_cfg: RunConfig, progress: bool) -> dict:
    from ldm.eval.evaluate import evaluate_samples

    samples = cfg.run_dir / "samples" / "fid" / "samples.npz"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples} does not exist: run the 'sample' stage first")
    results: dict[str, Any] = {}
    size = gen_cfg.data.image_size
    for name in cfg.fid_extractors:
        try:
            res = evaluate_samples(str(samples), gen_cfg.data.source, extractor=name, size=size,
                                   cache_dir=cfg.run_dir / "ref_stats", metrics=("fd", "pr"), progress=progress)
        except FileNotFoundError as err:
            if name != "inception":
                raise
            results["inception"] = f"skipped: {str(err).splitlines()[0]}"
            continue
        results[name] = res
    atomic_write_text(cfg.run_dir / "eval.json", json.dumps(results, indent=2))
    return results


STAGES: dict[str, Callable[[PipelineCfg, RunConfig, bool], dict]] = {
    "tokenizer": run_tokenizer, "latents": run_latents, "generator": run_generator, "sample": run_sample,
    "eval": run_eval,
}


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else {}


# ------------------------------------------------------------------------------------------------------ driver
def run_pipeline(cfg: PipelineCfg, *, progress: bool = True) -> dict:
    """Run the configured stages in order; returns (and writes) the summary."""
    from ldm.runs import setup_logging

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, True)
    save_config(cfg, run_dir / "pipeline.yaml")
    tok_cfg, gen_cfg = stage_configs(cfg)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}}
    total = time.perf_counter()
    for name in cfg.stages:
        log.info("=== stage %s ===", name)
        start = time.perf_counter()
        result = STAGES[name](cfg, tok_cfg if name == "tokenizer" else gen_cfg, progress)
        result["seconds"] = round(time.perf_counter() - start, 1)
        summary["stages"][name] = result
        log.info("stage %s done in %.1f s", name, result["seconds"])
    summary["seconds"] = round(time.perf_counter() - total, 1)
    summary["config"] = as_container(cfg)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def format_summary(summary: dict) -> str:
    """The short report printed at the end: where things are, the numbers, what to try next."""
    st = summary["stages"]
    lines = [f"\nPipeline finished in {summary['seconds']:.0f} s — everything is under {summary['run_dir']}/"]
    for name, res in st.items():
        note = " (already complete, skipped)" if res.get("skipped") else ""
        lines.append(f"  {name:<10} {res['seconds']:>6.1f} s{note}")
    if "tokenizer" in st:
        lines.append(f"  tokenizer  : {st['tokenizer']['run_dir']}  (latent std {st['tokenizer']['latent_std']})")
    if "generator" in st:
        lines.append(f"  generator  : {st['generator']['run_dir']}")
    if "sample" in st:
        lines.append(f"  grid       : {st['sample']['grid']}")
        lines.append(f"  samples    : {st['sample']['npz']} ({st['sample']['num']} images)")
    if "eval" in st:
        for name, res in st["eval"].items():
            if name == "seconds":
                continue
            if isinstance(res, str):
                lines.append(f"  {name:<10} : {res}")
                continue
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float))
            lines.append(f"  {name:<10} : {numbers}  [{res['num_samples']} samples vs {res['num_ref']} data images, "
                         f"extractor {res['extractor']}]")
            lines += [f"    warning: {w}" for w in res.get("warnings", [])]
    gen_dir = st.get("generator", {}).get("run_dir", "RUN")
    lines += ["", "Next:", f"  ldm sample {gen_dir} --num 100 --cfg 2.0 --grid --out my_samples",
              f"  tensorboard --logdir {summary['run_dir']}",
              "  ldm pipeline configs/quickstart.yaml generator.train.max_steps=4000 name=longer"]
    return "\n".join(lines)
