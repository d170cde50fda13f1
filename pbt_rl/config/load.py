"""Reading a config: YAML files (strictly), ``section.key=value`` overrides, plain mappings; and
writing one back (``to_dict``, ``dump_yaml``). Every problem is one :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from pbt_rl.config.convert import check_range, close_matches, convert, switch_word
from pbt_rl.config.schema import SECTIONS, ConfigError, ExperimentConfig, ParamSpec, PBTConfig
from pbt_rl.config.validate import validate
from pbt_rl.strict_yaml import MAX_YAML_DEPTH, DuplicateKeyError, NestingError, StrictLoader


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = sorted(fields)
            raise ConfigError(
                f"unknown key {full}{close_matches(str(key), allowed)}; "
                f"{prefix or 'top level'} allows: {', '.join(allowed)}"
            )
        if cls is PBTConfig and key == "search_space":
            kwargs[key] = _build_search_space(value, full)
            continue
        converted = convert(switch_word(value, fields[key].metadata), hints[key], full)
        check_range(converted, fields[key].metadata, full)
        kwargs[key] = converted
    return cls(**kwargs)


def _build_search_space(raw: Any, prefix: str) -> tuple[ParamSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping name -> {{kind, low, high}}, got {raw!r}")
    specs = []
    for name, spec_raw in raw.items():
        key = f"{prefix}.{name}"
        if not isinstance(spec_raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping like {{kind: log_uniform, low: 1e-4, high: 1e-2}}, got {spec_raw!r}")
        if "name" in spec_raw:
            raise ConfigError(f"{key}.name: the parameter name is the mapping key; remove 'name'")
        spec = _build_dataclass(ParamSpec, {**spec_raw}, key)
        specs.append(dataclasses.replace(spec, name=str(name)))
    return tuple(specs)


# ----------------------------------------------------------------------------------------
# Cross-field validation (one place)


def abbreviate(text: str, limit: int = 160) -> str:
    """``text`` cut in the middle when longer than ``limit``, so an error message stays readable."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value is YAML) into (path, value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. pbt.population_size=16)")
    key, raw_value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.key (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.load(raw_value, Loader=StrictLoader) if raw_value.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {key.strip()}: duplicate key {exc.key!r} in the value") from None
    except NestingError:
        raise ConfigError(f"override {key.strip()}: the value is nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
    except yaml.YAMLError:
        value = raw_value  # not YAML: the text itself, e.g. a run name
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw YAML mapping with ``section.key=value`` overrides applied."""
    import copy

    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in SECTIONS:
            raise ConfigError(
                f"override {text!r}: unknown section {path[0]!r}{close_matches(path[0], list(SECTIONS))}; "
                f"sections: {', '.join(SECTIONS)}"
            )
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return result


def from_dict(raw: Any) -> ExperimentConfig:
    """Build and validate a config from a plain mapping (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(f"unknown section {key!r}{close_matches(key, list(SECTIONS))}; sections: {', '.join(SECTIONS)}")
    sections = {name: _build_dataclass(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    return validate(ExperimentConfig(**sections))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; raise ConfigError for a missing, unreadable or non-YAML file, a key
    repeated in one mapping, or nesting deeper than :data:`MAX_YAML_DEPTH`."""
    path = Path(path)
    shown = abbreviate(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {shown}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc}") from None
    except OSError as exc:  # e.g. ENAMETOOLONG, EACCES, ELOOP; strerror leaves out the (long) path
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{shown}: {exc}") from None
    except NestingError as exc:
        raise ConfigError(f"{shown} is nested too deeply (more than {MAX_YAML_DEPTH} levels at line {exc.line})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{shown} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{shown}: expected a YAML mapping with sections {', '.join(SECTIONS)}")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML experiment file, apply CLI overrides, validate."""
    return from_dict(apply_overrides(read_yaml(path), list(overrides)))


def to_dict(config: Any) -> Any:
    """Plain, YAML-safe representation of a config (search space as a mapping)."""
    if isinstance(config, ExperimentConfig):
        return {name: to_dict(getattr(config, name)) for name in SECTIONS}
    if isinstance(config, PBTConfig):
        out = {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name != "search_space"}
        out["search_space"] = {
            spec.name: {k: v for k, v in to_dict(spec).items() if k != "name"} for spec in config.search_space
        }
        return out
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(v) for v in config]
    return config


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
