"""Typed run configuration: dataclass schemas, YAML + dotlist loading, validation.

A run is described by one `RunConfig`. Defaults live only in the dataclasses below. Loading merges, in order,
the structured schema <- YAML files <- command-line `key=value` overrides (OmegaConf dotlist), then converts to plain
dataclasses (`OmegaConf.to_object`) so the rest of the code never touches a DictConfig.

Every field may carry validation metadata (`choices`, `min`, `max`, `min_exclusive`); `validate()` checks all of them
in one place, plus the cross-field facts, and raises `ConfigError` naming the key, the value and what is allowed.
Names that pick a registered implementation (sampler, DiT preset, FID extractor, vision encoder, tokenizer kind) are
checked against the torch-free tuples of ldm/names.py, so a typo fails here rather than at the first sample grid.
Unknown keys are rejected with the closest valid key ("did you mean ...").
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.names import DIT_PRESET_NAMES, ENCODER_NAMES, EXTRACTOR_NAMES, SAMPLER_NAMES, TOKENIZER_KINDS


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names it and says what is allowed."""


def choice(default: Any, choices: tuple, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def bounded(default: Any, *, min: float | None = None, max: float | None = None, min_exclusive: bool = False,
            help: str = "") -> Any:
    return field(default=default, metadata={"min": min, "max": max, "min_exclusive": min_exclusive, "help": help})


def listed(default: list, help: str = "") -> Any:
    return field(default_factory=lambda: list(default), metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------- sections
@dataclass
class DataCfg:
    source: str = field(default="digits", metadata={"help": "'digits' (embedded sklearn 8x8 digits) or a path: image "
                                                            "folder (class sub-folders = labels), .zip/.tar, .npz"})
    image_size: int = bounded(32, min=8, help="side of the square training images in pixels")
    crop: str = choice("center", ("center", "random", "resize"),
                       "center: ADM centre crop + resize; random: random crops of image_size (many per large image); "
                       "resize: plain resize to image_size")
    crops_per_image: int = bounded(1, min=1, help="random crops drawn per image per epoch (crop=random)")
    hflip: bool = field(default=False, metadata={"help": "random horizontal flip with p=0.5"})
    on_error: str = choice("skip", ("skip", "raise"), "bad image files: skip with a counted warning, or raise")
    min_size: int = bounded(8, min=1, help="images whose shorter side is below this are treated as bad files")
    num_workers: int = bounded(0, min=0, help="DataLoader worker processes")
    class_cond: bool = field(default=True, metadata={"help": "use labels (class folders / npz arr_1 / digits)"})
    latents: Optional[str] = field(default=None, metadata={"help": "latent cache directory (generator stage); "
                                                                   "when unset latents are encoded on the fly"})


@dataclass
class OptimCfg:
    name: str = choice("adamw", ("adam", "adamw"), "optimizer")
    lr: float = bounded(1e-4, min=0.0, min_exclusive=True, help="peak learning rate")
    betas: list = listed([0.9, 0.999], "Adam betas")
    weight_decay: float = bounded(0.0, min=0.0)
    eps: float = bounded(1e-8, min=0.0, min_exclusive=True)
    warmup_steps: int = bounded(0, min=0, help="linear lr warm-up from 0")
    schedule: str = choice("constant", ("constant", "cosine", "linear"), "lr schedule after warm-up")
    min_lr_ratio: float = bounded(0.0, min=0.0, max=1.0, help="final lr / peak lr for cosine and linear decay")
    grad_clip: float = bounded(1.0, min=0.0, help="max global grad norm (0 = no clipping)")
    disc_lr: Optional[float] = field(default=None, metadata={"help": "discriminator lr (tokenizer); default = lr"})
    disc_betas: list = listed([0.5, 0.9], "discriminator Adam betas (tokenizer)")


@dataclass
class TrainCfg:
    batch_size: int = bounded(32, min=1, help="global batch size (all processes, all accumulation steps)")
    grad_accum_steps: int = bounded(1, min=1)
    max_steps: int = bounded(1000, min=1, help="optimizer steps")
    max_epochs: Optional[int] = field(default=None, metadata={"help": "stop after this many epochs too"})
    mixed_precision: str = choice("auto", ("auto", "no", "bf16", "fp16"), "auto: bf16 on CUDA, fp32 on CPU")
    ema: bool = field(default=True, metadata={"help": "keep an EMA copy of the model"})
    ema_decay: float = bounded(0.9999, min=0.0, max=1.0)
    ema_warmup_steps: int = bounded(0, min=0, help="decay ramps as min(decay, (1+s)/(10+s)) for s < this")
    log_every: int = bounded(10, min=1)
    ckpt_every: int = bounded(500, min=1)
    keep_last: int = bounded(3, min=1, help="checkpoints kept on disk")
    sample_every: int = bounded(0, min=0, help="write a sample / reconstruction grid every N steps (0 = end only)")
    eval_every: int = bounded(0, min=0, help="periodic evaluation every N steps (0 = off)")
    resume: str = field(default="auto", metadata={"help": "auto: continue from runs/<name>/latest if present; never: "
                                                          "refuse to reuse a run directory with checkpoints; or a path"})
    max_nan_skips: int = bounded(0, min=0, help="non-finite losses/grads skipped before the run stops")
    deterministic: bool = False
    compile: bool = False
    run_root: str = field(default="runs", metadata={"help": "runs are written to <run_root>/<name>/"})


@dataclass
class EqCfg:
    enabled: bool = False
    p_equivariance: float = bounded(0.5, min=0.0, max=1.0, help="probability of the equivariance mode per batch")
    p_prior_scale: float = bounded(0.25, min=0.0, max=1.0, help="in prior mode: probability of downscaled input")
    scale_num_min: int = bounded(8, min=1, help="scales s = k/scale_den for k in [scale_num_min, scale_num_max]")
    scale_num_max: int = bounded(31, min=1)
    scale_den: int = bounded(32, min=1)
    anisotropic: bool = False
    rotate: bool = True


@dataclass
class VaCfg:
    enabled: bool = False
    encoder: str = choice("dinov2_vitl14", ENCODER_NAMES, "frozen vision encoder: a name of ldm.encoders.ENCODERS "
                                                          "(local weights) or digits (shipped, offline)")
    weights: Optional[str] = None
    vf_weight: float = bounded(0.1, min=0.0)
    margin_cos: float = bounded(0.5, min=0.0, max=2.0)
    margin_dist: float = bounded(0.25, min=0.0, max=2.0)
    distmat_weight: float = bounded(1.0, min=0.0)
    cos_weight: float = bounded(1.0, min=0.0)
    adaptive: bool = True


@dataclass
class VqCfg:
    codebook_size: int = bounded(1024, min=1)
    code_dim: int = bounded(8, min=1)
    beta: float = bounded(0.25, min=0.0)
    l2_norm: bool = True
    ema: bool = False
    ema_decay: float = bounded(0.99, min=0.0, max=1.0)
    dead_code_threshold: float = bounded(0.0, min=0.0, help="restart codes used fewer times than this per step window")
    entropy_weight: float = bounded(0.0, min=0.0)
    entropy_temperature: float = bounded(0.01, min=0.0, min_exclusive=True, help="softmax temperature of the entropy loss")


@dataclass
class TokenizerCfg:
    kind: str = choice("kl", TOKENIZER_KINDS, "KL autoencoder (diffusers AutoencoderKL) or VQ autoencoder")
    pretrained: Optional[str] = field(default=None, metadata={"help": "diffusers AutoencoderKL folder to fine-tune "
                                                                      "or use frozen (generator stage)"})
    checkpoint: Optional[str] = field(default=None, metadata={"help": "ldm tokenizer run directory or export folder "
                                                                      "(generator stage)"})
    latent_channels: int = bounded(4, min=1, help="KL: latent channels; VQ: encoder output channels before the 1x1 "
                                                  "projection to vq.code_dim")
    block_out_channels: list = listed([32, 64], "encoder/decoder widths; downsampling = 2**(len-1)")
    layers_per_block: int = bounded(1, min=1)
    norm_num_groups: int = bounded(32, min=1)
    mid_block_attention: bool = True
    use_quant_conv: bool = field(default=True, metadata={"help": "KL: 1x1 convs around the latent (SD-VAE has them, "
                                                                 "FLUX's VAE does not)"})
    attn_levels: list = listed([], "encoder levels (0 = full resolution) whose blocks add self-attention; the decoder "
                                   "mirrors them (LDM attn_resolutions [16] at 256 px with 5 levels = [4])")
    learn_logvar: bool = field(default=False, metadata={"help": "train the NLL log-variance (LDM registers it as a "
                                                                "parameter but never optimises it: False matches)"})
    rec_loss: str = choice("l1", ("l1", "l2"))
    perceptual_weight: float = bounded(1.0, min=0.0, help="LPIPS weight (0 = off)")
    lpips_weights: Optional[str] = field(default=None, metadata={"help": "VGG16 backbone weights file for LPIPS"})
    lpips_random_backbone: bool = field(default=False, metadata={"help": "TESTS/SMOKE RUNS ONLY: random VGG"})
    kl_weight: float = bounded(1e-6, min=0.0)
    logvar_init: float = 0.0
    disc_start: int = bounded(0, min=0, help="step at which the GAN loss switches on")
    disc_weight: float = bounded(0.5, min=0.0)
    disc_adaptive: bool = field(default=True, metadata={"help": "scale the GAN loss by the adaptive weight of Esser "
                                                                "et al. 2021 Eq. 7 (else by disc_weight alone)"})
    disc_loss: str = choice("hinge", ("hinge", "non_saturating"))
    disc_layers: int = bounded(3, min=1)
    disc_filters: int = bounded(64, min=1)
    disc_norm: str = choice("batch", ("batch", "act"))
    eq: EqCfg = field(default_factory=EqCfg)
    va: VaCfg = field(default_factory=VaCfg)
    vq: VqCfg = field(default_factory=VqCfg)
    stats_num_images: int = bounded(1024, min=1, help="images used for the latent mean/std after training")


@dataclass
class ModelCfg:
    arch: str = choice("dit", ("dit", "unet"), "generator network")
    preset: str = field(default="DiT-S/2", metadata={"help": "DiT preset name (model.arch=dit; ldm.names."
                                                             "DIT_PRESET_NAMES = ldm.models.dit.DIT_PRESETS)"})
    learn_sigma: bool = False
    class_dropout: float = bounded(0.1, min=0.0, max=1.0, help="label dropout for classifier-free guidance")
    use_swiglu: bool = False
    use_rmsnorm: bool = False
    use_rope: bool = False
    use_qknorm: bool = False
    grad_checkpointing: bool = False
    unet_block_out_channels: list = listed([64, 128], "UNet widths")
    unet_layers_per_block: int = bounded(2, min=1)


@dataclass
class DiffusionCfg:
    path: str = choice("linear", ("linear", "gvp", "vp", "ddpm_linear", "ddpm_cosine"),
                       "noising path (t=0 data, t=1 noise)")
    prediction: str = choice("velocity", ("velocity", "eps", "v", "x0"), "network output parameterisation")
    t_sampler: str = choice("uniform", ("uniform", "logit_normal"), "training time distribution")
    t_mean: float = 0.0
    t_std: float = bounded(1.0, min=0.0, min_exclusive=True)
    t_shift: float = bounded(1.0, min=0.0, min_exclusive=True, help="t' = s t / (1 + (s-1) t)")
    weighting: str = choice("none", ("none", "min_snr"))
    min_snr_gamma: float = bounded(5.0, min=0.0, min_exclusive=True)
    cos_loss_weight: float = bounded(0.0, min=0.0, help="LightningDiT velocity-direction loss weight")
    latent_norm: str = choice("channel", ("channel", "scalar", "none"),
                              "latent normalisation: per-channel mean/std, scalar scaling factor, or none")
    scaling_factor: Optional[float] = field(default=None, metadata={"help": "scalar factor (latent_norm=scalar); "
                                                                            "default: the tokenizer's"})
    repa: bool = False
    repa_encoder: str = choice("dinov2_vitb14", ENCODER_NAMES, "frozen vision encoder REPA aligns to (as "
                                                              "tokenizer.va.encoder)")
    repa_weights: Optional[str] = None
    repa_depth: int = bounded(8, min=1)
    repa_weight: float = bounded(0.5, min=0.0)
    repa_proj_dim: int = bounded(2048, min=1)


@dataclass
class SampleCfg:
    sampler: str = choice("euler", SAMPLER_NAMES, "sampler (ldm.diffusion.samplers.SAMPLERS); the options each one "
                                                  "reads: samplers.SAMPLER_OPTIONS")
    steps: int = bounded(50, min=1)
    cfg_scale: float = bounded(1.0, min=0.0, help="classifier-free guidance scale (1 = off)")
    interval: list = listed([0.0, 1.0], "guidance on for t in [lo, hi] (t=0 data, t=1 noise)")
    cfg_channels: str = choice("all", ("all", "first3"))
    time_grid: str = choice("uniform", ("uniform", "karras", "shifted"))
    shift: float = bounded(1.0, min=0.0, min_exclusive=True)
    eta: float = bounded(0.0, min=0.0)
    num: int = bounded(64, min=1)
    batch_size: int = bounded(32, min=1)
    seed: int = 0
    use_ema: bool = True


# SampleCfg fields left out of a sample folder's identity (ldm.eval.generate.sample_identity records every other
# field), so one folder never mixes images of two settings. num and batch_size change how many images are made and how
# fast, not which; seed and use_ema do decide the images, but the identity records the values actually used (a seed
# given on the command line, whether the checkpoint had EMA weights) under its own keys, not the config's.
SAMPLE_NON_IDENTITY_FIELDS: tuple[str, ...] = ("num", "batch_size", "seed", "use_ema")


@dataclass
class EvalCfg:
    extractor: str = choice("inception", EXTRACTOR_NAMES, "feature extractor for FID "
                                                          "(ldm.eval.extractors.EXTRACTORS)")
    inception_weights: Optional[str] = None
    num_samples: int = bounded(1000, min=2)
    batch_size: int = bounded(64, min=1)
    reference: Optional[str] = field(default=None, metadata={"help": "reference images/npz/stats for FID"})


@dataclass
class RunConfig:
    name: str = "run"
    stage: str = choice("generator", ("tokenizer", "generator"), "which model this run trains")
    seed: int = 0
    data: DataCfg = field(default_factory=DataCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_root) / self.name


PIPELINE_STAGES = ("tokenizer", "latents", "generator", "sample", "eval")


@dataclass
class PipelineCfg:
    """`ldm pipeline`: the stages of a whole experiment under <run_root>/<name>/ (tokenizer/, latents/, generator/,
    samples/, eval.json, summary.json). `tokenizer` and `generator` are complete run configs of their stages."""

    name: str = "pipeline"
    run_root: str = "runs"
    stages: list = listed(list(PIPELINE_STAGES), "stages to run, in this order")
    tokenizer: RunConfig = field(default_factory=lambda: RunConfig(stage="tokenizer"))
    generator: RunConfig = field(default_factory=RunConfig)
    latent_flips: bool = field(default=False, metadata={"help": "cache horizontally flipped latents too"})
    num_samples: int = bounded(1000, min=1, help="images sampled for the FID stage")
    grid_per_class: int = bounded(10, min=1, help="grid rows: samples per class in the class-conditional grid")
    fid_extractors: list = listed(["digits", "inception"], "feature spaces for the FID stage; 'inception' is "
                                                           "skipped with a note when its weights are not installed")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


# ----------------------------------------------------------------------------------------------------------- loading
def _section_default(f: dataclasses.Field) -> Any:
    """The default instance of a nested section field (e.g. RunConfig.train -> TrainCfg()), else None."""
    sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return sub if dataclasses.is_dataclass(sub) else None


def _check_keys(node: Any, schema: Any, prefix: str) -> None:  # noqa: C901
    """Reject keys that the schema does not have, suggesting the closest valid one."""
    if not isinstance(node, (dict, DictConfig)) or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = [f"{prefix}{c}" for c in difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)]
            if not close:  # maybe a key put in the wrong section: search the whole schema
                everywhere = {name: f"{p}{name}" for p, name in _all_keys(type(schema), "")}
                close = [everywhere[c] for c in difflib.get_close_matches(str(key), list(everywhere), n=1, cutoff=0.6)]
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigError(f"unknown config key {full!r}{hint} Valid keys under {prefix or 'the top level'!r}: "
                              f"{sorted(fields)}")
        sub = _section_default(fields[key])
        if sub is not None:
            _check_keys(value, sub, f"{full}.")


def _all_keys(schema: type, prefix: str):
    for f in dataclasses.fields(schema):
        sub = _section_default(f)
        if sub is not None:
            yield from _all_keys(type(sub), f"{prefix}{f.name}.")
        else:
            yield prefix, f.name


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None


def _load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: name the file
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None,
                schema: type = RunConfig) -> Any:
    """Merge schema <- YAML files <- dotlist overrides, validate, and return the plain dataclass."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    layers = [_load_yaml(p) for p in (paths or [])]
    if overrides:
        layers.append(_parse_overrides(overrides))
    base = OmegaConf.structured(schema)
    for layer in layers:
        _check_keys(layer, schema(), "")
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(_type_error_message(err, schema)) from None
    cfg = OmegaConf.to_object(base)
    validate(cfg)
    return cfg


def _type_error_message(err: OmegaConfBaseException, schema: type) -> str:
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None) if hasattr(err, "value") else None
    expected = "?"
    f = _field_for(schema, str(key))
    if f is not None:
        expected = getattr(f.type, "__name__", str(f.type))
    shown = f"{value!r}" if value is not None else "the given value"
    return f"config key {key!r} has a value of the wrong type ({shown}); expected {expected}. ({err.msg.splitlines()[0]})"


def _field_for(schema: type, dotted: str) -> dataclasses.Field | None:
    node: Any = schema
    found = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        found = fields[part]
        sub = _section_default(found)
        node = type(sub) if sub is not None else None
    return found


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


# ----------------------------------------------------------------------------------------------------------- saving
def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config (atomically, so a crash never leaves half a file)."""
    from ldm.io import atomic_write_text

    atomic_write_text(Path(path), to_yaml(cfg))


def config_from_dict(data: dict, schema: type = RunConfig) -> Any:
    """Rebuild a validated config from a plain mapping (e.g. the copy stored inside a checkpoint)."""
    _check_keys(OmegaConf.create(data), schema(), "")
    base = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
    cfg = OmegaConf.to_object(base)
    validate(cfg)
    return cfg


def help_lines(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its default and help text, for the CLI's --help."""
    lines = []
    inst = schema()
    for f in dataclasses.fields(schema):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(help_lines(type(value), f"{prefix}{f.name}."))
            continue
        extra = f.metadata.get("help", "")
        if "choices" in f.metadata:
            extra = f"{{{'|'.join(map(str, f.metadata['choices']))}}} {extra}"
        lines.append(f"  {prefix}{f.name}={value!r}  {extra}".rstrip())
    return lines


def as_container(cfg: Any) -> dict:
    """Plain-dict copy (for checkpoints and JSON)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out


__all__ = ["ConfigError", "RunConfig", "DataCfg", "OptimCfg", "TrainCfg", "TokenizerCfg", "EqCfg", "VaCfg", "VqCfg",
           "ModelCfg", "DiffusionCfg", "SampleCfg", "SAMPLE_NON_IDENTITY_FIELDS", "EvalCfg", "PipelineCfg",
           "PIPELINE_STAGES", "load_config", "validate", "save_config", "to_yaml", "config_from_dict", "help_lines",
           "as_container", "ListConfig"]
