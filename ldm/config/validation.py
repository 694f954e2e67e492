"""`validate()`: every per-field choice and range, then the cross-field facts, in one place; each failure is a
ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any

from ldm.config.schema import (
    PIPELINE_STAGES,
    ConfigError,
    ModelCfg,
    OptimCfg,
    PipelineCfg,
    RunConfig,
    SampleCfg,
    TokenizerCfg,
    TrainCfg,
    _all_keys,
)
from ldm.names import DIT_PRESET_NAMES, EXTRACTOR_NAMES


# ----------------------------------------------------------------------------------------------------------- validation
def _not_allowed(key: str, value: Any, choices: tuple, context: str = "") -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key}={value!r} is not allowed{context}; expected one of {list(choices)}{hint}"


def _validate_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_fields(value, f"{key}.")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(_not_allowed(key, value, meta["choices"]))
        lo, hi = meta.get("min"), meta.get("max")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value:  # NaN
            raise ConfigError(f"{key}=nan is not allowed; expected a number")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{key}={value!r} is out of range; expected a value {op} {lo}"
                              + (f" and <= {hi}" if hi is not None else ""))
        if hi is not None and value > hi:
            raise ConfigError(f"{key}={value!r} is out of range; expected a value <= {hi}"
                              + (f" and >= {lo}" if lo is not None else ""))


def validate(cfg: Any) -> None:
    """All checks in one place: per-field choices and ranges, then the cross-field facts of each section.

    A pipeline config is checked as a whole, then each stage's run config; an error there names the stage
    (`generator.sample.sampler=...`)."""
    if isinstance(cfg, PipelineCfg):
        _validate_pipeline(cfg)
        return
    _validate_fields(cfg, "")
    if not cfg.name or any(c in cfg.name for c in "/\\"):
        raise ConfigError(f"name={cfg.name!r} must be a non-empty directory name without slashes")
    _check_train(cfg.train, cfg.optim)
    _check_allow_changes(cfg.train.allow_changes)
    _check_tokenizer(cfg.tokenizer, stage=cfg.stage, image_size=cfg.data.image_size)
    _check_model(cfg.model)
    _check_sample(cfg.sample)


def _validate_pipeline(cfg: PipelineCfg) -> None:
    _validate_fields(cfg, "")
    for key, names, allowed in (("stages", cfg.stages, PIPELINE_STAGES), ("fid_extractors", cfg.fid_extractors,
                                                                          EXTRACTOR_NAMES)):
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise ConfigError(f"{key}={list(names)!r}: {unknown} unknown; expected names from {list(allowed)}")
    for key, run in (("tokenizer", cfg.tokenizer), ("generator", cfg.generator)):
        try:
            validate(run)
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}") from None


def _check_train(t: TrainCfg, optim: OptimCfg) -> None:
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}")
    for key, betas in (("optim.betas", optim.betas), ("optim.disc_betas", optim.disc_betas)):
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{key}={list(betas)!r}; expected two numbers in [0, 1)")


def _check_allow_changes(patterns: list[str]) -> None:
    """Each entry of train.allow_changes names a key (or is a pattern matching one), so a typo fails here."""
    keys = [f"{prefix}{name}" for prefix, name in _all_keys(RunConfig, "")]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in keys):
            close = difflib.get_close_matches(pattern, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; expected dotted config keys such as 'seed'"
            raise ConfigError(f"train.allow_changes: {pattern!r} names no config key{hint}")


def _check_tokenizer(tok: TokenizerCfg, *, stage: str, image_size: int) -> None:
    """Architecture facts (downsampling, attention levels, group norm) and the EQ-VAE scales against the PatchGAN."""
    down = 2 ** (len(tok.block_out_channels) - 1)
    if stage == "tokenizer" and tok.pretrained is None and image_size % down:
        raise ConfigError(f"data.image_size={image_size} is not divisible by the tokenizer's downsampling "
                          f"factor {down} (2**(len(tokenizer.block_out_channels)-1)); choose a multiple of {down}")
    n_levels = len(tok.block_out_channels)
    bad_levels = [lv for lv in tok.attn_levels if not isinstance(lv, int) or not 0 <= lv < n_levels]
    if bad_levels:
        raise ConfigError(f"tokenizer.attn_levels={list(tok.attn_levels)!r}; expected level indices in "
                          f"[0, {n_levels - 1}] (one per entry of tokenizer.block_out_channels)")
    if any(c % tok.norm_num_groups for c in tok.block_out_channels) and tok.pretrained is None:
        raise ConfigError(f"tokenizer.block_out_channels={list(tok.block_out_channels)!r} must all be divisible by "
                          f"tokenizer.norm_num_groups={tok.norm_num_groups}")
    if tok.eq.scale_num_min > tok.eq.scale_num_max or tok.eq.scale_num_max >= tok.eq.scale_den:
        raise ConfigError(f"tokenizer.eq scales k/{tok.eq.scale_den} for k in [{tok.eq.scale_num_min}, "
                          f"{tok.eq.scale_num_max}] must satisfy scale_num_min <= scale_num_max < scale_den")
    levels = tok.fsq.levels
    if not levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in levels):
        raise ConfigError(f"tokenizer.fsq.levels={list(levels)!r}; expected a non-empty list of integers >= 2 (e.g. "
                          f"the FSQ paper's [8, 5, 5, 5] = 1000 codes)")
    if tok.sigma_vae.enabled and tok.kind != "kl":
        raise ConfigError(f"tokenizer.sigma_vae.enabled=true applies to tokenizer.kind=kl only, not "
                          f"tokenizer.kind={tok.kind!r}; set tokenizer.sigma_vae.enabled=false")
    if stage == "tokenizer" and tok.disc_weight > 0:  # PatchGAN: n stride-2 convs, then two 4x4 stride-1 convs
        disc_min = 3 * 2 ** tok.disc_layers
        smallest = image_size * tok.eq.scale_num_min // tok.eq.scale_den if tok.eq.enabled else image_size
        if smallest < disc_min:
            raise ConfigError(f"tokenizer.disc_layers={tok.disc_layers} needs images of at least {disc_min} px, but "
                              f"the discriminator would see {smallest} px (data.image_size={image_size}"
                              + (f", EQ-VAE scale {tok.eq.scale_num_min}/{tok.eq.scale_den}" if tok.eq.enabled else "")
                              + "); lower tokenizer.disc_layers, raise the image size or tokenizer.eq.scale_num_min")


def _check_model(model: ModelCfg) -> None:
    """model.preset names a DiT preset; the UNet is sized by its unet_* keys and ignores it."""
    if model.arch == "dit" and model.preset not in DIT_PRESET_NAMES:
        raise ConfigError(_not_allowed("model.preset", model.preset, DIT_PRESET_NAMES, " with model.arch=dit"))


def _check_sample(sample: SampleCfg) -> None:
    lo_hi = sample.interval
    if len(lo_hi) != 2 or not (0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0):
        raise ConfigError(f"sample.interval={list(lo_hi)!r}; expected [lo, hi] with 0 <= lo <= hi <= 1")


