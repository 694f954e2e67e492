"""Typed run configuration: dataclass schemas, YAML + dotlist loading, validation.

A run is described by one `RunConfig`. Defaults live only in the dataclasses below. Loading merges, in order,
the structured schema <- YAML files <- command-line `key=value` overrides (OmegaConf dotlist), then converts to plain
dataclasses (`OmegaConf.to_object`) so the rest of the code never touches a DictConfig.

Every field may carry validation metadata (`choices`, `min`, `max`, `min_exclusive`); `validate()` checks all of them
in one place, plus the cross-field facts, and raises `ConfigError` naming the key, the value and what is allowed.
Names that pick a registered implementation (sampler, DiT preset, FID extractor, vision encoder, tokenizer kind) are
checked against the torch-free tuples of ldm/names.py, so a typo fails here rather than at the first sample grid.
Unknown keys are rejected with the closest valid key ("did you mean ...").

Resuming: `resume_changes` compares a resuming run's config with the one stored in its checkpoint. Keys of
`RESUME_MAY_CHANGE` (how long, how fast from now on, what to write and where) may differ; any other difference changes
the experiment and is refused, one `key: old -> new` line each (`format_refusal`), unless the user names the key in
train.allow_changes.
"""

from ldm.config.loading import as_container, config_from_dict, help_lines, load_config, save_config, to_yaml  # noqa: F401
from ldm.config.resume import (  # noqa: F401
    RESUME_MAY_CHANGE,
    Change,
    flatten_keys,
    format_refusal,
    may_change_on_resume,
    resume_changes,
)
from ldm.config.schema import (  # noqa: F401
                                PIPELINE_STAGES,
                                SAMPLE_NON_IDENTITY_FIELDS,
                                ConfigError,
                                DataCfg,
                                DiffusionCfg,
                                EqCfg,
                                EvalCfg,
                                ModelCfg,
                                OptimCfg,
                                PipelineCfg,
                                RunConfig,
                                SampleCfg,
                                TextCfg,
                                TokenizerCfg,
                                TrainCfg,
                                VaCfg,
                                VqCfg,
                                bounded,
                                choice,
                                listed,
)
from ldm.config.validation import validate  # noqa: F401
