"""Raw YAML values to the schema's field types, and each field's own checks (one place).

A value of the wrong type or outside its field's range is one :class:`ConfigError` naming the key
and what is allowed.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Mapping

from pbt_rl.config.schema import ConfigError, agent_field_metadata


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = math.nan
            if as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            result = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept it as a number.
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(result):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return result
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported type {tp}")


def switch_word(value: Any, meta: Mapping[str, Any]) -> Any:
    """YAML 1.1 reads ``on``/``off`` (and ``yes``/``no``) as booleans; a text field whose choices
    are 'on' and 'off' takes a boolean back as that word (``run.cuda_mps=off`` on the command line)."""
    if isinstance(value, bool) and {"on", "off"} <= set(meta.get("choices", ())):
        return "on" if value else "off"
    return value


def check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be >= {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be <= {meta['max']}")
        if "gt" in meta and not value > meta["gt"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be > {meta['gt']}")
        if "lt" in meta and not value < meta["lt"]:
            raise ConfigError(f"{key}: {value!r} is out of range; must be < {meta['lt']}")



def check_agent_value(name: str, value: int | float) -> None:
    """The config's range rule for one agent field (what a learner checks a new PBT value with)."""
    check_range(value, agent_field_metadata(name), f"agent.{name}")


def close_matches(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
