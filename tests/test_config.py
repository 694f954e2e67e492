"""Config loading and validation: each kind of bad input gets its specific message."""

import dataclasses
import re

import pytest

from ldm.config import (
    SAMPLE_NON_IDENTITY_FIELDS,
    ConfigError,
    PipelineCfg,
    RunConfig,
    SampleCfg,
    help_lines,
    load_config,
)
from ldm.names import DIT_PRESET_NAMES, ENCODER_NAMES, EXTRACTOR_NAMES, SAMPLER_NAMES, TOKENIZER_KINDS


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "optim.betas=[0.5,0.9]", "name=x"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.5, 0.9] and cfg.name == "x"
    assert cfg.run_dir.as_posix() == "runs/x"


def test_yaml_then_dotlist(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("train:\n  max_steps: 3\n  batch_size: 4\ndata:\n  image_size: 16\n")
    cfg = load_config([path], ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.image_size) == (9, 4, 16)


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_stps'; did you mean 'train.max_steps'"):
        load_config(None, ["train.max_stps=5"])


def test_unknown_key_in_wrong_section_suggests_full_path(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_steps'; did you mean 'train.max_steps'"):
        load_config([path])


def test_nested_unknown_key():
    with pytest.raises(ConfigError, match=r"'tokenizer.eq.enabld'; did you mean 'tokenizer.eq.enabled'"):
        load_config(None, ["tokenizer.eq.enabld=true"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"'train.max_steps' has a value of the wrong type \('abc'\); expected int"):
        load_config(None, ["train.max_steps=abc"])


def test_out_of_range_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"train.max_steps=0 is out of range; expected a value >= 1"):
        load_config(None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.5 is out of range; expected a value <= 1.0"):
        load_config(None, ["train.ema_decay=1.5"])


def test_bad_choice_lists_allowed():
    with pytest.raises(ConfigError, match=r"data.crop='foo' is not allowed; expected one of \['center', 'random', "
                                          r"'resize'\]"):
        load_config(None, ["data.crop=foo"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="not divisible by the tokenizer's downsampling factor 2"):
        load_config(None, ["stage=tokenizer", "data.image_size=33"])
    with pytest.raises(ConfigError, match="train.batch_size=10 must be divisible by train.grad_accum_steps=4"):
        load_config(None, ["train.batch_size=10", "train.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.9\]; expected two numbers in \[0, 1\)"):
        load_config(None, ["optim.betas=[0.9]"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config([bad])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.max_steps"])


def test_help_lists_every_key():
    lines = "\n".join(help_lines())
    for key in ("train.max_steps=1000", "tokenizer.eq.p_equivariance=0.5", "sample.cfg_scale=1.0", "data.on_error"):
        assert key in lines


def test_name_tuples_equal_their_registries():
    """ldm/names.py repeats the registries' keys without torch; this keeps the two in step."""
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.encoders import ENCODERS
    from ldm.eval.extractors import EXTRACTORS
    from ldm.models.dit import DIT_PRESETS
    from ldm.tokenizers.kinds import KINDS

    for names in (SAMPLER_NAMES, DIT_PRESET_NAMES, EXTRACTOR_NAMES, ENCODER_NAMES, TOKENIZER_KINDS):
        assert len(set(names)) == len(names)
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert set(DIT_PRESET_NAMES) == set(DIT_PRESETS)
    assert set(EXTRACTOR_NAMES) == set(EXTRACTORS)
    assert set(ENCODER_NAMES) == set(ENCODERS) | {"digits"}
    assert set(TOKENIZER_KINDS) == set(KINDS)


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ldm.config; assert 'torch' not in sys.modules, 'ldm.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("override, allowed, suggestion", [
    ("sample.sampler=heunn", SAMPLER_NAMES, "heun"),
    ("model.preset=DiT-S/3", DIT_PRESET_NAMES, "DiT-S/"),  # any patch of DiT-S is equally close
    ("eval.extractor=incepton", EXTRACTOR_NAMES, "inception"),
    ("tokenizer.va.encoder=dinov2_vitl41", ENCODER_NAMES, "dinov2_vitl14"),
    ("diffusion.repa_encoder=dinov_vitb14", ENCODER_NAMES, "dinov2_vitb14"),
    ("tokenizer.kind=kll", TOKENIZER_KINDS, "kl"),
])
def test_registered_name_typo_fails_at_load(override, allowed, suggestion):
    key, value = override.split("=")
    message = f"{key}={value!r} is not allowed" + r"[^;]*; expected one of " + re.escape(str(list(allowed)))
    with pytest.raises(ConfigError, match=message + re.escape(f"; did you mean '{suggestion}")):
        load_config(None, [override])


def test_unet_has_no_preset():
    cfg = load_config(None, ["model.arch=unet", "model.preset=none"])
    assert cfg.model.preset == "none"


def test_pipeline_checks_names_of_both_stages():
    with pytest.raises(ConfigError, match=r"^generator\.sample\.sampler='heunn' is not allowed"):
        load_config(None, ["generator.sample.sampler=heunn"], schema=PipelineCfg)
    with pytest.raises(ConfigError, match=r"^tokenizer\.eval\.extractor='incepton' is not allowed"):
        load_config(None, ["tokenizer.eval.extractor=incepton"], schema=PipelineCfg)
    with pytest.raises(ConfigError, match=r"^generator\.model\.preset='DiT-S/3' is not allowed"):
        load_config(None, ["generator.model.preset=DiT-S/3"], schema=PipelineCfg)
    with pytest.raises(ConfigError, match=r"fid_extractors=\['incepton'\]: \['incepton'\] unknown; expected names "
                                          r"from \['inception', 'dinov2', 'digits'\]"):
        load_config(None, ["fid_extractors=[incepton]"], schema=PipelineCfg)


def test_sample_identity_fields():
    """The sample-folder identity is SampleCfg minus SAMPLE_NON_IDENTITY_FIELDS: exactly the SampleCfg keys that
    ldm.eval.generate.sample_identity recorded by hand before (plus guidance_rule, added later: folders without it
    read it as its default), so sample folders written then stay valid."""
    fields = [f.name for f in dataclasses.fields(SampleCfg)]
    assert set(SAMPLE_NON_IDENTITY_FIELDS) <= set(fields)
    identity = {name for name in fields if name not in SAMPLE_NON_IDENTITY_FIELDS}
    assert identity == {"sampler", "steps", "cfg_scale", "interval", "cfg_channels", "time_grid", "shift", "eta",
                        "guidance_rule"}


def _fields_with_paths(schema: type, prefix: str = ""):
    """Every dataclass field of `schema`, sections included, with its dotted key (recursing into sections)."""
    for f in dataclasses.fields(schema):
        yield f"{prefix}{f.name}", f
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            yield from _fields_with_paths(type(section), f"{prefix}{f.name}.")


@pytest.mark.parametrize("schema", [RunConfig, PipelineCfg])
def test_every_key_has_a_help_text(schema):
    keys = list(_fields_with_paths(schema))
    assert len(keys) > 100  # the walk reached the nested sections
    undocumented = [key for key, f in keys if not str(f.metadata.get("help", "")).strip()]
    assert undocumented == []


def test_unquoted_yaml_no_is_the_string_choice(tmp_path):
    """YAML 1.1 reads `no` as False; train.mixed_precision=no (command line or file) must mean the choice 'no'."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert load_config(f).train.mixed_precision == "no"
