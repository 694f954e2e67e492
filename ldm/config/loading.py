"""Loading and saving configs: structured schema <- YAML files <- `key=value` overrides (OmegaConf), validated, as
plain dataclasses; unknown keys are rejected with the closest valid key ("did you mean ...")."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config.schema import ConfigError, RunConfig, _all_keys, _section_default
from ldm.config.validation import validate


# ----------------------------------------------------------------------------------------------------------- loading
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
        _unbool_choices(layer, schema)
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(_type_error_message(err, schema)) from None
    cfg = OmegaConf.to_object(base)
    validate(cfg)
    return cfg


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _unbool_choices(node: Any, schema: type) -> None:
    """YAML 1.1 reads an unquoted `no` as False; a string choice that is one of those words (train.mixed_precision=no)
    gets the word back, so users need not quote it. Other string fields given a bool are left to the type check."""
    if not isinstance(node, DictConfig):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in list(node.keys()):
        f, value = fields.get(str(key)), node[key]
        if f is None:
            continue
        sub = _section_default(f)
        if sub is not None:
            _unbool_choices(value, type(sub))
        elif isinstance(value, bool) and "choices" in f.metadata:
            words = [w for w in _YAML_BOOL_WORDS[value] if w in f.metadata["choices"]]
            if words:
                node[key] = words[0]


def _type_error_message(err: OmegaConfBaseException, schema: type) -> str:
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None) if hasattr(err, "value") else None
    expected = "?"
    f = _field_for(schema, str(key))
    if f is not None:
        expected = getattr(f.type, "__name__", str(f.type))
    shown = f"{value!r}" if value is not None else "the given value"
    return (f"config key {key!r} has a value of the wrong type ({shown}); expected {expected}. "
            f"({err.msg.splitlines()[0]})")


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


