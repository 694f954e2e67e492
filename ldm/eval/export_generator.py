"""`ldm export` for generators: a trained run, or official DiT / SiT / LightningDiT weights, as a diffusers pipeline
folder with a model card (classes in ldm/eval/export_pipeline.py).

    DIR/model_index.json        DiTPipeline or LdmLatentPipeline, latent normalisation, sampling defaults, id2label
    DIR/transformer/            the network (LdmDiTTransformer2DModel or LdmGeneratorModel), safetensors
    DIR/vae/                    the frozen tokenizer as a diffusers AutoencoderKL
    DIR/scheduler/              the scheduler that performs the run's sampler (export_pipeline.scheduler_for)
    DIR/ldm_config.yaml         the resolved run config the generator was trained (or, official, is sampled) with
    DIR/README.md               model card: how to load, config, tokenizer fingerprint, metrics, ldm version

pipeline="auto" writes a DiTPipeline folder when DiTPipeline can run the model (export_pipeline.dit_pipeline_refusal:
an eps DiT with DiT's blocks on a DDPM path, 1 .. 1000 classes, scalar or no latent scaling), else an
LdmLatentPipeline folder; "dit" insists (and says why not), "ldm" always writes the ldm pipeline. Only KL tokenizers
export (diffusers has no VQ autoencoder with ldm's codebook). The folder is written beside DIR and renamed into place,
so DIR holds a complete export or nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

from ldm.eval.generator import Generator, load_generator, load_official_generator

log = logging.getLogger(__name__)

CONFIG_FILE = "ldm_config.yaml"
CARD_FILE = "README.md"
SAMPLE_KEYS = ("sampler", "steps", "cfg_scale", "interval", "cfg_channels", "guidance_rule", "time_grid", "shift", "eta")


def is_generator_source(path: str | Path) -> bool:
    """Whether `ldm export PATH` means a generator: a run or checkpoint directory of a generator run (its
    config.yaml, else its checkpoint's config, says stage=generator). Anything else is left to the tokenizer export."""
    from ldm.hub import resolve_path
    from ldm.runs import load_checkpoint, resolve_checkpoint
    from ldm.tokenizers.export import is_run_or_checkpoint

    path = Path(resolve_path(path))
    if not is_run_or_checkpoint(path):
        return False
    ckpt = resolve_checkpoint(path)
    run_config = ckpt.parent.parent / "config.yaml"
    if run_config.is_file():
        from ldm.config import load_config

        return load_config(run_config).stage == "generator"
    return load_checkpoint(ckpt)["state"].get("task", {}).get("kind") == "generator"


@dataclasses.dataclass
class GeneratorExport:
    """Where an export went and what it holds."""

    folder: Path
    pipeline_class: str  # DiTPipeline | LdmLatentPipeline
    scheduler_class: str
    note: str  # why the other pipeline kind was not used, or ""


def export_generator(src: str | Path, out_dir: str | Path, *, use_ema: bool = True, pipeline: str = "auto",
                     official: str | None = None, tokenizer: str | None = None) -> GeneratorExport:
    """Write the generator at `src` (a run / checkpoint directory, or with `official` a DiT / SiT / LightningDiT weights
    file) to `out_dir` as a diffusers pipeline folder (module docstring). `tokenizer` overrides the run's tokenizer
    (checked against its fingerprint) and is required for official weights."""
    from ldm.eval.export_pipeline import PIPELINE_KINDS

    if pipeline not in ("auto", *PIPELINE_KINDS):
        raise ValueError(f"--pipeline={pipeline!r}; expected one of {['auto', *PIPELINE_KINDS]}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"--to {out_dir} exists and is not empty; choose a new folder or delete it")
    if official is not None:
        if not use_ema:
            raise ValueError("--no-ema does not apply to --official weights (released files hold EMA weights only)")
        gen = load_official_generator(official, src, tokenizer=tokenizer)
    else:
        gen = load_generator(src, use_ema=use_ema, tokenizer=tokenizer)
    if getattr(gen, "text_encoder", None) is not None:
        raise ValueError(f"{src} is a text-conditioned generator; ldm exports class-conditional and unconditional "
                         f"generators only")
    if gen.tokenizer.kind != "kl":
        raise ValueError(f"{src}: its tokenizer is a {gen.tokenizer.kind} tokenizer; only KL tokenizers export to a "
                         f"diffusers pipeline (AutoencoderKL)")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _write(gen, tmp, pipeline, official=official, weights=src)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.folder = out_dir
    log.info("exported generator %s as a %s folder to %s", src, result.pipeline_class, out_dir)
    return result


def _write(gen: Generator, out: Path, pipeline: str, *, official: str | None, weights: str | Path) -> GeneratorExport:
    from ldm.eval.export_pipeline import dit_pipeline_refusal

    refusal = dit_pipeline_refusal(gen.model, path=gen.path, prediction=gen.prediction, normalizer=gen.normalizer)
    if pipeline == "dit" and refusal is not None:
        raise ValueError(f"--pipeline dit: {refusal}; use --pipeline ldm (or auto)")
    if pipeline in ("auto", "dit") and refusal is None:
        pipe = _dit_pipeline(gen)
        note = ""
    else:
        pipe = _ldm_pipeline(gen, official=official, weights=weights)
        note = refusal or "--pipeline ldm"
    out.mkdir(parents=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    _add_to_model_index(out, id2label=_id2label(gen.num_classes))
    from ldm.config import to_yaml
    from ldm.io import atomic_write_text

    atomic_write_text(out / CONFIG_FILE, to_yaml(gen.cfg))
    result = GeneratorExport(out, type(pipe).__name__, type(pipe.scheduler).__name__, note)
    atomic_write_text(out / CARD_FILE, model_card(gen, result))
    return result


def _vae(gen: Generator, scaling_factor: float | None):
    """A copy of the tokenizer's AutoencoderKL; scaling_factor (DiTPipeline's latent scale) replaces its config's."""
    vae = copy.deepcopy(gen.tokenizer.model).to("cpu")
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    return vae


def _dit_pipeline(gen: Generator):
    from diffusers import DiTPipeline

    from ldm.eval.export_pipeline import (
        LdmDiTTransformer2DModel,
        dit_pipeline_scheduler,
        dit_to_diffusers,
    )

    config, state = dit_to_diffusers(gen.model, num_timesteps=gen.path.num_timesteps)
    transformer = LdmDiTTransformer2DModel(**config)
    transformer.load_state_dict(state, strict=True)
    if gen.cfg.sample.sampler not in ("ddpm", "ddim"):
        log.warning("the run samples with %s; the DiTPipeline folder gets DDIMScheduler (swap pipe.scheduler, or "
                    "export with --pipeline ldm to keep %s)", gen.cfg.sample.sampler, gen.cfg.sample.sampler)
    scale = float(gen.normalizer.scale) if gen.normalizer.kind == "scalar" else 1.0  # DiTPipeline: z / scaling_factor
    return DiTPipeline(transformer=transformer.eval(), vae=_vae(gen, scale),
                       scheduler=dit_pipeline_scheduler(gen.path, gen.cfg.sample.sampler),
                       id2label=_id2label(gen.num_classes))


def _network_record(gen: Generator, *, official: str | None, weights: str | Path) -> dict:
    """How LdmGeneratorModel rebuilds the network: the run's model section, or the official weights' DiT kwargs."""
    c, h, _ = gen.latent_shape
    common = dict(latent_channels=c, latent_size=h, num_classes=gen.num_classes, path=gen.path.name,
                  prediction=gen.prediction, learned_sigma=gen.learned_sigma)
    if official is not None:
        from ldm.hub import resolve_path
        from ldm.models.checkpoints import convert_official_state_dict, read_state_dict

        _, kwargs = convert_official_state_dict(read_state_dict(resolve_path(weights)), official)
        return dict(builder="dit_kwargs", dit_kwargs=kwargs, **common)
    model_cfg = dataclasses.asdict(gen.cfg.model)
    model_cfg.update(attention="sdpa", grad_checkpointing=False)  # the same maths; no optional package needed
    return dict(builder="model_cfg", model_cfg=model_cfg, **common)


def _ldm_pipeline(gen: Generator, *, official: str | None, weights: str | Path):
    from ldm.eval.export_pipeline import (
        LdmGeneratorModel,
        LdmLatentPipeline,
        scheduler_for,
    )

    transformer = LdmGeneratorModel(**_network_record(gen, official=official, weights=weights))
    transformer.net.load_state_dict(gen.model.state_dict(), strict=True)
    n = gen.normalizer
    s = gen.cfg.sample
    sample = {k: getattr(s, k) for k in SAMPLE_KEYS}
    sample["interval"] = [float(v) for v in sample["interval"]]
    return LdmLatentPipeline(transformer=transformer.eval(), vae=_vae(gen, None),
                             scheduler=scheduler_for(gen.path, s, gen.learned_sigma), latent_norm=n.kind,
                             latent_mean=n.mean.flatten().tolist(), latent_std=n.std.flatten().tolist(),
                             latent_scale=float(n.scale), sample=sample, id2label=_id2label(gen.num_classes))


def _id2label(num_classes: int) -> dict[str, str] | None:
    """Class ids as names ("0", "1", ...): runs do not record class names."""
    return {str(i): str(i) for i in range(num_classes)} if num_classes > 0 else None


def _add_to_model_index(out: Path, **entries) -> None:
    """DiTPipeline does not register id2label in its config, so save_pretrained leaves it out of model_index.json;
    from_pretrained passes it back to __init__ from there."""
    from ldm.io import atomic_write_text

    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({k: v for k, v in entries.items() if v is not None})
    atomic_write_text(index_file, json.dumps(index, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------ model cards
def run_metrics(run_dir: Path | None) -> dict[str, tuple[int | None, float]]:
    """The last recorded value (with its step) of every non-training metric in RUN/metrics.jsonl (eval/*, val/*, ...)."""
    found: dict[str, tuple[int | None, float]] = {}
    path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if path is None or not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in record.items():
            if k != "step" and not k.startswith("train/") and isinstance(v, (int, float)):
                found[k] = (record.get("step"), float(v))
    return found


def _card(*, tags: list[str], title: str, intro: str, usage: list[str], facts: list[str], run_dir: Path | None,
          config_yaml: str | None) -> str:
    """A Hub model card: metadata, usage, provenance (the ldm version first), the run's metrics, the config."""
    import ldm
    from ldm.io import git_sha

    lines = ["---", "library_name: diffusers", "tags:", *[f"- {t}" for t in ["ldm", *tags]], "---", "",
             f"# {title}", "", intro, "", "```python", *usage, "```", "", "## Provenance", "",
             f"- ldm version: {ldm.__version__} (git {git_sha()})", *[f"- {f}" for f in facts], "", "## Metrics", ""]
    metrics = run_metrics(run_dir)
    if metrics:
        lines += ["| metric | value | step |", "|---|---|---|"]
        lines += [f"| {k} | {v:.6g} | {'' if step is None else step} |" for k, (step, v) in sorted(metrics.items())]
    else:
        lines.append("No evaluation metrics recorded in the run's metrics.jsonl.")
    if config_yaml is not None:
        lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def model_card(gen: Generator, export: GeneratorExport) -> str:
    """README.md of a generator export: how to load and sample, the tokenizer fingerprint, the sampling defaults, the
    run's metrics, the ldm version and the full config."""
    from ldm.config import to_yaml

    pipe, s = export.pipeline_class, gen.cfg.sample
    call = "class_labels=[0, 1, 2]" if gen.num_classes > 0 else "batch_size=4"
    facts = [f"weights: {gen.checkpoint} ({'EMA' if gen.used_ema else 'raw'})",
             f"tokenizer: {gen.tokenizer.source} (fingerprint `{gen.tokenizer.fingerprint}`)",
             f"latents: {tuple(gen.latent_shape)}, normalisation {gen.normalizer.kind}",
             (f"path {gen.path.name}, prediction {gen.prediction}, learned sigma {gen.learned_sigma}, "
              f"{gen.num_classes} classes"),
             (f"sampling defaults: {s.sampler}, {s.steps} steps, guidance {s.cfg_scale} on t in {list(s.interval)} "
              f"(t = 0 data, t = 1 noise), channels {s.cfg_channels}")]
    if export.note:
        facts.append(f"pipeline: {pipe} because {export.note}")
    run_dir = gen.checkpoint.parent.parent if gen.checkpoint is not None and gen.checkpoint.is_dir() else None
    return _card(tags=["latent-diffusion", pipe], title=gen.cfg.name,
                 intro=(f"A latent generator exported by ldm's `ldm export` as a diffusers `{pipe}` (scheduler "
                        f"`{export.scheduler_class}`)."),
                 usage=[f"from diffusers import {pipe}", "import ldm.eval.export_pipeline  # registers ldm's classes",
                        "", f"pipe = {pipe}.from_pretrained(\"REPO_OR_FOLDER\")", f"images = pipe({call}).images"],
                 facts=facts, run_dir=run_dir, config_yaml=to_yaml(gen.cfg))


def tokenizer_card(src: str | Path, folder: Path) -> str:
    """README.md of a tokenizer export: how to load it, its fingerprint and latent statistics, the run's metrics and
    config (when `src` is a run), the ldm version."""
    from ldm.tokenizers.export import load_tokenizer

    tok = load_tokenizer(folder)
    facts = [f"source: {src}",
             f"fingerprint `{tok.fingerprint}`, {tok.latent_channels} latent channels, downsampling {tok.downsample}"]
    if tok.stats is not None:
        facts.append(f"latent mean {tok.stats.mean}, std {tok.stats.std}, scaling factor "
                     f"{tok.stats.scaling_factor:.6g}")
    usage = (["from diffusers import AutoencoderKL", "", "vae = AutoencoderKL.from_pretrained(\"REPO_OR_FOLDER\")"]
             if tok.kind == "kl" else
             ["from ldm.tokenizers.export import load_tokenizer", "", "tok = load_tokenizer(\"hf://REPO\")"])
    run_dir = Path(src) if (Path(src) / "config.yaml").is_file() else None
    return _card(tags=["autoencoder"], title=Path(src).name, intro="A tokenizer exported by ldm's `ldm export`.",
                 usage=usage, facts=facts, run_dir=run_dir,
                 config_yaml=None if run_dir is None else (run_dir / "config.yaml").read_text())


def push_export(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder to the Hub (ldm.hub.push_folder); returns the commit URL."""
    from ldm.hub import push_folder

    return push_folder(folder, repo_id, commit_message=f"ldm export {Path(folder).name}", private=private)

