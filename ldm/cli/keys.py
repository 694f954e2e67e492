"""`key=value` overrides on the command line, and the short flags that are aliases of config keys.

Every command that reads config takes the same OmegaConf dotlist as `ldm train` (`sample.steps=8`,
`eval.batch_size=32`), checked by ldm.config: an unknown key fails with "did you mean", a bad value names the key and
what is allowed. A command's short flags (`--steps 8`) are aliases: each sets one key of the command's config
section, and both the flag's help and the key table in the epilog say which, so one help text documents both.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

from ldm.config import ConfigError, PipelineCfg, RunConfig, help_lines, load_config

# The two kinds of config YAML and the command that runs each: a run config (one stage) and a pipeline config.
CONFIG_KINDS = ((RunConfig, "run", "ldm train"), (PipelineCfg, "pipeline", "ldm pipeline"))


def split_config_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate positional arguments (YAML paths, a run directory) from key=value overrides."""
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return paths, overrides


def load_command_config(paths: list[str], overrides: list[str], schema: type) -> Any:
    """load_config for a command that reads `schema`; a YAML file written for the other command (a pipeline config
    given to `ldm train`, a run config given to `ldm pipeline`) fails with one line naming the command that runs it,
    instead of an unknown-key error about its first top-level key."""
    try:
        return load_config(paths, overrides, schema=schema)
    except ConfigError:
        for path in paths:
            kind = _other_kind(path, schema)
            if kind is not None:
                name, command, keys = kind
                raise ConfigError(f"{path}: this is a {name} config: run `{command} {path}` (its top-level keys "
                                  f"{keys} are {name} config keys)") from None
        raise


def _other_kind(path: str, schema: type) -> tuple[str, str, list[str]] | None:
    """(kind, command, the file's keys that `schema` lacks) when every top-level key of the YAML file at `path`
    belongs to another config kind and some do not belong to `schema`; None otherwise (or when it cannot be read:
    load_config has said why)."""
    from omegaconf import DictConfig, OmegaConf

    try:
        node = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - a missing or broken file keeps load_config's own message
        return None
    if not isinstance(node, DictConfig):
        return None
    keys = {str(k) for k in node}
    foreign = sorted(keys - {f.name for f in dataclasses.fields(schema)})
    for other, name, command in CONFIG_KINDS:
        if other is not schema and foreign and keys <= {f.name for f in dataclasses.fields(other)}:
            return name, command, foreign
    return None


def key_table(lines: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """Config key lines (ldm.config.help_lines) with each key's short flag appended, e.g. `[--steps]`."""
    aliases = aliases or {}
    out = []
    for line in lines:
        key = line.strip().split("=", 1)[0]
        out.append(f"{line}  [{aliases[key]}]" if key in aliases else line)
    return "\n".join(out)


def _dotlist_value(value: Any) -> str:
    """A flag's parsed value as dotlist text that OmegaConf reads back to the same value (floats by repr, strings
    quoted so a path like `a: b` or `123` stays a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dotlist_value(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


class KeyFlags:
    """The keys of one config section that a command reads, and the short flags that alias some of them.

        flags = KeyFlags("sample", SampleCfg)
        flags.add(parser, "--steps", field="steps", type=int, help="sampling steps")
        sample_cfg, given = flags.resolve(args, overrides, base=run_cfg.sample)
    """

    def __init__(self, section: str, schema: type, fields: Iterable[str] | None = None):
        self.section, self.schema = section, schema
        self.fields = tuple(fields) if fields is not None else tuple(f.name for f in dataclasses.fields(schema))
        self.flags: dict[str, tuple[str, str]] = {}  # argparse dest -> (flag, field)

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def add(self, parser, *flags: str, field: str, help: str, **kwargs) -> None:
        """Add a flag that sets `<section>.<field>`; it defaults to None (not given: the section's value holds)."""
        assert field in self.fields, f"{self.key(field)} is not a key this command reads"
        switch = {"store_true": "=true", "store_false": "=false"}.get(kwargs.get("action", ""), "")
        action = parser.add_argument(*flags, default=None, help=f"{help} [{self.key(field)}{switch}]", **kwargs)
        self.flags[action.dest] = (flags[0], field)

    def epilog(self, header: str) -> str:
        """`header`, then the table of this command's keys with their defaults and short flags."""
        aliases = {self.key(field): flag for flag, field in self.flags.values()}
        lines = [ln for ln in help_lines(self.schema, f"{self.section}.")
                 if ln.strip().split("=", 1)[0] in {self.key(f) for f in self.fields}]
        return f"{header}\n{key_table(lines, aliases)}"

    def resolve(self, args: argparse.Namespace, overrides: list[str], base: Any) -> tuple[Any, frozenset[str]]:
        """`base` (an instance of the section's dataclass) with the keys given as flags or key=value replaced, and
        the names of those keys. ldm.config checks every given key and value; keys of other sections, keys this
        command does not read and a key given both as a flag and as key=value are errors."""
        items: dict[str, str] = {}  # field -> dotlist item
        origin: dict[str, str] = {}  # field -> how it was given
        for dest, (flag, field) in self.flags.items():
            value = getattr(args, dest)
            if value is not None:
                items[field], origin[field] = f"{self.key(field)}={_dotlist_value(value)}", flag
        checked = getattr(load_config(None, [*items.values(), *overrides]), self.section)  # did-you-mean, types
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            field = key[len(self.section) + 1:] if key.startswith(f"{self.section}.") else None
            if field not in self.fields:
                raise ConfigError(f"{key!r} is not read by this command; it reads "
                                  f"{[self.key(f) for f in self.fields]}")
            if field in origin:
                raise ConfigError(f"{key} is given twice: as {origin[field]} and as {item!r}")
            items[field], origin[field] = item, key
        given = frozenset(items)
        return dataclasses.replace(base, **{f: getattr(checked, f) for f in given}), given
